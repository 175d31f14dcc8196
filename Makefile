# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lock lint format simulator bench bench-quick bench-audit bench-scale bench-peers soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Dependencies from the hash-pinned locks only (pip refuses anything whose hash differs), then the
# project itself without resolving again; its build backend (setuptools) comes from the lock too.
# Re-lock after changing setup.cfg: make lock.
$(RUN_STAMP): requirements.lock setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(TEST_STAMP): requirements-test.lock setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-test.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@ $(RUN_STAMP)

# pip-tools in a venv of its own (inside .venv, so `make clean` removes it), apart from what it pins.
LOCK_TOOLS := $(VENV)/lock-tools
LOCK := $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --all-build-deps \
        --no-emit-index-url --no-emit-find-links
$(LOCK_TOOLS)/bin/pip-compile:
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m pip install --quiet pip-tools
lock: | $(LOCK_TOOLS)/bin/pip-compile  ## re-pin requirements.lock and requirements-test.lock after a setup.cfg change
	$(LOCK) --output-file requirements.lock setup.cfg
	$(LOCK) --extra test --output-file requirements-test.lock setup.cfg
	$(LOCK) --extra granian --output-file requirements-granian.lock setup.cfg

# DTMF_SERVER=granian make run installs granian first (requirements-granian.lock).
run: $(RUN_STAMP) $(if $(filter granian,$(DTMF_SERVER)),$(VENV)/.installed-granian)  ## dtmf-gateway serve: gunicorn (or DTMF_SERVER=granian) on 127.0.0.1:8080, sandbox mode unless CXone is configured
	$(BIN)/dtmf-gateway serve

test: $(TEST_STAMP)  ## lint, format and type checks, then the whole suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(TEST_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

simulator: $(RUN_STAMP)  ## the CXone simulator as a real HTTP server on 127.0.0.1:9000
	$(BIN)/python -m dtmf_service.simulator --host 127.0.0.1 --port 9000

bench: $(RUN_STAMP)  ## the full benchmark (about 4 minutes)
	$(BIN)/python -m bench.run

bench-quick: $(RUN_STAMP)  ## a benchmark in under a minute
	$(BIN)/python -m bench.run --quick

bench-audit: $(RUN_STAMP)  ## audit on vs off, 50 ms upstream, 64 connections, 3 rounds (about 2 minutes)
	$(BIN)/python -m bench.run --audit

bench-scale: $(TEST_STAMP)  ## backlogs of 0/100k/500k for a down sink, spool overflow, space back (about 10 minutes)
	$(BIN)/python -m bench.scale

$(VENV)/.installed-granian: requirements-granian.lock | $(RUN_STAMP)  ## the runtime set plus granian, hash-pinned
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-granian.lock
	touch $@

# ARGS=--quick (1 round of 4 s), ARGS=--profile (needs py-spy in .venv)
bench-peers: $(VENV)/.installed-granian  ## against the Go seed (../shared/peers/go-seed, golang-go), gunicorn and granian (about 9 minutes)
	$(BIN)/python -m bench.peers $(ARGS)

soak: $(RUN_STAMP)  ## audit soak: worker SIGKILLs, webhook flapping, CLI runs; a 60 s SQLite lock holder, then fleet mode with Redis killed and restarted (about 6 minutes)
	$(BIN)/python -m bench.soak_audit
	$(BIN)/python -m bench.soak_audit --redis

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .ruff_cache

# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint format simulator bench bench-quick clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## start gunicorn on 127.0.0.1:8080 (sandbox mode unless CXone is configured)
	$(BIN)/gunicorn -c gunicorn.conf.py app:app

test: $(STAMP)  ## lint, then the whole suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

simulator: $(STAMP)  ## the CXone simulator as a real HTTP server on 127.0.0.1:9000
	$(BIN)/python -m dtmf_service.simulator --host 127.0.0.1 --port 9000

bench: $(STAMP)  ## the full benchmark (about 5 minutes)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)  ## a one-minute benchmark
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .ruff_cache

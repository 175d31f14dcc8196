"""Plugin packages as a team ships them (CONTRACT.md section 7, *rev 3*), installed with pip into a
directory on PYTHONPATH and run by a real gunicorn: README's example exactly as written, a bad
plugin setting as one line, and an upgrade picked up by a graceful reload under traffic."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.helpers import BIN, ROOT, Gateway, post, read_jsonl, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_kind")]

VALID = {"digits": "12#", "timeout_ms": 5000, "sequence_matrix_key": "menu.main"}


def readme_block(language, marker):
    readme = (ROOT / "README.md").read_text()
    return next(b for b in readme.split(f"```{language}\n")[1:] if marker in b.split("```")[0]).split("```")[0]


def pip_install(source, target):
    """What a team does (`pip install`), into a directory instead of the venv so the test leaves
    the environment as it found it. No index: nothing is downloaded."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--upgrade", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip


def env_for(tmp_path, site, **extra):
    return {
        "PYTHONPATH": str(site),
        "DTMF_METRICS_DIR": str(tmp_path / "metrics"),
        "DTMF_AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
        "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{tmp_path / 'idem.db'}",
        "DTMF_ACCESS_LOG": "off",
        "DTMF_GUNICORN_LOG_LEVEL": "warning",
        "DTMF_AUDIT_BATCH_WAIT_S": "0.01",
        **extra,
    }


@pytest.fixture(scope="module")
def acme_package(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("acme")
    source = tmp_path / "acme-sink"
    (source / "acme_sink").mkdir(parents=True)
    (source / "acme_sink" / "__init__.py").write_text(readme_block("python", '"""acme_sink:'))
    (source / "pyproject.toml").write_text(readme_block("toml", "[project.entry-points.dtmf_service]"))
    site = tmp_path / "site"
    pip_install(source, site)
    return site


def check_config(env):
    return subprocess.run([str(BIN / "dtmf-gateway"), "check-config"], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_readmes_plugin_example_runs_as_written(tmp_path, acme_package, webhook):
    env = env_for(tmp_path, acme_package, DTMF_AUDIT_SINKS="acme", DTMF_ACME_URL=webhook.url,
                  DTMF_ACME_TOKEN="acme-token-value")  # fmt: skip
    with Gateway(env, workers=2, log_path=tmp_path / "gunicorn.log") as server:
        ids = [f"acme-{i}" for i in range(3)]
        for interaction in ids:
            assert post(server.url, {**VALID, "interaction_id": interaction}).status_code == 200
        wait_until(lambda: {e["interaction_id"] for e in webhook.events} >= set(ids), timeout=20)
    assert all(h.get("Authorization") == "Bearer acme-token-value" for h in webhook.headers)
    shown = check_config(env)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^ACME_URL\s+http://127\.0\.0\.1", shown.stdout, re.M)
    assert re.search(r"^ACME_TOKEN\s+\*+$", shown.stdout, re.M)  # declared a secret: masked
    assert "acme-token-value" not in shown.stdout + shown.stderr


def test_a_bad_plugin_setting_stops_start_up_with_one_line(tmp_path, acme_package):
    env = env_for(tmp_path, acme_package, DTMF_AUDIT_SINKS="acme", DTMF_ACME_URL="ftp://audit.example",
                  DTMF_ACME_TOKEN="t0ken-value")  # fmt: skip
    log = tmp_path / "gunicorn.log"
    with pytest.raises(RuntimeError, match="exited with 4"):
        Gateway(env, workers=1, log_path=log).start()
    text = log.read_text()
    assert "Traceback" not in text
    assert "AUDIT_SINKS: the plugin for 'acme': ACME_URL: an https:// URL is required" in text
    shown = check_config(env)
    assert shown.returncode == 4
    assert shown.stderr.strip().splitlines() == [
        "dtmf-gateway: configuration error: AUDIT_SINKS: the plugin for 'acme': ACME_URL: an https:// URL is"
        " required when AUDIT_SINKS includes acme"
    ]


def test_an_undeclared_key_says_that_plugins_declare_theirs(tmp_path, acme_package):
    shown = check_config(env_for(tmp_path, acme_package, DTMF_ACME_URLS="x"))
    assert shown.returncode == 4
    assert "dtmf_config_keys" in shown.stderr and "Traceback" not in shown.stderr


UPGRADE_SINK = """
import json, os
from dtmf_service import hookimpl

VERSION = {version}


class Sink:
    def __init__(self, path):
        self.path = path

    def deliver(self, event):
        with open(self.path, "a") as out:
            out.write(json.dumps({{"interaction_id": event["interaction_id"], "version": VERSION,
                                  "pid": os.getpid()}}) + "\\n")


@hookimpl
def dtmf_config_keys():
    return ["UPGRADE_SINK_PATH"]


@hookimpl
def dtmf_audit_sink(name, config):
    return Sink(config["UPGRADE_SINK_PATH"]) if name == "upgraded" else None
"""


def write_upgrade_package(source, version):
    (source / "upgrade_sink").mkdir(parents=True, exist_ok=True)
    (source / "upgrade_sink" / "__init__.py").write_text(UPGRADE_SINK.format(version=version))
    (source / "pyproject.toml").write_text(f"""
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "upgrade-sink"
version = "{version}.0.0"

[project.entry-points.dtmf_service]
upgraded = "upgrade_sink"
""")


def test_a_plugin_upgraded_with_pip_runs_in_every_new_worker_after_a_reload(tmp_path):
    source, site, out = tmp_path / "src", tmp_path / "site", tmp_path / "events.jsonl"
    write_upgrade_package(source, 1)
    pip_install(source, site)
    env = env_for(tmp_path, site, DTMF_AUDIT_SINKS="upgraded", DTMF_UPGRADE_SINK_PATH=str(out))
    with Gateway(env, workers=2, log_path=tmp_path / "gunicorn.log") as server:
        assert post(server.url, {**VALID, "interaction_id": "before"}).status_code == 200
        wait_until(lambda: [e["version"] for e in read_jsonl(out)] == [1], timeout=20)

        answers: list[int] = []
        stop = threading.Event()

        def traffic():  # callers keep calling through the reload: bounded in count and time
            deadline = time.monotonic() + 60
            while not stop.is_set() and len(answers) < 2000 and time.monotonic() < deadline:
                interaction = f"during-{uuid.uuid4().hex[:8]}"
                answers.append(post(server.url, {**VALID, "interaction_id": interaction}).status_code)

        caller = threading.Thread(target=traffic)
        caller.start()
        old = set(server.worker_pids())
        write_upgrade_package(source, 2)
        pip_install(source, site)
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_until(lambda: len(server.worker_pids()) == 2 and not old & set(server.worker_pids()), timeout=40)
        stop.set()
        caller.join(30)
        assert answers and set(answers) == {200}, "a caller was refused during the reload"

        after = [f"after-{i}" for i in range(4)]
        for interaction in after:
            assert post(server.url, {**VALID, "interaction_id": interaction}).status_code == 200
        wait_until(lambda: set(after) <= {e["interaction_id"] for e in read_jsonl(out)}, timeout=20)
    written = {e["interaction_id"]: e for e in read_jsonl(out)}
    assert {written[i]["version"] for i in after} == {2}, "a new worker still ran the old version"
    assert {written[i]["pid"] for i in after} <= set(server.worker_pids()) | {e["pid"] for e in written.values()}
    assert json.dumps(written["before"]["version"]) == "1"

"""CONTRACT.md section 11: the operator commands, as a console script, on the outbox of a running gunicorn."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from dtmf_service.audit.outbox_sqlite import SqliteOutbox
from tests.conftest import VALID
from tests.helpers import ROOT, WebhookReceiver, wait_until
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "dtmf-gateway")


def run(env, *args):
    return subprocess.run([CLI, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)


def test_check_config_masks_secrets_and_names_a_bad_key(tmp_path, gateway_env):
    env = {
        **gateway_env,
        "DTMF_CXONE_CLIENT_SECRET": "s3cr3t-value",
        "DTMF_API_KEYS": "key-one-0123456789,key-two-0123456789",
    }
    done = run(env, "check-config", "--json")
    assert done.returncode == 0, done.stderr
    values = json.loads(done.stdout)
    assert values["CXONE_CLIENT_SECRET"] == "********" and values["API_KEYS"] == ["********", "********"]
    assert "s3cr3t-value" not in done.stdout + done.stderr and "key-one" not in done.stdout + done.stderr
    bad = run({**gateway_env, "DTMF_AUDIT_DIGIT": "masked"}, "check-config")
    assert bad.returncode == 4
    assert "did you mean AUDIT_DIGITS?" in bad.stderr and "Traceback" not in bad.stderr


def test_status_dead_letters_and_redeliver_while_the_service_runs(tmp_path, gateway_env, sim_url, start_gateway):
    webhook = WebhookReceiver().start()
    webhook.reject_if = lambda event: event.get("interaction_id") == "poison-1"
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "webhook",
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
        "DTMF_AUDIT_RETRY_ATTEMPTS": "1",
        "DTMF_AUDIT_DIGITS": "masked",
    }
    try:
        gateway = start_gateway(env, workers=2)
        body = {**VALID, "interaction_id": "poison-1", "digits": "4821"}
        assert requests.post(f"{gateway.url}/api/dtmf/parse", json=body, timeout=10).status_code == 200

        def status():
            done = run(env, "audit", "status", "--json")
            return json.loads(done.stdout)["webhook"] if done.returncode == 0 else None

        wait_until(lambda: (status() or {}).get("dead_letters") == 1, timeout=20, interval=0.3)
        listed = run(env, "audit", "dead-letters", "--json")
        (letter,) = [json.loads(line) for line in listed.stdout.splitlines()]
        assert letter["event"]["interaction_id"] == "poison-1"
        assert letter["event"]["digits"] == "****" and "4821" not in listed.stdout  # as AUDIT_DIGITS allows
        # Why it failed, with the receiver's HTTP status (CONTRACT.md section 7, rev 3).
        assert letter["reason"] == "refused by the receiver: DeliveryRejected: webhook refused the event (HTTP 400)"
        assert status()["last_error"] == "DeliveryRejected: webhook refused the event (HTTP 400)"
        assert status()["last_error_at"].endswith("Z") or "+00:00" in status()["last_error_at"]
        table = run(env, "audit", "status")
        assert table.returncode == 0 and "webhook" in table.stdout
        assert "last error of webhook at " in table.stdout and "(HTTP 400)" in table.stdout
        webhook.reject_if = None  # the receiver is fixed
        again = run(env, "audit", "redeliver", "--sink", "webhook", "--event-id", letter["event_id"])
        assert again.returncode == 0 and "1 dead letter(s) back in line" in again.stdout
        wait_until(lambda: any(e["event_id"] == letter["event_id"] for e in webhook.events), timeout=20)
        assert status()["dead_letters"] == 0
        assert run(env, "audit", "redeliver").returncode != 0  # says which, or nothing happens
    finally:
        webhook.stop()


def test_the_same_commands_run_under_flask(gateway_env, tmp_path):
    env = {**gateway_env, "DTMF_AUDIT_SINKS": "file", "DTMF_AUDIT_FILE_PATH": str(tmp_path / "a.jsonl")}
    SqliteOutbox(os.path.join(env["DTMF_AUDIT_SPOOL_DIR"], "outbox.db"), ("file",), 1 << 20).close()  # the service's
    flask = str(Path(sys.executable).parent / "flask")
    done = subprocess.run(
        [flask, "--app", "app", "dtmf", "audit", "status", "--json"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["file"]["pending"] == 0


def test_an_outbox_that_cannot_be_reached_is_one_line_never_a_traceback(gateway_env, closed_port):
    env = {**gateway_env, "DTMF_AUDIT_SINKS": "file", "DTMF_AUDIT_FILE_PATH": "/tmp/unused.jsonl",
           "DTMF_AUDIT_OUTBOX": f"redis://:pw-in-url@127.0.0.1:{closed_port}/0"}  # fmt: skip
    done = run(env, "audit", "status")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the audit outbox cannot be reached: ConnectionError")
    assert "Traceback" not in done.stderr and "pw-in-url" not in done.stderr

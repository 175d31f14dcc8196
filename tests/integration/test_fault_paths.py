"""Issue 9: never press twice, never report a false outcome, with the faults produced for real.

Real gunicorn (4 workers) in front of the simulator, or of a misbehaving raw upstream on loopback.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import RedisServer, read_jsonl, wait_until
from tests.integration.conftest import dialect_env
from tests.upstreams import RawUpstream, garbage_outside_tls, make_certificate, trickle

pytestmark = pytest.mark.slow


def keyed(url, key, body=VALID, timeout=30):
    return requests.post(f"{url}/api/dtmf/parse", json=body, headers={"Idempotency-Key": key}, timeout=timeout)


@pytest.fixture
def audited_env(tmp_path, gateway_env, sim_url):
    return {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "file",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
    }


def metrics(url):
    return requests.get(f"{url}/api/metrics", timeout=5).json()


def test_tls_broken_after_the_post_is_504_unknown_and_a_keyed_retry_does_not_press_again(
    tmp_path, audited_env, sim_url, start_gunicorn
):
    cert = make_certificate(tmp_path)
    upstream = RawUpstream(garbage_outside_tls, cert)
    try:
        env = {
            **audited_env,
            "DTMF_CXONE_BASE_URL": upstream.base_url,
            "DTMF_CXONE_TOKEN_URL": f"{sim_url}/api/v2/oauth/token",
            "DTMF_CXONE_CA_BUNDLE": str(cert[0]),
        }
        gateway = start_gunicorn(env, workers=2)
        first = keyed(gateway.url, "tls-1")
        assert first.status_code == 504
        assert first.json() == {**first.json(), "status": "submission_unknown", "cxone_status": None}
        again = keyed(gateway.url, "tls-1")
        assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (504, "true")
        assert len(upstream.requests) == 1  # pressed at most once, in spite of the retry
    finally:
        upstream.close()


def test_trickling_answer_is_cut_at_the_deadline_and_a_repeat_meanwhile_is_409(audited_env, sim_url, start_gunicorn):
    upstream = RawUpstream(trickle(0.3, 60))
    try:
        env = {
            **audited_env,
            "DTMF_CXONE_BASE_URL": upstream.base_url,
            "DTMF_CXONE_TOKEN_URL": f"{sim_url}/api/v2/oauth/token",
            "DTMF_CXONE_RETRY_BUDGET_S": "1",
            "DTMF_CXONE_READ_TIMEOUT_S": "1",
        }
        gateway = start_gunicorn(env, workers=2)
        outcome = {}

        def first():
            started = time.monotonic()
            outcome["response"] = keyed(gateway.url, "slow-1")
            outcome["elapsed"] = time.monotonic() - started

        thread = threading.Thread(target=first)
        thread.start()
        wait_until(lambda: upstream.requests, timeout=10)
        repeats = []
        while thread.is_alive():
            repeats.append(keyed(gateway.url, "slow-1").status_code)
            time.sleep(0.2)
        thread.join()
        assert outcome["response"].status_code == 504
        assert outcome["response"].json()["status"] == "submission_unknown"
        assert outcome["elapsed"] < 2.0 + 1.0  # budget + read timeout, plus process overhead
        assert repeats and set(repeats) == {409}
        assert len(upstream.requests) == 1
    finally:
        upstream.close()


LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def test_sqlite_store_locked_by_another_process_after_cxone_answered(tmp_path, audited_env, sim, start_gunicorn):
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 1.0, "body": {"ok": True}}])
    gateway = start_gunicorn(audited_env, workers=2)
    db_path = audited_env["DTMF_IDEMPOTENCY_STORE"][len("sqlite:///") :]
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", keyed(gateway.url, "locked-1")))
    thread.start()
    wait_until(lambda: sim.seen("dtmf"), timeout=10)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, db_path, "4"], stdout=subprocess.PIPE)
    assert locker.stdout.readline().strip() == b"locked"
    thread.join(30)
    response = result["r"]
    assert response.status_code == 200  # the digits were played: the caller is told so
    assert response.json()["status"] == "dtmf_submitted"
    (event,) = wait_until(lambda: read_jsonl(tmp_path / "audit.jsonl"))
    assert (event["outcome"], event["cxone_status"]) == ("dtmf_submitted", 200)
    figures = metrics(gateway.url)
    assert (figures["successful_parses"], figures["submission_failures"]) == (1, 0)
    assert figures["idempotency_store_errors"] == 1
    locker.wait(10)

    # Once the lock is gone the outcome is written in the background: the retry is a replay.
    def replayed():
        again = keyed(gateway.url, "locked-1")
        return again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"

    wait_until(replayed, timeout=15, interval=0.3)
    assert len(sim.seen("dtmf")) == 1
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM idempotency WHERE state='in_flight'").fetchone()[0] == 0


def test_redis_killed_mid_request_still_answers_the_truth(tmp_path, audited_env, sim, start_gunicorn):
    if RedisServer.BINARY is None:
        pytest.skip("REDIS NOT INSTALLED: .ci/run installs redis-server")
    redis_server = RedisServer(tmp_path / "redis", persistent=True)
    (tmp_path / "redis").mkdir()
    redis_server.start()
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 1.0, "body": {"ok": True}}])
    env = {**audited_env, "DTMF_IDEMPOTENCY_STORE": redis_server.url, "DTMF_IDEMPOTENCY_HASH_KEY": "k"}
    gateway = start_gunicorn(env, workers=2)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", keyed(gateway.url, "redis-1")))
    thread.start()
    wait_until(lambda: sim.seen("dtmf"), timeout=10)
    redis_server.kill()
    thread.join(30)
    assert result["r"].status_code == 200
    assert result["r"].json()["status"] == "dtmf_submitted"
    (event,) = wait_until(lambda: read_jsonl(tmp_path / "audit.jsonl"))
    assert event["outcome"] == "dtmf_submitted"
    assert metrics(gateway.url)["idempotency_store_errors"] == 1
    redis_server.start()  # same port and append-only file: the in-flight mark is still there

    def replayed():
        again = keyed(gateway.url, "redis-1")
        return again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"

    try:
        wait_until(replayed, timeout=20, interval=0.3)
        assert len(sim.seen("dtmf")) == 1
    finally:
        redis_server.stop()


def test_worker_killed_mid_request_leaves_the_key_taken_and_then_unknown(audited_env, sim, start_gunicorn):
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 3.0, "body": {"ok": True}}])
    gateway = start_gunicorn(audited_env, workers=1)
    (worker,) = gateway.worker_pids()
    thread = threading.Thread(target=lambda: _swallow(lambda: keyed(gateway.url, "killed-1")))
    thread.start()
    wait_until(lambda: sim.seen("dtmf"), timeout=10)
    os.kill(worker, signal.SIGKILL)
    thread.join(30)
    wait_until(lambda: len(gateway.worker_pids()) == 1 and gateway.worker_pids() != [worker], timeout=20)
    # The mark outlives the dead worker: no repeat is processed beside (or after) the first.
    repeat = keyed(gateway.url, "killed-1")
    assert repeat.status_code == 409
    # When its lease has lapsed (simulated: the lease moved into the past), the outcome reads as unknown.
    db_path = audited_env["DTMF_IDEMPOTENCY_STORE"][len("sqlite:///") :]
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE idempotency SET lease=0")
    later = keyed(gateway.url, "killed-1")
    assert (later.status_code, later.json()["status"]) == (504, "submission_unknown")
    assert later.headers.get("Idempotent-Replayed") == "true"
    assert len(sim.seen("dtmf")) == 1


def _swallow(call):
    try:
        call()
    except requests.RequestException:
        pass

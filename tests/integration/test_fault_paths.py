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
from tests.helpers import RedisServer, healthy, read_jsonl, wait_until
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
    tmp_path, audited_env, sim_url, start_gateway
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
        gateway = start_gateway(env, workers=2)
        first = keyed(gateway.url, "tls-1")
        assert first.status_code == 504
        assert first.json() == {**first.json(), "status": "submission_unknown", "cxone_status": None}
        again = keyed(gateway.url, "tls-1")
        assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (504, "true")
        assert len(upstream.requests) == 1  # pressed at most once, in spite of the retry
    finally:
        upstream.close()


def test_trickling_answer_is_cut_at_the_deadline_and_a_repeat_meanwhile_is_409(audited_env, sim_url, start_gateway):
    upstream = RawUpstream(trickle(0.3, 60))
    try:
        env = {
            **audited_env,
            "DTMF_CXONE_BASE_URL": upstream.base_url,
            "DTMF_CXONE_TOKEN_URL": f"{sim_url}/api/v2/oauth/token",
            "DTMF_CXONE_RETRY_BUDGET_S": "1",
            "DTMF_CXONE_READ_TIMEOUT_S": "1",
        }
        gateway = start_gateway(env, workers=2)
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


def test_sqlite_store_locked_by_another_process_after_cxone_answered(tmp_path, audited_env, sim, start_gateway):
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 1.0, "body": {"ok": True}}])
    gateway = start_gateway(audited_env, workers=2)
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


def test_redis_killed_mid_request_still_answers_the_truth(tmp_path, audited_env, sim, start_gateway):
    if RedisServer.BINARY is None:
        pytest.skip("REDIS NOT INSTALLED: .ci/run installs redis-server")
    redis_server = RedisServer(tmp_path / "redis", persistent=True)
    (tmp_path / "redis").mkdir()
    redis_server.start()
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 1.0, "body": {"ok": True}}])
    env = {**audited_env, "DTMF_IDEMPOTENCY_STORE": redis_server.url, "DTMF_IDEMPOTENCY_HASH_KEY": "k"}
    gateway = start_gateway(env, workers=2)
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


def test_worker_killed_mid_request_leaves_the_key_taken_and_then_unknown(audited_env, sim, start_gateway):
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 3.0, "body": {"ok": True}}])
    gateway = start_gateway(audited_env, workers=1)
    (worker,) = gateway.worker_pids()
    thread = threading.Thread(target=lambda: _swallow(lambda: keyed(gateway.url, "killed-1")))
    thread.start()
    wait_until(lambda: sim.seen("dtmf"), timeout=10)
    os.kill(worker, signal.SIGKILL)
    thread.join(30)
    wait_until(lambda: len(gateway.worker_pids()) == 1 and gateway.worker_pids() != [worker], timeout=20)
    wait_until(lambda: healthy(gateway.url), timeout=20)  # granian: the new worker listens once booted
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


def test_a_body_nested_980_deep_is_400_counted_and_audited_under_gunicorn(tmp_path, audited_env, start_gateway):
    gateway = start_gateway(audited_env, workers=1)
    deep = "[" * 980 + "]" * 980
    body = '{"interaction_id":"c","digits":"1","timeout_ms":5000,"sequence_matrix_key":' + deep + "}"
    response = requests.post(
        f"{gateway.url}/api/dtmf/parse", data=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert (response.status_code, response.json()["status"]) == (400, "invalid_request")
    assert metrics(gateway.url)["validation_failures"] == 1
    (event,) = wait_until(lambda: read_jsonl(tmp_path / "audit.jsonl"))
    assert event["outcome"] == "invalid_request"


def test_file_sink_on_a_full_disk_keeps_whole_lines_and_loses_nothing(
    tmp_path, small_tmpfs, audited_env, start_gateway
):
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"x" * (60 * 1024))  # leave about 4 KiB: a few events fit, then the disk is full
    audit = small_tmpfs / "audit.jsonl"
    env = {**audited_env, "DTMF_AUDIT_FILE_PATH": str(audit), "DTMF_AUDIT_BACKOFF_MAX_S": "0.5"}
    gateway = start_gateway(env, workers=2)
    answered = 0
    for _ in range(30):
        assert requests.post(f"{gateway.url}/api/dtmf/parse", json=VALID, timeout=10).status_code == 200
        answered += 1
    time.sleep(1.0)  # let the sinks hit the full disk
    assert all(line for line in audit.read_bytes().split(b"\n")[:-1])
    [__import__("json").loads(line) for line in audit.read_text().splitlines()]  # every line parses
    filler.unlink()
    # Room again: every answered request's event arrives, whole, none dropped.
    wait_until(lambda: len({e["event_id"] for e in read_jsonl(audit)}) == answered, timeout=30, interval=0.2)
    assert metrics(gateway.url)["audit_dropped"] == 0


def test_an_outbox_folder_deleted_at_run_time_loses_nothing(tmp_path, gateway_env, sim_url, start_gateway):
    import shutil

    from tests.helpers import WebhookReceiver

    receiver = WebhookReceiver().start()
    receiver.stop()  # down: events wait in the outbox
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "webhook",
        "DTMF_AUDIT_WEBHOOK_URL": receiver.url,
        "DTMF_AUDIT_RETRY_ATTEMPTS": "1",
        "DTMF_AUDIT_BACKOFF_MAX_S": "0.5",
    }
    gateway = start_gateway(env, workers=2)
    for _ in range(5):
        assert requests.post(f"{gateway.url}/api/dtmf/parse", json=VALID, timeout=10).status_code == 200
    wait_until(lambda: metrics(gateway.url)["audit_pending"] == 5, timeout=15)
    shutil.rmtree(gateway_env["DTMF_AUDIT_SPOOL_DIR"])  # outbox, its WAL and the journals, with 5 undelivered
    for _ in range(5):
        assert requests.post(f"{gateway.url}/api/dtmf/parse", json=VALID, timeout=10).status_code == 200
    wait_until(lambda: (metrics(gateway.url)["audit_pending"] or 0) >= 10, timeout=15)
    receiver.start()
    try:
        wait_until(lambda: len(set(receiver.ids())) == 10, timeout=30, interval=0.2)
        assert metrics(gateway.url)["audit_dropped"] == 0
    finally:
        receiver.stop()


@pytest.mark.parametrize("path", ["/api//dtmf/parse", "//api/dtmf/parse"])
def test_no_redirect_and_options_is_405_through_real_gunicorn(audited_env, start_gateway, path):
    import http.client

    gateway = start_gateway(audited_env, workers=1)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request("POST", path, body=b"{}", headers={"Host": "evil.example", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert (response.status, response.getheader("Location")) == (404, None)
    assert response.getheader("Content-Type") == "application/json"
    response.read()
    conn.request("OPTIONS", "/api/dtmf/parse")
    options = conn.getresponse()
    assert (options.status, options.getheader("Allow")) == (405, "POST")
    assert __import__("json").loads(options.read())["status"] == "invalid_request"
    conn.close()

"""CONTRACT.md section 7 rev 3 through real gunicorn: audit never holds a caller back while another
process holds the outbox's write lock, and an outbox deleted at run time is copied into its new file
once per host, not once per worker.
"""

import os
import shutil
import signal
import threading
import time
import uuid

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import SqliteLockHolder, WebhookReceiver, read_jsonl, wait_until
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow

LOCK_S = 15.0  # the soak (make soak) holds it for 60 s
BUDGET_S = 1.0  # the contract's budget is 50 ms of audit work; this bound stays robust on a loaded 2-core box


def _metrics(url):
    return requests.get(f"{url}/api/metrics", timeout=10).json()


def test_a_process_holding_the_outbox_lock_never_holds_an_answer_back(tmp_path, gateway_env, sim_url, start_gateway):
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "file",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
    }
    server = start_gateway(env, workers=2, threads=8)
    for _ in range(4):
        assert requests.post(f"{server.url}/api/dtmf/parse", json=VALID, timeout=10).status_code == 200
    holder = SqliteLockHolder(tmp_path / "spool" / "outbox.db").hold()
    answered: dict[str, float] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + LOCK_S

    def caller():
        session = requests.Session()
        for _ in range(2000):  # bounded in count and in time
            if time.monotonic() > deadline:
                break
            rid = uuid.uuid4().hex
            started = time.monotonic()
            try:
                response = session.post(f"{server.url}/api/dtmf/parse", json=VALID, headers={"X-Request-ID": rid},
                                        timeout=60)  # fmt: skip
            except requests.RequestException:
                session = requests.Session()  # its worker was killed: no answer, no promise
                continue
            assert response.status_code == 200
            with lock:
                answered[rid] = time.monotonic() - started

    try:
        callers = [threading.Thread(target=caller) for _ in range(6)]
        for thread in callers:
            thread.start()
        time.sleep(2.0)
        os.kill(server.worker_pids()[0], signal.SIGKILL)  # its replacement boots while the lock is held
        for thread in callers:
            thread.join(120)
        during = _metrics(server.url)
        assert server.proc.poll() is None and len(server.worker_pids()) == 2
    finally:
        holder.release()
    worst = max(answered.values())
    print(f"{len(answered)} answers while the outbox was locked for {LOCK_S:.0f} s; the slowest took {worst:.3f} s")
    assert worst < BUDGET_S, f"an answer waited {worst:.2f} s while the outbox was locked"
    assert len(answered) > 2 * 128 * 2, "too few requests to take every journal slot of both workers"
    wait_until(lambda: set(answered) <= {e.get("request_id") for e in read_jsonl(tmp_path / "audit.jsonl")},
               timeout=60, interval=0.5)  # fmt: skip
    after = _metrics(server.url)
    assert during["audit_pending"] >= len(answered)  # waiting in the journals: pending, not lost
    assert (during["audit_dropped"], after["audit_dropped"]) == (0, 0)
    assert after["audit_outbox_errors"] == 0


def test_an_outbox_deleted_at_run_time_is_copied_once_per_host(tmp_path, gateway_env, sim_url, start_gateway):
    receiver = WebhookReceiver().start()
    receiver.stop()  # down: events wait in the outbox
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "webhook",
        "DTMF_AUDIT_WEBHOOK_URL": receiver.url,
        "DTMF_AUDIT_BACKOFF_MAX_S": "0.5",
    }
    server = start_gateway(env, workers=4, threads=4)
    for _ in range(20):
        assert requests.post(f"{server.url}/api/dtmf/parse", json=VALID, timeout=10).status_code == 200
    wait_until(lambda: _metrics(server.url)["audit_pending"] == 20, timeout=15)
    shutil.rmtree(gateway_env["DTMF_AUDIT_SPOOL_DIR"])  # outbox, WAL and journals, 20 undelivered
    wait_until(lambda: (_metrics(server.url)["audit_pending"] or 0) >= 20, timeout=15)
    time.sleep(3.0)  # every worker's maintenance round (once a second) has noticed
    receiver.start()
    try:
        wait_until(lambda: len(set(receiver.ids())) == 20, timeout=30, interval=0.2)
        wait_until(lambda: _metrics(server.url)["audit_pending"] == 0, timeout=30, interval=0.2)
        assert len(receiver.ids()) == 20, f"{len(receiver.ids()) - 20} duplicate deliveries"
        assert _metrics(server.url)["audit_dropped"] == 0
    finally:
        receiver.stop()

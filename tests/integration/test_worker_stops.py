"""CONTRACT.md section 7 rev 3: every way a worker stops keeps an answered request's audit event with
the outcome the caller received. Real gunicorn, a slow simulator, requests in flight when the worker
is told to stop; afterwards the file sink holds, for each answered request, the outcome its caller
saw (and never a recovered ``submission_unknown`` in its place).
"""

import signal
import threading
import time
import uuid

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import read_jsonl, wait_until
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow

IN_FLIGHT = 6


def _env(tmp_path, gateway_env, sim_url, **extra):
    return {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "file",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
        "DTMF_AUDIT_LEASE_S": "2",
        **extra,
    }


def _callers(url, count):
    """``count`` callers posting at once; each remembers the status its caller saw (None: no answer)."""
    seen: dict[str, str | None] = {}

    def call(rid):
        try:
            response = requests.post(f"{url}/api/dtmf/parse", json=VALID, headers={"X-Request-ID": rid}, timeout=30)
            seen[rid] = response.json().get("status")
        except (requests.RequestException, ValueError):
            seen[rid] = None

    threads = [threading.Thread(target=call, args=(uuid.uuid4().hex,)) for _ in range(count)]
    for thread in threads:
        thread.start()
    return seen, threads


def _assert_each_answer_audited_as_answered(tmp_path, seen):
    answered = {rid: status for rid, status in seen.items() if status is not None}
    assert answered, "no request was answered"

    def audited():
        events = read_jsonl(tmp_path / "audit.jsonl")
        found: dict[str, set[str]] = {}
        for event in events:
            found.setdefault(event.get("request_id"), set()).add(event["outcome"])
        return found if set(answered) <= set(found) else None

    found = wait_until(audited, timeout=40, interval=0.3)
    wrong = {rid: (status, found[rid]) for rid, status in answered.items() if found[rid] != {status}}
    assert not wrong, f"audited outcomes differ from the answers the callers got: {wrong}"


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGQUIT, marks=pytest.mark.gunicorn_only("gunicorn's quick stop; granian has none")),
        signal.SIGINT,
        pytest.param(signal.SIGABRT, marks=pytest.mark.gunicorn_only("gunicorn's timeout kill; granian has none")),
        signal.SIGTERM,
    ],
    ids=["SIGQUIT", "SIGINT", "SIGABRT-timeout-kill", "SIGTERM"],
)
def test_a_worker_stopped_with_requests_in_flight_keeps_every_answered_outcome(
    sig, tmp_path, gateway_env, sim, sim_url, start_gateway
):
    server = start_gateway(_env(tmp_path, gateway_env, sim_url), workers=1, threads=IN_FLIGHT + 2)
    (worker,) = server.worker_pids()
    assert requests.post(f"{server.url}/api/dtmf/parse", json=VALID, timeout=10).status_code == 200  # token fetched
    sim.configure(delay_s=1.5)  # every DTMF POST now waits on "CXone"
    before = len(sim.seen("dtmf"))
    seen, threads = _callers(server.url, IN_FLIGHT)
    wait_until(lambda: len(sim.seen("dtmf")) - before == IN_FLIGHT, timeout=10)
    __import__("os").kill(worker, sig)  # with every request waiting on CXone
    for thread in threads:
        thread.join(40)
    assert list(seen.values()) == ["dtmf_submitted"] * IN_FLIGHT  # the stop let each request finish
    sim.configure(delay_s=0)
    wait_until(lambda: len(server.worker_pids()) == 1 and server.worker_pids() != [worker], timeout=30)
    _assert_each_answer_audited_as_answered(tmp_path, seen)


@pytest.mark.gunicorn_only("max_requests is a gunicorn setting")
def test_max_requests_with_requests_in_flight_keeps_every_answered_outcome(
    tmp_path, gateway_env, sim, sim_url, start_gateway
):
    env = _env(tmp_path, gateway_env, sim_url, GUNICORN_CMD_ARGS="--max-requests 3")
    server = start_gateway(env, workers=1, threads=IN_FLIGHT + 2)
    (worker,) = server.worker_pids()
    sim.configure(delay_s=1.0)
    seen, threads = _callers(server.url, IN_FLIGHT)  # the worker restarts after 3, with others in flight
    for thread in threads:
        thread.join(40)
    sim.configure(delay_s=0)
    wait_until(lambda: server.worker_pids() and server.worker_pids() != [worker], timeout=30)
    time.sleep(0.5)
    _assert_each_answer_audited_as_answered(tmp_path, seen)

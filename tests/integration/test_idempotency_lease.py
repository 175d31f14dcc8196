"""Issue 17 item 7, CONTRACT.md section 9 *rev 3*: the in-flight mark of an Idempotency-Key lives as
long as its request can, whatever IDEMPOTENCY_TTL_S says. Real gunicorn, the simulator as its own
process (presses counted there), SQLite and a real redis-server."""

import os
import signal
import threading
import time

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import wait_until
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow


def keyed(url, key, interaction_id, timeout=30):
    body = {**VALID, "interaction_id": interaction_id}
    return requests.post(f"{url}/api/dtmf/parse", json=body, headers={"Idempotency-Key": key}, timeout=timeout)


def in_background(call):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("response", call()), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture(params=["sqlite", "redis"])
def store_env(request, tmp_path):
    if request.param == "sqlite":
        return {}
    return {"DTMF_IDEMPOTENCY_STORE": request.getfixturevalue("redis_url")}


def test_a_replay_window_shorter_than_the_request_never_presses_twice(
    sim_process, gateway_env, start_gateway, store_env
):
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_process.url),
        **store_env,
        "DTMF_IDEMPOTENCY_TTL_S": "1",  # far below the 4 s CXone takes, and the 30 s of the killed request
    }
    gateway = start_gateway(env, workers=2, threads=4)

    # 1. A same-key retry while the first request still waits on CXone.
    sim_process.script("dtmf:slow-1", [{"status": 200, "delay_s": 4, "body": {"ok": True}}])
    first, result = in_background(lambda: keyed(gateway.url, "k-slow", "slow-1"))
    wait_until(lambda: sim_process.presses("slow-1") == 1, timeout=10)
    time.sleep(1.5)  # past IDEMPOTENCY_TTL_S
    retry = keyed(gateway.url, "k-slow", "slow-1")
    assert (retry.status_code, retry.json()["status"]) == (409, "idempotency_in_progress")
    first.join(15)
    assert result["response"].status_code == 200
    assert sim_process.presses("slow-1") == 1

    # 2. A same-key retry after the first request's worker was SIGKILLed mid-request.
    sim_process.script("dtmf:killed-1", [{"status": 200, "delay_s": 30, "body": {"ok": True}}])
    doomed, _ = in_background(lambda: keyed(gateway.url, "k-kill", "killed-1", timeout=40))
    wait_until(lambda: sim_process.presses("killed-1") == 1, timeout=10)
    for pid in gateway.worker_pids():  # whichever worker holds it
        os.kill(pid, signal.SIGKILL)
    doomed.join(10)
    time.sleep(1.5)  # past IDEMPOTENCY_TTL_S
    wait_until(lambda: len(gateway.worker_pids()) == 2, timeout=20)
    (retry,) = wait_until(lambda: _answered(gateway.url, "k-kill", "killed-1"), timeout=20)
    # Its lease (the request's deadline plus margin) has not lapsed: in flight, never processed again.
    assert (retry.status_code, retry.json()["status"]) == (409, "idempotency_in_progress")
    assert sim_process.presses("killed-1") == 1


def _answered(url, key, interaction_id):
    try:
        return (keyed(url, key, interaction_id, timeout=10),)  # a tuple: a 409 response is falsy
    except requests.ConnectionError:
        return None  # the new workers are still starting


def test_fingerprint_key_from_configuration_only(sim_process, gateway_env, start_gateway, tmp_path):
    """Issue 18 item 2: outside sandbox mode no key means no start (one line); in sandbox mode the
    master's in-memory key is shared by all its workers, and no key file is ever written."""
    store_dir = tmp_path / "idem"
    base = {**gateway_env, "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{store_dir / 'idem.db'}"}
    upstream = {k: v for k, v in dialect_env("tutorial", sim_process.url).items() if k != "DTMF_IDEMPOTENCY_HASH_KEY"}
    refused = {k: v for k, v in {**base, **upstream}.items() if k != "DTMF_IDEMPOTENCY_HASH_KEY"}
    with pytest.raises(RuntimeError, match="exited with 4") as info:
        start_gateway(refused, workers=2, threads=2)
    lines = [line for line in str(info.value).splitlines() if "IDEMPOTENCY_HASH_KEY" in line]
    assert lines and "required outside sandbox mode" in lines[0]

    sandbox = {k: v for k, v in base.items() if k != "DTMF_IDEMPOTENCY_HASH_KEY"}
    gateway = start_gateway(sandbox, workers=3, threads=2)
    answers = []
    for _ in range(9):  # new connections: spread over the three workers
        with requests.Session() as session:
            r = session.post(
                f"{gateway.url}/api/dtmf/parse", json=VALID, headers={"Idempotency-Key": "s-1"}, timeout=10
            )
            answers.append((r.status_code, r.headers.get("Idempotent-Replayed")))
    assert answers == [(200, None)] + [(200, "true")] * 8  # no 422: every worker fingerprints alike
    assert {p.name for p in store_dir.iterdir()} <= {"idem.db", "idem.db-wal", "idem.db-shm"}


def test_redis_release_and_finish_touch_only_their_own_claim(redis_url):
    """The owner token on Redis (Lua scripts): a stray release or a late finish of another claim of
    the same key never frees or overwrites this request's mark; the mark outlives a short TTL."""
    from dtmf_service.idempotency.stores import RedisStore, Stored

    store = RedisStore(redis_url)
    try:
        assert store.claim("k", "fp", "first", 40.0, 1) is None
        assert 40 <= store._redis.ttl("dtmf:idem:k") <= 41  # lease + replay window, not the 1 s window
        store.release("k", "someone-else")
        store.finish("k", "someone-else", Stored("done", "fp", 200, "{}"), 60)
        assert store.claim("k", "fp", "second", 40.0, 1).state == "in_flight"
        store.finish("k", "first", Stored("done", "fp", 200, '{"status":"dtmf_submitted"}'), 60)
        replay = store.claim("k", "fp", "third", 40.0, 1)
        assert (replay.state, replay.status) == ("done", 200)
        assert store.claim("j", "fp", "fourth", 40.0, 1) is None
        store.release("j", "fourth")
        assert store.claim("j", "fp", "fifth", 40.0, 1) is None  # released: processed anew
    finally:
        store.close()

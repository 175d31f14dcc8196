"""CONTRACT.md section 9: Idempotency-Key shared by 4 workers (SQLite) and by two instances (real Redis)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import VALID
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow


def race(urls, key, body, count=24):
    """Fire ``count`` identical keyed requests at once, spread over ``urls``."""

    def send(i):
        with requests.Session() as s:
            r = s.post(f"{urls[i % len(urls)]}/api/dtmf/parse", json=body, headers={"Idempotency-Key": key}, timeout=30)
            return r.status_code, r.headers.get("Idempotent-Replayed"), r.json()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(send, range(count)))


def check_race(results, sim, urls):
    processed = [r for r in results if r[0] == 200 and r[1] is None]
    replayed = [r for r in results if r[0] == 200 and r[1] == "true"]
    in_flight = [r for r in results if r[0] == 409]
    assert len(processed) == 1
    assert len(processed) + len(replayed) + len(in_flight) == len(results)
    assert all(r[2] == processed[0][2] for r in replayed)
    assert len(sim.seen("dtmf")) == 1  # the keys were pressed once
    for url in urls:  # afterwards every instance replays the stored answer
        again = requests.post(f"{url}/api/dtmf/parse", json=VALID, headers={"Idempotency-Key": "k-1"}, timeout=10)
        assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (200, "true")
        conflict = requests.post(
            f"{url}/api/dtmf/parse", json={**VALID, "digits": "0"}, headers={"Idempotency-Key": "k-1"}, timeout=10
        )
        assert (conflict.status_code, conflict.json()["status"]) == (422, "idempotency_conflict")


def test_sqlite_store_shared_by_four_workers(sim, sim_url, gateway_env, start_gateway):
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 0.3, "body": {"ok": True}}])
    gateway = start_gateway({**gateway_env, **dialect_env("tutorial", sim_url)}, workers=4)
    check_race(race([gateway.url], "k-1", VALID), sim, [gateway.url])


def test_redis_store_shared_by_two_instances(sim, sim_url, gateway_env, start_gateway, redis_url, tmp_path):
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 0.3, "body": {"ok": True}}])
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_IDEMPOTENCY_STORE": redis_url,
        "DTMF_IDEMPOTENCY_HASH_KEY": "shared-fingerprint-key",
    }
    first = start_gateway({**env, "DTMF_METRICS_DIR": str(tmp_path / "m1")}, workers=2)
    second = start_gateway({**env, "DTMF_METRICS_DIR": str(tmp_path / "m2")}, workers=2)
    urls = [first.url, second.url]
    check_race(race(urls, "k-1", VALID), sim, urls)

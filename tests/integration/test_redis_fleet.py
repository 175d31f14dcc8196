"""Issue 17 item 5 and issue 19 item 3: fleet mode through Redis trouble, with real redis-server and
redis-sentinel processes on loopback (CONTRACT.md section 7 *rev 3*).

Answered requests are known by the X-Request-ID each one sends, which the audit event carries.
"""

import ast
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
import requests

from dtmf_service.audit.outbox_redis import RedisOutbox
from tests.conftest import VALID
from tests.helpers import RedisSentinelTrio, RedisServer, read_jsonl, wait_until
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow

_BUDGET_S = 2.0  # far above an answer's time here; an answer that waited on Redis would take 3-5 s


def make_event(**extra):
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", **extra}


class Callers:
    """A few caller threads for a bounded time; the request ids answered and the slowest answer."""

    def __init__(self, url, threads=3, headers=None, answers=None):
        self.url, self.threads, self.headers = url, threads, headers or (lambda: {})
        self.answers = answers  # the statuses that count as answered (default: every counted one)
        self.answered: set[str] = set()
        self.slowest = 0.0
        self.statuses: dict[int, int] = {}
        self._lock = threading.Lock()

    def _call(self, deadline):
        with requests.Session() as session:
            while time.monotonic() < deadline:
                rid = uuid.uuid4().hex
                started = time.monotonic()
                try:
                    response = session.post(f"{self.url}/api/dtmf/parse", json=VALID,
                                            headers={"X-Request-ID": rid, **self.headers()}, timeout=10)  # fmt: skip
                except requests.RequestException:
                    continue
                with self._lock:
                    self.slowest = max(self.slowest, time.monotonic() - started)
                    self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
                    if response.status_code != 401 if self.answers is None else response.status_code in self.answers:
                        self.answered.add(rid)

    def run(self, seconds, during=None):
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._call, args=(deadline,)) for _ in range(self.threads)]
        for thread in threads:
            thread.start()
        if during is not None:
            during()
        for thread in threads:
            thread.join(30)
        return self


def fleet_env(tmp_path, gateway_env, sim_url, outbox_url, **extra):
    return {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "file",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
        "DTMF_AUDIT_OUTBOX": outbox_url,
        "DTMF_AUDIT_LEASE_S": "2",
        "DTMF_AUDIT_BACKOFF_BASE_S": "0.05",
        "DTMF_AUDIT_BACKOFF_MAX_S": "0.5",
        **extra,
    }


def delivered(tmp_path):
    return {event.get("request_id") for event in read_jsonl(tmp_path / "audit.jsonl")}


def test_redis_stopped_restarted_empty_and_killed_under_load(tmp_path, gateway_env, sim_url, redis_server,
                                                             start_gateway):  # fmt: skip
    """Answers never wait on Redis; every answered event reaches the sink once Redis is back, the
    groups are created again after a restart without persistence, within one lease."""
    server = start_gateway(fleet_env(tmp_path, gateway_env, sim_url, redis_server.url), workers=2, threads=4)
    before = Callers(server.url).run(1.0)
    wait_until(lambda: before.answered <= delivered(tmp_path), timeout=20)

    redis_server.stop()  # no persistence: it comes back empty, without the consumer groups
    outage = Callers(server.url).run(1.5)
    assert outage.answered and outage.slowest < _BUDGET_S, (len(outage.answered), outage.slowest)
    outage_figures = requests.get(f"{server.url}/api/metrics", timeout=10).json()
    redis_server.start()
    after = Callers(server.url).run(1.0)
    # Every process resumes within one lease (2 s) of Redis being back; the rest is slack for load.
    wait_until(lambda: outage.answered | after.answered <= delivered(tmp_path), timeout=20)
    groups = redis.Redis(port=redis_server.port).xinfo_groups("dtmf:audit:events")
    assert [g["name"] for g in groups] == [b"file"]
    # Waiting is not lost: nothing was counted dropped or failed to be written, during or after.
    figures = requests.get(f"{server.url}/api/metrics", timeout=10).json()
    for counts in (outage_figures, figures):
        assert counts["audit_dropped"] == 0 and counts["audit_outbox_errors"] == 0, counts
    assert figures["audit_pending"] == 0

    redis_server.stop()
    redis_server.persistent = True  # from here on an AOF, as production would have
    redis_server.start()

    def kill_and_restart():
        time.sleep(0.7)
        redis_server.kill()
        time.sleep(0.8)
        redis_server.start()

    killed = Callers(server.url).run(2.5, during=kill_and_restart)
    assert killed.answered and killed.slowest < _BUDGET_S, (len(killed.answered), killed.slowest)
    wait_until(lambda: killed.answered <= delivered(tmp_path), timeout=20)


def test_a_host_without_a_sink_never_trims_its_unread_entries_and_counts_drops_per_group(redis_url):
    b_host = RedisOutbox(redis_url, ("b",), 64 * 1024 * 1024)
    assert b_host.claim("b", "host-b:1", 10, 30.0) == []  # group b exists; its sink is down from here on
    mine = [make_event() for _ in range(150)]
    for event in mine:
        b_host.commit(event)
    # Another host in a rolling change, configured with sink a only: it delivers its own and trims.
    script = (
        "import sys, uuid\n"
        "from dtmf_service.audit.outbox_redis import RedisOutbox\n"
        "box = RedisOutbox(sys.argv[1], ('a',), int(sys.argv[2]))\n"
        "for _ in range(150):\n"
        "    box.commit({'event_id': str(uuid.uuid4()), 'outcome': 'dtmf_submitted'})\n"
        "while (claimed := box.claim('a', 'host-a:1', 100, 30.0)):\n"
        "    box.ack('a', [c.ref for c in claimed])\n"
        "print(box.enforce_bound())\n"
    )

    def other_host(max_bytes):
        run = subprocess.run([sys.executable, "-c", script, redis_url, str(max_bytes)],
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        return run.stdout.strip()

    assert other_host(64 * 1024 * 1024) == "{}"
    unread = b_host.claim("b", "host-b:1", 1000, 30.0)  # (the other host's events are routed to a only)
    assert [c.event["event_id"] for c in unread] == [e["event_id"] for e in mine]  # none trimmed
    # Under the size bound the other host drops b's entries too, and counts them for b.
    assert ast.literal_eval(other_host(1)) == {"b": 150}
    assert b_host.backlog()["b"].dropped == 150


def test_the_bound_is_the_streams_real_memory(redis_url):
    bound = 1024 * 1024
    box = RedisOutbox(redis_url, ("a",), bound)
    for _ in range(3000):
        box.commit(make_event(cxone_response="x" * 400))  # about 520 bytes each in the stream
    r = redis.Redis.from_url(redis_url)
    assert r.memory_usage("dtmf:audit:events") > 1.2 * bound
    dropped = box.enforce_bound()
    used = r.memory_usage("dtmf:audit:events")
    assert 0.8 * bound <= used <= bound, used  # the bound is used, not half of it
    assert dropped == {"a": 3000 - r.xlen("dtmf:audit:events")}
    assert box.backlog()["a"].dropped == dropped["a"] and box.enforce_bound() == {}  # counted once


def test_trimming_gives_a_caught_up_backlogs_memory_back_at_once(redis_url, tmp_path):
    """One maintenance round after catch-up trims every settled entry (exact MINID, no LIMIT)."""
    r = redis.Redis.from_url(redis_url)
    box = RedisOutbox(redis_url, ("a",), 512 * 1024 * 1024, str(tmp_path / "journals"))
    box.commit(make_event())
    assert box.flush(10)
    box.enforce_bound()
    baseline = r.info("memory")["used_memory"]
    for _ in range(11000):  # a backlog while the sink was down, built through the outbox
        box.commit(make_event(cxone_response="x" * 300))
    assert box.flush(30)
    peak = r.info("memory")["used_memory"]
    while claimed := box.claim("a", "c", 1000, 30.0):  # the sink is back: caught up
        box.ack("a", [c.ref for c in claimed])
    box.enforce_bound()
    assert r.xlen("dtmf:audit:events") == 0
    assert r.info("memory")["used_memory"] - baseline <= 0.2 * (peak - baseline)
    box.close()


def test_the_journal_keeps_each_event_until_a_replica_has_it(redis_server, tmp_path):
    r = redis.Redis(port=redis_server.port)
    r.config_set("repl-diskless-sync-delay", 0)
    box = RedisOutbox(f"{redis_server.url}?wait_replicas=1&wait_ms=50", ("a",), 64 << 20, str(tmp_path / "journals"))
    for _ in range(600):  # more than the journal's slots: the rest spill to a file beside it
        box.commit(make_event())
    wait_until(lambda: r.xlen("dtmf:audit:events") >= 600)  # in Redis, deliverable from there...
    assert not box.flush(0.3) and box.waiting_on_host() == 600  # ...and kept here: no replica has them
    (tmp_path / "replica").mkdir()
    replica = RedisServer(tmp_path / "replica")
    replica.extra = ["--replicaof", "127.0.0.1", str(redis_server.port)]
    replica.start()
    try:
        assert box.flush(15) and box.waiting_on_host() == 0
    finally:
        box.close()
        replica.stop()


def test_a_dead_processes_journal_and_spill_reach_redis_through_another_process(redis_server, tmp_path):
    journals = str(tmp_path / "journals")
    redis_server.stop()
    script = (
        "import os, sys, uuid\n"
        "from dtmf_service.audit.outbox_redis import RedisOutbox\n"
        "box = RedisOutbox(sys.argv[1], ('a',), 64 << 20, sys.argv[2])\n"
        "for _ in range(600):\n"
        "    event_id = str(uuid.uuid4())\n"
        "    box.commit({'event_id': event_id, 'outcome': 'dtmf_submitted'})\n"
        "    print(event_id, flush=True)\n"
        "os._exit(0)\n"  # dies with every event still on the host: Redis is down
    )
    run = subprocess.run([sys.executable, "-c", script, redis_server.url, journals],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    answered = set(run.stdout.split())
    assert len(answered) == 600
    redis_server.start()
    other = RedisOutbox(redis_server.url, ("a",), 64 << 20, journals)
    assert other.recover() == 600
    claimed = other.claim("a", "c", 1000, 30.0)
    assert {c.event["event_id"] for c in claimed} == answered
    assert os.listdir(journals) == []
    other.close()


@pytest.fixture
def sentinels(tmp_path):
    if RedisSentinelTrio.BINARY is None or RedisSentinelTrio.master_binary() is None:
        pytest.skip("REDIS-SENTINEL NOT INSTALLED: .ci/run installs redis-sentinel; these tests did not run")
    trio = RedisSentinelTrio(tmp_path / "sentinel").start()
    yield trio
    trio.stop()


def test_sentinel_failover_with_the_master_killed_under_load_loses_no_answered_event(
    tmp_path, gateway_env, sim_url, sentinels, start_gateway
):
    env = fleet_env(tmp_path, gateway_env, sim_url, sentinels.url,
                    DTMF_IDEMPOTENCY_STORE=sentinels.url, DTMF_IDEMPOTENCY_HASH_KEY="k" * 32)  # fmt: skip
    server = start_gateway(env, workers=2, threads=4)

    def post(key):
        return requests.post(f"{server.url}/api/dtmf/parse", json=VALID, headers={"Idempotency-Key": key}, timeout=10)

    first = post("before-failover")
    assert first.status_code == 200

    def kill_master():
        time.sleep(1.0)
        sentinels.master.kill()

    # Keyed requests: the idempotency store fails over too (while it has no master a keyed request
    # fails before CXone is called; only the answers that pressed are counted here).
    keyed = Callers(server.url, headers=lambda: {"Idempotency-Key": uuid.uuid4().hex}, answers={200})
    load = keyed.run(4.0, during=kill_master)
    wait_until(lambda: sentinels.master_port() == sentinels.replica.port, timeout=15)
    assert load.answered and load.slowest < 10
    wait_until(lambda: load.answered <= delivered(tmp_path), timeout=30)
    # The idempotency store follows the new master: a replay of a key stored before, a new key.
    replay = post("before-failover")
    assert replay.status_code == 200 and replay.headers.get("Idempotent-Replayed") == "true"
    assert post("after-failover").status_code == 200
    assert post("after-failover").headers.get("Idempotent-Replayed") == "true"

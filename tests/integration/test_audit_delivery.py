"""Audit sinks behind real gunicorn: every event reaches every sink; nothing lost across a restart."""

import json
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import Gateway, UdpReceiver, post, wait_until
from tests.integration.conftest import dialect_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_kind")]


@pytest.fixture
def udp_servers():
    syslog, statsd = UdpReceiver(), UdpReceiver()
    yield syslog, statsd
    syslog.close()
    statsd.close()


def sinks_env(tmp_path, webhook, syslog_port, statsd_port):
    return {
        "DTMF_AUDIT_SINKS": "file,webhook,syslog",
        "DTMF_METRICS_EXPORTERS": "memory,statsd",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
        "DTMF_AUDIT_SYSLOG_ADDRESS": f"udp://127.0.0.1:{syslog_port}",
        "DTMF_STATSD_PORT": str(statsd_port),
        "DTMF_AUDIT_BACKOFF_BASE_S": "0.05",
        "DTMF_AUDIT_BACKOFF_MAX_S": "0.5",
    }


def file_ids(tmp_path):
    path = tmp_path / "audit.jsonl"
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines()] if path.exists() else []


def audit_pending(url):
    return requests.get(f"{url}/api/metrics", timeout=5).json()["audit_pending"]


def send_many(url, bodies, workers=16):
    def send(body):
        with requests.Session() as session:
            return session.post(f"{url}/api/dtmf/parse", json=body, timeout=30).status_code

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(send, bodies))


def test_every_event_reaches_every_sink_exactly_once(
    tmp_path, sim_url, gateway_env, start_gateway, webhook, udp_servers
):
    syslog, statsd = udp_servers
    env = {**gateway_env, **dialect_env("tutorial", sim_url), **sinks_env(tmp_path, webhook, syslog.port, statsd.port)}
    gateway = start_gateway(env)
    bodies = [VALID] * 200 + [{**VALID, "digits": "no"}] * 50 + [{**VALID, "interaction_id": "missing-3"}] * 50
    statuses = send_many(gateway.url, bodies)
    assert len(statuses) == 300
    wait_until(
        lambda: len(webhook.ids()) >= 300 and len(file_ids(tmp_path)) >= 300 and len(syslog.datagrams) >= 300,
        timeout=30,
    )
    wait_until(lambda: audit_pending(gateway.url) == 0, timeout=10)
    hook_ids, disk_ids = webhook.ids(), file_ids(tmp_path)
    # RFC 5424: the JSON message follows "<PRI>1 TIMESTAMP HOST APP PID audit - ".
    syslog_ids = [json.loads(d.decode().split(" ", 7)[7])["event_id"] for d in syslog.datagrams]
    assert len(set(hook_ids)) == len(hook_ids) == 300
    assert set(hook_ids) == set(disk_ids) == set(syslog_ids)
    assert len(disk_ids) == len(syslog_ids) == 300
    outcomes = sorted(e["outcome"] for e in webhook.events)
    assert outcomes.count("dtmf_submitted") == 200 and outcomes.count("validation_failed") == 50
    wait_until(
        lambda: (
            sum(d.count(b"p.total_submissions") + d.count(b"dtmf.total_submissions") for d in statsd.datagrams) >= 300
        ),
        timeout=10,
    )
    totals = sum(d.count(b"dtmf.total_submissions:1|c") for d in statsd.datagrams)
    assert totals == 300
    body = requests.get(f"{gateway.url}/api/metrics", timeout=5).json()
    assert body["audit_sinks"]["webhook"]["audit_delivered"] == 300
    assert body["audit_dropped"] == 0


def test_webhook_down_across_a_restart_loses_nothing(tmp_path, sim_url, gateway_env, webhook, udp_servers):
    syslog, statsd = udp_servers
    webhook.stop()  # down: the port is closed
    env = {**gateway_env, **dialect_env("tutorial", sim_url), **sinks_env(tmp_path, webhook, syslog.port, statsd.port)}
    first = Gateway(env, workers=4, log_path=tmp_path / "g1.log").start()
    try:
        statuses = send_many(first.url, [VALID] * 120)
        assert statuses == [200] * 120
        wait_until(lambda: len(file_ids(tmp_path)) == 120, timeout=20)
    finally:
        assert first.stop(signal.SIGTERM) == 0  # graceful: the webhook's events wait in the outbox
    expected = set(file_ids(tmp_path))
    assert len(expected) == 120
    webhook.start()
    second = Gateway(env, workers=4, log_path=tmp_path / "g2.log").start()
    try:
        wait_until(lambda: set(webhook.ids()) >= expected, timeout=30)
        wait_until(lambda: audit_pending(second.url) == 0, timeout=10)
    finally:
        second.stop()
    assert set(webhook.ids()) == expected  # at least once; receivers deduplicate on event_id


def test_slow_webhook_does_not_slow_callers(tmp_path, sim_url, gateway_env, start_gateway, webhook, udp_servers):
    syslog, statsd = udp_servers
    webhook.delay_s = 1.0
    env = {**gateway_env, **dialect_env("tutorial", sim_url), **sinks_env(tmp_path, webhook, syslog.port, statsd.port)}
    gateway = start_gateway(env)
    latencies = []
    with requests.Session() as session:
        for _ in range(40):
            started = time.perf_counter()
            assert session.post(f"{gateway.url}/api/dtmf/parse", json=VALID, timeout=30).status_code == 200
            latencies.append(time.perf_counter() - started)
    # Each event costs the receiver 1 s; the callers must not feel it (generous bound for a busy CI machine).
    assert statistics.median(latencies) < 0.25
    assert max(latencies) < 1.0


def test_sigterm_during_a_retry_wait_completes_the_request_and_keeps_its_event(
    tmp_path, sim, sim_url, gateway_env, webhook, udp_servers
):
    syslog, statsd = udp_servers
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        **sinks_env(tmp_path, webhook, syslog.port, statsd.port),
        "DTMF_CXONE_BACKOFF_MAX_S": "8",
    }
    server = Gateway(env, workers=2, log_path=tmp_path / "g.log").start()
    sim.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": "2"}}])
    result = {}

    def call():
        result["response"] = post(server.url, VALID)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: len(sim.seen("dtmf")) == 1, timeout=10)  # first attempt answered 429: now waiting 2 s
    server.stop(signal.SIGTERM)
    caller.join(30)
    response = result["response"]
    assert response.status_code == 200
    assert response.json()["attempts"] == 2
    # The event was in the outbox before the answer left; delivered already, or waiting for the next start.
    from dtmf_service.audit.outbox_sqlite import SqliteOutbox

    backlog = SqliteOutbox(str(tmp_path / "spool" / "outbox.db"), ("file",), 1 << 30).backlog()
    assert len(file_ids(tmp_path)) + backlog["file"].pending == 1


def test_sighup_reload_with_the_webhook_down_loses_nothing(tmp_path, sim_url, gateway_env, webhook, udp_servers):
    syslog, statsd = udp_servers
    webhook.stop()
    env = {**gateway_env, **dialect_env("tutorial", sim_url), **sinks_env(tmp_path, webhook, syslog.port, statsd.port)}
    server = Gateway(env, workers=2, log_path=tmp_path / "g.log").start()
    try:
        assert send_many(server.url, [VALID] * 60) == [200] * 60
        wait_until(lambda: len(file_ids(tmp_path)) == 60, timeout=20)
        expected = set(file_ids(tmp_path))
        old_workers = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)  # new workers start and deliver what the old ones left
        wait_until(lambda: not (set(server.worker_pids()) & old_workers) and len(server.worker_pids()) == 2, timeout=30)
        webhook.start()
        wait_until(lambda: set(webhook.ids()) >= expected, timeout=30)
    finally:
        server.stop()


def test_unauthenticated_requests_are_neither_counted_nor_audited(
    tmp_path, sim_url, gateway_env, start_gateway, webhook, udp_servers
):
    syslog, statsd = udp_servers
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        **sinks_env(tmp_path, webhook, syslog.port, statsd.port),
        "DTMF_API_KEYS": "k-1-0123456789abcdef",
        "DTMF_METRICS_PUBLIC": "true",
    }
    gateway = start_gateway(env, workers=2)
    assert post(gateway.url, VALID).status_code == 401
    assert post(gateway.url, VALID, {"Authorization": "Bearer k-1-0123456789abcdef"}).status_code == 200
    wait_until(lambda: len(file_ids(tmp_path)) == 1, timeout=10)
    time.sleep(0.3)
    assert len(file_ids(tmp_path)) == 1
    assert requests.get(f"{gateway.url}/api/metrics", timeout=5).json()["total_submissions"] == 1


def test_a_refused_event_becomes_a_dead_letter_and_never_blocks_the_batch(
    tmp_path, sim_url, gateway_env, start_gateway, webhook, udp_servers
):
    syslog, statsd = udp_servers
    webhook.reject_if = lambda event: event.get("interaction_id") == "poison-1"
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        **sinks_env(tmp_path, webhook, syslog.port, statsd.port),
        "DTMF_AUDIT_SINKS": "webhook",
        "DTMF_AUDIT_WEBHOOK_BATCH_MAX": "20",
        "DTMF_AUDIT_RETRY_ATTEMPTS": "2",
        "DTMF_METRICS_PUBLIC": "true",
    }
    gateway = start_gateway(env, workers=2)
    assert post(gateway.url, {**VALID, "interaction_id": "poison-1"}).status_code == 200
    assert send_many(gateway.url, [VALID] * 30) == [200] * 30
    wait_until(lambda: len(webhook.events) == 30, timeout=20)  # the rest went through, batched
    assert all(e["interaction_id"] == "call-1" for e in webhook.events)
    assert any(h.get("Content-Type") == "application/x-ndjson" for h in webhook.headers)

    def dead_lettered():
        figures = requests.get(f"{gateway.url}/api/metrics", timeout=5).json()["audit_sinks"]["webhook"]
        return figures["audit_dead_letters"] == 1 and figures["audit_pending"] == 0

    wait_until(dead_lettered, timeout=20)


def test_an_upgrade_delivers_what_the_previous_versions_spool_held(
    tmp_path, sim_url, gateway_env, start_gateway, webhook
):
    import uuid

    legacy = tmp_path / "spool" / "webhook"
    legacy.mkdir(parents=True)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    (legacy / f"{time.time_ns():020d}-77-0-n4.jsonl").write_text(
        "".join(json.dumps({"event_id": i, "outcome": "dtmf_submitted"}) + "\n" for i in ids)
    )
    env = {**gateway_env, **dialect_env("tutorial", sim_url), "DTMF_AUDIT_SINKS": "webhook",
           "DTMF_AUDIT_WEBHOOK_URL": webhook.url}  # fmt: skip
    start_gateway(env, workers=2)
    wait_until(lambda: set(webhook.ids()) >= set(ids), timeout=20)
    assert not list(legacy.iterdir())

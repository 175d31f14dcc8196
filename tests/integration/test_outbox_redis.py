"""Issue 10, fleet mode: the audit outbox on Redis Streams with a real redis-server on loopback."""

import os
import signal
import time
import uuid

import pytest

from dtmf_service.audit.outbox_redis import RedisOutbox
from tests.helpers import Gateway, WebhookReceiver, wait_until
from tests.integration.conftest import dialect_env
from tests.integration.test_audit_crashes import Load, request_ids

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_kind")]


def make_event(**extra):
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", **extra}


@pytest.fixture
def box(redis_url):
    outbox = RedisOutbox(redis_url, ("a", "b"), 64 * 1024 * 1024)
    yield outbox
    outbox.close()


def test_a_dead_consumers_events_are_claimed_again_after_the_lease(box):
    events = [make_event() for _ in range(5)]
    for event in events:
        box.commit(event)
    assert len(box.claim("a", "host1:111", 10, lease_s=0.5)) == 5  # host1 dies holding them
    assert box.claim("a", "host2:222", 10, lease_s=0.5) == []
    time.sleep(0.6)
    again = box.claim("a", "host2:222", 10, lease_s=0.5)
    assert [c.event["event_id"] for c in again] == [e["event_id"] for e in events]
    assert all(c.attempts == 2 for c in again)
    box.ack("a", [c.ref for c in again])
    assert box.backlog()["a"].pending == 0 and box.backlog()["b"].pending == 5  # each sink its own group


def test_retry_waits_its_delay_and_dead_letters_go_back_to_their_own_sink(box):
    event = make_event()
    box.commit(event)
    (first,) = box.claim("a", "c1", 10, lease_s=5.0)
    box.retry("a", [first.ref], 0.3)
    assert box.claim("a", "c1", 10, lease_s=5.0) == []
    time.sleep(0.35)
    (again,) = box.claim("a", "c1", 10, lease_s=5.0)
    box.dead_letter("a", again, "refused")
    assert box.backlog()["a"].dead_letters == 1 and box.backlog()["a"].pending == 0
    assert [letter["event_id"] for letter in box.dead_letters("a")] == [event["event_id"]]
    assert box.redeliver("a") == 1
    (redelivered,) = box.claim("a", "c1", 10, lease_s=5.0)
    assert redelivered.event == event
    b_events = [c.event["event_id"] for c in box.claim("b", "c1", 10, lease_s=5.0)]
    assert b_events == [event["event_id"]]  # b got the original once, not the redelivery


def test_placeholders_are_recovered_by_any_host_once_the_lease_lapses(box, redis_url):
    box.intend(make_event(outcome="submission_unknown"), lease_s=0.0)
    box.intend(make_event(outcome="submission_unknown"), lease_s=600)
    other_host = RedisOutbox(redis_url, ("a", "b"), 64 * 1024 * 1024)
    assert other_host.recover() == 1 and box.recover() == 0
    (claimed,) = box.claim("a", "c", 10, 5.0)
    assert claimed.event["recovered"] is True


def test_two_instances_share_the_outbox_and_one_delivers_the_others_events_after_sigkill(tmp_path, sim_url, redis_url):
    webhook = WebhookReceiver().start()
    webhook.delay_s = 1.5  # deliveries are in flight, held by their consumer, when it dies
    common = {
        **dialect_env("tutorial", sim_url),
        "DTMF_ACCESS_LOG": "off",
        "DTMF_GUNICORN_LOG_LEVEL": "warning",
        "DTMF_AUDIT_SINKS": "webhook",
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
        "DTMF_AUDIT_OUTBOX": redis_url,
        "DTMF_AUDIT_LEASE_S": "2",
        "DTMF_AUDIT_BACKOFF_MAX_S": "0.5",
    }

    def env(name):
        return {
            **common,
            "DTMF_METRICS_DIR": str(tmp_path / f"metrics-{name}"),
            "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{tmp_path / name / 'idem.db'}",
        }

    doomed = Gateway(env("a"), workers=2, threads=8, log_path=tmp_path / "a.log").start()
    survivor = Gateway(env("b"), workers=2, threads=8, log_path=tmp_path / "b.log").start()
    try:
        answered = Load(lambda: doomed.url, threads=4, seconds=3.0).run()
        assert len(answered) > 20
        os.killpg(doomed.proc.pid, signal.SIGKILL)  # the host dies for good
        doomed.proc.wait(10)
        webhook.delay_s = 0
        wait_until(lambda: answered <= request_ids(webhook.events), timeout=60, interval=0.5)
    finally:
        survivor.stop()
        doomed.stop()
        webhook.stop()


def test_outbox_redis_is_configured_from_the_environment(redis_url, make_app):
    app = make_app(AUDIT_SINKS=["file"], AUDIT_FILE_PATH="/dev/null", AUDIT_OUTBOX=redis_url)
    assert isinstance(app.extensions["dtmf"].outbox, RedisOutbox)

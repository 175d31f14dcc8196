"""CONTRACT.md section 7, delivery from the outbox: at least once, leases, backoff, dead letters, bound, intents.

A real SQLite outbox in tmp_path; real file sinks; forked processes where processes matter.
"""

import json
import multiprocessing
import os
import threading
import time
import uuid

import pytest

from dtmf_service import DeliveryIncomplete, DeliveryRejected
from dtmf_service.audit.delivery import DeliveryEngine, SinkDelivery
from dtmf_service.audit.outbox_sqlite import SqliteOutbox
from dtmf_service.metrics import Metrics
from plugins.file import FileSink
from tests.helpers import wait_until


def make_event(**extra):
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", **extra}


class FlakySink:
    """A sink that fails while ``down`` is set, refuses ``refuse`` ids for good, and records what it got."""

    def __init__(self):
        self.down = False
        self.refuse = set()
        self.received = []
        self.delay_s = 0.0

    def deliver(self, event):
        if self.delay_s:
            time.sleep(self.delay_s)
        if event["event_id"] in self.refuse:
            raise DeliveryRejected("no")
        if self.down:
            raise ConnectionError("receiver down")
        self.received.append(event["event_id"])


@pytest.fixture
def config(tmp_path):
    return {
        "AUDIT_BATCH_SIZE": 50,
        "AUDIT_BATCH_WAIT_S": 0.01,
        "AUDIT_RETRY_ATTEMPTS": 2,
        "AUDIT_BACKOFF_BASE_S": 0.01,
        "AUDIT_BACKOFF_MAX_S": 0.05,
        "AUDIT_LEASE_S": 30.0,
        "AUDIT_SPOOL_MAX_MB": 512,
        "AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
    }


@pytest.fixture
def counters(tmp_path):
    return Metrics(str(tmp_path / "metrics"))


@pytest.fixture
def outbox_path(tmp_path):
    return str(tmp_path / "spool" / "outbox.db")


class SettledOutbox(SqliteOutbox):
    """Each commit waits until the writer thread has moved the event from the journal into SQLite,
    so a test can read the backlog right after committing."""

    def commit(self, event, ticket=None):
        super().commit(event, ticket)
        assert self.flush(5)


def outbox(path, sinks=("s",), max_bytes=1 << 30):
    return SettledOutbox(path, sinks, max_bytes)


def run_until(delivery, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not delivery.step("test"):
            time.sleep(0.01)
    raise AssertionError("condition not met")


def test_events_reach_a_healthy_sink_exactly_once(config, counters, outbox_path):
    box, sink = outbox(outbox_path), FlakySink()
    events = [make_event() for _ in range(120)]
    for event in events:
        box.commit(event)
    delivery = SinkDelivery("s", sink, box, config, counters)
    run_until(delivery, lambda: len(sink.received) == 120)
    assert sink.received == [e["event_id"] for e in events]  # in order, once each
    assert box.backlog()["s"].pending == 0
    assert counters.counters.totals()["audit.s.delivered"] == 120


def test_partial_batch_failure_resends_only_the_failed_events(config, counters, outbox_path):
    box = outbox(outbox_path)
    events = [make_event() for _ in range(10)]
    for event in events:
        box.commit(event)
    calls = []

    class HalfSink:
        def deliver(self, event):
            raise AssertionError("deliver_many is used")

        def deliver_many(self, batch):
            calls.append([e["event_id"] for e in batch])
            if len(calls) == 1:
                raise DeliveryIncomplete(batch[5:]) from ConnectionError("half")

    delivery = SinkDelivery("s", HalfSink(), box, config, counters)
    run_until(delivery, lambda: box.backlog()["s"].pending == 0)
    assert calls[1] == [e["event_id"] for e in events[5:]]


def test_a_down_sink_keeps_everything_and_gets_it_when_it_returns(config, counters, outbox_path):
    box, sink = outbox(outbox_path), FlakySink()
    sink.down = True
    for _ in range(40):
        box.commit(make_event())
    delivery = SinkDelivery("s", sink, box, config, counters)
    for _ in range(20):
        delivery.step("test")
        time.sleep(0.01)
    backlog = box.backlog()["s"]
    assert backlog.pending == 40 and backlog.oldest_pending_s is not None
    assert counters.counters.totals()["audit.s.failed_attempts"] >= 2
    sink.down = False
    run_until(delivery, lambda: len(set(sink.received)) == 40)


def test_a_new_process_delivers_what_an_earlier_one_left(config, counters, outbox_path):
    first = outbox(outbox_path)
    events = [make_event() for _ in range(25)]
    for event in events:
        first.commit(event)
    first.close()
    sink = FlakySink()
    delivery = SinkDelivery("s", sink, outbox(outbox_path), config, counters)
    run_until(delivery, lambda: len(sink.received) == 25)


def test_events_claimed_by_a_dead_consumer_are_claimed_again_after_the_lease(outbox_path):
    box = outbox(outbox_path)
    for _ in range(5):
        box.commit(make_event())
    assert len(box.claim("s", "dead-process", 10, lease_s=0.3)) == 5  # then it "dies": no ack
    assert box.claim("s", "other", 10, lease_s=30) == []  # leased: nobody else takes them
    time.sleep(0.35)
    again = box.claim("s", "other", 10, lease_s=30)
    assert len(again) == 5 and all(c.attempts == 2 for c in again)


def test_a_refused_event_becomes_a_dead_letter_and_never_blocks_the_rest(config, counters, outbox_path):
    box, sink = outbox(outbox_path), FlakySink()
    events = [make_event() for _ in range(6)]
    sink.refuse = {events[0]["event_id"]}
    for event in events:
        box.commit(event)
    delivery = SinkDelivery("s", sink, box, config, counters)
    run_until(delivery, lambda: len(sink.received) == 5)  # the ones behind went through at once
    run_until(delivery, lambda: box.backlog()["s"].dead_letters == 1)
    (letter,) = box.dead_letters("s")
    assert letter["event_id"] == events[0]["event_id"] and letter["event"] == events[0]
    assert box.backlog()["s"].pending == 0
    assert counters.counters.totals()["audit.s.dead_letters"] == 1
    # Put back in line (the operator fixed the receiver): delivered, and only to its own sink.
    sink.refuse = set()
    assert box.redeliver("s") == 1
    run_until(delivery, lambda: len(sink.received) == 6)
    assert box.backlog()["s"].dead_letters == 0


def test_the_outbox_is_bounded_oldest_dropped_and_counted_per_sink(outbox_path):
    box = SqliteOutbox(outbox_path, ("a", "b"), 6 * 1024 * 1024)  # the 2 MiB journal and the WAL count too
    ids = []
    for _ in range(4000):
        event = make_event(pad="x" * 400)
        ids.append(event["event_id"])
        box.commit(event)
    assert box.flush(10)
    dropped = box.enforce_bound()
    assert dropped["a"] == dropped["b"] > 0
    backlog = box.backlog()
    assert backlog["a"].dropped == dropped["a"]
    assert backlog["a"].pending == 4000 - dropped["a"]
    claimed = box.claim("a", "c", 1, 30)
    assert claimed[0].event["event_id"] == ids[dropped["a"]]  # the oldest went first


def test_a_placeholder_becomes_submission_unknown_when_its_process_is_gone(outbox_path):
    box = outbox(outbox_path)
    event = make_event(outcome="submission_unknown")
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=lambda: outbox(outbox_path).intend(event, lease_s=600))
    child.start()
    child.join(10)  # the process that wrote the placeholder is gone, its lease far from over
    alive = make_event(outcome="submission_unknown")
    box.intend(alive, lease_s=600)  # this process lives on: its request may still be running
    assert box.recover() == 1
    (claimed,) = box.claim("s", "c", 10, 30)
    assert claimed.event["event_id"] == event["event_id"]
    assert claimed.event["outcome"] == "submission_unknown" and claimed.event["recovered"] is True
    assert box.recover() == 0  # recovered once only


def test_commit_replaces_the_placeholder_and_a_live_process_keeps_its_own(outbox_path):
    box = outbox(outbox_path)
    answered, running = make_event(outcome="submission_unknown"), make_event(outcome="submission_unknown")
    ticket = box.intend(answered, lease_s=0.0)
    box.intend(running, lease_s=0.0)
    box.commit({**answered, "outcome": "dtmf_submitted"}, ticket)
    assert box.recover() == 0  # this process is alive: its request is still running, whatever the lease
    outcomes = {c.event["event_id"]: c.event["outcome"] for c in box.claim("s", "c", 10, 30)}
    assert outcomes == {answered["event_id"]: "dtmf_submitted"}


def test_without_journal_room_placeholders_go_through_sqlite_and_lapse_with_their_lease(outbox_path):
    from dtmf_service.audit.journal import Journal

    box = outbox(outbox_path)
    box._journal = Journal(box._journal.directory, slots=0)  # every slot taken
    lapsed, answered = make_event(outcome="submission_unknown"), make_event(outcome="submission_unknown")
    assert box.intend(lapsed, lease_s=0.0) is None
    box.intend(answered, lease_s=600)
    box.commit({**answered, "outcome": "dtmf_submitted"})
    assert box.recover() == 1
    outcomes = {c.event["event_id"]: c.event["outcome"] for c in box.claim("s", "c", 10, 30)}
    assert outcomes == {lapsed["event_id"]: "submission_unknown", answered["event_id"]: "dtmf_submitted"}


def _deliver_into_file(path, out_path, metrics_dir, config):
    delivery = SinkDelivery("file", FileSink(out_path, "never"), outbox(path, ("file",)), config,
                            Metrics(metrics_dir))  # fmt: skip
    idle = 0
    while idle < 20:
        idle = 0 if delivery.step(f"p{os.getpid()}") else idle + 1
        time.sleep(0.005)


def test_four_processes_share_one_outbox_without_double_delivery(tmp_path, config, outbox_path):
    box = SqliteOutbox(outbox_path, ("file",), 1 << 30)
    ids = []
    for _ in range(600):
        event = make_event()
        ids.append(event["event_id"])
        box.commit(event)
    assert box.flush(10)
    out = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    small = {**config, "AUDIT_BATCH_SIZE": 7}
    procs = [
        ctx.Process(target=_deliver_into_file, args=(outbox_path, str(out), str(tmp_path / "m"), small))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    delivered = [json.loads(line)["event_id"] for line in out.read_text().splitlines()]
    assert sorted(delivered) == sorted(ids)  # every event once: none twice, none skipped
    assert box.backlog()["file"].pending == 0


def test_one_sink_down_never_delays_another(config, counters, outbox_path):
    down, up = FlakySink(), FlakySink()
    down.down = True
    down.delay_s = 0.2
    box = outbox(outbox_path, ("down", "up"))
    engine = DeliveryEngine({"down": down, "up": up}, box, config, counters)
    engine.start()
    for _ in range(20):
        box.commit(make_event())
        engine.notify()
    wait_until(lambda: len(up.received) == 20, timeout=5)
    engine.stop(1)


def test_file_sink_lines_never_interleave_across_threads(tmp_path):
    sink = FileSink(str(tmp_path / "a.jsonl"), "never")
    big = "y" * 5000

    def write():
        for _ in range(200):
            sink.deliver({"event_id": str(uuid.uuid4()), "pad": big})

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == 800
    assert all(json.loads(line)["pad"] == big for line in lines)


def test_the_outbox_file_is_private(outbox_path):
    import stat

    outbox(outbox_path)
    assert stat.S_IMODE(os.stat(outbox_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(outbox_path)).st_mode) == 0o700


def test_an_outbox_deleted_at_run_time_moves_into_a_new_file(outbox_path):
    import shutil

    box = outbox(outbox_path)
    for _ in range(5):
        box.commit(make_event())
    shutil.rmtree(os.path.dirname(outbox_path))
    moved = []
    # The maintenance round may run on a thread that opens its first connection only now.
    thread = threading.Thread(target=lambda: moved.append(box.check_file()))
    thread.start()
    thread.join(10)
    assert moved == [5]
    assert box.backlog()["s"].pending == 5
    assert box.check_file() == 0  # once


def test_an_earlier_versions_spool_is_imported_for_its_own_sink(tmp_path, outbox_path):
    box = outbox(outbox_path, ("file", "webhook"))
    legacy = os.path.join(os.path.dirname(outbox_path), "webhook")
    os.makedirs(legacy)
    events = [make_event() for _ in range(3)]
    lines = "".join(json.dumps(e) + "\n" for e in events) + '{"event_id": "torn'
    with open(os.path.join(legacy, f"{time.time_ns():020d}-12-0-n4.jsonl"), "w") as handle:
        handle.write(lines)
    assert box.import_legacy_spool() == 3
    assert not os.listdir(legacy)
    assert box.backlog()["webhook"].pending == 3 and box.backlog()["file"].pending == 0
    assert box.import_legacy_spool() == 0

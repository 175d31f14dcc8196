"""CONTRACT.md section 7, delivery: never block the caller, keep what failed, spool, bound, share."""

import json
import logging
import multiprocessing
import os
import threading
import time
import uuid

import pytest

from dtmf_service import DeliveryIncomplete
from dtmf_service.delivery import SinkWorker
from dtmf_service.metrics import SharedCounters
from dtmf_service.spool import Spool
from plugins.file import FileSink
from tests.helpers import wait_until


def make_event():
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted"}


class FlakySink:
    """A sink that fails while ``down`` is set, and records what it received."""

    def __init__(self):
        self.down = False
        self.received = []
        self.delay_s = 0.0

    def deliver(self, event):
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.down:
            raise ConnectionError("receiver down")
        self.received.append(event["event_id"])


@pytest.fixture
def config(tmp_path):
    return {
        "AUDIT_QUEUE_SIZE": 1000,
        "AUDIT_BATCH_SIZE": 50,
        "AUDIT_RETRY_ATTEMPTS": 2,
        "AUDIT_BACKOFF_BASE_S": 0.01,
        "AUDIT_BACKOFF_MAX_S": 0.05,
        "AUDIT_SPOOL_MAX_MB": 512,
        "AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
    }


@pytest.fixture
def counters(tmp_path):
    return SharedCounters(str(tmp_path / "metrics"))


def test_events_reach_a_healthy_sink_exactly_once(config, counters):
    sink = FlakySink()
    worker = SinkWorker("s", sink, config, counters)
    events = [make_event() for _ in range(300)]
    for e in events:
        worker.submit(e)
    assert worker.flush(10)
    assert sorted(sink.received) == sorted(e["event_id"] for e in events)
    assert counters.totals()["audit.s.delivered"] == 300
    worker.close(2)


class PartlyFailingSink:
    """A batch sink that refuses chosen events on their first try and reports just those."""

    def __init__(self, refuse_once):
        self.refuse_once = set(refuse_once)
        self.received = []
        self.batches = []

    def deliver_many(self, events):
        self.batches.append([e["event_id"] for e in events])
        refused = [e for e in events if e["event_id"] in self.refuse_once]
        self.received += [e["event_id"] for e in events if e not in refused]
        self.refuse_once -= {e["event_id"] for e in refused}
        if refused:
            raise DeliveryIncomplete(refused) from ConnectionError("two of them timed out")

    def deliver(self, event):
        self.deliver_many([event])


def test_partial_batch_failure_resends_only_the_failed_events(config, counters, caplog):
    events = [make_event() for _ in range(20)]
    sink = PartlyFailingSink({events[4]["event_id"], events[11]["event_id"]})
    worker = SinkWorker("s", sink, config, counters)
    for e in events:
        worker.submit(e)
    assert worker.flush(10)
    worker.close(2)
    # Exactly once each: the 18 delivered with the first try were not sent again.
    assert sorted(sink.received) == sorted(e["event_id"] for e in events)
    # 20 sends and 2 resends, whichever batches the events fell into.
    assert sum(len(batch) for batch in sink.batches) == 22
    totals = counters.totals()
    assert totals["audit.s.delivered"] == 20 and totals["audit.s.failed_attempts"] in (1, 2)
    assert "delivery failed (ConnectionError)" in caplog.text  # the cause, not the wrapper


def test_submit_never_blocks_on_a_slow_sink(config, counters):
    sink = FlakySink()
    sink.delay_s = 1.0
    worker = SinkWorker("s", sink, config, counters)
    started = time.monotonic()
    for _ in range(100):
        worker.submit(make_event())
    assert time.monotonic() - started < 0.5
    worker.close(0.2)


def test_failed_events_are_spooled_then_delivered_when_the_sink_returns(config, counters):
    sink = FlakySink()
    sink.down = True
    worker = SinkWorker("s", sink, config, counters)
    events = [make_event() for _ in range(40)]
    for e in events:
        worker.submit(e)
    wait_until(lambda: worker.spool.pending() == 40, timeout=10)
    assert counters.totals()["audit.s.failed_attempts"] >= 2
    sink.down = False
    wait_until(lambda: len(set(sink.received)) == 40, timeout=20)
    wait_until(lambda: worker.spool.pending() == 0, timeout=5)
    worker.close(2)


def test_close_spools_what_is_still_queued(config, counters):
    sink = FlakySink()
    sink.delay_s = 0.3
    worker = SinkWorker("s", sink, config, counters)
    events = [make_event() for _ in range(20)]
    for e in events:
        worker.submit(e)
    worker.close(0.1)
    spooled = [e["event_id"] for seg in worker.spool.segments() for e in _read(seg.path)]
    assert set(spooled) | set(sink.received) == {e["event_id"] for e in events}


def test_queue_overflow_spills_to_the_spool(config, counters):
    sink = FlakySink()
    sink.delay_s = 0.5
    worker = SinkWorker("s", sink, {**config, "AUDIT_QUEUE_SIZE": 5}, counters)
    for _ in range(30):
        worker.submit(make_event())
    wait_until(lambda: worker.spool.pending() >= 20, timeout=10)  # spooled by the delivery thread
    assert counters.totals().get("audit_dropped", 0) == 0
    worker.close(0.1)


_DISK_EVENTS = {"open", "os.listdir", "os.scandir", "os.rename", "os.remove", "os.mkdir"}
_watched: dict[int, list[str]] = {}


def _audit_hook(event, args):
    seen = _watched.get(threading.get_ident())
    if seen is not None and event in _DISK_EVENTS:
        seen.append(event)


def test_callers_never_touch_the_disk_even_with_the_queue_full_and_a_big_spool(config, counters):
    """Issue 9.11: with the queue full, submit() used to write, fsync and list every segment."""
    import sys

    spool = Spool(config["AUDIT_SPOOL_DIR"], "s", 1 << 30, lambda n: None)
    for _ in range(300):
        spool.append([make_event()])
    sink = FlakySink()
    sink.delay_s = 0.2
    worker = SinkWorker("s", sink, {**config, "AUDIT_QUEUE_SIZE": 2}, counters)
    worker.submit(make_event())  # this process opens its counters file once, here
    sys.addaudithook(_audit_hook)  # the interpreter's own record of file-system calls, by thread
    _watched[threading.get_ident()] = seen = []
    try:
        for _ in range(50):
            worker.submit(make_event())
    finally:
        del _watched[threading.get_ident()]
    assert seen == []
    worker.close(0.1)


def test_a_deleted_spool_folder_is_recreated_and_nothing_is_dropped(config, counters):
    import shutil

    sink = FlakySink()
    sink.down = True
    worker = SinkWorker("s", sink, config, counters)
    shutil.rmtree(config["AUDIT_SPOOL_DIR"])
    for _ in range(5):
        worker.submit(make_event())
    wait_until(lambda: worker.spool.pending() == 5, timeout=10)
    assert counters.totals().get("audit_dropped", 0) == 0
    worker.close(0.5)


def test_a_new_process_delivers_what_an_earlier_one_spooled(config, counters):
    spool = Spool(config["AUDIT_SPOOL_DIR"], "s", 1 << 30, lambda n: None)
    events = [make_event() for _ in range(25)]
    spool.append(events)
    sink = FlakySink()
    worker = SinkWorker("s", sink, config, counters)
    worker._ensure_thread()
    wait_until(lambda: len(sink.received) == 25, timeout=10)
    wait_until(lambda: worker.spool.pending() == 0, timeout=5)  # the segment goes once all of it is delivered
    worker.close(1)


def test_truncated_last_line_is_skipped_and_logged_the_rest_delivered(config, counters, caplog):
    directory = os.path.join(config["AUDIT_SPOOL_DIR"], "s")
    os.makedirs(directory)
    good = [make_event() for _ in range(3)]
    lines = "".join(json.dumps(e) + "\n" for e in good) + '{"event_id": "trunc'
    with open(os.path.join(directory, f"{time.time_ns():020d}-1-0-n4.jsonl"), "w") as handle:
        handle.write(lines)
    sink = FlakySink()
    worker = SinkWorker("s", sink, config, counters)
    with caplog.at_level(logging.ERROR, logger="dtmf_service.audit"):
        worker._ensure_thread()
        wait_until(lambda: len(sink.received) == 3, timeout=10)
    assert sorted(sink.received) == sorted(e["event_id"] for e in good)
    assert any("unreadable line 4" in r.getMessage() for r in caplog.records)
    worker.close(1)


def test_spool_is_bounded_oldest_dropped_and_counted(tmp_path, caplog):
    dropped = []
    spool = Spool(str(tmp_path), "s", 4000, dropped.append)
    with caplog.at_level(logging.ERROR, logger="dtmf_service.audit"):
        for _ in range(20):
            spool.append([{"event_id": str(uuid.uuid4()), "pad": "x" * 300}])
    total = sum(os.path.getsize(s.path) for s in spool.segments())
    assert total <= 4000
    assert sum(dropped) == 20 - len(spool.segments())
    assert any("spool full" in r.getMessage() for r in caplog.records)
    # the oldest went first: what is left is the newest
    names = [os.path.basename(s.path) for s in spool.segments()]
    assert names == sorted(names)


def _drain_into_file(spool_dir, out_path, metrics_dir):
    config = {
        "AUDIT_QUEUE_SIZE": 100,
        "AUDIT_BATCH_SIZE": 7,
        "AUDIT_RETRY_ATTEMPTS": 1,
        "AUDIT_BACKOFF_BASE_S": 0.01,
        "AUDIT_BACKOFF_MAX_S": 0.01,
        "AUDIT_SPOOL_MAX_MB": 512,
        "AUDIT_SPOOL_DIR": spool_dir,
    }
    worker = SinkWorker("file", FileSink(out_path, "never"), config, SharedCounters(metrics_dir))
    for _ in range(3):
        worker._drain_spool()


def test_workers_share_one_spool_without_double_delivery(tmp_path):
    spool_dir = str(tmp_path / "spool")
    spool = Spool(spool_dir, "file", 1 << 30, lambda n: None)
    ids = []
    for _ in range(60):
        batch = [make_event() for _ in range(10)]
        ids += [e["event_id"] for e in batch]
        spool.append(batch)
    out = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_drain_into_file, args=(spool_dir, str(out), str(tmp_path / "m"))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    delivered = [json.loads(line)["event_id"] for line in out.read_text().splitlines()]
    assert sorted(delivered) == sorted(ids)  # every event once: none twice, none skipped
    assert spool.pending() == 0


def test_one_sink_down_never_delays_another(config, counters):
    from dtmf_service.delivery import DeliveryEngine

    down, up = FlakySink(), FlakySink()
    down.down = True
    down.delay_s = 0.2
    engine = DeliveryEngine({"down": down, "up": up}, config, counters)
    for _ in range(20):
        engine.submit(make_event())
    wait_until(lambda: len(up.received) == 20, timeout=5)
    engine.close(1)


def _read(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


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


def test_unwritable_spool_counts_the_events_as_dropped(config, counters, caplog):
    sink = FlakySink()
    sink.down = True
    worker = SinkWorker("s", sink, config, counters)
    # A file where the spool folder should be: every write fails, even for root.
    os.rmdir(worker.spool.directory)
    with open(worker.spool.directory, "w") as blocker:
        blocker.write("not a folder")
    with caplog.at_level(logging.ERROR, logger="dtmf_service.audit"):
        worker.submit(make_event())
        wait_until(lambda: counters.totals().get("audit_dropped", 0) == 1, timeout=10)
    assert "spool not writable" in caplog.text
    worker.close(1)

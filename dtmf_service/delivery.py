"""Audit delivery, written once for every sink: queue, worker thread, retries, spool.

Per sink: a bounded in-memory queue drained by a background thread that is
(re)started lazily in each process (gunicorn forks after import). A batch that
fails is retried with capped exponential backoff and jitter; after the last
try it goes to the disk spool, the sink is considered down, and new events are
parked on disk until a probe (the oldest spooled segment) gets through. The
caller's request only ever does a non-blocking queue put.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

from .hookspecs import DeliveryIncomplete
from .metrics import SharedCounters
from .retry import backoff_delay
from .spool import Spool

log = logging.getLogger("dtmf_service.audit")

_IDLE_WAIT_S = 0.2
_SPOOL_SCAN_S = 1.0


class SinkWorker:
    """Delivers events to one sink, at least once."""

    def __init__(self, name: str, sink: Any, config: Mapping[str, Any], counters: SharedCounters) -> None:
        self.name = name
        self.sink = sink
        self._counters = counters
        self._queue_size = int(config["AUDIT_QUEUE_SIZE"])
        self._batch_size = int(config["AUDIT_BATCH_SIZE"])
        self._linger_s = float(config.get("AUDIT_BATCH_WAIT_S", 0.05))
        self._attempts = int(config["AUDIT_RETRY_ATTEMPTS"])
        self._base_s = float(config["AUDIT_BACKOFF_BASE_S"])
        self._max_s = float(config["AUDIT_BACKOFF_MAX_S"])
        max_bytes = int(float(config["AUDIT_SPOOL_MAX_MB"]) * 1024 * 1024)
        self.spool = Spool(config["AUDIT_SPOOL_DIR"], name, max_bytes, self._dropped)
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(self._queue_size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._inflight: list[dict[str, Any]] = []
        self._overflow: list[dict[str, Any]] = []
        self._overflow_lock = threading.Lock()
        self._overflow_max = max(self._queue_size, 10000)  # held only until the thread's next step
        self._down_until = 0.0
        self._down_level = 0
        self._next_scan = 0.0
        self._prefix = f"audit.{name}."
        counters.declare_gauges([self._prefix + "pending"])
        counters.declare([self._prefix + "delivered", self._prefix + "failed_attempts", "audit_dropped"])

    # -- request side --------------------------------------------------------------------------
    def submit(self, event: dict[str, Any]) -> None:
        """Hand an event over without blocking or touching the disk: a full queue overflows into a
        list that the delivery thread spools (callers never wait on audit)."""
        self._ensure_thread()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._overflow_lock:
                if len(self._overflow) < self._overflow_max:
                    self._overflow.append(event)
                    return
            self._dropped(1)
            log.error("audit sink %s: queue and overflow full; an event was dropped", self.name)
            return
        self._publish_pending()

    def _spool_overflow(self) -> None:
        with self._overflow_lock:
            events, self._overflow = self._overflow, []
        if events:
            self._spool(events)

    def _spool(self, events: list[dict[str, Any]]) -> None:
        """Park events on disk; a disk that refuses (full, read-only) costs them, counted and logged."""
        try:
            self.spool.append(events)
        except OSError as exc:
            self._dropped(len(events))
            log.error("audit sink %s: spool not writable (%s): %d events dropped", self.name, exc.strerror, len(events))

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._pid == pid and self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._pid == pid and self._thread is not None and self._thread.is_alive():
                return
            if self._pid != pid:
                # After fork: the parent's queue and thread do not exist here.
                self._queue = queue.Queue(self._queue_size)
                self._inflight = []
                self._overflow = []
                self._stop = threading.Event()
            self._pid = pid
            self._thread = threading.Thread(target=self._run, name=f"audit-{self.name}", daemon=True)
            self._thread.start()

    # -- worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything a sink does
                log.error("audit sink %s: delivery loop error: %s", self.name, type(exc).__name__)
                self._stop.wait(_IDLE_WAIT_S)
        self._park_everything()

    def _step(self) -> None:
        self._spool_overflow()
        batch = self._take(_IDLE_WAIT_S)
        now = time.monotonic()
        if batch:
            self._inflight = batch
            if now < self._down_until:
                self._spool(batch)  # sink is down: park on disk, do not hold memory
            else:
                self._deliver_or_spool(batch, tries=self._attempts)
            self._inflight = []
            self._publish_pending()
        if now >= self._next_scan and now >= self._down_until:
            self._next_scan = now + _SPOOL_SCAN_S
            self._drain_spool()

    def _take(self, wait_s: float) -> list[dict[str, Any]]:
        try:
            first = self._queue.get(timeout=wait_s)
        except queue.Empty:
            return []
        self._inflight = [first]  # taken off the queue: still pending for flush() and shutdown
        if self._linger_s and self._queue.qsize() < self._batch_size - 1:
            # Let a batch gather: one wake-up and one write (or fsync) per batch, not per event.
            self._stop.wait(self._linger_s)
        batch = [first]
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _deliver_or_spool(self, batch: list[dict[str, Any]], tries: int) -> bool:
        remaining = batch
        for attempt in range(tries):
            remaining = self._deliver(remaining)
            if not remaining:
                self._down_level = 0
                return True
            if attempt + 1 < tries and self._stop.wait(backoff_delay(attempt, self._base_s, self._max_s)):
                break  # shutting down: park what is left
        self._spool(remaining)
        self._mark_down()
        return False

    def _deliver(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Try each event once; return those not delivered."""
        many = getattr(self.sink, "deliver_many", None)
        done = 0
        left: list[dict[str, Any]] = []
        try:
            if many is not None:
                many(events)
                done = len(events)
            else:
                for event in events:
                    self.sink.deliver(event)
                    done += 1
        except DeliveryIncomplete as exc:
            # Only the failed ones go round again: re-sending the delivered ones would make duplicates.
            left = list(exc.undelivered)
            done = max(0, len(events) - len(left))
            self._failed(exc.__cause__ or exc)
        except Exception as exc:  # noqa: BLE001 - any failure means "not delivered, keep it"
            left = events[done:]
            self._failed(exc)
        if done:
            self._counters.inc(self._prefix + "delivered", done)
        return left

    def _failed(self, exc: BaseException) -> None:
        self._counters.inc(self._prefix + "failed_attempts")
        log.warning("audit sink %s: delivery failed (%s)", self.name, type(exc).__name__)

    def _mark_down(self) -> None:
        delay = backoff_delay(self._down_level, self._base_s, self._max_s, rand=lambda: 0.5 + random.random() / 2)
        self._down_level += 1
        self._down_until = time.monotonic() + delay
        log.warning("audit sink %s: unavailable, events spooled; next try in %.1fs", self.name, delay)

    def _drain_spool(self) -> None:
        for segment in self.spool.segments():
            if self._stop.is_set():
                return
            with self.spool.claim(segment) as events:
                if events is None:
                    continue
                rest = events
                for start in range(0, len(events), self._batch_size):
                    chunk = events[start : start + self._batch_size]
                    left = self._deliver(chunk)
                    if left:
                        rest = left + events[start + self._batch_size :]
                        break
                else:
                    rest = []
                self.spool.consume(segment, rest)
            if rest:
                self._mark_down()
                return
            self._down_level = 0

    def _park_everything(self) -> None:
        self._spool_overflow()
        leftovers = list(self._inflight)
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if leftovers:
            self._spool(leftovers)
        self._inflight = []
        self._publish_pending()

    # -- lifecycle and figures -----------------------------------------------------------------
    def close(self, timeout_s: float) -> None:
        """Stop the thread; what is not delivered by then is spooled."""
        self._stop.set()
        thread = self._thread
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout_s)
            if thread.is_alive():
                # Stuck in a slow sink: spool its batch too (a duplicate beats a loss).
                self._park_everything()
        else:
            self._park_everything()
        closer = getattr(self.sink, "close", None)
        if closer is not None:
            try:
                closer()
            except Exception as exc:  # noqa: BLE001
                log.error("audit sink %s failed to close: %s", self.name, type(exc).__name__)

    def flush(self, timeout_s: float) -> bool:
        """Wait until this process's queue is empty (tests and benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.empty() and not self._inflight and not self._overflow:
                return True
            time.sleep(0.01)
        return False

    def _publish_pending(self) -> None:
        pending = self._queue.qsize() + len(self._inflight) + len(self._overflow)
        self._counters.set(self._prefix + "pending", pending)

    def _dropped(self, count: int) -> None:
        self._counters.inc("audit_dropped", count)


class DeliveryEngine:
    """One SinkWorker per enabled sink; one sink's trouble never touches another's."""

    def __init__(self, sinks: Mapping[str, Any], config: Mapping[str, Any], counters: SharedCounters) -> None:
        self.workers = {name: SinkWorker(name, sink, config, counters) for name, sink in sinks.items()}

    def start(self) -> None:
        """Start the threads now (a process that finds a spool delivers it without waiting for traffic)."""
        for worker in self.workers.values():
            worker._ensure_thread()

    def submit(self, event: dict[str, Any]) -> None:
        for worker in self.workers.values():
            try:
                worker.submit(event)
            except Exception as exc:  # noqa: BLE001 - never fail the caller's request over audit
                log.error("audit sink %s: could not accept event: %s", worker.name, type(exc).__name__)

    def close(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for worker in self.workers.values():
            worker._stop.set()
        for worker in self.workers.values():
            worker.close(max(0.1, deadline - time.monotonic()))

    def flush(self, timeout_s: float) -> bool:
        return all(w.flush(timeout_s) for w in self.workers.values())

    def metrics(self, totals: Mapping[str, float]) -> dict[str, Any]:
        sinks = {}
        for name, worker in self.workers.items():
            prefix = f"audit.{name}."
            sinks[name] = {
                "audit_pending": int(totals.get(prefix + "pending", 0)) + worker.spool.pending(),
                "audit_delivered": int(totals.get(prefix + "delivered", 0)),
                "audit_failed_attempts": int(totals.get(prefix + "failed_attempts", 0)),
            }
        return {
            "audit_pending": sum(s["audit_pending"] for s in sinks.values()),
            "audit_dropped": int(totals.get("audit_dropped", 0)),
            "audit_sinks": sinks,
        }

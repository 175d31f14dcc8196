"""Audit delivery, written once for every sink: claim from the outbox, deliver, acknowledge.

Requests only write the outbox (outbox.py). Here, in every worker process, one thread per sink
claims batches of events under a lease, hands them to the sink, and acknowledges what went
through. What failed goes back with capped exponential backoff; a sink that fails a whole batch
is "down" and probed with one event at a time until it answers. An event the receiver refuses
for good (DeliveryRejected) is tried AUDIT_RETRY_ATTEMPTS times, then set aside as a dead
letter, so it never blocks the events behind it. A maintenance thread recovers the placeholders
of requests whose worker died (audited as ``submission_unknown``) and keeps the outbox under its
size bound. Any process of the host (or of the fleet, with Redis) can deliver any event.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from dtmf_service.audit.outbox import Claimed, Outbox
from dtmf_service.audit.reasons import FailureReasons
from dtmf_service.cxone.retry import backoff_delay
from dtmf_service.hookspecs import AuditSink, BatchAuditSink, DeliveryIncomplete, DeliveryRejected
from dtmf_service.metrics import Metrics
from dtmf_service.pluginmanager import close_plugin

log = logging.getLogger("dtmf_service.audit")

_MAINTENANCE_S = 1.0
_NOTE_EVERY_S = 5.0  # how often a sink that keeps failing the same way rewrites its last error
_BOUND_CHECK_S = 5.0  # between size checks, unless the outbox says how often (``bound_check_s``)


class SinkDelivery:
    """Delivers one sink's events from the outbox, at least once."""

    def __init__(self, name: str, sink: AuditSink, outbox: Outbox, config: Mapping[str, Any], metrics: Metrics) -> None:
        self.name = name
        self.sink = sink
        self.outbox = outbox
        self._counts = metrics.sink(name)
        self._batch = int(config["AUDIT_BATCH_SIZE"])
        self._idle_s = float(config["AUDIT_BATCH_WAIT_S"]) or 0.05
        self._attempts = int(config["AUDIT_RETRY_ATTEMPTS"])
        self._base_s = float(config["AUDIT_BACKOFF_BASE_S"])
        self._max_s = float(config["AUDIT_BACKOFF_MAX_S"])
        self._lease_s = float(config["AUDIT_LEASE_S"])
        self._reasons = FailureReasons.from_config(config)
        self._noted: tuple[str, float] = ("", float("-inf"))  # the last error kept in the outbox, and when
        self._down_level = 0
        self._down_until = 0.0

    def step(self, consumer: str) -> bool:
        """One claim-deliver-acknowledge round; False when there was nothing to do now."""
        now = time.monotonic()
        if now < self._down_until:
            return False
        probing = self._down_level > 0
        claimed = self.outbox.claim(self.name, consumer, 1 if probing else self._batch, self._lease_s)
        if not claimed:
            return False
        delivered, failed, rejected, error = self._attempt(claimed)
        if delivered:
            self.outbox.ack(self.name, [c.ref for c in delivered])
            self._counts.delivered(len(delivered))
        for item in rejected:
            if item.attempts >= self._attempts:
                self.outbox.dead_letter(self.name, item, f"refused by the receiver: {self._reasons.describe(error)}")
                self._counts.dead_letter()
                log.error("audit sink %s: event %s refused %d times: set aside as a dead letter",
                          self.name, item.event.get("event_id"), item.attempts)  # fmt: skip
            else:
                self.outbox.retry(self.name, [item.ref], self._backoff(item.attempts - 1))
        if failed:
            self._counts.failed_attempt()
            if delivered or rejected:
                delay = self._backoff(min(c.attempts for c in failed) - 1)  # the sink is up: only these wait
            else:
                delay = self._mark_down(error)
            self.outbox.retry(self.name, [c.ref for c in failed], delay)
        elif delivered:
            self._down_level = 0
        return True

    def _attempt(self, claimed: list[Claimed]) -> tuple[list[Claimed], list[Claimed], list[Claimed], Any]:
        """Hand the batch to the sink: (delivered, failed for now, refused for good, the first error)."""
        events = [c.event for c in claimed]
        if isinstance(self.sink, BatchAuditSink):
            try:
                self.sink.deliver_many(events)
                return claimed, [], [], None
            except DeliveryIncomplete as exc:
                left = {e.get("event_id") for e in exc.undelivered}
                refused = {e.get("event_id") for e in exc.rejected}
                error = exc.__cause__ or exc
                self._log_failure(error)
                delivered = [c for c in claimed if c.event.get("event_id") not in left]
                rejected = [c for c in claimed if c.event.get("event_id") in refused]
                failed = [c for c in claimed if c.event.get("event_id") in left - refused]
                return delivered, failed, rejected, error
            except DeliveryRejected as exc:
                self._log_failure(exc)
                return [], [], claimed, exc
            except Exception as exc:  # noqa: BLE001 - any failure means "not delivered, keep it"
                self._log_failure(exc)
                return [], claimed, [], exc
        delivered, rejected = [], []
        first_error: Any = None
        for index, item in enumerate(claimed):
            try:
                self.sink.deliver(item.event)
                delivered.append(item)
            except DeliveryRejected as exc:
                self._log_failure(exc)
                rejected.append(item)
                first_error = exc
            except Exception as exc:  # noqa: BLE001
                self._log_failure(exc)
                return delivered, claimed[index:], rejected, exc
        return delivered, [], rejected, first_error

    def _backoff(self, retry_number: int) -> float:
        return backoff_delay(max(retry_number, 0), self._base_s, self._max_s, rand=lambda: 0.5 + random.random() / 2)

    def _mark_down(self, error: Any) -> float:
        delay = self._backoff(self._down_level)
        self._down_level += 1
        self._down_until = time.monotonic() + delay
        log.warning(
            "audit sink %s: unavailable (%s); next try in %.1fs", self.name, self._reasons.describe(error), delay
        )
        return delay

    def _log_failure(self, exc: BaseException) -> None:
        reason = self._reasons.describe(exc)
        log.warning("audit sink %s: delivery failed: %s", self.name, reason)
        now = time.monotonic()
        # The sink's last error for `audit status`, written at most every few seconds while a sink
        # stays down with the same error: one small row, never a write per failed attempt.
        if reason != self._noted[0] or now - self._noted[1] >= _NOTE_EVERY_S:
            self._noted = (reason, now)
            try:
                self.outbox.note_failure(self.name, reason)
            except Exception as error:  # noqa: BLE001 - the reason is already in the log
                log.debug("audit sink %s: could not keep the last error (%s)", self.name, type(error).__name__)


class DeliveryEngine:
    """The delivery threads of this process: one per sink, plus maintenance; restarted after fork."""

    def __init__(
        self, sinks: Mapping[str, AuditSink], outbox: Outbox, config: Mapping[str, Any], metrics: Metrics
    ) -> None:
        self.sinks = dict(sinks)
        self.outbox = outbox
        self.deliveries = {name: SinkDelivery(name, sink, outbox, config, metrics) for name, sink in sinks.items()}
        self._idle_s = float(config["AUDIT_BATCH_WAIT_S"]) or 0.05
        self._metrics = metrics
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def consumer(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def start(self) -> None:
        """Start this process's threads (idempotent; a forked child starts its own)."""
        if self._pid == os.getpid() or not self.deliveries:
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._wake = threading.Event()
            self._threads = [
                threading.Thread(target=self._run, args=(d,), name=f"audit-{d.name}", daemon=True)
                for d in self.deliveries.values()
            ]
            self._threads.append(threading.Thread(target=self._maintain, name="audit-maintenance", daemon=True))
            for thread in self._threads:
                thread.start()

    def notify(self) -> None:
        """An event was committed here: wake this process's delivery threads now."""
        self._wake.set()

    def _run(self, delivery: SinkDelivery) -> None:
        consumer = self.consumer
        while not self._stop.is_set():
            try:
                busy = delivery.step(consumer)
            except Exception as exc:  # noqa: BLE001 - the thread must survive the outbox and the sink
                log.error("audit sink %s: delivery loop error: %s", delivery.name, type(exc).__name__)
                busy = False
                self._stop.wait(1.0)
            if not busy:
                # Let a batch gather: one claim, one sink call and one acknowledgement per batch.
                self._wake.wait(self._idle_s)
                self._wake.clear()
                self._stop.wait(self._idle_s)

    def _maintain(self) -> None:
        # The size check runs as often as the outbox asks (SQLite: a few stat calls, so often enough
        # that traffic cannot push the files far past the bound between two checks).
        every = float(getattr(self.outbox, "bound_check_s", _BOUND_CHECK_S))
        tick = min(every, _MAINTENANCE_S)
        next_maintenance, next_bound = time.monotonic() + _MAINTENANCE_S, time.monotonic() + every
        unlogged: dict[str, int] = {}  # drops not yet logged: one line per sink every few seconds
        next_log = 0.0
        while not self._stop.wait(tick):
            try:
                now = time.monotonic()
                if now >= next_maintenance - tick / 2:
                    next_maintenance = now + _MAINTENANCE_S
                    self.outbox.check_file()
                    recovered = self.outbox.recover()
                    if recovered:
                        log.warning("audit: %d request(s) whose worker died were audited as submission_unknown",
                                    recovered)  # fmt: skip
                if now >= next_bound - tick / 2:
                    next_bound = now + every
                    for sink, count in self.outbox.enforce_bound().items():
                        self._metrics.audit_dropped(count)
                        unlogged[sink] = unlogged.get(sink, 0) + count
                if unlogged and now >= next_log:
                    next_log = now + _BOUND_CHECK_S
                    for sink, count in unlogged.items():
                        log.error("audit outbox full (AUDIT_SPOOL_MAX_MB): dropped the %d oldest events of sink %s",
                                  count, sink)  # fmt: skip
                    unlogged.clear()
            except Exception as exc:  # noqa: BLE001
                log.error("audit: outbox maintenance failed: %s", type(exc).__name__)

    def stop(self, timeout_s: float) -> None:
        """Stop the threads; what they hold is given back to the outbox by its lease."""
        self._stop.set()
        self._wake.set()
        if self._pid == os.getpid():
            deadline = time.monotonic() + timeout_s
            for thread in self._threads:
                thread.join(max(0.05, deadline - time.monotonic()))
        for name, sink in self.sinks.items():
            close_plugin(sink, f"audit sink {name!r}")

    def flush(self, timeout_s: float) -> bool:
        """Wait until no event is pending for any sink (tests and benchmarks)."""
        deadline = time.monotonic() + timeout_s
        self.outbox.flush(timeout_s)  # this process's journal into the outbox first
        while time.monotonic() < deadline:
            # A sink this process does not have (removed from the configuration) waits for its
            # return or a purge: nothing here will deliver it.
            if all(b.pending == 0 for b in self.outbox.backlog().values() if b.configured):
                return True
            time.sleep(0.02)
        return False

"""The host's stage in front of Redis (fleet mode): this process's journal, its spill file and the
forwarder thread that moves their events into Redis (CONTRACT.md section 7 *rev 3*, "Audit never
holds a caller back" and "Fleet mode through Redis trouble").

A request copies its placeholder and its event into a journal slot (journal.py: durable against
any crash of the process once the copy is done) and is answered; the forwarder sends them to Redis
in batches and frees the slots, as a Kafka producer's buffer or Postgres's WAL archiver does. While
Redis is away the batches wait and are sent again (an event may reach the stream twice, never not
at all). With replicas asked for (``WAIT``), a slot is freed only once a replica holds its event.
When every slot is taken, the journal's own spill files take the events (bounded by the spool size),
and another process of the host takes journal and spill files over when this one dies.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from dtmf_service.audit.journal import FINAL, INTENT, Journal, JournalFull, Ticket, recover_orphans, waiting_in
from dtmf_service.audit.outbox import routed, unrouted

log = logging.getLogger("dtmf_service.audit")

SLOTS = 512  # 8 MiB per process: a few seconds of a busy worker's events during an outage
BATCH = 256


class Item:
    """One write on its way to Redis: a placeholder ("intent") or a final event."""

    __slots__ = ("kind", "event_id", "body", "slot", "lease_s", "route")

    def __init__(
        self, kind: str, event_id: str, body: str, slot: Ticket | None, lease_s: float = 0.0, route: str = ""
    ) -> None:
        self.kind, self.event_id, self.body, self.slot, self.lease_s = kind, event_id, body, slot, lease_s
        self.route = route  # the sinks of the answering process, comma separated (routing, outbox.py)

    def payload(self) -> bytes:
        """What the journal keeps: the event's JSON with its sinks (outbox.routed)."""
        return routed(self.body, self.route.split(",") if self.route else [])


class Sender(Protocol):
    """The Redis side (outbox_redis.py): one round trip per call, raising while Redis is away.
    Each returns whether the replicas asked for hold every write so far, and the master's
    replication id (it changes when a replica is promoted)."""

    def send(self, items: Sequence[Item]) -> tuple[bool, str]: ...
    def replicated(self) -> tuple[bool, str]: ...


class HostStage:
    """This process's journal and forwarder (each made again after fork)."""

    def __init__(self, directory: str, sender: Sender, spill_max_bytes: int) -> None:
        self.directory = directory
        self._journal = Journal(directory, SLOTS, spill_max_bytes)
        self._forwarder = _Forwarder(sender, self._forwarded)

    def intend(self, item: Item) -> Ticket | None:
        """The placeholder, durable on the host when this returns; its slot is the ticket."""
        try:
            item.slot = self._journal.acquire()
            self._journal.write(item.slot, INTENT, item.payload())
        except JournalFull:
            if item.slot is not None:
                self._journal.release(item.slot)
                item.slot = None
            # No room at all: the placeholder goes to Redis only.
        self._forwarder.put(item)
        return item.slot

    def commit(self, item: Item) -> None:
        """The final event, durable on the host when this returns (a slot, or the journal's spill
        file). Only with the spill at the spool bound too does it wait in memory for Redis."""
        try:
            if item.slot is None:
                item.slot = self._journal.acquire()
            self._journal.write(item.slot, FINAL, item.payload())
        except JournalFull:
            if item.slot is not None:
                self._journal.release(item.slot)
                item.slot = None
            log.error("audit outbox: the host's journal and spill are full; an event waits in memory for Redis")
        self._forwarder.put(item)

    def _forwarded(self, items: Sequence[Item]) -> None:
        """``items`` are in Redis (and on a replica when asked): free their slots."""
        for item in items:
            if item.kind == "event" and item.slot is not None:
                self._journal.release(item.slot)

    def recover(self, send: Callable[[Sequence[Item]], object], route: str) -> int:
        """Hand the journals and spill files of this host's dead processes to ``send`` (placeholders
        as ``submission_unknown`` events, each to the sinks it was written for; ``route`` for an
        earlier version's), then delete them."""

        def move(entries: list[tuple[int, bytes]]) -> None:
            items = []
            for state, payload in entries:
                body, sinks = unrouted(payload)
                event = json.loads(body)
                if state == INTENT:
                    event["recovered"] = True
                to = route if sinks is None else ",".join(sinks)
                items.append(Item("event", event["event_id"], json.dumps(event, separators=(",", ":")), None, 0.0, to))
            for start in range(0, len(items), BATCH):
                send(items[start : start + BATCH])

        return recover_orphans(self.directory, move)

    def waiting(self) -> int:
        """Final events in this host's journals and spill files, not yet (known to be) in Redis.
        Reads only: the CLI may call this."""
        return waiting_in(self.directory) if os.path.isdir(self.directory) else 0

    def ensure_file(self) -> None:
        self._journal.ensure_file()

    def drain(self, timeout_s: float, confirmed: bool = True) -> bool:
        """Wait until this process's events are in Redis and, with ``confirmed``, on a replica."""
        return self._forwarder.drain(timeout_s, confirmed)

    def close(self) -> None:
        """Forward what the journal holds (10 s at most). No replica to confirm (WAIT) does not hold
        a shutdown: what is left stays in the journal and its spill files, and the process that takes
        them over sends them again (the same event_id twice at worst)."""
        drained = self._forwarder.drain(10.0, confirmed=False)
        self._forwarder.stop()
        self._journal.close(remove=drained and self._journal.in_use() == 0)


class _Forwarder:
    """One thread per process moves journaled writes into Redis, in order and in batches.

    While Redis cannot be reached the batch waits (capped backoff) and is sent again: an event may
    reach the stream twice (same event_id; receivers deduplicate), never not at all. Writes that
    Redis took but no replica confirmed wait in ``_unconfirmed`` (their slots still taken) until a
    later WAIT succeeds; if a failover happened meanwhile they are sent again.
    """

    def __init__(self, sender: Sender, forwarded: Callable[[Sequence[Item]], None]) -> None:
        self._sender = sender
        self._forwarded = forwarded
        self._cond = threading.Condition()
        self._queue: list[Item] = []
        self._unconfirmed: list[Item] = []
        self._history = ""  # the master's replication id when the unconfirmed writes were made
        self._pid: int | None = None
        self._busy = 0  # items not yet forwarded (and confirmed)
        self._stopped = False
        self._thread: threading.Thread | None = None

    def put(self, item: Item) -> None:
        with self._cond:
            if self._pid != os.getpid():  # after fork the parent's thread does not exist here
                self._pid, self._queue, self._unconfirmed, self._busy = os.getpid(), [], [], 0
                self._stopped = False
                self._thread = threading.Thread(target=self._run, name="audit-redis-forwarder", daemon=True)
                self._thread.start()
            self._queue.append(item)
            self._busy += 1
            self._cond.notify()

    def _run(self) -> None:
        delay = 0.05
        while True:
            with self._cond:
                while not self._queue and not self._unconfirmed and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return  # closed: what is left stays in the journal for another process
                if not self._queue:
                    self._cond.wait(1.0)  # only unconfirmed writes: ask the replicas again now and then
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            try:
                confirmed = self._forward(batch)
            except Exception as exc:  # noqa: BLE001 - Redis away (refused, timeout, no master): kept, sent again
                log.error("audit outbox: Redis unavailable (%s); %d event(s) wait on this host",
                          type(exc).__name__, self._busy)  # fmt: skip
                with self._cond:
                    self._queue[:0] = batch
                    self._cond.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            self._forwarded(confirmed)
            with self._cond:
                self._busy -= len(confirmed)

    def _forward(self, batch: list[Item]) -> list[Item]:
        """Send ``batch``; the items now safe (in Redis, and on a replica when asked)."""
        sender = self._sender
        if batch:
            replicated, history = sender.send(batch)
        elif self._unconfirmed:
            replicated, history = sender.replicated()
        else:
            return []
        if self._unconfirmed and history != self._history:
            # A failover since the unconfirmed writes: the new master may lack them. Send them again
            # (this WAIT then covers the batch too: it went to the same master just before).
            replicated, history = sender.send(self._unconfirmed)
        if replicated:
            confirmed, self._unconfirmed = self._unconfirmed + batch, []
            return confirmed
        self._history = history
        self._unconfirmed += batch
        return []

    def drain(self, timeout_s: float, confirmed: bool = True) -> bool:
        """Wait until every write is in Redis and, with ``confirmed``, on a replica when asked."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                left = self._busy - (0 if confirmed else len(self._unconfirmed))
                if left <= 0 or self._pid != os.getpid():
                    return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None and thread.ident != threading.get_ident() and self._pid == os.getpid():
            thread.join(7.0)  # at most one round trip in progress (socket timeout 5 s, WAIT 1 s)

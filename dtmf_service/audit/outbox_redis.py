"""The fleet's audit outbox on Redis Streams (AUDIT_OUTBOX=redis://... or redis+sentinel://...,
CONTRACT.md section 7, *rev 2* and *rev 3* "Fleet mode through Redis trouble").

Redis is the second stage behind the host's journal (redis_stage.py): requests write the journal
and are answered; a forwarder thread sends the events here with ``send``, so a Redis outage never
delays an answer and loses nothing. In Redis, one stream holds every event; each sink is a
consumer group, each worker process of each host a consumer. XREADGROUP hands new events out, XACK
settles them, and XAUTOCLAIM gives the events a dead or stuck consumer held (idle longer than
AUDIT_LEASE_S) to another one: when a host dies for good, the others deliver the events it had
forwarded. Forwarded placeholders live in a hash with their lease in a sorted set, so any host
recovers them as ``submission_unknown`` once the lease lapses.

Groups are created again whenever Redis answers NOGROUP (a restart without persistence, a failover
to a replica that lacked them): nothing is cached for the life of the process. A retry after a
delay is an XCLAIM that sets the entry's idle time so that it becomes claimable again exactly
``delay`` later. Trimming (exact ``XTRIM MINID``) stops at the oldest entry that any consumer group
present in the stream still needs, whichever sinks this process knows; the size bound is measured
with ``MEMORY USAGE`` and its drops are counted per group.

Routing: each entry lists its sinks (field ``s``, those of the process that wrote it); a group
acknowledges at once the entries that are not for it. A sink removed from the configuration keeps
its group, its entries and its dead letters (``purge`` drops them). Dead letters go back in line
through a script that claims each one atomically.

Longer than the project's usual module: the stream, its groups, the trimming and bound, and the
dead letters are one unit that share the key layout; the host side is in redis_stage.py.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis

from dtmf_service.audit.event import AuditEvent
from dtmf_service.audit.journal import Ticket
from dtmf_service.audit.outbox import Claimed, OutboxMissing, SinkBacklog, routed, shown_url, unrouted
from dtmf_service.audit.redis_stage import HostStage, Item
from dtmf_service.redis_client import connect, parse

log = logging.getLogger("dtmf_service.audit")
T = TypeVar("T")

_PREFIX = "dtmf:audit:"

_RECOVER = """
local body = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if not body then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[1], '*', 'e', ARGV[2], 's', ARGV[3])
return 1
"""

# A dead letter back in line, claimed atomically: only the caller whose HDEL removed it queues it,
# so two operators (two terminals, two hosts) never put one letter back twice.
_REDELIVER = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', 'e', ARGV[2], 's', ARGV[3])
return 1
"""

# A sink's dead letters dropped on purpose, counted as dropped, in one step.
_PURGE_DEAD = """
local n = redis.call('HLEN', KEYS[1])
redis.call('DEL', KEYS[1])
if n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], n) end
return n
"""


def _dumps(event: Mapping[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


def _routes_to(fields: Mapping[str, str], sink: str) -> bool:
    """Is a stream entry for ``sink``? Its ``s`` field lists its sinks (fixed by the process that
    wrote it); an entry without one (an earlier version's) is for every sink."""
    targets = fields.get("s")
    return targets is None or sink in targets.split(",")


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(stream_id: str) -> str:
    ms, seq = _id_key(stream_id)
    return f"{ms}-{seq + 1}"


class RedisOutbox:
    """The Outbox interface of outbox.py on Redis Streams with consumer groups."""

    def __init__(
        self, url: str, sinks: Iterable[str], max_bytes: int, journal_dir: str | None = None, operator: bool = False
    ) -> None:
        self.sinks = tuple(sinks)
        self._route = ",".join(self.sinks)  # every entry this process writes goes to these sinks
        self.operator = operator  # the CLI: creates no stream and no group
        target = parse(url, "AUDIT_OUTBOX")
        self._r = connect(target, socket_timeout=5, socket_connect_timeout=3, decode_responses=True)
        self._wait_replicas, self._wait_ms = target.wait_replicas, target.wait_ms
        self._stream = _PREFIX + "events"
        self._intents = _PREFIX + "intents"
        self._leases = _PREFIX + "leases"
        self._max_bytes = max_bytes
        self._recover_script = self._r.register_script(_RECOVER)
        self._redeliver_script = self._r.register_script(_REDELIVER)
        self._purge_dead_script = self._r.register_script(_PURGE_DEAD)
        if operator and not self._r.exists(self._stream):
            raise OutboxMissing(f"{shown_url(url)} (stream {self._stream})")
        self._lease_s = 30.0  # the claim lease last used: a retry's delay is measured against it
        # The host's journal in front of Redis (redis_stage.py); None (tools, the CLI): writes go
        # to Redis before they return.
        self._stage = HostStage(journal_dir, self, max_bytes) if journal_dir and not operator else None

    def _with_groups(self, work: Callable[[], T]) -> T:
        """Run ``work``; on NOGROUP (Redis restarted empty, or failed over to a replica without the
        groups) create this process's groups and run it again."""
        try:
            return work()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc) or self.operator:
                raise
        self._create_groups()
        return work()

    def _create_groups(self) -> None:
        if self.operator:
            return  # the CLI creates nothing
        for sink in self.sinks:
            try:
                self._r.xgroup_create(self._stream, sink, id="0", mkstream=True)
                log.warning("audit outbox: consumer group %s (re)created in Redis", sink)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- request path: the host's stage, then Redis -------------------------------------------
    def _item(self, kind: str, event: Mapping[str, Any], slot: Ticket | None, lease_s: float = 0.0) -> Item:
        return Item(kind, event["event_id"], _dumps(event), slot, lease_s, self._route)

    def intend(self, event: Mapping[str, Any], lease_s: float) -> Ticket | None:
        """The placeholder, durable on the host before this returns (a journal slot: the ticket)."""
        item = self._item("intent", event, None, lease_s)
        if self._stage is None:
            self.send([item])
            return None
        return self._stage.intend(item)

    def commit(self, event: Mapping[str, Any], ticket: Any = None) -> None:
        """The final event, durable on the host before this returns; the forwarder takes it to Redis."""
        item = self._item("event", event, ticket)
        if self._stage is None:
            self.send([item])
        else:
            self._stage.commit(item)

    def send(self, items: Sequence[Item]) -> tuple[bool, str]:
        """Write ``items`` to Redis in one round trip. Returns whether the replicas asked for hold
        them too (else: in Redis, not yet on a replica), and the master's replication id at the
        time of the writes (it changes when a replica is promoted). Raises while Redis is away."""
        pipe = self._r.pipeline(transaction=False)
        if self._wait_replicas:
            pipe.info("replication")  # same connection as the writes: the master that took them
        now = time.time()
        for item in items:
            if item.kind == "intent":
                pipe.hset(self._intents, item.event_id, routed(item.body, item.route.split(",")).decode())
                pipe.zadd(self._leases, {item.event_id: now + item.lease_s})  # the lease starts in Redis
            else:
                pipe.xadd(self._stream, {"e": item.body, "s": item.route})
                pipe.hdel(self._intents, item.event_id)
                pipe.zrem(self._leases, item.event_id)
        if not self._wait_replicas:
            pipe.execute()
            return True, ""
        pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms)
        results = pipe.execute()
        return int(results[-1]) >= self._wait_replicas, str(results[0].get("master_replid", ""))

    def replicated(self) -> tuple[bool, str]:
        """Do the replicas hold everything written so far? A write and WAIT on one connection: the
        replication stream is ordered, so a replica past this write has every earlier one."""
        pipe = self._r.pipeline(transaction=False)
        pipe.info("replication")
        pipe.incr(_PREFIX + "replica-probe")
        pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms)
        results = pipe.execute()
        return int(results[-1]) >= self._wait_replicas, str(results[0].get("master_replid", ""))

    def recover(self) -> int:
        """Dead processes' journals and spill files of this host into Redis (placeholders as
        ``submission_unknown``; one WAIT, not kept waiting for a replica), and placeholders in
        Redis whose lease lapsed (any host's)."""
        recovered = self._stage.recover(self.send, self._route) if self._stage is not None else 0
        for event_id in self._r.zrangebyscore(self._leases, "-inf", time.time()):
            body = self._r.hget(self._intents, event_id)
            if body is None:
                self._r.zrem(self._leases, event_id)
                continue
            plain, sinks = unrouted(body.encode())
            event = {**json.loads(plain), "recovered": True}
            route = self._route if sinks is None else ",".join(sinks)  # the answering process's sinks
            recovered += int(
                self._recover_script(
                    keys=[self._stream, self._intents, self._leases], args=[event_id, _dumps(event), route]
                )
            )
        return recovered

    # -- delivery side -------------------------------------------------------------------------
    def claim(self, sink: str, consumer: str, limit: int, lease_s: float) -> list[Claimed]:
        self._lease_s = lease_s
        lease_ms = int(lease_s * 1000)
        _, entries, deleted = self._with_groups(
            lambda: self._r.xautoclaim(self._stream, sink, consumer, lease_ms, "0-0", count=limit)
        )
        if deleted:
            self._count_dropped({sink: len(deleted)})
        if len(entries) < limit:
            fresh = self._with_groups(
                lambda: self._r.xreadgroup(sink, consumer, {self._stream: ">"}, count=limit - len(entries))
            )
            for _, items in fresh or []:
                entries += items
        claimed, foreign = [], []
        wanted = [(entry_id, fields) for entry_id, fields in entries if fields]
        for entry_id, fields in entries:
            if not fields:
                foreign.append(entry_id)  # trimmed under us: nothing left to deliver
        if wanted:
            pipe = self._r.pipeline(transaction=False)
            for entry_id, _ in wanted:
                pipe.hincrby(_PREFIX + f"attempts:{sink}", entry_id, 1)
            counts = pipe.execute()
            for (entry_id, fields), attempts in zip(wanted, counts, strict=True):
                if not _routes_to(fields, sink):
                    foreign.append(entry_id)  # written for other sinks: settled for this one
                    continue
                claimed.append(Claimed(entry_id, AuditEvent(json.loads(fields["e"]), fields["e"]), int(attempts)))
        if foreign:
            self.ack(sink, foreign)
        return claimed

    def ack(self, sink: str, refs: Sequence[str]) -> None:
        if not refs:
            return
        pipe = self._r.pipeline(transaction=False)
        pipe.xack(self._stream, sink, *refs)
        pipe.hdel(_PREFIX + f"attempts:{sink}", *refs)
        pipe.execute()

    def retry(self, sink: str, refs: Sequence[str], delay_s: float) -> None:
        """Claimable again ``delay_s`` from now: XCLAIM sets the idle time to lease minus delay."""
        if not refs:
            return
        idle_ms = max(int((self._lease_s - delay_s) * 1000), 0)
        self._r.xclaim(self._stream, sink, "retry", 0, list(refs), idle=idle_ms, justid=True)

    def note_failure(self, sink: str, reason: str) -> None:
        self._r.hset(_PREFIX + "last_error", sink, json.dumps({"at": time.time(), "reason": reason[:500]}))

    def dead_letter(self, sink: str, claimed: Claimed, reason: str) -> None:
        record = {"failed": time.time(), "reason": reason[:500], "event": claimed.event}
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(_PREFIX + f"dead:{sink}", claimed.event["event_id"], _dumps(record))
        pipe.xack(self._stream, sink, claimed.ref)
        pipe.hdel(_PREFIX + f"attempts:{sink}", claimed.ref)
        pipe.execute()

    def enforce_bound(self) -> dict[str, int]:
        """Trim, exactly, what every consumer group in the stream has settled (not only this
        process's sinks: a host during a rolling change may lack one); past the bound, measured
        with MEMORY USAGE, drop the oldest entries, counted per group that had not settled them."""
        if not self._r.exists(self._stream):
            return {}
        self._create_groups()
        groups = self._r.xinfo_groups(self._stream)
        needed_from: list[str] = []
        for group in groups:
            summary = self._r.xpending(self._stream, group["name"])
            if summary["pending"]:
                needed_from.append(summary["min"])
            needed_from.append(_next_id(group["last-delivered-id"]))
        if needed_from:
            self._r.xtrim(self._stream, minid=min(needed_from, key=_id_key), approximate=False)
        dropped: dict[str, int] = {}
        # Measured again after each cut: the size is a sampled estimate, and Redis frees a stream's
        # memory a whole node (a few KiB of entries) at a time. Each further round cuts deeper.
        for round_ in range(10):
            if not self._drop_over_bound(groups, dropped, 2**round_):
                break
        self._count_dropped(dropped)
        return dropped

    def _drop_over_bound(self, groups: list[dict[str, Any]], dropped: dict[str, int], at_least: int) -> int:
        """Drop the oldest entries over the bound (``at_least`` of them), adding to ``dropped``;
        how many were dropped, 0 when within the bound."""
        length = self._r.xlen(self._stream)
        used = self._r.memory_usage(self._stream) or 0
        if not length or used <= self._max_bytes:
            return 0
        # Entries are alike in size: drop the share of them that is over the bound.
        excess = min(length, max(math.ceil(length * (used - self._max_bytes) / used), at_least))
        doomed = self._r.xrange(self._stream, count=excess)
        if not doomed:
            return 0
        cut = doomed[-1][0]
        for group in groups:
            name, last = group["name"], group["last-delivered-id"]
            unread = sum(
                1 for entry_id, fields in doomed if _id_key(entry_id) > _id_key(last) and _routes_to(fields, name)
            )
            pending = self._r.xpending_range(self._stream, name, min="-", max=cut, count=excess)
            if pending:
                refs = [p["message_id"] for p in pending]
                self._r.xack(self._stream, name, *refs)
                self._r.hdel(_PREFIX + f"attempts:{name}", *refs)
            if unread + len(pending):
                dropped[name] = dropped.get(name, 0) + unread + len(pending)
        self._r.xtrim(self._stream, minid=_next_id(cut), approximate=False)  # exactly: counted once
        return len(doomed)

    def _count_dropped(self, counts: Mapping[str, int]) -> None:
        for sink, count in counts.items():
            self._r.hincrby(_PREFIX + "dropped", sink, count)

    # -- figures and operator commands ---------------------------------------------------------
    def _known_sinks(self, groups: Mapping[str, Any]) -> list[str]:
        """This process's sinks, then every other sink the stream has a group for (a sink removed
        from the configuration keeps its group, so its events and dead letters stay visible)."""
        return [*self.sinks, *sorted(name for name in groups if name not in self.sinks)]

    def _group_info(self) -> dict[str, Any]:
        if not self._r.exists(self._stream):
            return {}
        return {g["name"]: g for g in self._r.xinfo_groups(self._stream)}

    def backlog(self) -> dict[str, SinkBacklog]:
        """Per sink: what Redis holds for it, plus (configured sinks) what waits on this host to
        reach Redis. Read only: the CLI calls it."""
        groups = self._group_info()
        dropped = self._r.hgetall(_PREFIX + "dropped")
        errors = {sink: json.loads(text) for sink, text in self._r.hgetall(_PREFIX + "last_error").items()}
        waiting = self.waiting_on_host()
        now_ms = time.time() * 1000
        result = {}
        for sink in self._known_sinks(groups):
            group = groups.get(sink, {})
            pending = int(group.get("pending") or 0)
            lag = group.get("lag")
            oldest: str | None = None
            if pending:
                oldest = self._r.xpending(self._stream, sink)["min"]
            last = group.get("last-delivered-id", "0-0")
            unread = self._r.xrange(self._stream, min=f"({last}", count=1)
            configured = sink in self.sinks
            if lag is None or not configured:
                # Redis cannot tell (entries were trimmed), or nobody reads this group any more (its
                # lag would count every later entry, for whatever sinks): count its own entries.
                lag = self._unread_for(sink, last)
            if oldest is None and unread:
                oldest = unread[0][0]
            age = round(max(now_ms - _id_key(oldest)[0], 0) / 1000, 3) if oldest else None
            result[sink] = SinkBacklog(
                pending + int(lag) + (waiting if configured else 0),
                age,
                int(self._r.hlen(_PREFIX + f"dead:{sink}")),
                int(dropped.get(sink, 0)),
                configured=configured,
                last_error=errors.get(sink, {}).get("reason"),
                last_error_at=errors.get(sink, {}).get("at"),
            )
        return result

    def _unread_for(self, sink: str, after: str, upto: str = "+") -> int:
        """Entries after ``after`` (up to ``upto``) that are for ``sink``, read a page at a time."""
        count, cursor = 0, f"({after}"
        while True:
            page = self._r.xrange(self._stream, min=cursor, max=upto, count=1000)
            count += sum(1 for _, fields in page if fields and _routes_to(fields, sink))
            if len(page) < 1000:
                return count
            cursor = f"({page[-1][0]}"

    def dead_letters(self, sink: str | None = None) -> list[dict[str, Any]]:
        letters = []
        for name in [sink] if sink else self._known_sinks(self._group_info()):
            for event_id, raw in self._r.hgetall(_PREFIX + f"dead:{name}").items():
                record = json.loads(raw)
                letters.append({"sink": name, "event_id": event_id, **record})
        return sorted(letters, key=lambda letter: letter["failed"])

    def redeliver(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Put dead letters back in line: a new stream entry addressed to their own sink only, for
        sinks this process has (the others' letters are kept). Each letter is claimed atomically
        (a script: HDEL, and XADD only if it removed the letter)."""
        moved = 0
        for name in self.sinks:
            if sink not in (None, name):
                continue
            for letter in self.dead_letters(name):
                if event_id and letter["event_id"] != event_id:
                    continue
                moved += int(
                    self._redeliver_script(
                        keys=[self._stream, _PREFIX + f"dead:{name}"],
                        args=[letter["event_id"], _dumps(letter["event"]), name],
                    )
                )
        return moved

    def purge(self, sink: str, dead_letters_only: bool = False) -> tuple[int, int]:
        """Drop ``sink``'s dead letters and (unless ``dead_letters_only``) its undelivered entries, on
        purpose, counted as dropped. The group stays (moved to the end of the stream, its pending
        entries acknowledged): a host that still has the sink carries on from there."""
        letters = int(self._purge_dead_script(keys=[_PREFIX + f"dead:{sink}", _PREFIX + "dropped"], args=[sink]))
        group = self._group_info().get(sink)
        if dead_letters_only or group is None:
            return 0, letters
        cut = self._r.xinfo_stream(self._stream)["last-generated-id"]
        events = self._unread_for(sink, group["last-delivered-id"], cut)
        self._r.xgroup_setid(self._stream, sink, cut)
        while True:
            held = self._r.xpending_range(self._stream, sink, min="-", max=cut, count=1000)
            if not held:
                break
            refs = [p["message_id"] for p in held]
            self.ack(sink, refs)
            events += len(refs)
        if events:
            self._count_dropped({sink: events})
        return events, letters

    def waiting_on_host(self) -> int:
        """Final events in this host's journals and spill files, not yet (known to be) in Redis."""
        return self._stage.waiting() if self._stage is not None else 0

    def check_file(self) -> int:
        if self._stage is not None:
            self._stage.ensure_file()
        return 0  # no outbox file: the events live in Redis

    def import_legacy_spool(self) -> int:
        return 0  # an upgrade onto Redis starts a new outbox; the old spool is imported with SQLite only

    def flush(self, timeout_s: float) -> bool:
        """Wait until this process's journaled events are in Redis (and on a replica when asked)."""
        return self._stage is None or self._stage.drain(timeout_s)

    def close(self) -> None:
        """Forward what this process's journal holds; another process of the host takes the rest over."""
        if self._stage is not None:
            self._stage.close()
        self._r.close()

"""The fleet's audit outbox on Redis Streams (AUDIT_OUTBOX=redis://..., CONTRACT.md section 7, *rev 2*).

One stream holds every event; each sink is a consumer group, each worker process of each host a
consumer. XREADGROUP hands new events out, XACK settles them, and XAUTOCLAIM gives the events a
dead or stuck consumer held (idle longer than AUDIT_LEASE_S) to another one: when a host dies for
good, the others deliver its events. Placeholders of requests in flight live in a hash with their
lease in a sorted set, so any host recovers them as ``submission_unknown`` once the lease lapses.

A retry after a delay is an XCLAIM that sets the entry's idle time so that it becomes claimable
again exactly ``delay`` later. The stream is trimmed (XTRIM MINID) behind the slowest sink, and to
the size bound when a sink falls too far behind, counting the undelivered events it drops.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from dtmf_service.audit.event import AuditEvent
from dtmf_service.audit.outbox import Claimed, SinkBacklog

_PREFIX = "dtmf:audit:"
_AVERAGE_EVENT_BYTES = 1024  # to turn AUDIT_SPOOL_MAX_MB into a stream length

_RECOVER = """
local body = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if not body then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[1], '*', 'e', ARGV[2])
return 1
"""


def _dumps(event: Mapping[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class RedisOutbox:
    """The Outbox interface of outbox.py on Redis Streams with consumer groups."""

    def __init__(self, url: str, sinks: Iterable[str], max_bytes: int) -> None:
        self.sinks = tuple(sinks)
        self._r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3, decode_responses=True)
        self._stream = _PREFIX + "events"
        self._intents = _PREFIX + "intents"
        self._leases = _PREFIX + "leases"
        self._max_entries = max(1000, max_bytes // _AVERAGE_EVENT_BYTES)
        self._recover_script = self._r.register_script(_RECOVER)
        self._groups_ready = False
        self._lease_s = 30.0  # the claim lease last used: a retry's delay is measured against it

    def _groups(self) -> None:
        if self._groups_ready:
            return
        for sink in self.sinks:
            try:
                self._r.xgroup_create(self._stream, sink, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    # -- request path --------------------------------------------------------------------------
    def intend(self, event: Mapping[str, Any], lease_s: float) -> None:
        """In Redis before this returns: when this host dies for good, another recovers it."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._intents, event["event_id"], _dumps(event))
        pipe.zadd(self._leases, {event["event_id"]: time.time() + lease_s})
        pipe.execute()

    def commit(self, event: Mapping[str, Any], ticket: Any = None) -> None:
        """In Redis before this returns (no local journal: the event must outlive the host)."""
        self._groups()
        pipe = self._r.pipeline(transaction=True)
        pipe.xadd(self._stream, {"e": _dumps(event)})
        pipe.hdel(self._intents, event["event_id"])
        pipe.zrem(self._leases, event["event_id"])
        pipe.execute()

    def recover(self) -> int:
        self._groups()
        recovered = 0
        for event_id in self._r.zrangebyscore(self._leases, "-inf", time.time()):
            body = self._r.hget(self._intents, event_id)
            if body is None:
                self._r.zrem(self._leases, event_id)
                continue
            event = {**json.loads(body), "recovered": True}
            recovered += int(
                self._recover_script(keys=[self._stream, self._intents, self._leases], args=[event_id, _dumps(event)])
            )
        return recovered

    # -- delivery side -------------------------------------------------------------------------
    def claim(self, sink: str, consumer: str, limit: int, lease_s: float) -> list[Claimed]:
        self._groups()
        self._lease_s = lease_s
        lease_ms = int(lease_s * 1000)
        _, entries, deleted = self._r.xautoclaim(self._stream, sink, consumer, lease_ms, "0-0", count=limit)
        if deleted:
            self._count_dropped({sink: len(deleted)})
        if len(entries) < limit:
            fresh = self._r.xreadgroup(sink, consumer, {self._stream: ">"}, count=limit - len(entries))
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
                only = fields.get("s")
                if only and only != sink:
                    foreign.append(entry_id)  # put back in line for another sink
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

    def dead_letter(self, sink: str, claimed: Claimed, reason: str) -> None:
        record = {"failed": time.time(), "reason": reason[:500], "event": claimed.event}
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(_PREFIX + f"dead:{sink}", claimed.event["event_id"], _dumps(record))
        pipe.xack(self._stream, sink, claimed.ref)
        pipe.hdel(_PREFIX + f"attempts:{sink}", claimed.ref)
        pipe.execute()

    def enforce_bound(self) -> dict[str, int]:
        """Trim what every sink has settled; past the bound, the oldest entries, counted per sink."""
        self._groups()
        groups = {g["name"]: g for g in self._r.xinfo_groups(self._stream)}
        needed_from: list[str] = []
        for sink in self.sinks:
            group = groups.get(sink)
            if group is None:
                continue
            summary = self._r.xpending(self._stream, sink)
            if summary["pending"]:
                needed_from.append(summary["min"])
            last = group["last-delivered-id"]
            ms, seq = _id_key(last)
            needed_from.append(f"{ms}-{seq + 1}")
        if needed_from:
            self._r.xtrim(self._stream, minid=min(needed_from, key=_id_key))
        excess = self._r.xlen(self._stream) - self._max_entries
        if excess <= 0:
            return {}
        doomed = self._r.xrange(self._stream, count=excess)
        if not doomed:
            return {}
        cut = doomed[-1][0]
        dropped: dict[str, int] = {}
        for sink in self.sinks:
            group = groups.get(sink)
            last = group["last-delivered-id"] if group else "0-0"
            unread = sum(1 for entry_id, _ in doomed if _id_key(entry_id) > _id_key(last))
            pending = self._r.xpending_range(self._stream, sink, min="-", max=cut, count=excess)
            if pending:
                self._r.xack(self._stream, sink, *[p["message_id"] for p in pending])
            if unread + len(pending):
                dropped[sink] = unread + len(pending)
        ms, seq = _id_key(cut)
        self._r.xtrim(self._stream, minid=f"{ms}-{seq + 1}", approximate=False)  # exactly: counted once
        self._count_dropped(dropped)
        return dropped

    def _count_dropped(self, counts: Mapping[str, int]) -> None:
        for sink, count in counts.items():
            self._r.hincrby(_PREFIX + "dropped", sink, count)

    # -- figures and operator commands ---------------------------------------------------------
    def backlog(self) -> dict[str, SinkBacklog]:
        self._groups()
        groups = {g["name"]: g for g in self._r.xinfo_groups(self._stream)}
        dropped = self._r.hgetall(_PREFIX + "dropped")
        now_ms = time.time() * 1000
        result = {}
        for sink in self.sinks:
            group = groups.get(sink, {})
            pending = int(group.get("pending") or 0)
            lag = group.get("lag")
            oldest: str | None = None
            if pending:
                oldest = self._r.xpending(self._stream, sink)["min"]
            last = group.get("last-delivered-id", "0-0")
            unread = self._r.xrange(self._stream, min=f"({last}", count=1)
            if lag is None:  # Redis cannot tell (entries were trimmed): count what is after the cursor
                lag = len(self._r.xrange(self._stream, min=f"({last}"))
            if oldest is None and unread:
                oldest = unread[0][0]
            age = round(max(now_ms - _id_key(oldest)[0], 0) / 1000, 3) if oldest else None
            result[sink] = SinkBacklog(
                pending + int(lag), age, int(self._r.hlen(_PREFIX + f"dead:{sink}")), int(dropped.get(sink, 0))
            )
        return result

    def dead_letters(self, sink: str | None = None) -> list[dict[str, Any]]:
        letters = []
        for name in [sink] if sink else self.sinks:
            for event_id, raw in self._r.hgetall(_PREFIX + f"dead:{name}").items():
                record = json.loads(raw)
                letters.append({"sink": name, "event_id": event_id, **record})
        return sorted(letters, key=lambda letter: letter["failed"])

    def redeliver(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Put dead letters back in line: a new stream entry addressed to their own sink only."""
        moved = 0
        for letter in self.dead_letters(sink):
            if event_id and letter["event_id"] != event_id:
                continue
            pipe = self._r.pipeline(transaction=True)
            pipe.xadd(self._stream, {"e": _dumps(letter["event"]), "s": letter["sink"]})
            pipe.hdel(_PREFIX + f"dead:{letter['sink']}", letter["event_id"])
            pipe.execute()
            moved += 1
        return moved

    def check_file(self) -> int:
        return 0  # no local file: the events live in Redis

    def import_legacy_spool(self) -> int:
        return 0  # an upgrade onto Redis starts a new outbox; the old spool is imported with SQLite only

    def flush(self, timeout_s: float) -> bool:
        return True  # every write is in Redis when intend() or commit() returns

    def close(self) -> None:
        self._r.close()

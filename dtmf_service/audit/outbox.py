"""The audit outbox: where every event waits until each sink has it (CONTRACT.md section 7).

One outbox for every sink, shared by every process of the host (SQLite in WAL mode, the default)
or of the fleet (Redis Streams). The request path writes; the delivery side
(delivery.py) claims, delivers and acknowledges:

- ``intend(event)`` before the DTMF POST: a placeholder (outcome ``submission_unknown``) copied
  into the process's journal (journal.py), durable against any process crash when it returns.
  ``commit(event, ticket)`` puts the final event in the same slot, and a writer thread moves it
  into SQLite in the background. ``recover()`` takes over the journals of dead processes:
  placeholders become events, so a request that may have reached CXone is always audited.
  When every slot is taken the journal spills into local files, so a locked, slow or full store
  never holds a caller back; without any journal (it could not be made) both go through SQLite,
  waiting 50 ms at most (placeholders then carry a lease and lapse into events when it runs out).
- ``claim(sink, n)`` leases up to ``n`` events of one sink to this process; an event claimed by a
  process that died is claimed again once the lease lapses. ``ack`` removes them for that sink,
  ``retry`` puts them back after a delay, ``dead_letter`` sets a permanently refused one aside.
- The size bound (AUDIT_SPOOL_MAX_MB) drops the oldest events, counted per sink.

Routing (CONTRACT.md section 7 rev 3): where an event goes is fixed when it is written, by the
sinks of the process that answered its request: the stored event carries its sink list (SQLite: a
column the fan-out trigger reads; Redis: a field of the stream entry; the journal: a key appended
to the payload, ``routed``/``unrouted``), so no other process (the CLI, ``check-config`` run with
another configuration, a host with other settings during a rolling change) can change it. A sink
that leaves the configuration keeps its events and dead letters until ``purge`` drops them.

The operator CLI opens an existing outbox only (``open_outbox(..., operator=True)``): it creates
no file, group or key, and raises OutboxMissing when there is nothing at the configured place.

Implementations: outbox_sqlite.py (the default) and outbox_redis.py; ``open_outbox`` picks one
from AUDIT_OUTBOX.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dtmf_service.config import ConfigError
from dtmf_service.redis_client import is_redis_url


@dataclass(frozen=True)
class Claimed:
    """One event leased to this process for one sink."""

    ref: str  # the outbox's own handle (SQLite row id, Redis stream id)
    event: dict[str, Any]
    attempts: int  # deliveries tried so far, this one included


@dataclass(frozen=True)
class SinkBacklog:
    pending: int
    oldest_pending_s: float | None
    dead_letters: int
    dropped: int
    configured: bool = True  # False: a sink this process does not have, whose events wait for it
    last_error: str | None = None  # why its latest failed delivery failed (scrubbed: reasons.py)
    last_error_at: float | None = None  # when, in Unix seconds


class OutboxMissing(Exception):
    """The operator CLI found no outbox where the configuration points (it never creates one)."""

    def __init__(self, where: str) -> None:
        super().__init__(f"no audit outbox at {where}")
        self.where = where


# The sink list travels with an event through the journal as one more key at the end of its JSON
# object (a quoted key followed by a list cannot occur inside a JSON string value, only as a real
# key, and events have no such key): the payload still parses as the event's JSON.
_ROUTE_KEY = b',"dtmf:sinks":'


def route_suffix(sinks: Sequence[str]) -> bytes:
    """What ends every journal payload addressed to ``sinks`` (fixed for a process: made once)."""
    return _ROUTE_KEY + json.dumps(list(sinks), separators=(",", ":")).encode() + b"}"


def routed(body: str, sinks: Sequence[str] | bytes) -> bytes:
    """The journal payload of ``body`` (an event's compact JSON object) addressed to ``sinks`` (or
    ending in a ``route_suffix``)."""
    suffix = sinks if isinstance(sinks, bytes) else route_suffix(sinks)
    return body[:-1].encode() + suffix


def unrouted(payload: bytes) -> tuple[str, tuple[str, ...] | None]:
    """(the event's JSON, its sinks) from a journal payload; sinks None for an earlier version's."""
    at = payload.rfind(_ROUTE_KEY)
    if at < 0 or not payload.endswith(b"]}"):
        return payload.decode(), None
    sinks = json.loads(payload[at + len(_ROUTE_KEY) : -1])
    return payload[:at].decode() + "}", tuple(sinks)


class Outbox(Protocol):
    """What the request path and the delivery side need; SQLite and Redis implement it."""

    def intend(self, event: Mapping[str, Any], lease_s: float) -> Any: ...
    def commit(self, event: Mapping[str, Any], ticket: Any = None) -> None: ...
    def recover(self) -> int: ...
    def claim(self, sink: str, consumer: str, limit: int, lease_s: float) -> list[Claimed]: ...
    def ack(self, sink: str, refs: Sequence[str]) -> None: ...
    def retry(self, sink: str, refs: Sequence[str], delay_s: float) -> None: ...
    def dead_letter(self, sink: str, claimed: Claimed, reason: str) -> None: ...
    def note_failure(self, sink: str, reason: str) -> None:
        """Keep ``reason`` as the sink's last error, for ``audit status`` on any host's CLI."""

    def enforce_bound(self) -> dict[str, int]: ...
    def backlog(self) -> dict[str, SinkBacklog]: ...
    def dead_letters(self, sink: str | None = None) -> list[dict[str, Any]]: ...
    def redeliver(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Put dead letters back in line, each for its own sink only, each claimed atomically (two
        operators at once never queue one twice); how many. Letters of a sink this outbox's
        configuration lacks are kept, never queued for no sink."""

    def purge(self, sink: str, dead_letters_only: bool = False) -> tuple[int, int]:
        """Drop a sink's undelivered events (unless ``dead_letters_only``) and its dead letters on
        purpose, counted as dropped: (events, dead letters) dropped."""

    def check_file(self) -> int:
        """Notice a file or folder deleted at run time and move what this process holds into a new one."""

    def import_legacy_spool(self) -> int:
        """Take in an earlier version's spool segments (the gunicorn master, before the workers)."""

    def flush(self, timeout_s: float) -> bool:
        """Wait until this process's journaled events are in the shared store (tests, shutdown)."""

    def close(self) -> None: ...


def outbox_url(config: Mapping[str, Any]) -> str:
    return config.get("AUDIT_OUTBOX") or f"sqlite:///{os.path.join(config['AUDIT_SPOOL_DIR'], 'outbox.db')}"


def shown_url(url: str) -> str:
    """``url`` fit for a message: user-info and query string masked (they may hold a password)."""
    url = re.sub(r"^([a-z+]+://)[^@/]*@", r"\1********@", url)
    return re.sub(r"\?.*$", "?********", url)


def open_outbox(config: Mapping[str, Any], sinks: Iterable[str], operator: bool = False) -> Outbox:
    """The outbox named by AUDIT_OUTBOX (default: SQLite in AUDIT_SPOOL_DIR). ``operator`` (the CLI):
    open an existing one without creating or changing anything, else raise OutboxMissing."""
    url = outbox_url(config)
    max_bytes = int(float(config["AUDIT_SPOOL_MAX_MB"]) * 1024 * 1024)
    if url.startswith("sqlite:///"):
        from dtmf_service.audit.outbox_sqlite import SqliteOutbox

        path = url[len("sqlite:///") :]
        fsync = bool(config.get("AUDIT_OUTBOX_FSYNC"))
        return SqliteOutbox(path, sinks, max_bytes, fsync, operator=operator)
    if is_redis_url(url):
        from dtmf_service.audit.outbox_redis import RedisOutbox

        # The host's journal in front of Redis: an outage never holds an answer back (redis_stage.py).
        journals = os.path.join(config["AUDIT_SPOOL_DIR"], "redis-journals")
        return RedisOutbox(url, sinks, max_bytes, journals, operator=operator)
    raise ConfigError(
        "AUDIT_OUTBOX: expected sqlite:///<path>, redis://host:port/db"
        " or redis+sentinel://host:port[,host:port...]/service_name/db"
    )

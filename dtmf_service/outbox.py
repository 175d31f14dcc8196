"""The audit outbox: every event is durable here before its response leaves the worker (CONTRACT.md section 7).

One outbox for every sink, shared by every process of the host (SQLite in WAL mode, the default)
or of the fleet (Redis Streams, ``outbox_redis.py``). The request path writes; the delivery side
(delivery.py) claims, delivers and acknowledges:

- ``intend(event)`` before the DTMF POST: a placeholder whose outcome is ``submission_unknown``,
  with a lease longer than any request. ``commit(event)`` writes the final event and drops the
  placeholder in one transaction. A worker killed in between leaves the placeholder behind, and
  ``recover()`` turns it into an event once its process is gone or its lease has lapsed: a request
  that may have reached CXone is always audited.
- ``claim(sink, n)`` leases up to ``n`` events of one sink to this process; an event claimed by a
  process that died is claimed again once the lease lapses. ``ack`` removes them for that sink,
  ``retry`` puts them back after a delay, ``dead_letter`` sets a permanently refused one aside.
- The size bound (AUDIT_SPOOL_MAX_MB) drops the oldest events, counted per sink.

SQLite with synchronous=NORMAL survives any process crash (the WAL is in the kernel's page cache);
AUDIT_OUTBOX_FSYNC=true (synchronous=FULL) also survives a machine crash, at the cost of an fsync
per request.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .metrics import pid_alive

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL,"
    " created REAL NOT NULL, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS pending (sink TEXT NOT NULL, event INTEGER NOT NULL,"
    " next_try REAL NOT NULL DEFAULT 0, lease_until REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (sink, event)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS pending_event ON pending (event)",
    "CREATE TABLE IF NOT EXISTS intents (event_id TEXT PRIMARY KEY, pid INTEGER NOT NULL,"
    " lease_until REAL NOT NULL, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dead_letters (sink TEXT NOT NULL, event_id TEXT NOT NULL, failed REAL NOT NULL,"
    " reason TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (sink, event_id))",
    "CREATE TABLE IF NOT EXISTS dropped (sink TEXT PRIMARY KEY, count INTEGER NOT NULL)",
)


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


class Outbox(Protocol):
    """What the request path and the delivery side need; SQLite and Redis implement it."""

    def intend(self, event: Mapping[str, Any], lease_s: float) -> None: ...
    def commit(self, event: Mapping[str, Any]) -> None: ...
    def recover(self) -> int: ...
    def claim(self, sink: str, consumer: str, limit: int, lease_s: float) -> list[Claimed]: ...
    def ack(self, sink: str, refs: Sequence[str]) -> None: ...
    def retry(self, sink: str, refs: Sequence[str], delay_s: float) -> None: ...
    def release(self, sink: str, refs: Sequence[str]) -> None: ...
    def dead_letter(self, sink: str, claimed: Claimed, reason: str) -> None: ...
    def enforce_bound(self) -> dict[str, int]: ...
    def backlog(self) -> dict[str, SinkBacklog]: ...
    def dead_letters(self, sink: str | None = None) -> list[dict[str, Any]]: ...
    def redeliver(self, sink: str | None = None, event_id: str | None = None) -> int: ...
    def close(self) -> None: ...


def _dumps(event: Mapping[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


class SqliteOutbox:
    """The host's outbox: one SQLite file in WAL mode, shared by every worker of every master."""

    def __init__(self, path: str, sinks: Iterable[str], max_bytes: int, fsync: bool = False) -> None:
        self.path = path
        self.sinks = tuple(sinks)
        self.max_bytes = max_bytes
        self._synchronous = "FULL" if fsync else "NORMAL"
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # digits may be in events: owner only
        self._local = threading.local()
        self._initialise()

    # -- connections ---------------------------------------------------------------------------
    def _initialise(self, patience_s: float = 15.0) -> None:
        deadline = time.monotonic() + patience_s
        delay = 0.01
        while True:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                for statement in _SCHEMA:
                    db.execute(statement)
                return
            except sqlite3.OperationalError:
                # Workers booting together race for the WAL switch's exclusive lock: try again.
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            finally:
                db.close()

    def _db(self) -> sqlite3.Connection:
        # One connection per thread and per process: SQLite connections survive neither sharing nor fork.
        owner = (os.getpid(), threading.get_ident())
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "owner", None) != owner:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            self._local.db, self._local.owner = db, owner
        return db

    def _transaction(self, work: Any) -> Any:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
            return result
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- request path --------------------------------------------------------------------------
    def intend(self, event: Mapping[str, Any], lease_s: float) -> None:
        self._db().execute(
            "INSERT OR REPLACE INTO intents VALUES (?, ?, ?, ?)",
            (event["event_id"], os.getpid(), time.time() + lease_s, _dumps(event)),
        )

    def commit(self, event: Mapping[str, Any]) -> None:
        body = _dumps(event)

        def write(db: sqlite3.Connection) -> None:
            self._insert(db, event["event_id"], body, self.sinks)
            db.execute("DELETE FROM intents WHERE event_id=?", (event["event_id"],))

        self._transaction(write)

    @staticmethod
    def _insert(db: sqlite3.Connection, event_id: str, body: str, sinks: Iterable[str]) -> None:
        row = db.execute(
            "INSERT INTO events (event_id, created, body) VALUES (?, ?, ?)", (event_id, time.time(), body)
        ).lastrowid
        db.executemany("INSERT INTO pending (sink, event) VALUES (?, ?)", [(sink, row) for sink in sinks])

    def recover(self) -> int:
        """Turn the placeholders of dead requests into events (outcome ``submission_unknown``)."""
        now = time.time()
        rows = self._db().execute("SELECT event_id, pid, lease_until FROM intents").fetchall()
        orphans = [event_id for event_id, pid, lease in rows if lease <= now or not pid_alive(pid)]
        recovered = 0
        for event_id in orphans:

            def move(db: sqlite3.Connection, event_id: str = event_id) -> bool:
                found = db.execute("DELETE FROM intents WHERE event_id=? RETURNING body", (event_id,)).fetchone()
                if found is None:
                    return False  # another process recovered it first
                event = json.loads(found[0])
                event["recovered"] = True
                self._insert(db, event_id, _dumps(event), self.sinks)
                return True

            recovered += bool(self._transaction(move))
        return recovered

    # -- delivery side -------------------------------------------------------------------------
    def claim(self, sink: str, consumer: str, limit: int, lease_s: float) -> list[Claimed]:
        now = time.time()
        ready = "SELECT 1 FROM pending WHERE sink=? AND next_try<=? AND lease_until<=? LIMIT 1"
        if self._db().execute(ready, (sink, now, now)).fetchone() is None:
            return []  # a read, no write lock: idle polling costs the request path nothing

        def lease(db: sqlite3.Connection) -> list[Claimed]:
            rows = db.execute(
                "UPDATE pending SET lease_until=?, attempts=attempts+1 WHERE sink=? AND event IN"
                " (SELECT event FROM pending WHERE sink=? AND next_try<=? AND lease_until<=? ORDER BY event LIMIT ?)"
                " RETURNING event, attempts",
                (now + lease_s, sink, sink, now, now, limit),
            ).fetchall()
            if not rows:
                return []
            attempts = dict(rows)
            marks = ",".join("?" * len(attempts))
            bodies = db.execute(f"SELECT id, body FROM events WHERE id IN ({marks}) ORDER BY id", list(attempts))  # noqa: S608
            return [Claimed(str(row), json.loads(body), attempts[row]) for row, body in bodies]

        return self._transaction(lease)

    def ack(self, sink: str, refs: Sequence[str]) -> None:
        if not refs:
            return
        ids = [int(r) for r in refs]
        marks = ",".join("?" * len(ids))

        def done(db: sqlite3.Connection) -> None:
            db.execute(f"DELETE FROM pending WHERE sink=? AND event IN ({marks})", [sink, *ids])  # noqa: S608
            db.execute(
                f"DELETE FROM events WHERE id IN ({marks})"  # noqa: S608
                " AND NOT EXISTS (SELECT 1 FROM pending WHERE pending.event=events.id)",
                ids,
            )

        self._transaction(done)

    def retry(self, sink: str, refs: Sequence[str], delay_s: float) -> None:
        self._put_back(sink, refs, time.time() + delay_s)

    def release(self, sink: str, refs: Sequence[str]) -> None:
        """Give claimed events back at once (a process stopping), without counting an attempt."""
        if not refs:
            return
        ids = [int(r) for r in refs]
        marks = ",".join("?" * len(ids))
        self._db().execute(
            f"UPDATE pending SET lease_until=0, attempts=max(attempts-1, 0) WHERE sink=? AND event IN ({marks})",  # noqa: S608
            [sink, *ids],
        )

    def _put_back(self, sink: str, refs: Sequence[str], next_try: float) -> None:
        if not refs:
            return
        ids = [int(r) for r in refs]
        marks = ",".join("?" * len(ids))
        self._db().execute(
            f"UPDATE pending SET next_try=?, lease_until=0 WHERE sink=? AND event IN ({marks})",  # noqa: S608
            [next_try, sink, *ids],
        )

    def dead_letter(self, sink: str, claimed: Claimed, reason: str) -> None:
        def move(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?)",
                (sink, claimed.event["event_id"], time.time(), reason[:500], _dumps(claimed.event)),
            )
            db.execute("DELETE FROM pending WHERE sink=? AND event=?", (sink, int(claimed.ref)))
            db.execute(
                "DELETE FROM events WHERE id=? AND NOT EXISTS (SELECT 1 FROM pending WHERE pending.event=events.id)",
                (int(claimed.ref),),
            )

        self._transaction(move)

    def enforce_bound(self) -> dict[str, int]:
        """Drop the oldest events while the file's live pages exceed the bound; per sink, how many."""
        dropped: dict[str, int] = {}
        db = self._db()
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        while True:
            pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
            if pages * page_size <= self.max_bytes:
                return dropped

            def drop(db: sqlite3.Connection) -> dict[str, int]:
                oldest = [r[0] for r in db.execute("SELECT id FROM events ORDER BY id LIMIT 200")]
                if not oldest:
                    return {}
                marks = ",".join("?" * len(oldest))
                counts = dict(
                    db.execute(
                        f"SELECT sink, count(*) FROM pending WHERE event IN ({marks}) GROUP BY sink",  # noqa: S608
                        oldest,
                    ).fetchall()
                )
                db.execute(f"DELETE FROM pending WHERE event IN ({marks})", oldest)  # noqa: S608
                db.execute(f"DELETE FROM events WHERE id IN ({marks})", oldest)  # noqa: S608
                for sink, count in counts.items():
                    db.execute(
                        "INSERT INTO dropped VALUES (?, ?) ON CONFLICT(sink) DO UPDATE SET count=count+excluded.count",
                        (sink, count),
                    )
                return counts

            counts = self._transaction(drop)
            if not counts and not db.execute("SELECT 1 FROM events LIMIT 1").fetchone():
                return dropped  # nothing left to drop: the bound is below the empty file's size
            for sink, count in counts.items():
                dropped[sink] = dropped.get(sink, 0) + count

    # -- figures and operator commands ---------------------------------------------------------
    def backlog(self) -> dict[str, SinkBacklog]:
        db = self._db()
        now = time.time()
        pending = {}
        for sink, count, oldest in db.execute(
            "SELECT sink, count(*), min(event) FROM pending GROUP BY sink"
        ).fetchall():
            created = db.execute("SELECT created FROM events WHERE id=?", (oldest,)).fetchone()
            pending[sink] = (count, created[0] if created else None)
        dead = dict(db.execute("SELECT sink, count(*) FROM dead_letters GROUP BY sink").fetchall())
        dropped = dict(db.execute("SELECT sink, count FROM dropped").fetchall())
        result = {}
        for sink in sorted(set(self.sinks) | set(pending) | set(dead) | set(dropped)):
            count, created = pending.get(sink, (0, None))
            result[sink] = SinkBacklog(
                count,
                round(max(now - created, 0.0), 3) if created is not None else None,
                dead.get(sink, 0),
                dropped.get(sink, 0),
            )
        return result

    def dead_letters(self, sink: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT sink, event_id, failed, reason, body FROM dead_letters"
        rows = self._db().execute(query + (" WHERE sink=? ORDER BY failed" if sink else " ORDER BY failed"),
                                  (sink,) if sink else ())  # fmt: skip
        return [{"sink": s, "event_id": e, "failed": f, "reason": r, "event": json.loads(b)} for s, e, f, r, b in rows]

    def redeliver(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Put dead letters back in line, for their own sink only."""

        def move(db: sqlite3.Connection) -> int:
            clauses, params = [], []
            if sink:
                clauses.append("sink=?")
                params.append(sink)
            if event_id:
                clauses.append("event_id=?")
                params.append(event_id)
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = db.execute(f"DELETE FROM dead_letters{where} RETURNING sink, event_id, body", params).fetchall()  # noqa: S608
            for row_sink, row_event_id, body in rows:
                self._insert(db, row_event_id, body, [row_sink])
            return len(rows)

        return self._transaction(move)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def open_outbox(config: Mapping[str, Any], sinks: Iterable[str]) -> Outbox:
    """The outbox named by AUDIT_OUTBOX (default: SQLite in AUDIT_SPOOL_DIR)."""
    url = config.get("AUDIT_OUTBOX") or f"sqlite:///{os.path.join(config['AUDIT_SPOOL_DIR'], 'outbox.db')}"
    max_bytes = int(float(config["AUDIT_SPOOL_MAX_MB"]) * 1024 * 1024)
    if url.startswith("sqlite:///"):
        return SqliteOutbox(url[len("sqlite:///") :], sinks, max_bytes, bool(config.get("AUDIT_OUTBOX_FSYNC")))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .outbox_redis import RedisOutbox

        return RedisOutbox(url, sinks, max_bytes)
    from .config import ConfigError

    raise ConfigError("AUDIT_OUTBOX: expected sqlite:///<path> or redis://host:port/db")

"""The audit outbox on SQLite (the default): one file in WAL mode shared by every process of the host.

The request path writes through a per-process journal (journal.py) and a group-commit writer
thread; the delivery side claims, acknowledges and retries with one statement each, the
triggers in ``_SCHEMA`` fanning an event out to its sinks and settling it. The interface and
its guarantees are described in outbox.py.

SQLite with synchronous=NORMAL survives any process crash (the WAL is in the kernel's page cache);
AUDIT_OUTBOX_FSYNC=true (synchronous=FULL, and msync of the journal) also survives a machine crash.

Longer than the project's usual module: the SQLite outbox, its group-commit writer and its file
recovery are one unit that share the connection rules and the write lock; splitting them would
spread those rules over several files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dtmf_service.audit.event import AuditEvent
from dtmf_service.audit.journal import FINAL, INTENT, Journal, JournalFull, Ticket, recover_orphans, waiting_in
from dtmf_service.audit.outbox import Claimed, OutboxMissing, SinkBacklog, route_suffix, routed, unrouted
from dtmf_service.jsontext import compact
from dtmf_service.processes import pid_alive
from dtmf_service.sqlite_wal import BUSY_PATIENCE_S, initialise, retry_busy

log = logging.getLogger("dtmf_service.audit")

_SCHEMA = (
    # ``sinks``: the JSON list of sinks the event goes to, fixed when it is written (by the process
    # that answered). NULL only in rows of an earlier version, which fan out through ``sinks`` (the
    # table that version rewrote at each start; this one never writes it).
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL,"
    " created REAL NOT NULL, body TEXT NOT NULL, only_sink TEXT, sinks TEXT)",
    # Keyed by event first: a new event's rows land on the one page at the tail, and "is anything left
    # for this event" needs no second index. The claim token is indexed only while it is set.
    "CREATE TABLE IF NOT EXISTS pending (event INTEGER NOT NULL, sink TEXT NOT NULL,"
    " next_try REAL NOT NULL DEFAULT 0, lease_until REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,"
    " token TEXT, PRIMARY KEY (event, sink)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS pending_token ON pending (token) WHERE token IS NOT NULL",
    # A sink's rows in delivery order, covering the ready test: a healthy sink's poll and claim, and a
    # sink's oldest pending event, never walk another sink's backlog (the key leads with the event).
    "CREATE INDEX IF NOT EXISTS pending_sink ON pending (sink, event, next_try, lease_until)",
    "CREATE TABLE IF NOT EXISTS sinks (name TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS intents (event_id TEXT PRIMARY KEY, pid INTEGER NOT NULL,"
    " lease_until REAL NOT NULL, body TEXT NOT NULL, sinks TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS dead_letters (sink TEXT NOT NULL, event_id TEXT NOT NULL, failed REAL NOT NULL,"
    " reason TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (sink, event_id))",
    "CREATE TABLE IF NOT EXISTS dropped (sink TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sink_errors (sink TEXT PRIMARY KEY, at REAL NOT NULL, reason TEXT NOT NULL)",
    # Every write is one statement: the triggers do the rest inside it, so SQLite's write lock is held
    # only within one C call, never across a GIL hand-off between Python statements.
    # An event fans out to the sinks it carries. (``events_fan_out``, an earlier version's trigger that
    # read the shared ``sinks`` table only, is replaced by ``_migrate``.)
    "CREATE TRIGGER IF NOT EXISTS events_routed AFTER INSERT ON events BEGIN"
    " INSERT INTO pending (event, sink) SELECT NEW.id, value FROM json_each(NEW.sinks) WHERE NEW.sinks IS NOT NULL;"
    " INSERT INTO pending (event, sink) SELECT NEW.id, name FROM sinks"
    " WHERE NEW.sinks IS NULL AND (NEW.only_sink IS NULL OR name = NEW.only_sink);"
    " DELETE FROM intents WHERE event_id = NEW.event_id; END",
    "CREATE TRIGGER IF NOT EXISTS events_settled AFTER DELETE ON pending"
    " WHEN NOT EXISTS (SELECT 1 FROM pending WHERE event = OLD.event) BEGIN"
    " DELETE FROM events WHERE id = OLD.event; END",
)

# Per-sink pending counts, kept in the statement that changes ``pending`` (whichever process or
# version runs it), so a scrape or ``audit status`` reads one row per sink instead of counting the
# backlog. Rows of ``pending`` are only ever inserted plainly and deleted (never REPLACEd, which
# would skip the delete trigger). Added to files of earlier versions by ``_add_counters``.
_COUNTERS = (
    "CREATE TABLE sink_counts (sink TEXT PRIMARY KEY, pending INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE TRIGGER pending_counted AFTER INSERT ON pending BEGIN"
    " INSERT INTO sink_counts (sink, pending) VALUES (NEW.sink, 1)"
    " ON CONFLICT (sink) DO UPDATE SET pending = pending + 1; END",
    "CREATE TRIGGER pending_uncounted AFTER DELETE ON pending BEGIN"
    " UPDATE sink_counts SET pending = pending - 1 WHERE sink = OLD.sink; END",
)

# The one statement that counts the backlog: once per file, when the counters are added to it.
COUNT_EXISTING = "INSERT INTO sink_counts SELECT sink, count(*) FROM pending GROUP BY sink"


def _add_counters(db: sqlite3.Connection) -> None:
    """Create the counters once per file, counting what an earlier version left (one transaction:
    no event is inserted between the count and the triggers)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name='sink_counts'").fetchone():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name='sink_counts'").fetchone():
            for statement in _COUNTERS:
                db.execute(statement)
            db.execute(COUNT_EXISTING)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _dumps(event: Mapping[str, Any]) -> str:
    return compact(event)


def _migrate(db: sqlite3.Connection) -> None:
    """The routing columns and triggers. A file of an earlier version keeps its pending events and
    gains the columns (CREATE ... IF NOT EXISTS adds none) in one transaction with the trigger
    swap: no event is inserted between the old trigger's removal and the new one's creation."""

    def current() -> bool:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        return (
            "events_fan_out" not in names
            and {"events_routed", "events_settled"} <= names
            and all("sinks" in {row[1] for row in db.execute(f"PRAGMA table_info({t})")} for t in ("events", "intents"))
        )

    if current():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if not current():
            for table in ("events", "intents"):
                if "sinks" not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN sinks TEXT")
            db.execute("DROP TRIGGER IF EXISTS events_fan_out")
            for statement in _SCHEMA:
                if "CREATE TRIGGER" in statement:
                    db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class SqliteOutbox:
    """The host's outbox: one SQLite file in WAL mode, shared by every worker of every master."""

    def __init__(
        self, path: str, sinks: Iterable[str], max_bytes: int, fsync: bool = False, operator: bool = False
    ) -> None:
        self.path = path
        self.sinks = tuple(sinks)
        # Every event this process writes goes to these sinks, whoever else uses the file.
        self._route = json.dumps(list(self.sinks), separators=(",", ":"))
        self._suffix = route_suffix(self.sinks)  # the journal payload's ending, the same for every event
        self.max_bytes = max_bytes
        self._wal_cap = min(max(max_bytes // 10, 64 * 1024), _WAL_CAP_MAX)
        self._reclaiming = False  # giving space back after a drain, a little each maintenance round
        self.operator = operator
        self._synchronous = "FULL" if fsync else "NORMAL"
        directory = os.path.dirname(os.path.abspath(path))
        if operator:
            # The CLI: the service's file or nothing; no directory, file, schema or journal is made.
            if not os.path.isfile(path):
                raise OutboxMissing(os.path.abspath(path))
        else:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if not os.path.exists(path):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # digits may be in events: owner only
        self._local = threading.local()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._generation = 0  # bumped by close(): every thread then opens a fresh connection
        if not operator:
            self._initialise()
        self._inode = os.stat(path).st_ino
        # A connection opened with the file and kept: if the file is deleted at run time, this one
        # still reads it (and its WAL), so check_file() can move what it holds into a new one.
        anchor = _existing(path, "ro") if operator else _anchor(path)
        self._anchor: tuple[int, sqlite3.Connection] = (os.getpid(), anchor)
        self._migrate_lock = threading.Lock()  # the writer's batches versus moving to a new file
        self._fsync = fsync
        # The journal may spill as far as the spool bound while the outbox cannot take its events.
        self._journal = Journal(os.path.join(directory, "journals"), spill_max_bytes=max_bytes)
        self._writer = _GroupCommit(self)

    # -- connections ---------------------------------------------------------------------------
    def _initialise(self) -> None:
        def schema(db: sqlite3.Connection) -> None:
            for statement in _SCHEMA:
                if "CREATE TRIGGER" not in statement:
                    db.execute(statement)
            _migrate(db)
            _add_counters(db)

        _prefer_incremental_vacuum(self.path)
        initialise(self.path, schema)

    def _db(self) -> sqlite3.Connection:
        # One connection per thread and per process: SQLite connections survive neither sharing nor fork.
        owner = (os.getpid(), threading.get_ident(), self._generation)
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "owner", None) != owner:
            # No busy timeout: retry_busy waits half a millisecond at a time instead of SQLite's
            # sleeps of several milliseconds.
            if self.operator:
                # The CLI reads through a read-only connection that cannot create the file; its few
                # writes (redeliver, purge) open their own (``_transaction``).
                db = _existing(self.path, "ro")
            else:
                db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            # The same few tail pages change with every write: checkpoint them less often (a WAL of up
            # to a tenth of the bound, 40 MiB at most), and cut the WAL back to that size afterwards.
            db.execute(f"PRAGMA wal_autocheckpoint={max(self._wal_cap // _PAGE, 16)}")
            db.execute(f"PRAGMA journal_size_limit={self._wal_cap}")
            # Debian builds SQLite with secure_delete on: each freed page would be zeroed through the
            # WAL, doubling the bytes written by acknowledgements and drops (the WAL grew several MB
            # per drop). FAST still zeroes deleted cells in the pages written anyway; free pages are
            # cut off the file after a drain (_reclaim).
            db.execute("PRAGMA secure_delete=FAST")
            self._local.db, self._local.owner = db, owner
            self._connections.append((os.getpid(), db))
        return db

    def _execute(self, sql: str, params: Sequence[Any] = (), patience_s: float = BUSY_PATIENCE_S) -> sqlite3.Cursor:
        """One statement, atomic on its own (autocommit), retried while another writer holds the lock."""
        db = self._db()
        return retry_busy(lambda: db.execute(sql, params), patience_s)

    def _transaction(self, work: Any, patience_s: float = BUSY_PATIENCE_S) -> Any:
        db = _existing(self.path, "rw") if self.operator else self._db()
        try:
            retry_busy(lambda: db.execute("BEGIN IMMEDIATE"), patience_s)
            try:
                result = work(db)
                db.execute("COMMIT")
                return result
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            if self.operator:
                db.close()

    # -- request path --------------------------------------------------------------------------
    def intend(self, event: Mapping[str, Any], lease_s: float) -> Ticket | None:
        """The placeholder, durable before this returns: a journal slot (the ticket for ``commit``)."""
        body = _dumps(event)
        try:
            slot: Ticket | None = self._journal.acquire()
        except JournalFull:
            slot = None
        if slot is not None:
            try:
                self._journal.write(slot, INTENT, routed(body, self._suffix))
                if self._fsync:
                    self._journal.sync()
                return slot
            except JournalFull:
                self._journal.release(slot)
        # No journal at all (it could not be made, or its spill reached the bound): SQLite directly.
        self._write_now(_Write("intent", (event["event_id"], os.getpid(), time.time() + lease_s, body, self._route)))
        return None

    def commit(self, event: Mapping[str, Any], ticket: Ticket | None = None) -> None:
        """The final event, durable before this returns (in the journal); the writer thread moves it
        into SQLite in the background. Without a journal, through SQLite, waiting for it briefly."""
        row = (event["event_id"], time.time(), _dumps(event), self._route)
        slot = ticket
        try:
            if slot is None:
                slot = self._journal.acquire()
            self._journal.write(slot, FINAL, routed(row[2], self._suffix))
        except JournalFull:
            if slot is not None:
                self._journal.release(slot)
            self._write_now(_Write("event", row))
            return
        if self._fsync:
            self._journal.sync()
        self._writer.write(_Write("event", row, slot))

    def _write_now(self, item: _Write) -> None:
        """A write on the request thread when the journal cannot take it: a caller waits for audit
        work _DIRECT_WAIT_S at most (CONTRACT.md section 7 rev 3), so a locked outbox makes this
        raise (the event is then lost, and counted so by the caller) instead of holding the answer."""
        if not self._migrate_lock.acquire(timeout=_DIRECT_WAIT_S):
            raise TimeoutError("audit outbox: busy moving into a new file")
        try:
            self._write_batch([item], patience_s=_DIRECT_WAIT_S)
        finally:
            self._migrate_lock.release()

    def _write_batch(self, batch: Sequence[_Write], patience_s: float = BUSY_PATIENCE_S) -> None:
        """A batch of request writes: one multi-row statement for the placeholders and one for the
        events (the triggers fan each event out to its sinks and drop its placeholder)."""
        intents = [item.row for item in batch if item.kind == "intent"]
        events = [item.row for item in batch if item.kind == "event"]
        for start in range(0, len(intents), _ROWS_PER_STATEMENT):
            chunk = intents[start : start + _ROWS_PER_STATEMENT]
            self._execute(
                "INSERT OR REPLACE INTO intents VALUES " + ",".join(["(?, ?, ?, ?, ?)"] * len(chunk)),  # noqa: S608 - markers only
                [value for row in chunk for value in row],
                patience_s,
            )
        for start in range(0, len(events), _ROWS_PER_STATEMENT):
            chunk = events[start : start + _ROWS_PER_STATEMENT]
            self._execute(
                "INSERT INTO events (event_id, created, body, sinks) VALUES "  # noqa: S608 - "?" markers only
                + ",".join(["(?, ?, ?, ?)"] * len(chunk)),
                [value for row in chunk for value in row],
                patience_s,
            )

    @staticmethod
    def _insert(db: sqlite3.Connection, event_id: str, body: str, sinks: str, created: float | None = None) -> None:
        """One event for ``sinks`` (a JSON list)."""
        db.execute(
            "INSERT INTO events (event_id, created, body, sinks) VALUES (?, ?, ?, ?)",
            (event_id, time.time() if created is None else created, body, sinks),
        )

    def _route_of(self, sinks: Sequence[str] | None) -> str:
        """The JSON sink list an event recovered from a journal goes to: its own (fixed by the
        process that answered), or, for an earlier version's journal, this process's sinks."""
        return self._route if sinks is None else json.dumps(list(sinks), separators=(",", ":"))

    def _move_orphans(self, entries: list[tuple[int, bytes]]) -> None:
        """A dead process's journal slots into the outbox: placeholders as ``submission_unknown``."""

        def move(db: sqlite3.Connection) -> None:
            for state, payload in entries:
                body, sinks = unrouted(payload)
                event = json.loads(body)
                if state == INTENT:
                    event["recovered"] = True
                    body = _dumps(event)
                self._insert(db, event["event_id"], body, self._route_of(sinks))

        # Briefly: while another process holds the file the journal stays where it is, for the next round.
        self._transaction(move, patience_s=_WRITER_PATIENCE_S)

    def _writable(self) -> bool:
        """Whether this process can take the write lock now (briefly): while another process holds
        the file, dead processes' journals are left unread for a later round."""
        db = self._db()
        try:
            retry_busy(lambda: db.execute("BEGIN IMMEDIATE"), _WRITER_PATIENCE_S)
        except sqlite3.OperationalError as exc:
            if _locked(exc):
                return False
            raise
        db.execute("ROLLBACK")
        return True

    def recover(self) -> int:
        """Events left by dead processes: their journals, and placeholders that went through SQLite.
        Placeholders become events with outcome ``submission_unknown``."""
        recovered = recover_orphans(self._journal.directory, self._move_orphans, self._writable)
        now = time.time()
        rows = self._db().execute("SELECT event_id, pid, lease_until FROM intents").fetchall()
        orphans = [event_id for event_id, pid, lease in rows if lease <= now or not pid_alive(pid)]
        for event_id in orphans:

            def move(db: sqlite3.Connection, event_id: str = event_id) -> bool:
                found = db.execute("DELETE FROM intents WHERE event_id=? RETURNING body, sinks", (event_id,)).fetchone()
                if found is None:
                    return False  # another process recovered it first
                event = json.loads(found[0])
                event["recovered"] = True
                self._insert(db, event_id, _dumps(event), found[1] or self._route)
                return True

            recovered += bool(self._transaction(move))
        return recovered

    def check_file(self) -> int:
        """If the outbox file was deleted or replaced at run time, move what this process's
        connections still see of it (undelivered events, dead letters) into a new file: nothing
        that was accepted is lost to a clean-up gone wrong. Every process of the host notices;
        the new file records how far the old one was copied (``moved_in``), so each event is
        copied once per host, and a process that wrote into the old file after that copies only
        its late events. Returns how many events this process moved."""
        self._journal.ensure_file()
        try:
            if os.stat(self.path).st_ino == self._inode:
                return 0
        except FileNotFoundError:
            pass
        with self._migrate_lock:
            anchor_pid, anchor = self._anchor
            old = anchor if anchor_pid == os.getpid() else self._db()
            source = str(self._inode)  # still open through the anchors, so no new file can have it
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._generation += 1  # every thread opens the new file from now on
            self._initialise()
            os.chmod(self.path, 0o600)  # whoever created it (an early reconnect), it holds digits
            self._inode = os.stat(self.path).st_ino
            self._anchor = (os.getpid(), _anchor(self.path))

            def refill(db: sqlite3.Connection) -> int:
                # Inside the new file's write transaction: the processes of the host copy one at a time.
                db.execute("CREATE TABLE IF NOT EXISTS moved_in (source TEXT PRIMARY KEY, upto INTEGER NOT NULL)")
                found = db.execute("SELECT upto FROM moved_in WHERE source=?", (source,)).fetchone()
                upto = found[0] if found else 0
                old.execute("BEGIN")  # one snapshot of the old file
                try:
                    pending = old.execute(
                        "SELECT e.id, e.event_id, e.created, e.body, p.sink FROM pending p"
                        " JOIN events e ON e.id = p.event WHERE e.id > ?",
                        (upto,),
                    ).fetchall()
                    dead = old.execute("SELECT * FROM dead_letters").fetchall()
                    dropped = old.execute("SELECT * FROM dropped").fetchall() if found is None else []
                finally:
                    old.execute("COMMIT")
                for _id, event_id, created, body, sink in pending:  # each for the sink it was waiting for
                    self._insert(db, event_id, body, self._route_of([sink]), created)
                db.executemany("INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?)", dead)
                db.executemany(
                    "INSERT INTO dropped VALUES (?, ?) ON CONFLICT(sink) DO UPDATE SET count=count+excluded.count",
                    dropped,
                )
                upto = max([upto, *(row[0] for row in pending)])
                db.execute("INSERT OR REPLACE INTO moved_in VALUES (?, ?)", (source, upto))
                return len(pending)

            moved = int(self._transaction(refill))
            if anchor_pid == os.getpid():
                anchor.close()
        if moved:
            log.error("audit outbox %s was deleted or replaced at run time: %d undelivered event(s) moved into"
                      " a new one", self.path, moved)  # fmt: skip
        return moved

    def import_legacy_spool(self) -> int:
        """Events an earlier version left in its spool (``<AUDIT_SPOOL_DIR>/<sink>/*.jsonl``, written
        whole) go into the outbox for their own sink, so an upgrade loses none. Run by the gunicorn
        master at start, before any worker exists."""
        directory = os.path.dirname(os.path.abspath(self.path))
        moved = 0
        for segment in sorted(glob.glob(os.path.join(directory, "*", "*.jsonl"))):
            sink = os.path.basename(os.path.dirname(segment))
            if not _LEGACY_SEGMENT.match(os.path.basename(segment)):
                continue
            with open(segment, encoding="utf-8", errors="replace") as handle:
                lines = [line for line in handle.read().splitlines() if line.strip()]
            events = []
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a torn line of a crashed writer: the old spool skipped it too
                if isinstance(event, dict) and "event_id" in event:
                    events.append(event)

            def move(db: sqlite3.Connection, events: list[dict[str, Any]] = events, sink: str = sink) -> None:
                for event in events:
                    self._insert(db, event["event_id"], _dumps(event), self._route_of([sink]))

            self._transaction(move)
            os.unlink(segment)
            moved += len(events)
        if moved:
            log.warning("audit: %d event(s) from the previous version's spool moved into the outbox", moved)
        return moved

    def flush(self, timeout_s: float) -> bool:
        """Wait until every final event of this process is in SQLite (shutdown, tests)."""
        return self._writer.drain(timeout_s)

    # -- delivery side -------------------------------------------------------------------------
    def claim(self, sink: str, consumer: str, limit: int, lease_s: float) -> list[Claimed]:
        now = time.time()
        ready = "SELECT 1 FROM pending WHERE sink=? AND next_try<=? AND lease_until<=? LIMIT 1"
        if self._db().execute(ready, (sink, now, now)).fetchone() is None:
            return []  # a read, no write lock: idle polling costs the request path nothing
        token = f"{consumer}:{uuid.uuid4().hex}"
        self._execute(
            "UPDATE pending SET lease_until=?, attempts=attempts+1, token=? WHERE sink=? AND event IN"
            " (SELECT event FROM pending WHERE sink=? AND next_try<=? AND lease_until<=? ORDER BY event LIMIT ?)",
            (now + lease_s, token, sink, sink, now, now, limit),
            _WRITER_PATIENCE_S,  # another process holding the file: try again next round, stop promptly
        )
        rows = (
            self._db()
            .execute(
                "SELECT p.event, p.attempts, e.body FROM pending p JOIN events e ON e.id = p.event"
                " WHERE p.token=? ORDER BY p.event",
                (token,),
            )
            .fetchall()
        )
        return [Claimed(str(event), AuditEvent(json.loads(body), body), attempts) for event, attempts, body in rows]

    def ack(self, sink: str, refs: Sequence[str]) -> None:
        if refs:
            ids = [int(r) for r in refs]
            marks = ",".join("?" * len(ids))
            self._execute(f"DELETE FROM pending WHERE sink=? AND event IN ({marks})", [sink, *ids])  # noqa: S608

    def retry(self, sink: str, refs: Sequence[str], delay_s: float) -> None:
        if not refs:
            return
        ids = [int(r) for r in refs]
        marks = ",".join("?" * len(ids))
        self._execute(
            f"UPDATE pending SET next_try=?, lease_until=0 WHERE sink=? AND event IN ({marks})",  # noqa: S608
            [time.time() + delay_s, sink, *ids],
        )

    def dead_letter(self, sink: str, claimed: Claimed, reason: str) -> None:
        def move(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?)",
                (sink, claimed.event["event_id"], time.time(), reason[:500], _dumps(claimed.event)),
            )
            db.execute("DELETE FROM pending WHERE sink=? AND event=?", (sink, int(claimed.ref)))

        self._transaction(move)

    def note_failure(self, sink: str, reason: str) -> None:
        self._execute("INSERT OR REPLACE INTO sink_errors VALUES (?, ?, ?)", (sink, time.time(), reason[:500]))

    bound_check_s = 0.25  # how often the maintenance thread calls enforce_bound: a few stat calls

    def disk_bytes(self) -> int:
        """Every byte the outbox keeps on disk: the database, its WAL, shared memory and rollback
        journal, and the processes' journals."""
        return _size(self.path) + self._side_bytes()

    def _side_bytes(self) -> int:
        journals = glob.glob(os.path.join(self._journal.directory, "*"))
        return sum(_size(path) for path in (self.path + "-wal", self.path + "-shm", self.path + "-journal", *journals))

    def enforce_bound(self) -> dict[str, int]:
        """Keep every byte on disk within the bound (AUDIT_SPOOL_MAX_MB), then give space back.

        The events' pages get what the rest leaves: the WAL (as it is, and at least twice its
        checkpoint size plus 2 MiB: a batch of up to 512 events may start just before a checkpoint,
        and a starved checkpoint lets a few such batches through), the shared memory and the
        journals as they are now.
        Past that the oldest events are dropped, counted per sink. Freed pages are reused by new
        events, so the file stops growing; ``_reclaim`` gives them back once many are free (after a
        drain, or a bound lowered below what the file holds)."""
        dropped: dict[str, int] = {}
        db = self._db()
        wal = _size(self.path + "-wal")
        room = self.max_bytes - max(2 * self._wal_cap + _WAL_SLACK, wal) - (self._side_bytes() - wal)
        while _live_bytes(db) > room:
            counts = self._transaction(_drop_oldest)
            if counts is None:
                break  # nothing left to drop: the bound is below the empty file's size
            for sink, count in counts.items():
                dropped[sink] = dropped.get(sink, 0) + count
        self._reclaim(db, wal, overflowing=bool(dropped))
        return dropped

    def _reclaim(self, db: sqlite3.Connection, wal: int, overflowing: bool) -> None:
        """Space back: a WAL that readers kept from restarting is truncated; once a quarter of the
        file (and at least 1 MiB) is free, free pages are cut from its end a little at a time (the
        maintenance thread's writes, never a request's) until none is left. A file of an earlier
        version (no auto_vacuum) is converted with one VACUUM, only while it holds little
        (milliseconds of work)."""
        try:
            if wal > 2 * self._wal_cap:
                # Readers kept the WAL from restarting: copy it back and empty it now (no busy wait:
                # another round tries again).
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            pages, free = _pages(db)
            if overflowing and free * 2 < pages:
                # Full: the next events take the freed pages (moving pages now would only fill the
                # WAL). Only a file mostly free (a bound lowered below it) is cut while full.
                return
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0:
                if _live_bytes(db) <= _CONVERT_LIVE_BYTES:
                    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                    db.execute("VACUUM")
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    log.info("audit outbox %s: converted to give space back after a drain", self.path)
                return
            if free > max(_RECLAIM_FROM_PAGES, pages // 4):
                self._reclaiming = True  # a small steady backlog reuses its free pages: no work then
            if not self._reclaiming:
                return
            deadline = time.monotonic() + _RECLAIM_S
            while free and time.monotonic() < deadline:
                db.execute(f"PRAGMA incremental_vacuum({_VACUUM_STEP})").fetchall()
                free = _pages(db)[1]
            if not free:
                # The file shrinks when checkpointed, and the WAL goes back to nothing; until both
                # are done, the next rounds carry on.
                busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                self._reclaiming = bool(busy)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise  # another writer held the lock: the next round tries again

    # -- figures and operator commands ---------------------------------------------------------
    def backlog(self) -> dict[str, SinkBacklog]:
        """O(sinks): the maintained counts, and each sink's oldest event found through its index."""
        if not self.operator:
            self.check_file()  # a worker has no maintenance thread: count the outbox's file, not a deleted one
        db = self._db()
        now = time.time()
        pending = {}
        try:
            counts = db.execute("SELECT sink, pending FROM sink_counts WHERE pending > 0").fetchall()
        except sqlite3.OperationalError:
            # A file no process of this version has opened yet (a read-only look before the upgrade).
            counts = db.execute("SELECT sink, count(*) FROM pending GROUP BY sink").fetchall()
        for sink, count in counts:
            created = db.execute(
                "SELECT created FROM events WHERE id = (SELECT min(event) FROM pending WHERE sink=?)", (sink,)
            ).fetchone()
            pending[sink] = (count, created[0] if created else None)
        dead = dict(db.execute("SELECT sink, count(*) FROM dead_letters GROUP BY sink").fetchall())
        dropped = dict(db.execute("SELECT sink, count FROM dropped").fetchall())
        try:
            errors = {sink: (at, reason) for sink, at, reason in db.execute("SELECT sink, at, reason FROM sink_errors")}
        except sqlite3.OperationalError:  # an earlier version's file, opened read-only by the CLI
            errors = {}
        # Events in the host's journals (the outbox locked, slow or full) are pending too.
        waiting = waiting_in(self._journal.directory)
        for sink in self.sinks if waiting else ():
            count, created = pending.get(sink, (0, None))
            pending[sink] = (count + waiting, created)
        result = {}
        for sink in sorted(set(self.sinks) | set(pending) | set(dead) | set(dropped)):
            count, created = pending.get(sink, (0, None))
            result[sink] = SinkBacklog(
                count,
                round(max(now - created, 0.0), 3) if created is not None else None,
                dead.get(sink, 0),
                dropped.get(sink, 0),
                configured=sink in self.sinks,
                last_error=errors[sink][1] if sink in errors else None,
                last_error_at=errors[sink][0] if sink in errors else None,
            )
        return result

    def dead_letters(self, sink: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT sink, event_id, failed, reason, body FROM dead_letters"
        rows = self._db().execute(query + (" WHERE sink=? ORDER BY failed" if sink else " ORDER BY failed"),
                                  (sink,) if sink else ())  # fmt: skip
        return [{"sink": s, "event_id": e, "failed": f, "reason": r, "event": json.loads(b)} for s, e, f, r, b in rows]

    def redeliver(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Put dead letters back in line, each for its own sink only, and only for sinks this
        process has (the others' letters are kept). The letter is claimed by deleting it in the
        same write transaction that queues it: two operators at once never queue one twice."""
        wanted = [name for name in self.sinks if sink in (None, name)]
        if not wanted:
            return 0

        def move(db: sqlite3.Connection) -> int:
            clauses, params = [f"sink IN ({','.join('?' * len(wanted))})"], list(wanted)
            if event_id:
                clauses.append("event_id=?")
                params.append(event_id)
            rows = db.execute(
                f"DELETE FROM dead_letters WHERE {' AND '.join(clauses)} RETURNING sink, event_id, body",  # noqa: S608
                params,
            ).fetchall()
            for row_sink, row_event_id, body in rows:
                self._insert(db, row_event_id, body, self._route_of([row_sink]))
            return len(rows)

        return int(self._transaction(move))

    def purge(self, sink: str, dead_letters_only: bool = False) -> tuple[int, int]:
        """Drop ``sink``'s undelivered events (unless ``dead_letters_only``) and its dead letters, on
        purpose, counted as dropped (an event other sinks still wait for stays for them)."""

        def drop(db: sqlite3.Connection) -> tuple[int, int]:
            events = 0 if dead_letters_only else db.execute("DELETE FROM pending WHERE sink=?", (sink,)).rowcount
            letters = db.execute("DELETE FROM dead_letters WHERE sink=?", (sink,)).rowcount
            if events + letters:
                db.execute(
                    "INSERT INTO dropped VALUES (?, ?) ON CONFLICT(sink) DO UPDATE SET count=count+excluded.count",
                    (sink, events + letters),
                )
            return events, letters

        events, letters = self._transaction(drop)
        return int(events), int(letters)

    def close(self) -> None:
        """Move what the journal still holds into SQLite, then close this process's connections
        (every thread's); a later call opens new ones. A journal that could not be emptied stays
        on disk and another process takes it over."""
        # Not for long while SQLite refuses them (locked by another process): they are safe in the
        # journal, which the next process takes over.
        drained = self._writer.drain(10.0, unless_refused=True)
        self._journal.close(remove=drained)  # left mapped (and on disk) while it still holds events
        self._generation += 1
        mine = [db for pid, db in self._connections if pid == os.getpid()]
        self._connections = [(pid, db) for pid, db in self._connections if pid != os.getpid()]
        anchor_pid, anchor = self._anchor
        if anchor_pid == os.getpid():
            mine.append(anchor)
            self._anchor = (-1, anchor)  # closed: check_file() falls back to an ordinary connection
        for db in mine:
            try:
                db.close()
            except sqlite3.Error:
                pass


_PAGE = 4096  # SQLite's default page size, which this file keeps
_WAL_CAP_MAX = 40 * 1024 * 1024
_WAL_SLACK = 2 * 1024 * 1024  # measured: the WAL exceeds its cap by 1-2.5 MB under a starved checkpoint
_CONVERT_LIVE_BYTES = 1024 * 1024
_VACUUM_STEP = 1024  # pages per incremental_vacuum: a short write transaction each
_RECLAIM_S = 0.05
_RECLAIM_FROM_PAGES = 256  # 1 MiB of free pages


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _pages(db: sqlite3.Connection) -> tuple[int, int]:
    return db.execute("PRAGMA page_count").fetchone()[0], db.execute("PRAGMA freelist_count").fetchone()[0]


def _page_size(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA page_size").fetchone()[0])


def _live_bytes(db: sqlite3.Connection) -> int:
    pages, free = _pages(db)
    return (pages - free) * _page_size(db)


def _drop_oldest(db: sqlite3.Connection) -> dict[str, int] | None:
    """The 200 oldest events out, counted per sink in ``dropped``; None when there is none."""
    oldest = [
        r[0] for r in db.execute("SELECT id FROM events WHERE id >= (SELECT min(id) FROM events) ORDER BY id LIMIT 200")
    ]
    if not oldest:
        return None
    marks = ",".join("?" * len(oldest))
    counts = dict(
        db.execute(f"SELECT sink, count(*) FROM pending WHERE event IN ({marks}) GROUP BY sink", oldest).fetchall()  # noqa: S608
    )
    db.execute(f"DELETE FROM pending WHERE event IN ({marks})", oldest)  # noqa: S608
    db.execute(f"DELETE FROM events WHERE id IN ({marks})", oldest)  # noqa: S608
    for sink, count in counts.items():
        db.execute(
            "INSERT INTO dropped VALUES (?, ?) ON CONFLICT(sink) DO UPDATE SET count=count+excluded.count",
            (sink, count),
        )
    return counts


def _prefer_incremental_vacuum(path: str) -> None:
    """A new file gives space back after a drain: auto_vacuum is chosen before its first page is
    written (an existing file is converted later, by ``_reclaim``)."""
    if _size(path) > 0:
        return
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError:
        pass  # another process is creating it; initialise() waits for it
    finally:
        db.close()


_LEGACY_SEGMENT = re.compile(r"^\d{20}-\d+-\d+-n\d+\.jsonl$")
_LINGER_S = 0.01  # how long journaled events wait to be moved into SQLite together
_EAGER_BATCH = 64
# Rows per INSERT: large enough to carry a batch in a few statements, small enough that a statement
# (and a tracing tool's copy of it with every value expanded) stays small after a backlog.
_ROWS_PER_STATEMENT = 25
_DIRECT_WAIT_S = 0.05  # the most a request waits on SQLite itself (only when the journal cannot take an event)
_WRITER_PATIENCE_S = 0.5  # the writer's spin on a locked file before it sleeps and tries again


def _existing(path: str, mode: str) -> sqlite3.Connection:
    """A connection to the file at ``path`` that never creates it (``mode`` ro or rw)."""
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode={mode}"
    return sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)


def _anchor(path: str) -> sqlite3.Connection:
    """A connection that has read once, so it holds the database, its WAL and its shared memory
    open: deleted by path, they stay readable through it."""
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    db.execute("SELECT count(*) FROM sinks").fetchone()
    return db


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


class _GroupCommit:
    """One writer thread per process moves the journaled events into SQLite together.

    Each event is durable in its journal slot (or spill file) before its caller is answered; a
    transaction per event would make every worker's threads queue on SQLite's write lock and write
    the same B-tree pages to the WAL again and again. Events that arrive while one transaction
    commits go together in the next. Nobody waits for this thread: while the file is locked by
    another process, slow or full, the events wait in the journal and this thread tries again.
    """

    def __init__(self, outbox: SqliteOutbox) -> None:
        self._outbox = outbox
        self._cond = threading.Condition()
        self._queue: list[_Write] = []
        self._pid: int | None = None
        self._busy = 0  # items queued or being written
        self._refused = False  # the last batch could not be written
        self._retry_s = 0.1
        self._next_check = 0.0

    def write(self, item: _Write) -> None:
        """Queue ``item`` (already durable in its journal slot, freed once committed)."""
        with self._cond:
            if self._pid != os.getpid():
                # After fork the parent's thread does not exist here.
                self._pid, self._queue, self._busy = os.getpid(), [], 0
                threading.Thread(target=self._run, name="audit-outbox-writer", daemon=True).start()
            self._queue.append(item)
            self._busy += 1
            if len(self._queue) == 1 or len(self._queue) >= _EAGER_BATCH:
                self._cond.notify()  # wake the writer once per batch, not once per event

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if not self._cond.wait(1.0):
                        self._check_file()  # idle too: a late event left in a replaced file moves on
                if len(self._queue) < _EAGER_BATCH:
                    self._cond.wait(_LINGER_S)  # let a batch gather (a full batch cuts this short)
                batch, self._queue = self._queue[:512], self._queue[512:]
            journal = self._outbox._journal
            stale = [item for item in batch if item.slot is not None and not journal.current(item.slot)]
            if stale:
                # Their journal was closed with them in it (the outbox closed while SQLite refused
                # them): they are on disk for another process to take over, no longer this thread's.
                batch = [item for item in batch if item not in stale]
                with self._cond:
                    self._busy -= len(stale)
            self._check_file()
            failed = self._write(batch)
            for item in batch:
                if item.error is None and item.slot is not None:
                    try:
                        self._outbox._journal.release(item.slot)
                    except OSError as exc:  # a spill file's clean-up: the thread must outlive it
                        log.error("audit journal: could not free a moved event's place (%s)", exc.strerror)
            with self._cond:
                self._busy -= len(batch) - len(failed)
                self._refused = bool(failed)
            if failed:
                log.error("audit outbox: %d event(s) wait in the journal, SQLite refused them (%s)",
                          len(failed), type(failed[0].error).__name__)  # fmt: skip
                time.sleep(self._retry_s)
                self._retry_s = min(self._retry_s * 2, 1.0)
                for item in failed:
                    item.error = None
                with self._cond:
                    self._queue[:0] = failed
            else:
                self._retry_s = 0.1

    def _check_file(self) -> None:
        # Workers have no maintenance thread (the host's delivery process has): before writing,
        # at most once a second, make sure the file written is the outbox's (check_file's text).
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + 1.0
        try:
            self._outbox.check_file()
        except Exception as exc:  # noqa: BLE001 - the writer must outlive a failed check
            log.error("audit outbox: could not check the outbox file (%s)", type(exc).__name__)

    def _write(self, batch: list[_Write]) -> list[_Write]:
        """Commit ``batch``; the items that could not be written (each with its error)."""
        try:
            with self._outbox._migrate_lock:
                self._outbox._write_batch(batch, patience_s=_WRITER_PATIENCE_S)
            return []
        except Exception as exc:  # noqa: BLE001 - every failure leaves the events in the journal
            if _locked(exc):
                for item in batch:
                    item.error = exc  # another process holds the file: the whole batch waits
                return batch
        failed = []
        for item in batch:  # find out which write failed: each alone
            try:
                with self._outbox._migrate_lock:
                    self._outbox._write_batch([item], patience_s=_WRITER_PATIENCE_S)
            except Exception as exc:  # noqa: BLE001
                item.error = exc
                failed.append(item)
        return failed

    def drain(self, timeout_s: float, unless_refused: bool = False) -> bool:
        """Wait until nothing is queued or being written in this process; with ``unless_refused``,
        give up as soon as SQLite refuses a batch."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                if self._busy <= 0 or self._pid != os.getpid():
                    return True
                if unless_refused and self._refused:
                    return False
            time.sleep(0.01)
        return False


class _Write:
    """One request's write: a placeholder ("intent") or a final event, and its journal ticket."""

    __slots__ = ("kind", "row", "slot", "error")

    def __init__(self, kind: str, row: tuple[Any, ...], slot: Ticket | None = None) -> None:
        self.kind, self.row, self.slot = kind, row, slot
        self.error: BaseException | None = None

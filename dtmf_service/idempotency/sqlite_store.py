"""The idempotency store of one host: one SQLite file in WAL mode, shared by every worker.

Sized for tens of millions of live keys: each request runs primary-key statements only, and
expiry walks an index on ``expires`` in small batches from a maintenance thread (README, "Sizing
the idempotency store").
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable

from dtmf_service.idempotency.stores import UNKNOWN_BODY, UNKNOWN_STATUS, Stored
from dtmf_service.sqlite_wal import initialise


def _private_file(path: str) -> None:
    """Create ``path`` as 0600 if it does not exist (SQLite gives its -wal and -shm files the same mode)."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    os.chmod(path, 0o600)


def _private_directory(directory: str) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.stat(directory).st_uid == os.geteuid():
        os.chmod(directory, 0o700)


class SqliteStore:
    """One SQLite file in WAL mode, shared by every worker on the host; readable by its owner only.

    Every statement a request runs is a primary-key lookup or write, so a request costs the same
    with 10 million live keys as with none. Expired records are deleted by ``maintain()`` (each
    process's maintenance thread, never a request thread), in batches of ``PURGE_BATCH`` through
    the index on ``expires``, by one process of the host at a time (``next_purge`` in the meta table).
    """

    PURGE_BATCH = 500  # rows per delete transaction: a few milliseconds of write lock at most
    PURGE_INTERVAL_S = 5.0  # one purge round per host per interval
    PURGE_ROUND_S = 1.0  # a round stops after this long; the next one goes on
    # The statements maintenance runs (kept here so a test can check their query plans).
    PURGE_SQL = (
        "DELETE FROM idempotency WHERE rowid IN"
        " (SELECT rowid FROM idempotency WHERE expires<=? ORDER BY expires LIMIT ?)"
    )
    GUARD_SQL = "UPDATE idempotency_meta SET value=? WHERE name='next_purge' AND value<=?"

    def __init__(
        self, path: str, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.path = path
        _private_directory(os.path.dirname(os.path.abspath(path)))
        _private_file(path)
        self._local = threading.local()
        # This process's writers queue here, in order, instead of in SQLite's busy handler, whose
        # growing sleeps (1, 2, 5 ... 100 ms) under many threads turned into 1 s waits and failed
        # finishes: only the host's other processes are left to contend for the file's lock.
        self._write_lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._initialise()

    def _initialise(self) -> None:
        def schema(db: sqlite3.Connection) -> None:
            db.execute(
                "CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,"
                " state TEXT NOT NULL, status INTEGER, body TEXT, headers TEXT, expires REAL NOT NULL,"
                " lease REAL)"
            )
            columns = {row[1] for row in db.execute("PRAGMA table_info(idempotency)")}
            if "lease" not in columns:  # a store made by an earlier version
                db.execute("ALTER TABLE idempotency ADD COLUMN lease REAL")
            if "owner" not in columns:
                db.execute("ALTER TABLE idempotency ADD COLUMN owner TEXT")
            # Expiry walks this index in small batches; without it each purge read the whole table.
            db.execute("CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires)")
            db.execute("CREATE TABLE IF NOT EXISTS idempotency_meta (name TEXT PRIMARY KEY, value REAL NOT NULL)")
            db.execute("INSERT OR IGNORE INTO idempotency_meta VALUES ('next_purge', 0)")

        initialise(self.path, schema)

    def _connect(self) -> sqlite3.Connection:
        # One connection per thread and per process: sqlite connections survive neither sharing nor fork.
        owner = (os.getpid(), threading.get_ident())
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "owner", None) != owner:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")  # per connection; WAL itself is set once in the file
            self._local.db, self._local.owner = db, owner
        return db

    def claim(self, key: str, fingerprint: str, owner: str, lease_s: float, ttl_s: float) -> Stored | None:
        db = self._connect()
        with self._write_lock:
            return self._claim(db, key, fingerprint, owner, lease_s, ttl_s)

    def _claim(
        self, db: sqlite3.Connection, key: str, fingerprint: str, owner: str, lease_s: float, ttl_s: float
    ) -> Stored | None:
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT fingerprint, state, status, body, headers, lease FROM idempotency WHERE key=? AND expires>?",
                (key, now),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency (key, fingerprint, state, status, body, headers, expires,"
                    " lease, owner) VALUES (?, ?, 'in_flight', NULL, NULL, NULL, ?, ?, ?)",
                    (key, fingerprint, now + lease_s + ttl_s, now + lease_s, owner),
                )
            elif row[1] == "in_flight" and (row[5] or 0) <= now:
                # The lease lapsed: the worker that held it died mid-request. Its outcome is unknown.
                db.execute(
                    "UPDATE idempotency SET state='done', status=?, body=?, headers='{}' WHERE key=?",
                    (UNKNOWN_STATUS, UNKNOWN_BODY, key),
                )
                row = (row[0], "done", UNKNOWN_STATUS, UNKNOWN_BODY, "{}", None)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if row is None:
            return None
        return Stored(row[1], row[0], row[2] or 0, row[3] or "", json.loads(row[4]) if row[4] else None)

    def finish(self, key: str, owner: str, stored: Stored, ttl_s: int) -> None:
        db = self._connect()
        # CXone has answered: wait for a busy store only briefly, the background retry waits longer.
        db.execute("PRAGMA busy_timeout=1000")
        try:
            with self._write_lock:
                db.execute(
                    "UPDATE idempotency SET state='done', status=?, body=?, headers=?, expires=?"
                    " WHERE key=? AND owner=?",
                    (stored.status, stored.body, json.dumps(stored.headers or {}), self._clock() + ttl_s, key, owner),
                )
        finally:
            db.execute("PRAGMA busy_timeout=5000")

    def release(self, key: str, owner: str) -> None:
        db = self._connect()
        db.execute("PRAGMA busy_timeout=1000")
        try:
            with self._write_lock:
                db.execute("DELETE FROM idempotency WHERE key=? AND owner=? AND state='in_flight'", (key, owner))
        finally:
            db.execute("PRAGMA busy_timeout=5000")

    @property
    def maintenance_interval_s(self) -> float | None:
        return self.PURGE_INTERVAL_S

    def maintain(self) -> int:
        """One purge round, if it is this process's turn on the host: expired records deleted in
        batches (each its own short write transaction), for at most ``PURGE_ROUND_S``."""
        db = self._connect()
        now = self._clock()
        if db.execute(self.GUARD_SQL, (now + self.PURGE_INTERVAL_S, now)).rowcount != 1:
            return 0  # another process of this host purged within the interval
        deleted, stop_at = 0, time.monotonic() + self.PURGE_ROUND_S
        while True:
            with self._write_lock:
                batch = db.execute(self.PURGE_SQL, (now, self.PURGE_BATCH)).rowcount
            deleted += batch
            if batch < self.PURGE_BATCH or time.monotonic() >= stop_at:
                return deleted
            self._sleep(0.005)  # let waiting request writes in between batches

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

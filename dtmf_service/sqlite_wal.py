"""What the SQLite stores (idempotency, audit outbox) share: opening a file in WAL mode, and
retrying a write while another process holds the lock."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
BUSY_PATIENCE_S = 10.0


def initialise(path: str, setup: Callable[[sqlite3.Connection], None], patience_s: float = 15.0) -> None:
    """WAL mode and the schema, once per file. Workers booting at the same moment race for the
    exclusive lock the WAL switch takes, and SQLite answers "locked" without waiting: retry."""
    deadline = time.monotonic() + patience_s
    delay = 0.01
    while True:
        db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            setup(db)
            return
        except sqlite3.OperationalError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        finally:
            db.close()


def retry_busy(attempt: Callable[[], T], patience_s: float = BUSY_PATIENCE_S) -> T:
    """Run ``attempt`` again every half millisecond while SQLite says the database is locked, for
    ``patience_s`` at most.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms and more, while the lock is usually
    free again after a fraction of a millisecond; in WAL mode only starting a write can be refused.
    A lock held longer than 50 ms is another process's (a backup, an operator's ``sqlite3``): then
    every 5 ms, so that threads waiting it out do not take the CPU from the requests."""
    started = deadline = 0.0
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            now = time.monotonic()
            if not deadline:
                started, deadline = now, now + patience_s
            if now > deadline:
                raise
            time.sleep(0.0005 if now - started < 0.05 else 0.005)

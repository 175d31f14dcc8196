"""Where Idempotency-Key records live: one SQLite file per host, or Redis for a fleet.

A record is an in-flight mark (with a lease) while the first request runs, then the outcome
it got (status, body without the digits, Retry-After). A lapsed lease is turned into the
"unknown" outcome by whoever reads it first, atomically.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from dtmf_service.config import ConfigError
from dtmf_service.sqlite_wal import initialise

UNKNOWN_STATUS = 504
UNKNOWN_BODY = json.dumps(
    {
        "status": "submission_unknown",
        "error": "the first request with this Idempotency-Key did not finish (its worker stopped); "
        "the digits may or may not have been played, so they were not sent again",
        "cxone_status": None,
    },
    separators=(",", ":"),
)


@dataclass
class Stored:
    state: str  # "in_flight" | "done"
    fingerprint: str
    status: int = 0
    body: str = ""  # the outcome's JSON body, digits blanked
    headers: dict[str, str] | None = None


class Store(Protocol):
    """What ``Idempotency`` needs from a store; every method may raise on store trouble."""

    def claim(self, key: str, fingerprint: str, lease_s: float, ttl_s: float) -> Stored | None:
        """None when this call claimed the key; else what is stored for it."""

    def finish(self, key: str, stored: Stored, ttl_s: int) -> None: ...

    def release(self, key: str, fingerprint: str) -> None: ...

    def local_key(self) -> bytes:
        """The fingerprint key to use when none is configured (or raise ConfigError)."""

    def close(self) -> None: ...


def default_store_url() -> str:
    return f"sqlite:///{os.path.abspath(os.path.join('var', 'idempotency', 'idempotency.db'))}"


def open_store(url: str | None) -> Store:
    """The store named by IDEMPOTENCY_STORE (default: a SQLite file under ./var)."""
    url = url or default_store_url()
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
        return SqliteStore(url[len("sqlite:///") :])
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    raise ConfigError("IDEMPOTENCY_STORE: expected sqlite:///<path> or redis://host:port/db")


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
    """One SQLite file in WAL mode, shared by every worker on the host; readable by its owner only."""

    _PURGE_EVERY = 500

    def __init__(self, path: str) -> None:
        self.path = path
        _private_directory(os.path.dirname(os.path.abspath(path)))
        _private_file(path)
        self._local = threading.local()
        self._claims = 0
        self._initialise()

    def local_key(self) -> bytes:
        """The fingerprint key when none is configured: random, made once, kept beside the store
        (0600), never inside it: a leaked copy of the database alone gives no digits back."""
        key_path = f"{self.path}.key"
        try:
            with open(key_path, "rb") as handle:
                key = handle.read().strip()
            if key:
                return key
        except FileNotFoundError:
            pass
        tmp = f"{key_path}.{os.getpid()}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_hex(32).encode())
        try:
            os.link(tmp, key_path)  # atomic: the first process to get here decides the key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        with open(key_path, "rb") as handle:
            return handle.read().strip()

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

    def claim(self, key: str, fingerprint: str, lease_s: float, ttl_s: float) -> Stored | None:
        db = self._connect()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT fingerprint, state, status, body, headers, lease FROM idempotency WHERE key=? AND expires>?",
                (key, now),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, 'in_flight', NULL, NULL, NULL, ?, ?)",
                    (key, fingerprint, now + ttl_s, now + lease_s),
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
        self._claims += 1
        if self._claims % self._PURGE_EVERY == 0:
            db.execute("DELETE FROM idempotency WHERE expires<=?", (now,))
        if row is None:
            return None
        return Stored(row[1], row[0], row[2] or 0, row[3] or "", json.loads(row[4]) if row[4] else None)

    def finish(self, key: str, stored: Stored, ttl_s: int) -> None:
        db = self._connect()
        # CXone has answered: wait for a busy store only briefly, the background retry waits longer.
        db.execute("PRAGMA busy_timeout=1000")
        try:
            db.execute(
                "UPDATE idempotency SET state='done', status=?, body=?, headers=?, expires=?"
                " WHERE key=? AND fingerprint=?",
                (
                    stored.status,
                    stored.body,
                    json.dumps(stored.headers or {}),
                    time.time() + ttl_s,
                    key,
                    stored.fingerprint,
                ),
            )
        finally:
            db.execute("PRAGMA busy_timeout=5000")

    def release(self, key: str, fingerprint: str) -> None:
        db = self._connect()
        db.execute("PRAGMA busy_timeout=1000")
        try:
            db.execute(
                "DELETE FROM idempotency WHERE key=? AND fingerprint=? AND state='in_flight'", (key, fingerprint)
            )
        finally:
            db.execute("PRAGMA busy_timeout=5000")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class RedisStore:
    """Redis, for many hosts behind one balancer: SET NX claims a key atomically; the lease is in the value."""

    # Turn a lapsed in-flight mark into the "unknown" outcome, unless another process changed it meanwhile.
    _LAPSE = (
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') return 1 end return 0"
    )
    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = "dtmf:idem:"

    def local_key(self) -> bytes:
        # Hosts sharing a Redis store must agree on fingerprints: a per-host random key cannot do.
        raise ConfigError("IDEMPOTENCY_HASH_KEY: required with a redis:// IDEMPOTENCY_STORE (or set AUDIT_HASH_KEY)")

    def claim(self, key: str, fingerprint: str, lease_s: float, ttl_s: float) -> Stored | None:
        name = self._prefix + key
        marker = json.dumps(
            {"state": "in_flight", "fingerprint": fingerprint, "lease": time.time() + lease_s, "id": uuid.uuid4().hex}
        )
        for _ in range(3):
            if self._redis.set(name, marker, nx=True, ex=int(ttl_s)):
                return None
            raw = self._redis.get(name)
            if raw is None:
                continue  # expired between SET and GET: try to claim again
            data = json.loads(raw)
            if data["state"] == "in_flight" and data.get("lease", 0) <= time.time():
                unknown = json.dumps(
                    {
                        "state": "done",
                        "fingerprint": data["fingerprint"],
                        "status": UNKNOWN_STATUS,
                        "body": UNKNOWN_BODY,
                    }
                )
                self._redis.eval(self._LAPSE, 1, name, raw, unknown)
                continue  # read back whatever is there now
            return Stored(
                data["state"], data["fingerprint"], data.get("status", 0), data.get("body", ""), data.get("headers")
            )
        raise RuntimeError("idempotency store: could not claim key")

    def finish(self, key: str, stored: Stored, ttl_s: int) -> None:
        value = json.dumps(
            {
                "state": "done",
                "fingerprint": stored.fingerprint,
                "status": stored.status,
                "body": stored.body,
                "headers": stored.headers or {},
            }
        )
        self._redis.set(self._prefix + key, value, ex=ttl_s)

    def release(self, key: str, fingerprint: str) -> None:
        name = self._prefix + key
        raw = self._redis.get(name)
        if raw is not None and json.loads(raw).get("state") == "in_flight":
            self._redis.eval(self._RELEASE, 1, name, raw)

    def close(self) -> None:
        self._redis.close()

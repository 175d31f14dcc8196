"""Idempotency-Key: a retried request never presses the keys twice (CONTRACT.md section 9).

The key is scoped to the caller's identity (a hash of the matched API key) and bound to
a keyed fingerprint (HMAC-SHA256) of the raw body, so a copy of the store does not give
a 4-digit PIN back to a brute force. The first request claims the key with an in-flight
mark whose lease outlives any request (section 3's deadline plus a margin); a repeat
while it runs is 409, with another body 422, after it finished the stored response with
``Idempotent-Replayed: true``. A mark whose lease lapsed means its worker died mid-request:
the repeat is answered 504 ``submission_unknown``, never processed again.

Answers that prove nothing reached CXone (503 rate limited, 502 with no CXone answer) are
not stored, so the caller's retry is processed. When the store fails after CXone answered,
the caller still gets the true outcome; the write is retried in the background.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Response

from .errors import error_response
from .sqlite_wal import initialise

log = logging.getLogger("dtmf_service")

_PRINTABLE = frozenset(range(0x20, 0x7F))
LEASE_MARGIN_S = 30.0
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


def valid_key(key: str) -> bool:
    """1 to 255 printable ASCII characters."""
    return 0 < len(key) <= 255 and all(ord(c) in _PRINTABLE for c in key)


@dataclass
class Stored:
    state: str  # "in_flight" | "done"
    fingerprint: str
    status: int = 0
    body: str = ""
    headers: dict[str, str] | None = None


def _storable(status: int, body: Mapping[str, Any]) -> bool:
    if status == 503:
        return False
    return not (status == 502 and body.get("cxone_status") is None)


class Idempotency:
    """Runs a request at most once per key, on a shared store."""

    def __init__(
        self,
        store: Any,
        ttl_s: int,
        lease_s: float,
        hash_key: bytes,
        on_store_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self._hash_key = hash_key
        self._on_store_error = on_store_error
        self._retrier = _Retrier(lease_s)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], on_store_error: Callable[[], None] = lambda: None) -> Idempotency:
        url = config.get("IDEMPOTENCY_STORE") or default_store_url()
        # The lease outlives the longest request (one deadline, CONTRACT.md section 3) with room to spare.
        from .config import request_deadline_s

        lease = request_deadline_s(config) + LEASE_MARGIN_S
        store = open_store(url)
        secret = config.get("IDEMPOTENCY_HASH_KEY") or config.get("AUDIT_HASH_KEY")
        key = secret.encode() if secret else store.local_key()
        return cls(store, int(config["IDEMPOTENCY_TTL_S"]), lease, key, on_store_error)

    def run(
        self, key: str, scope: str, raw_body: bytes, handle: Callable[[], Response], digits: str
    ) -> tuple[Response, bool]:
        """The response, and whether it was processed here (False: replayed or refused).

        The stored body never holds the digits (a card number or PIN would sit in the store for a
        day): they are blanked before storing and put back on replay, from this request, whose body
        is byte-identical to the first one's.
        """
        store_key = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        fingerprint = hmac.new(self._hash_key, raw_body, hashlib.sha256).hexdigest()
        existing = self.store.claim(store_key, fingerprint, self.lease_s, self.ttl_s)
        if existing is not None:
            if existing.fingerprint != fingerprint:
                return error_response(
                    422, "idempotency_conflict", "this Idempotency-Key was used with a different request body"
                ), False
            if existing.state == "in_flight":
                return error_response(
                    409, "idempotency_in_progress", "a request with this Idempotency-Key is still being processed"
                ), False
            response = Response(
                _with_digits(existing.body, digits), status=existing.status, mimetype="application/json"
            )
            response.headers.update(existing.headers or {})
            response.headers["Idempotent-Replayed"] = "true"
            return response, False
        try:
            response = handle()
        except BaseException:
            self._settle(self.store.release, store_key, fingerprint)
            raise
        body = response.get_data(as_text=True)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        if _storable(response.status_code, parsed):
            headers = {"Retry-After": response.headers["Retry-After"]} if "Retry-After" in response.headers else {}
            stored = Stored("done", fingerprint, response.status_code, _with_digits(body, ""), headers)
            self._settle(self.store.finish, store_key, stored, self.ttl_s)
        else:
            self._settle(self.store.release, store_key, fingerprint)
        return response, True

    def _settle(self, operation: Callable[..., None], *args: Any) -> None:
        """Record how the request ended. CXone has answered by now, so a failing store must not turn
        the true outcome into a 500: log, count, and keep trying in the background."""
        try:
            operation(*args)
        except Exception as exc:  # noqa: BLE001 - any store failure (locked, full, unreachable)
            self._on_store_error()
            log.error(
                "idempotency store failed after the request was processed (%s); the caller got the true "
                "outcome and the store write is retried in the background",
                type(exc).__name__,
            )
            self._retrier.submit(operation, args)

    def flush(self, timeout_s: float) -> bool:
        """Wait for background store writes (tests, shutdown)."""
        return self._retrier.flush(timeout_s)

    def close(self) -> None:
        self._retrier.flush(2.0)
        self.store.close()


class _Retrier:
    """Retries failed store writes until they succeed or their lease is long gone (then a repeat
    of the key reads the lapsed lease as "unknown" instead, which still never presses twice)."""

    def __init__(self, give_up_after_s: float) -> None:
        self._give_up_s = max(give_up_after_s * 4, 120.0)
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...], float]] = queue.Queue()
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._busy = 0

    def submit(self, operation: Callable[..., None], args: tuple[Any, ...]) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._queue = queue.Queue()
                self._busy = 0
                threading.Thread(target=self._run, name="idempotency-retry", daemon=True).start()
            self._busy += 1
        self._queue.put((operation, args, time.monotonic() + self._give_up_s))

    def _run(self) -> None:
        delay = 0.2
        while True:
            operation, args, give_up_at = self._queue.get()
            try:
                operation(*args)
            except Exception as exc:  # noqa: BLE001
                if time.monotonic() < give_up_at:
                    self._queue.put((operation, args, give_up_at))
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                log.error("idempotency store: gave up writing a request's outcome (%s)", type(exc).__name__)
            delay = 0.2
            with self._lock:
                self._busy -= 1

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._busy <= 0 or self._pid != os.getpid():
                    return True
            time.sleep(0.02)
        return False


def _with_digits(body: str, digits: str) -> str:
    """The body with its "digits" field set to ``digits`` (same key order, same separators)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or "digits" not in data:
        return body
    data["digits"] = digits
    return json.dumps(data, separators=(",", ":"))


def default_store_url() -> str:
    return f"sqlite:///{os.path.abspath(os.path.join('var', 'idempotency', 'idempotency.db'))}"


def open_store(url: str) -> Any:
    """The store named by IDEMPOTENCY_STORE."""
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
        return SqliteStore(url[len("sqlite:///") :])
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    from .config import ConfigError

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
        from .config import ConfigError

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

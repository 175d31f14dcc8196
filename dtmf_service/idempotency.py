"""Idempotency-Key: a retried request never presses the keys twice (CONTRACT.md section 9).

The key is scoped to the caller's API key and bound to a SHA-256 of the raw
body. The first request claims the key with an in-flight marker; a repeat
while it runs is 409, a repeat with another body is 422, a repeat after it
finished gets the stored response with ``Idempotent-Replayed: true``.
Answers that say the digits certainly did not reach CXone (503 rate limited,
502 with no CXone answer) are not stored, so the caller's retry is processed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Response

from .errors import error_response

_PRINTABLE = frozenset(range(0x20, 0x7F))


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

    def __init__(self, store: Any, ttl_s: int, in_flight_ttl_s: float, hash_key: str | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.in_flight_ttl_s = in_flight_ttl_s
        # The body holds the digits: with a key, its fingerprint cannot be brute-forced from a leaked store.
        self._hash_key = hash_key.encode() if hash_key else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Idempotency:
        url = config.get("IDEMPOTENCY_STORE") or f"sqlite:///{os.path.abspath(os.path.join('var', 'idempotency.db'))}"
        # A crashed worker's marker must not block the key forever: it lapses after the longest possible request.
        in_flight = float(config["CXONE_RETRY_BUDGET_S"]) + float(config["CXONE_READ_TIMEOUT_S"]) + 30.0
        return cls(open_store(url), int(config["IDEMPOTENCY_TTL_S"]), in_flight, config.get("AUDIT_HASH_KEY"))

    def run(
        self, key: str, scope: str, raw_body: bytes, handle: Callable[[], Response], digits: str
    ) -> tuple[Response, bool]:
        """The response, and whether it was processed here (False: replayed or refused).

        The stored body never holds the digits (a card number or PIN would sit in the store for a
        day): they are blanked before storing and put back on replay, from this request, whose body
        is byte-identical to the first one's.
        """
        store_key = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        fingerprint = (
            hmac.new(self._hash_key, raw_body, hashlib.sha256).hexdigest()
            if self._hash_key
            else hashlib.sha256(raw_body).hexdigest()
        )
        existing = self.store.claim(store_key, fingerprint, self.in_flight_ttl_s)
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
            self.store.release(store_key, fingerprint)
            raise
        body = response.get_data(as_text=True)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        if _storable(response.status_code, parsed):
            headers = {"Retry-After": response.headers["Retry-After"]} if "Retry-After" in response.headers else {}
            stored = Stored("done", fingerprint, response.status_code, _with_digits(body, ""), headers)
            self.store.finish(store_key, stored, self.ttl_s)
        else:
            self.store.release(store_key, fingerprint)
        return response, True

    def close(self) -> None:
        self.store.close()


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


def open_store(url: str) -> Any:
    """The store named by IDEMPOTENCY_STORE."""
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
        return SqliteStore(url[len("sqlite:///") :])
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    from .config import ConfigError

    raise ConfigError("IDEMPOTENCY_STORE: expected sqlite:///<path> or redis://host:port/db")


class SqliteStore:
    """One SQLite file in WAL mode, shared by every worker on the host."""

    _PURGE_EVERY = 500

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._local = threading.local()
        self._claims = 0
        self._initialise()

    def _initialise(self, patience_s: float = 15.0) -> None:
        """WAL mode and the table, once per file. Workers booting at the same moment race for the
        exclusive lock the WAL switch takes, and SQLite answers "locked" without waiting: retry."""
        deadline = time.monotonic() + patience_s
        delay = 0.01
        while True:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,"
                    " state TEXT NOT NULL, status INTEGER, body TEXT, headers TEXT, expires REAL NOT NULL)"
                )
                return
            except sqlite3.OperationalError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            finally:
                db.close()

    def _connect(self) -> sqlite3.Connection:
        # One connection per thread and per process: sqlite connections survive neither sharing nor fork.
        owner = (os.getpid(), threading.get_ident())
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "owner", None) != owner:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")  # per connection; WAL itself is set once in the file
            self._local.db, self._local.owner = db, owner
        return db

    def claim(self, key: str, fingerprint: str, in_flight_ttl_s: float) -> Stored | None:
        db = self._connect()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT fingerprint, state, status, body, headers FROM idempotency WHERE key=? AND expires>?",
                (key, now),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, 'in_flight', NULL, NULL, NULL, ?)",
                    (key, fingerprint, now + in_flight_ttl_s),
                )
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
        self._connect().execute(
            "UPDATE idempotency SET state='done', status=?, body=?, headers=?, expires=? WHERE key=? AND fingerprint=?",
            (
                stored.status,
                stored.body,
                json.dumps(stored.headers or {}),
                time.time() + ttl_s,
                key,
                stored.fingerprint,
            ),
        )

    def release(self, key: str, fingerprint: str) -> None:
        self._connect().execute(
            "DELETE FROM idempotency WHERE key=? AND fingerprint=? AND state='in_flight'", (key, fingerprint)
        )

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class RedisStore:
    """Redis, for many hosts behind one balancer: SET NX with a TTL claims a key atomically."""

    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        self._prefix = "dtmf:idem:"

    def claim(self, key: str, fingerprint: str, in_flight_ttl_s: float) -> Stored | None:
        marker = json.dumps({"state": "in_flight", "fingerprint": fingerprint, "id": uuid.uuid4().hex})
        name = self._prefix + key
        for _ in range(3):
            if self._redis.set(name, marker, nx=True, px=int(in_flight_ttl_s * 1000)):
                return None
            raw = self._redis.get(name)
            if raw is None:
                continue  # expired between SET and GET: try to claim again
            data = json.loads(raw)
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

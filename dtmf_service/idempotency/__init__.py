"""Idempotency-Key: a retried request never presses the keys twice (CONTRACT.md section 9).

The key is scoped to the caller's identity (a hash of the matched API key) and bound to
a keyed fingerprint (HMAC-SHA256) of the raw body, so a copy of the store does not give
a 4-digit PIN back to a brute force. The first request claims the key with an in-flight
mark whose lease outlives any request (section 3's deadline plus a margin); a repeat
while it runs is 409, with another body 422, after it finished the stored response with
``Idempotent-Replayed: true``. A mark whose lease lapsed means its worker died mid-request:
the repeat is answered 504 ``submission_unknown``, never processed again.

The in-flight mark outlives its lease by a replay window whatever ``IDEMPOTENCY_TTL_S`` says,
and each claim has its own owner token: a store error during or after the claim releases that
claim (nothing was sent), never another request's. Expiry runs in each process's maintenance
thread, never in a request thread (stores.SqliteStore.maintain).

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
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from dtmf_service.config import ConfigError, request_lease_s
from dtmf_service.idempotency.stores import UNKNOWN_STATUS, RedisStore, Store, Stored, open_store
from dtmf_service.ids import hex_id
from dtmf_service.outcome import Facts, Outcome, error_body

log = logging.getLogger("dtmf_service")

_PRINTABLE = frozenset(range(0x20, 0x7F))


def valid_key(key: str) -> bool:
    """1 to 255 printable ASCII characters."""
    return 0 < len(key) <= 255 and all(ord(c) in _PRINTABLE for c in key)


def _storable(outcome: Outcome) -> bool:
    """Whether a repeat must get this outcome again: not when it proves nothing reached CXone (503
    rate limited, 502 with no CXone answer) or when it is an internal error: then the repeat runs."""
    if outcome.http_status in (500, 503):
        return False
    return not (outcome.http_status == 502 and outcome.cxone_status is None)


class Idempotency:
    """Runs a request at most once per key, on a shared store."""

    def __init__(
        self,
        store: Store,
        ttl_s: int,
        lease_s: float,
        hash_key: bytes,
        on_store_error: Callable[[], None] = lambda: None,
        maintenance_interval_s: float | None = None,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self._hash_key = hash_key
        self._on_store_error = on_store_error
        self._retrier = _Retrier(lease_s)
        interval = maintenance_interval_s if maintenance_interval_s is not None else store.maintenance_interval_s
        self._maintenance = _Maintenance(store, interval) if interval else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], on_store_error: Callable[[], None] = lambda: None) -> Idempotency:
        lease = request_lease_s(config)
        key = fingerprint_key(config)  # before opening the store: a refusal leaves nothing behind
        store = open_store(config.get("IDEMPOTENCY_STORE"))
        if isinstance(store, RedisStore) and not (config.get("IDEMPOTENCY_HASH_KEY") or config.get("AUDIT_HASH_KEY")):
            store.close()
            # Hosts sharing a Redis store must agree on fingerprints: a per-host key cannot do.
            raise ConfigError(
                "IDEMPOTENCY_HASH_KEY: required with a redis:// IDEMPOTENCY_STORE (or set AUDIT_HASH_KEY)"
            )
        return cls(store, int(config["IDEMPOTENCY_TTL_S"]), lease, key, on_store_error)

    def run(
        self, key: str, scope: str, raw_body: bytes, handle: Callable[[], Outcome], digits: str, facts: Facts
    ) -> Outcome:
        """``handle()``'s outcome, or the stored one, or a refusal; only ``handle()``'s is counted.

        The stored body never holds the digits (a card number or PIN would sit in the store for a
        day): they are blanked before storing and put back on replay, from this request, whose body
        is byte-identical to the first one's.
        """
        store_key = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        fingerprint = hmac.new(self._hash_key, raw_body, hashlib.sha256).hexdigest()
        owner = hex_id(16)
        if self._maintenance is not None:
            self._maintenance.ensure_running()
        try:
            existing = self.store.claim(store_key, fingerprint, owner, self.lease_s, self.ttl_s)
        except Exception:
            # The claim may be written even though the call failed (a commit, then an error): take
            # back this request's mark, so the key is not left in flight with nothing sent. The
            # caller gets 500 (nothing was sent) and may retry.
            self._on_store_error()
            self._release_after_failed_claim(store_key, owner)
            raise
        if existing is not None:
            if existing.fingerprint != fingerprint:
                error = "this Idempotency-Key was used with a different request body"
                return Outcome(422, error_body("idempotency_conflict", error), facts, counted=False)
            if existing.state == "in_flight":
                error = "a request with this Idempotency-Key is still being processed"
                return Outcome(409, error_body("idempotency_in_progress", error), facts, counted=False)
            return _replayed(existing, digits, facts)
        try:
            outcome = handle()
        except BaseException:
            self._settle(self.store.release, store_key, owner)
            raise
        if _storable(outcome):
            body = json.dumps({**outcome.body, "digits": ""} if "digits" in outcome.body else dict(outcome.body),
                              separators=(",", ":"))  # fmt: skip
            retry_after = {"Retry-After": outcome.headers["Retry-After"]} if "Retry-After" in outcome.headers else {}
            stored = Stored("done", fingerprint, outcome.http_status, body, retry_after)
            self._settle(self.store.finish, store_key, owner, stored, self.ttl_s)
        else:
            self._settle(self.store.release, store_key, owner)
        return outcome

    def _release_after_failed_claim(self, store_key: str, owner: str) -> None:
        try:
            self.store.release(store_key, owner)
        except Exception as exc:  # noqa: BLE001 - the store is in trouble: keep trying in the background
            log.error("idempotency store failed while claiming a key (%s); nothing was sent", type(exc).__name__)
            self._retrier.submit(self.store.release, (store_key, owner))
        else:
            log.error("idempotency store failed while claiming a key; the claim was released, nothing was sent")

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
        if self._maintenance is not None:
            self._maintenance.stop()
        self._retrier.flush(2.0)
        self.store.close()


_sandbox_key: bytes | None = None
_sandbox_key_lock = threading.Lock()


def fingerprint_key(config: Mapping[str, Any]) -> bytes:
    """The HMAC key of body fingerprints (CONTRACT.md section 8 *rev 3*): IDEMPOTENCY_HASH_KEY or
    AUDIT_HASH_KEY, from configuration only, never a file beside the store.

    In sandbox mode with neither set: a random key held in memory by the process that first asks.
    gunicorn's master asks at start (on_starting), before it forks, so every worker it ever forks
    (reloads included) inherits the same key and fingerprints agree across workers; a restarted
    master makes a new key, so a repeat sent across a restart is answered 422, never processed twice.
    """
    secret = config.get("IDEMPOTENCY_HASH_KEY") or config.get("AUDIT_HASH_KEY")
    if secret:
        return str(secret).encode()
    if not config.get("SANDBOX"):
        raise ConfigError(
            "IDEMPOTENCY_HASH_KEY: required outside sandbox mode (or AUDIT_HASH_KEY); the key of the stored"
            " fingerprints must be kept outside the store"
        )
    global _sandbox_key
    with _sandbox_key_lock:
        if _sandbox_key is None:
            _sandbox_key = secrets.token_bytes(32)
        return _sandbox_key


class _Maintenance:
    """Each process's expiry thread (``store.maintain()`` every interval, with jitter so the
    processes of a host do not all wake at once). Started by the first keyed request of each
    process, because gunicorn forks workers after start-up and threads do not survive a fork."""

    def __init__(self, store: Store, interval_s: float) -> None:
        self._store = store
        self._interval_s = interval_s
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def ensure_running(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            threading.Thread(target=self._run, args=(self._stop,), name="idempotency-expiry", daemon=True).start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval_s * random.uniform(0.5, 1.0)):
            try:
                self._store.maintain()
            except Exception as exc:  # noqa: BLE001 - a busy or failing store: try again next round
                log.warning("idempotency store: expiry round failed (%s); retried next round", type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()


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


def _replayed(stored: Stored, digits: str, facts: Facts) -> Outcome:
    """The first request's outcome again, with this request's digits put back (same key order)."""
    try:
        body = json.loads(stored.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"status": "submission_unknown", "error": "the stored outcome could not be read", "cxone_status": None}
    if "digits" in body:
        body["digits"] = digits
    headers = {**(stored.headers or {}), "Idempotent-Replayed": "true"}
    return Outcome(stored.status or UNKNOWN_STATUS, body, facts, headers, counted=False,
                   cxone_status=body.get("cxone_status"))  # fmt: skip

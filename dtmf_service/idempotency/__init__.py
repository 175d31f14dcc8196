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
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from dtmf_service.config import request_lease_s
from dtmf_service.idempotency.stores import UNKNOWN_STATUS, Store, Stored, open_store
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
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self._hash_key = hash_key
        self._on_store_error = on_store_error
        self._retrier = _Retrier(lease_s)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], on_store_error: Callable[[], None] = lambda: None) -> Idempotency:
        lease = request_lease_s(config)
        store = open_store(config.get("IDEMPOTENCY_STORE"))
        secret = config.get("IDEMPOTENCY_HASH_KEY") or config.get("AUDIT_HASH_KEY")
        key = secret.encode() if secret else store.local_key()
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
        existing = self.store.claim(store_key, fingerprint, self.lease_s, self.ttl_s)
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
            self._settle(self.store.release, store_key, fingerprint)
            raise
        if _storable(outcome):
            body = json.dumps({**outcome.body, "digits": ""} if "digits" in outcome.body else dict(outcome.body),
                              separators=(",", ":"))  # fmt: skip
            retry_after = {"Retry-After": outcome.headers["Retry-After"]} if "Retry-After" in outcome.headers else {}
            stored = Stored("done", fingerprint, outcome.http_status, body, retry_after)
            self._settle(self.store.finish, store_key, stored, self.ttl_s)
        else:
            self._settle(self.store.release, store_key, fingerprint)
        return outcome

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

"""Where Idempotency-Key records live: one SQLite file per host (sqlite_store.py), or Redis for a fleet.

A record is an in-flight mark (with a lease) while the first request runs, then the outcome
it got (status, body without the digits, Retry-After). A lapsed lease is turned into the
"unknown" outcome by whoever reads it first, atomically.

The in-flight mark is kept for the lease *plus* the replay window (CONTRACT.md section 9 *rev 3*):
``IDEMPOTENCY_TTL_S`` below the longest request never lets a repeat through beside the first, and a
lapsed lease reads as "unknown" for a whole replay window after it. Each claim carries an owner
token, so a release or a late finish only ever touches the mark its own request made.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Protocol

from dtmf_service.config import ConfigError
from dtmf_service.redis_client import is_redis_url

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

    def claim(self, key: str, fingerprint: str, owner: str, lease_s: float, ttl_s: float) -> Stored | None:
        """None when this call claimed the key (as ``owner``); else what is stored for it."""

    def finish(self, key: str, owner: str, stored: Stored, ttl_s: int) -> None:
        """Store ``owner``'s outcome in place of its mark (or of the "unknown" its lapse left)."""

    def release(self, key: str, owner: str) -> None:
        """Drop ``owner``'s in-flight mark, if it is still there: nothing was sent."""

    @property
    def maintenance_interval_s(self) -> float | None:
        """How often ``maintain()`` should run in each process; None when the store expires
        records by itself."""

    def maintain(self) -> int:
        """Off the request path: remove some expired records; how many."""

    def close(self) -> None: ...


def default_store_url() -> str:
    return f"sqlite:///{os.path.abspath(os.path.join('var', 'idempotency', 'idempotency.db'))}"


def open_store(url: str | None) -> Store:
    """The store named by IDEMPOTENCY_STORE (default: a SQLite file under ./var)."""
    url = url or default_store_url()
    if url.startswith("sqlite:///"):
        from dtmf_service.idempotency.sqlite_store import SqliteStore

        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
        return SqliteStore(url[len("sqlite:///") :])
    if is_redis_url(url):
        return RedisStore(url)
    raise ConfigError(
        "IDEMPOTENCY_STORE: expected sqlite:///<path>, redis://host:port/db"
        " or redis+sentinel://host:port[,host:port...]/service_name/db"
    )


class RedisStore:
    """Redis, for many hosts behind one balancer: SET NX claims a key atomically; the lease is in the value."""

    # Turn a lapsed in-flight mark into the "unknown" outcome, unless another process changed it meanwhile.
    _LAPSE = (
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') return 1 end return 0"
    )
    # Drop a mark only if it is still this request's in-flight mark.
    _RELEASE = (
        "local raw = redis.call('GET', KEYS[1]) if not raw then return 0 end "
        "local data = cjson.decode(raw) "
        "if data['state'] == 'in_flight' and data['id'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
        "return 0"
    )
    # Store an outcome over this request's mark (or the "unknown" its lapse left), never over another's.
    _FINISH = (
        "local raw = redis.call('GET', KEYS[1]) if not raw then return 0 end "
        "local data = cjson.decode(raw) "
        "if data['id'] ~= ARGV[1] then return 0 end "
        "redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1"
    )

    def __init__(self, url: str) -> None:
        from dtmf_service.redis_client import connect, parse

        # redis:// or redis+sentinel:// (the master looked up again after a failover): redis_client.py
        self._redis = connect(parse(url, "IDEMPOTENCY_STORE"), socket_timeout=2, socket_connect_timeout=2)
        self._prefix = "dtmf:idem:"

    def claim(self, key: str, fingerprint: str, owner: str, lease_s: float, ttl_s: float) -> Stored | None:
        name = self._prefix + key
        marker = json.dumps(
            {"state": "in_flight", "fingerprint": fingerprint, "lease": time.time() + lease_s, "id": owner}
        )
        # The mark outlives its lease by a whole replay window: whatever IDEMPOTENCY_TTL_S says, a
        # repeat finds it while the request can still run, and reads "unknown" after a lapse.
        expire_s = math.ceil(lease_s + ttl_s)
        for _ in range(3):
            if self._redis.set(name, marker, nx=True, ex=expire_s):
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
                        "id": data.get("id"),
                    }
                )
                self._redis.eval(self._LAPSE, 1, name, raw, unknown)
                continue  # read back whatever is there now
            return Stored(
                data["state"], data["fingerprint"], data.get("status", 0), data.get("body", ""), data.get("headers")
            )
        raise RuntimeError("idempotency store: could not claim key")

    def finish(self, key: str, owner: str, stored: Stored, ttl_s: int) -> None:
        value = json.dumps(
            {
                "state": "done",
                "fingerprint": stored.fingerprint,
                "status": stored.status,
                "body": stored.body,
                "headers": stored.headers or {},
                "id": owner,
            }
        )
        self._redis.eval(self._FINISH, 1, self._prefix + key, owner, value, int(ttl_s))

    def release(self, key: str, owner: str) -> None:
        self._redis.eval(self._RELEASE, 1, self._prefix + key, owner)

    @property
    def maintenance_interval_s(self) -> float | None:
        return None  # Redis expires keys by itself (EX on every record)

    def maintain(self) -> int:
        return 0

    def close(self) -> None:
        self._redis.close()

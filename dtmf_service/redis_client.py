"""What the Redis users (audit outbox, idempotency store) share: one URL syntax and one way to connect.

``redis://``, ``rediss://`` and ``unix://`` URLs go to redis-py as they are. With
``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]`` the master of
``service_name`` is asked of Redis Sentinel: redis-py's SentinelConnectionPool looks it up again on
every new connection, and a connection to a master demoted to replica (READONLY) is dropped, so
after a failover the next command reaches the new master. Two query parameters, read here and not
passed on, say how many replicas must hold a write before the outbox forgets its local copy
(``wait_replicas``, default 1 with Sentinel, 0 otherwise) and how long ``WAIT`` may take
(``wait_ms``, default 1000); see README "Fleet mode".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from dtmf_service.config import ConfigError

if TYPE_CHECKING:
    import redis

SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")
_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: a plain one for redis-py, or Sentinel's addresses and service."""

    url: str  # the plain URL without our own query parameters ("" with Sentinel)
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    password: str | None = None
    sentinel_password: str | None = None
    wait_replicas: int = 0
    wait_ms: int = 1000


def is_redis_url(url: str) -> bool:
    return url.startswith(SCHEMES)


def parse(url: str, key: str) -> RedisTarget:
    """Read ``url``; a malformed one is a ConfigError naming ``key`` (never the URL: it may hold a password)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    own = {name: query.pop(name) for name in ("wait_replicas", "wait_ms") if name in query}
    sentinel = parts.scheme == "redis+sentinel"
    try:
        wait_replicas = int(own.get("wait_replicas", 1 if sentinel else 0))
        wait_ms = int(own.get("wait_ms", 1000))
    except ValueError:
        raise ConfigError(f"{key}: wait_replicas and wait_ms must be whole numbers") from None
    if wait_replicas < 0 or wait_ms < 1:
        raise ConfigError(f"{key}: wait_replicas must be 0 or more and wait_ms 1 or more")
    if not sentinel:
        plain = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
        return RedisTarget(plain, wait_replicas=wait_replicas, wait_ms=wait_ms)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    password = unquote(userinfo.partition(":")[2]) if userinfo else None
    sentinels = []
    for address in filter(None, hosts.split(",")):
        host, _, port = address.rpartition(":") if ":" in address else (address, "", str(_SENTINEL_PORT))
        try:
            sentinels.append((host.strip("[]"), int(port)))
        except ValueError:
            raise ConfigError(f"{key}: a Sentinel address needs host:port") from None
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(f"{key}: expected redis+sentinel://host:port[,host:port...]/service_name[/db]")
    return RedisTarget(
        "",
        tuple(sentinels),
        path[0],
        int(path[1]) if len(path) == 2 else 0,
        password or None,
        query.get("sentinel_password") or None,
        wait_replicas,
        wait_ms,
    )


def connect(target: RedisTarget, **options: Any) -> redis.Redis:
    """A client for the target; ``options`` (timeouts, decode_responses) go to every connection."""
    import redis  # imported when used: a host on SQLite alone never loads it
    from redis.sentinel import Sentinel

    if not target.sentinels:
        return redis.Redis.from_url(target.url, **options)
    timeouts = {name: value for name, value in options.items() if name.startswith("socket_")}
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={**timeouts, "password": target.sentinel_password},
        **options,
    )
    return sentinel.master_for(target.service, db=target.db, password=target.password)

"""The DTMF POST on the wire, with failures sorted into "not sent" and "outcome unknown".

The hot path uses urllib3's connection pools directly: they are requests' own
transport, without the per-call machinery (settings merging, cookies, hooks)
that costs about 0.6 ms of CPU per call and that a fixed JSON POST does not need.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import urllib3
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict


class NotSent(Exception):
    """The connection never opened: CXone cannot have seen the request."""


class Unknown(Exception):
    """The request may have reached CXone, but no answer came back."""


class Answer(Protocol):
    status: int
    headers: Mapping[str, str]
    text: str


class _Answer:
    __slots__ = ("status", "headers", "text")

    def __init__(self, status: int, headers: Mapping[str, str], text: str) -> None:
        self.status, self.headers, self.text = status, headers, text


class Transport(Protocol):
    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        """POST and read the whole answer; raise NotSent or Unknown."""


_NOT_SENT = (
    urllib3.exceptions.NewConnectionError,  # refused, unreachable, DNS (NameResolutionError)
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.SSLError,  # the handshake failed before any byte of the request left
)


def classify(exc: BaseException) -> type[Exception]:
    """NotSent when nothing reached CXone, else Unknown (the safe default)."""
    seen = 0
    reason: BaseException | None = exc
    while reason is not None and seen < 8:
        if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
            return Unknown
        if isinstance(reason, _NOT_SENT):
            return NotSent
        reason = getattr(reason, "reason", None) or reason.__cause__ or reason.__context__
        seen += 1
    return Unknown


class PooledTransport:
    """Keep-alive connection pools shared by every thread of the process."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, pool_size: int = 128) -> None:
        self._timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)
        # block=False: a burst beyond pool_size opens extra connections instead of queueing callers.
        self._pools = urllib3.PoolManager(num_pools=8, maxsize=pool_size, block=False, retries=False)
        self._origins: dict[str, urllib3.HTTPConnectionPool] = {}

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        scheme_end = url.index("://") + 3
        path_start = url.find("/", scheme_end)
        origin, path = (url, "/") if path_start < 0 else (url[:path_start], url[path_start:])
        try:
            pool = self._origins.get(origin)
            if pool is None:  # one URL parse per origin, not per call
                pool = self._origins[origin] = self._pools.connection_from_url(origin)
            response = pool.urlopen(
                "POST",
                path,
                body=body,
                headers=headers,
                timeout=self._timeout,
                retries=False,
                redirect=False,
                preload_content=True,
                assert_same_host=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise classify(exc)() from None
        except OSError as exc:
            raise classify(exc)() from None
        return _Answer(response.status, response.headers, response.data.decode("utf-8", "replace"))

    def close(self) -> None:
        self._origins.clear()
        self._pools.clear()


class SimulatorTransport:
    """Sandbox mode: the in-process simulator answers, no socket involved."""

    def __init__(self, simulator: Any) -> None:
        self.simulator = simulator

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        answer = self.simulator.handle("POST", target, {k.lower(): v for k, v in headers.items()}, body)
        if answer.delay_s:
            time.sleep(answer.delay_s)
        if answer.drop:
            raise Unknown()
        headers_in = CaseInsensitiveDict({"Content-Type": "application/json", **answer.headers})
        return _Answer(answer.status, headers_in, answer.payload().decode("utf-8", "replace"))

    def close(self) -> None:
        pass

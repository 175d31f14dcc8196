"""Every CXone call on the wire, with failures sorted by where they happened (CONTRACT.md section 3).

DTMF is not idempotent, so what matters about a failure is whether any byte of the
request may have reached CXone. The transport therefore opens the connection (TCP and
the TLS handshake) as its own step: a failure there is ``NotSent`` and may be retried.
From the first byte written on, every failure (TLS error, reset, end of file, a
malformed or partial answer, a timeout) is ``Unknown``, whatever the exception's class.

Each call has one deadline for the whole exchange. A socket timeout bounds a single
``recv`` only, so an answer trickled in a byte at a time would outlive it; the
deadline watchdog cuts the socket when the time is up instead.

``http.client`` connections in a small keep-alive pool open the connection (TCP, TLS with
SNI and hostname checks); the exchange itself is this module's (``http1.py``): one write of
the whole request, then a strict reading of the answer. http.client's own reading parses the
header block with the ``email`` package, which was the largest single cost of a request.
Owning the connect step is what makes the "was anything written?" question answerable.
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import urlsplit

from dtmf_service.cxone.http1 import Headers, exchange, host_header
from dtmf_service.deadlines import WATCHDOG, Watchdog

# An idle keep-alive connection older than this is dropped rather than reused: servers close
# theirs after a while, and a write into a connection the server is closing is an unknown outcome.
IDLE_MAX_S = 30.0


class NotSent(Exception):
    """Nothing of the request was written: CXone cannot have seen it (safe to retry)."""


class Unknown(Exception):
    """Writing began, and no whole answer came back: CXone may have acted on the request."""


class AnswerHeaders(Protocol):
    def get(self, name: str, default: None = None) -> str | None:
        """The first value of ``name``, case-insensitive."""

    def items(self) -> Iterable[tuple[str, str]]: ...


class Answer(Protocol):
    status: int
    headers: AnswerHeaders
    text: str


class _Answer:
    __slots__ = ("status", "headers", "text")

    def __init__(self, status: int, headers: AnswerHeaders, text: str) -> None:
        self.status, self.headers, self.text = status, headers, text


class Transport(Protocol):
    def request(self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float) -> Answer:
        """Send and read the whole answer within ``timeout_s``; raise NotSent or Unknown."""

    def close(self) -> None: ...


def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Verification always on; ``ca_bundle`` adds trust (a private CA) to the system's."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


class HttpTransport:
    """Keep-alive connections per origin, shared by every thread of the process."""

    def __init__(
        self,
        connect_timeout_s: float,
        read_timeout_s: float,
        ca_bundle: str | None = None,
        pool_size: int = 128,
        watchdog: Watchdog = WATCHDOG,
    ) -> None:
        self._connect_s = connect_timeout_s
        self._read_s = read_timeout_s
        self._context = tls_context(ca_bundle)
        self._pool_size = pool_size
        self._watchdog = watchdog
        self._idle: dict[str, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._hosts: dict[str, bytes] = {}  # origin -> its Host header line
        self._lock = threading.Lock()

    def request(self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float) -> Answer:
        deadline = time.monotonic() + timeout_s
        origin, target = _split(url)
        conn = self._checkout(origin)
        if conn.sock is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotSent("the request's deadline passed before connecting")
            conn.timeout = min(self._connect_s, remaining)
            try:
                conn.connect()  # TCP and the whole TLS handshake: nothing of the request is written yet
            except Exception as exc:  # noqa: BLE001 - any failure to connect means "not sent"
                conn.close()
                raise NotSent(f"could not connect ({type(exc).__name__})") from None
        sock = conn.sock
        assert sock is not None
        remaining = deadline - time.monotonic()
        timeout = max(min(self._read_s, remaining), 0.001)
        if sock.gettimeout() != timeout:
            sock.settimeout(timeout)  # two fcntl calls each time: only when it changes (usually the read timeout)
        alarm = self._watchdog.arm(sock, remaining)
        try:
            host = self._hosts.get(origin) or self._hosts.setdefault(origin, host_header(conn))
            status, answer_headers, data, will_close = exchange(sock, method, target, host, body, headers)
        except Exception as exc:  # noqa: BLE001 - from the first byte on, any failure is "unknown"
            self._watchdog.cancel(alarm)
            conn.close()
            why = "the request's deadline passed" if alarm.fired else type(exc).__name__
            raise Unknown(f"no complete answer ({why})") from None
        intact = self._watchdog.cancel(alarm)
        answer = _Answer(status, answer_headers, data.decode("utf-8", "replace"))
        if will_close or not intact:
            conn.close()
        else:
            self._checkin(origin, conn)
        return answer

    def _checkout(self, origin: str) -> http.client.HTTPConnection:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(origin)
            while idle:
                since, conn = idle.pop()
                if now - since < IDLE_MAX_S and _still_open(conn):
                    return conn
                conn.close()
        scheme, _, hostport = origin.partition("://")
        if scheme == "https":
            return http.client.HTTPSConnection(hostport, context=self._context)
        return http.client.HTTPConnection(hostport)

    def _checkin(self, origin: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self._pool_size:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for idle in pools.values():
            for _, conn in idle:
                conn.close()


def _split(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise NotSent("not an http(s) URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme}://{parts.netloc}", target


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle connection must have nothing to read: readable means closed by the server (or junk)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class SimulatorTransport:
    """Sandbox mode: the in-process simulator answers, no socket involved."""

    def __init__(self, simulator: Any) -> None:
        self.simulator = simulator

    def request(self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float) -> Answer:
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        answer = self.simulator.handle(method, target, {k.lower(): v for k, v in headers.items()}, body or b"")
        if answer.delay_s:
            time.sleep(min(answer.delay_s, max(timeout_s, 0.0)))
            if answer.delay_s > timeout_s:
                raise Unknown("no complete answer (the request's deadline passed)")
        if answer.drop:
            raise Unknown("no complete answer (connection dropped)")
        headers_in = Headers([("Content-Type", "application/json"), *answer.headers.items()])
        return _Answer(answer.status, headers_in, answer.payload().decode("utf-8", "replace"))

    def close(self) -> None:
        pass

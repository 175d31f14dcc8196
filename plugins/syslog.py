"""Audit sink ``syslog``: one event per RFC 5424 message (CONTRACT.md section 7, *rev 2*).

    <PRI>1 <RFC 3339 timestamp> <hostname> <app name> <pid> audit - <the event's JSON>

AUDIT_SYSLOG_ADDRESS: ``udp://host:port``, ``tcp://host:port``, ``tls://host:port`` (RFC 5425, the
certificate verified against the system's trust plus AUDIT_SYSLOG_CA_BUNDLE) or a Unix socket path
(default /dev/log). Over TCP and TLS each message is framed by octet counting (RFC 6587 3.4.1,
RFC 5425 4.3: ``<length> <message>``), so a JSON message can never be split or joined by a newline.
A Unix socket may be a datagram socket (rsyslog's imuxsock, journald) or a stream socket
(syslog-ng's ``unix-stream()``): the sink tries datagram first and falls back to stream, where each
message ends with a newline as those daemons expect.
"""

from __future__ import annotations

import datetime as dt
import logging.handlers
import os
import select
import socket
import ssl
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from dtmf_service import event_json, hookimpl
from dtmf_service.config import ConfigError
from dtmf_service.cxone.transport import tls_context

_SEVERITY_INFO = 6
_NILVALUE = "-"


def parse_address(address: str) -> tuple[str, Any]:
    """``(kind, address)`` with kind ``udp``, ``tcp``, ``tls`` or ``unix``."""
    if address.startswith(("udp://", "tcp://", "tls://")):
        parts = urlsplit(address)
        if not parts.hostname or not parts.port:
            raise ConfigError(f"AUDIT_SYSLOG_ADDRESS: expected scheme://host:port, got {address!r}")
        return parts.scheme, (parts.hostname, parts.port)
    if address.startswith("/"):
        return "unix", address
    raise ConfigError(f"AUDIT_SYSLOG_ADDRESS: expected udp://, tcp://, tls:// or a socket path, got {address!r}")


def _header_token(text: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most ``limit`` characters."""
    cleaned = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return cleaned or _NILVALUE


def format_message(priority: int, hostname: str, app_name: str, event: dict[str, Any]) -> bytes:
    """One RFC 5424 message; the JSON (ASCII-escaped) is the MSG part."""
    timestamp = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = f"<{priority}>1 {timestamp} {hostname} {app_name} {os.getpid()} audit {_NILVALUE} "
    return (header + event_json(event)).encode("ascii")


class SyslogSink:
    """Raises when a send fails, so the core keeps the event and tries again."""

    def __init__(
        self, address: str, facility: str, app_name: str = "dtmf-gateway", ca_bundle: str | None = None
    ) -> None:
        facilities = logging.handlers.SysLogHandler.facility_names
        if facility not in facilities:
            raise ConfigError(f"AUDIT_SYSLOG_FACILITY: unknown facility {facility!r}")
        self.kind, self.address = parse_address(address)
        self._tls: ssl.SSLContext | None = None
        if self.kind == "tls":
            try:
                self._tls = tls_context(ca_bundle)
            except OSError as exc:  # ssl.SSLError included: a file that is not PEM
                raise ConfigError(f"AUDIT_SYSLOG_CA_BUNDLE: cannot load {ca_bundle!r} ({type(exc).__name__})") from None
        self.priority = facilities[facility] * 8 + _SEVERITY_INFO
        self.hostname = _header_token(socket.gethostname(), 255)
        self.app_name = _header_token(app_name, 48)
        self._sock: socket.socket | None = None
        self._stream = False
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _connected(self) -> socket.socket:
        if self._sock is not None and self._pid == os.getpid():
            if not self._stream or not _peer_closed(self._sock):
                return self._sock
            self._drop_connection()  # the daemon closed the stream: a send now would vanish unseen
        if self.kind == "unix":
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.connect(self.address)
                self._stream = False
            except OSError:
                sock.close()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # EPROTOTYPE: a stream socket
                try:
                    sock.connect(self.address)
                except OSError:
                    sock.close()
                    raise
                self._stream = True
        else:
            family_type = socket.SOCK_DGRAM if self.kind == "udp" else socket.SOCK_STREAM
            host, port = self.address
            info = socket.getaddrinfo(host, port, type=family_type)[0]
            sock = socket.socket(info[0], family_type)
            try:
                sock.settimeout(5.0)
                sock.connect(info[4])
                if self._tls is not None:
                    sock = self._tls.wrap_socket(sock, server_hostname=host)  # handshake, verified
            except OSError:
                sock.close()
                raise
            self._stream = self.kind in ("tcp", "tls")
        self._sock, self._pid = sock, os.getpid()
        return sock

    def deliver(self, event: dict[str, Any]) -> None:
        message = format_message(self.priority, self.hostname, self.app_name, event)
        with self._lock:
            try:
                sock = self._connected()
                if not self._stream:
                    sock.send(message)
                elif self.kind in ("tcp", "tls"):
                    sock.sendall(f"{len(message)} ".encode() + message)  # octet counting
                else:
                    sock.sendall(message + b"\n")  # unix-stream: newline-terminated, as syslog-ng reads it
            except OSError:
                self._drop_connection()
                raise

    def _drop_connection(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop_connection()


def _peer_closed(sock: socket.socket) -> bool:
    """Whether a stream's peer has closed it. A syslog daemon never writes to us, so a readable
    socket means end-of-file or an error; over TLS it may also be a record of the protocol's own (a
    TLS 1.3 session ticket), which reading without blocking consumes."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    if not isinstance(sock, ssl.SSLSocket):
        return True
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except ssl.SSLWantReadError:
        return False  # only protocol records were waiting: still open
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


@hookimpl
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> SyslogSink | None:
    if name != "syslog":
        return None
    return SyslogSink(
        config.get("AUDIT_SYSLOG_ADDRESS") or "/dev/log",
        config.get("AUDIT_SYSLOG_FACILITY") or "local0",
        config.get("AUDIT_SYSLOG_APP_NAME") or "dtmf-gateway",
        config.get("AUDIT_SYSLOG_CA_BUNDLE"),
    )

"""Audit sink ``syslog``: one event per message, ``<PRI>`` then the event's JSON.

AUDIT_SYSLOG_ADDRESS: ``udp://host:port``, ``tcp://host:port`` or a Unix socket path (default /dev/log).
Over TCP each message is terminated by a newline (RFC 6587 non-transparent framing).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import socket
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from dtmf_service import hookimpl
from dtmf_service.config import ConfigError

_SEVERITY_INFO = 6


def parse_address(address: str) -> tuple[Any, int]:
    """``(address, socktype)`` for SysLogHandler."""
    if address.startswith(("udp://", "tcp://")):
        parts = urlsplit(address)
        if not parts.hostname or not parts.port:
            raise ConfigError(f"AUDIT_SYSLOG_ADDRESS: expected udp://host:port or tcp://host:port, got {address!r}")
        kind = socket.SOCK_DGRAM if parts.scheme == "udp" else socket.SOCK_STREAM
        return (parts.hostname, parts.port), kind
    if address.startswith("/"):
        return address, socket.SOCK_DGRAM  # SysLogHandler falls back to a stream socket by itself
    raise ConfigError(f"AUDIT_SYSLOG_ADDRESS: expected udp://, tcp:// or a socket path, got {address!r}")


class SyslogSink:
    """Sends through the standard library's SysLogHandler, raising when a send fails."""

    def __init__(self, address: str, facility: str) -> None:
        facilities = logging.handlers.SysLogHandler.facility_names
        if facility not in facilities:
            raise ConfigError(f"AUDIT_SYSLOG_FACILITY: unknown facility {facility!r}")
        self.address, self.socktype = parse_address(address)
        self.priority = facilities[facility] * 8 + _SEVERITY_INFO
        self._handler: logging.handlers.SysLogHandler | None = None
        self._lock = threading.Lock()

    def _connected(self) -> logging.handlers.SysLogHandler:
        if self._handler is None:
            self._handler = logging.handlers.SysLogHandler(address=self.address, socktype=self.socktype)
        return self._handler

    def deliver(self, event: dict[str, Any]) -> None:
        message = f"<{self.priority}>" + json.dumps(event, separators=(",", ":"))
        data = message.encode()
        with self._lock:
            try:
                handler = self._connected()
                if handler.unixsocket:
                    try:
                        handler.socket.send(data)
                    except OSError:
                        handler.socket.close()
                        handler._connect_unixsocket(handler.address)
                        handler.socket.send(data)
                elif handler.socktype == socket.SOCK_DGRAM:
                    handler.socket.sendto(data, handler.address)
                else:
                    handler.socket.sendall(data + b"\n")
            except OSError:
                self._drop_connection()
                raise

    def _drop_connection(self) -> None:
        if self._handler is not None:
            try:
                self._handler.close()
            except OSError:
                pass
            self._handler = None

    def close(self) -> None:
        with self._lock:
            self._drop_connection()


@hookimpl
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> SyslogSink | None:
    if name != "syslog":
        return None
    return SyslogSink(config.get("AUDIT_SYSLOG_ADDRESS") or "/dev/log", config.get("AUDIT_SYSLOG_FACILITY") or "local0")

"""Metrics exporter ``statsd``: counters and a timer over UDP (STATSD_HOST, STATSD_PORT, STATSD_PREFIX)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from dtmf_service import hookimpl
from dtmf_service.metrics import CATEGORY, outcome_category

_MAX_DATAGRAM = 512  # the statsd client's default: lines that would reach it go in another datagram


class StatsdExporter:
    """One datagram per request, names as CONTRACT.md section 7.

    The datagram is what the ``statsd`` package's pipeline sends (``name:1|c`` lines joined by
    newlines, the timer as ``%0.6f|ms``), built from lines made once: the pipeline object, its
    deque and its formatting per line cost more than the rest of the exporter. Sending is one
    ``sendto`` on a socket of its own, which threads may share; like the statsd client, a send that
    fails is dropped (metrics never fail a request).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        prefix = config["STATSD_PREFIX"] or ""
        self._prefix = f"{prefix}." if prefix else ""
        family, _, _, _, address = socket.getaddrinfo(
            config["STATSD_HOST"], int(config["STATSD_PORT"]), socket.AF_INET, socket.SOCK_DGRAM
        )[0]
        self._address: Any = address
        self._sock: socket.socket | None = socket.socket(family, socket.SOCK_DGRAM)
        total = f"{self._prefix}total_submissions:1|c"
        self._lines = {category: (total, f"{self._prefix}{category}:1|c") for category in set(CATEGORY.values())}
        self._statuses: dict[int, str] = {}

    def record(self, event: dict[str, Any]) -> None:
        category = outcome_category(event["outcome"])
        if category is None:
            return
        lines = list(self._lines[category])
        if category == "successful_parses":
            lines.append(f"{self._prefix}latency_ms:{float(event['latency_ms']):0.6f}|ms")
        status = event.get("cxone_status")
        if status is not None:
            code = int(status)
            line = self._statuses.get(code)
            if line is None:
                line = self._statuses[code] = f"{self._prefix}cxone_status.{code}:1|c"
            lines.append(line)
        for datagram in _datagrams(lines):
            self._send(datagram)

    def _send(self, datagram: str) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.sendto(datagram.encode("ascii"), self._address)
        except (OSError, RuntimeError):
            pass  # as the statsd client: a lost datagram is a lost metric, never a failed request

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _datagrams(lines: list[str]) -> list[str]:
    """The lines joined by newlines, split where a datagram would reach 512 bytes (the pipeline's rule)."""
    data = lines[0]
    out = []
    for line in lines[1:]:
        if len(line) + len(data) + 1 >= _MAX_DATAGRAM:
            out.append(data)
            data = line
        else:
            data += "\n" + line
    out.append(data)
    return out


@hookimpl
def dtmf_metrics_exporter(name: str, config: Mapping[str, Any]) -> StatsdExporter | None:
    return StatsdExporter(config) if name == "statsd" else None

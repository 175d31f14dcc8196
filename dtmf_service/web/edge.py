"""Trust at the edge (CONTRACT.md section 8, *rev 3*): who may say who the caller is, and which request ids are kept.

``X-Forwarded-For`` and ``X-Forwarded-Proto`` are honoured only when the connection comes from an
address in FORWARDED_ALLOW_IPS (default 127.0.0.1 and ::1: the nginx on this host), and only
PROXY_COUNT hops deep (a Unix socket peer counts as trusted, as gunicorn's own rule has it). A
caller that reaches gunicorn directly from anywhere else cannot choose the ``client_ip`` its
audit event records.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from werkzeug.middleware.proxy_fix import ProxyFix

from dtmf_service.ids import hex_id

# The same rule as deploy/nginx.conf's: nginx's log and the audit event then share the id.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(supplied: str | None) -> str:
    """The caller's X-Request-ID when it matches ``^[A-Za-z0-9._:-]{1,128}$``, else a new one."""
    if supplied and _REQUEST_ID.fullmatch(supplied):
        return supplied
    return hex_id(16)  # as uuid4().hex: 32 hex digits


class TrustedProxies:
    """WSGI middleware: ProxyFix for connections from a trusted proxy, nothing for anyone else."""

    def __init__(self, app: Any, allowed: Iterable[str], hops: int) -> None:
        self._app = app
        self._fixed = ProxyFix(app, x_for=hops, x_proto=hops, x_host=0, x_port=0, x_prefix=0)
        entries = list(allowed)
        self._everyone = "*" in entries
        self._networks = [ipaddress.ip_network(e, strict=False) for e in entries if e != "*"]

    def trusted(self, peer: str | None) -> bool:
        """Whether the connecting address may set X-Forwarded-*."""
        if self._everyone:
            return True
        try:
            address = ipaddress.ip_address((peer or "").split("%", 1)[0])
        except ValueError:
            # A Unix socket (no IP): only local processes allowed by the socket's mode reach it; gunicorn
            # trusts these for its own forwarded headers too.
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self.trusted(environ.get("REMOTE_ADDR")):
            return self._fixed(environ, start_response)
        return self._app(environ, start_response)

"""Caller authentication (CONTRACT.md section 8): ``Authorization: Bearer <key>`` against API_KEYS.

Runs as the blueprint's ``before_request``, so a refused caller reaches no view: 401 is
never counted nor audited (section 4). Every key is compared in constant time, with no
early exit. The caller's identity kept for the request (``g.caller``, the idempotency
scope) is a hash of the matched key, never the key itself (``Bearer k`` and ``bearer k``
are one caller).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable

from flask import g, request

from dtmf_service.web.errors import error_response
from dtmf_service.web.response import Response

_OPEN = frozenset({"dtmf.healthz", "dtmf.openapi"})
_METRICS = frozenset({"dtmf.metrics", "dtmf.prometheus_metrics"})


class Authenticator:
    """Matches a bearer token against the configured keys."""

    def __init__(self, keys: Iterable[str], required: bool = False) -> None:
        self._keys = [key.encode() for key in keys]
        # API_KEYS_FILE set: on whatever the file holds; an empty file refuses everyone (never fails open).
        self._required = required

    @property
    def enabled(self) -> bool:
        return self._required or bool(self._keys)

    def caller(self, authorization: str) -> str | None:
        """The caller's identity for a matching ``Authorization`` header, else None."""
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        candidate = presented.strip().encode()
        matched = False
        for key in self._keys:  # every key compared, in constant time each: no early exit to time
            matched |= hmac.compare_digest(candidate, key)
        return hashlib.sha256(candidate).hexdigest()[:32] if matched else None


def authenticate(
    authenticator: Authenticator, metrics_public: bool, on_failure: Callable[[], None] | None = None
) -> Response | None:
    """The blueprint's ``before_request``: None to proceed (``g.caller`` set), else the 401.

    Every endpoint needs a key but /healthz, the OpenAPI document and, when METRICS_PUBLIC is
    set, the two metrics endpoints. Each refusal is counted (``on_failure``): never per key."""
    state = g._get_current_object()  # one proxy lookup, not one per use
    state.caller = ""
    if not authenticator.enabled:
        return None
    current = request._get_current_object()  # type: ignore[attr-defined]
    endpoint = current.endpoint
    if endpoint in _OPEN or (metrics_public and endpoint in _METRICS):
        return None
    caller = authenticator.caller(current.environ.get("HTTP_AUTHORIZATION", ""))  # the Authorization header
    if caller is None:
        if on_failure is not None:
            on_failure()
        return unauthorized()
    state.caller = caller
    return None


def unauthorized() -> Response:
    return error_response(
        401,
        "unauthorized",
        "missing or invalid API key (Authorization: Bearer <key>)",
        headers={"WWW-Authenticate": 'Bearer realm="dtmf-gateway"'},
    )

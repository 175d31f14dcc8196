"""The values one POST /api/dtmf/parse produces. Frozen: each is built once and only read after.

``RequestContext`` is what the HTTP layer knows of the request, ``Facts`` what the caller
sent as far as it was understood, ``Outcome`` the answer with everything the audit event
and the metrics need. None of them needs Flask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dtmf_service.jsontext import compact


@dataclass(frozen=True)
class RequestContext:
    """Where a request came from."""

    request_id: str
    trace_id: str
    trace_flags: str
    caller: str  # a hash of the matched API key (the idempotency scope); "" when keys are off
    client_ip: str | None
    started: float  # time.perf_counter() when the request arrived
    idempotency_key: str | None = None  # the Idempotency-Key header, as sent


@dataclass(frozen=True)
class Facts:
    """What the caller sent: ``sent`` is the JSON object (None when the body was not one), ``valid``
    the validated request (None when validation failed or did not run)."""

    event_id: str  # the audit event's id, also the CorrelationId sent to CXone
    sent: Mapping[str, Any] | None = None
    valid: Mapping[str, Any] | None = None
    invalid_fields: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Intent:
    """The durable audit placeholder written before the DTMF POST (CONTRACT.md section 7)."""

    ticket: object  # the outbox's handle on it
    event: Mapping[str, Any]


@dataclass(frozen=True)
class Outcome:
    """The answer to one request and what the audit event and the metrics take from it."""

    http_status: int
    body: Mapping[str, Any]
    facts: Facts
    headers: Mapping[str, str] = field(default_factory=dict)
    counted: bool = True  # False: answered from the idempotency store, nothing sent (section 4, 9)
    latency_ms: float | None = None
    cxone_status: int | None = None
    cxone_response: str | None = None
    intent: Intent | None = field(default=None, compare=False)

    @property
    def status(self) -> str:
        """The body's ``status``: dtmf_submitted, validation_failed, submission_unknown, ..."""
        return str(self.body["status"])

    def body_json(self) -> str:
        """The body exactly as sent."""
        return compact(dict(self.body))


def error_body(kind: str, error: str | None = None, **extra: Any) -> dict[str, Any]:
    """The one shape of every error body: ``{"status": kind, "error": ..., ...}``."""
    body: dict[str, Any] = {"status": kind}
    if error is not None:
        body["error"] = error
    body.update(extra)
    return body

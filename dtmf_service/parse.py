"""POST /api/dtmf/parse without the web: the raw body in, one frozen ``Outcome`` out.

The order is the contract's (sections 2, 3, 9): the Idempotency-Key is checked, the body
parsed and validated (nothing stored, nothing sent when that fails), the key claimed, the
audit placeholder made durable, the digits submitted; then ``answer`` turns what CXone did
into the caller's status and body, the one place that mapping lives.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any

from marshmallow import ValidationError

from dtmf_service.audit.trail import AuditTrail
from dtmf_service.cxone.client import CXoneClient, Result, Submission
from dtmf_service.idempotency import Idempotency, valid_key
from dtmf_service.ids import uuid4
from dtmf_service.outcome import Facts, Intent, Outcome, RequestContext, error_body
from dtmf_service.web.body import BadRequest, parse_object
from dtmf_service.web.errors import log_exception
from dtmf_service.web.schemas import DTMFRequestSchema, load_request, summarise
from dtmf_service.web.tracing import child_traceparent

log = logging.getLogger("dtmf_service")

_MAX_FIELD_NAME = 64
_UNKNOWN = (
    "CXone did not answer after the request was sent; the digits may or may not have been played, "
    "so they were not sent again"
)


class ParseService:
    """Validates a request and submits its digits once: CXone client, idempotency, audit placeholder."""

    def __init__(self, client: CXoneClient, idempotency: Idempotency, trail: AuditTrail) -> None:
        self.client = client
        self.idempotency = idempotency
        self.trail = trail
        self._schema = DTMFRequestSchema()

    def handle_parse(self, raw: bytes, ctx: RequestContext) -> Outcome:
        """The outcome of one request whose body was read in full; never raises."""
        event_id = uuid4()
        facts = Facts(event_id)
        try:
            key = ctx.idempotency_key
            if key is not None and not valid_key(key):
                return invalid(400, "Idempotency-Key must be 1 to 255 printable ASCII characters", facts, ctx)
            try:
                sent = parse_object(raw)
            except BadRequest as exc:
                return invalid(400, str(exc), facts, ctx)
            facts = Facts(event_id, sent)
            try:
                valid = load_request(self._schema, sent)
            except ValidationError as exc:
                errors = _flatten(exc.messages)
                facts = Facts(event_id, sent, invalid_fields=frozenset(errors))
                body = error_body("validation_failed", summarise(errors), errors=errors)
                return Outcome(400, body, facts, latency_ms=elapsed_ms(ctx))
            facts = Facts(event_id, sent, valid)
            if key is None:
                return self._submit(facts, ctx)
            # Validation failures above are never stored; only requests that reach CXone claim the key.
            assert facts.valid is not None
            submit = facts  # the closure's own name: mypy cannot narrow ``facts`` inside a lambda
            outcome = self.idempotency.run(
                key, ctx.caller, raw, lambda: self._submit(submit, ctx), facts.valid["digits"], facts
            )
            if not outcome.counted:
                # Not counted nor audited (nothing was sent), but an operator can still see it happened.
                log.info(
                    "request %s: Idempotency-Key answered %d without calling CXone", ctx.request_id, outcome.http_status
                )
            return outcome
        except Exception as exc:  # noqa: BLE001 - the caller gets 500 with no detail; the log gets the type
            return internal_error(exc, facts, ctx)

    def _submit(self, facts: Facts, ctx: RequestContext) -> Outcome:
        valid = facts.valid
        assert valid is not None
        intent = self.trail.intend(facts, ctx)  # durable before any byte goes to CXone
        try:
            trace = {"traceparent": child_traceparent(ctx.trace_id, ctx.trace_flags)}
            submission = self.client.submit(
                valid["interaction_id"], valid["digits"], valid["timeout_ms"], facts.event_id, trace
            )
            outcome = answer(submission, facts, ctx, intent)
        except Exception as exc:  # noqa: BLE001 - as above, and the placeholder is still settled
            return replace(internal_error(exc, facts, ctx), intent=intent)
        if outcome.http_status != 200:
            log.warning(
                "request %s trace %s: %s (http %d, cxone_status %s, attempts %d): %s",
                ctx.request_id,
                ctx.trace_id,
                outcome.status,
                outcome.http_status,
                outcome.cxone_status,
                submission.attempts,
                outcome.body.get("error"),
            )
        return outcome


def answer(submission: Submission, facts: Facts, ctx: RequestContext, intent: Intent | None = None) -> Outcome:
    """What the caller is told about a submission (CONTRACT.md section 2's table); ``intent``, the
    audit placeholder the outcome settles."""
    valid = facts.valid
    assert valid is not None
    cxone_status, text, result = submission.cxone_status, submission.cxone_response, submission.result
    headers: dict[str, str] = {}
    if result is Result.ACCEPTED:
        latency_ms = elapsed_ms(ctx)
        body: dict[str, Any] = {
            "status": "dtmf_submitted",
            "interaction_id": valid["interaction_id"],
            "digits": valid["digits"],
            "cxone_status": cxone_status,
            "attempts": submission.attempts,
            "latency_ms": latency_ms,
        }
        return Outcome(
            200, body, facts, latency_ms=latency_ms, cxone_status=cxone_status, cxone_response=text, intent=intent
        )
    if result is Result.UNKNOWN:
        http, body = 504, error_body("submission_unknown", _UNKNOWN, cxone_status=None)
    elif result is Result.NOT_FOUND:
        error = "CXone: interaction not found or no longer active"
        http, body = 404, error_body("submission_failed", error, cxone_status=cxone_status)
    elif result is Result.RATE_LIMITED:
        error = "CXone is still rate limiting; retry later"
        http, body = 503, error_body("submission_failed", error, cxone_status=cxone_status)
        headers["Retry-After"] = str(max(1, math.ceil(submission.retry_after_s or 0.0)))
    elif result is Result.UNREACHABLE:
        http, body = 502, error_body("submission_failed", "could not connect to CXone", cxone_status=None)
    elif result is Result.NOT_READY:
        http, body = 502, error_body("submission_failed", submission.detail, cxone_status=None)
    else:
        error = f"CXone answered {cxone_status}"
        http, body = 502, error_body("submission_failed", error, cxone_status=cxone_status)
    return Outcome(
        http,
        body,
        facts,
        headers,
        latency_ms=elapsed_ms(ctx),
        cxone_status=body["cxone_status"],
        cxone_response=text,
        intent=intent,
    )


def invalid(http_status: int, error: str, facts: Facts, ctx: RequestContext) -> Outcome:
    """A request refused before validation (400, 408, 413, 415): counted, audited, nothing sent."""
    return Outcome(http_status, error_body("invalid_request", error), facts, latency_ms=elapsed_ms(ctx))


def internal_error(exc: BaseException, facts: Facts, ctx: RequestContext) -> Outcome:
    """500 with no detail for the caller; the log gets the type and the stack, never the message."""
    log_exception(log, f"request {ctx.request_id} failed unexpectedly", exc)
    return Outcome(500, error_body("internal_error"), facts, latency_ms=elapsed_ms(ctx))


def elapsed_ms(ctx: RequestContext) -> float:
    return round((time.perf_counter() - ctx.started) * 1000.0, 3)


def _flatten(messages: Any) -> dict[str, list[str]]:
    if not isinstance(messages, dict):
        return {"_schema": [str(messages)]}
    flat: dict[str, list[str]] = {}
    for name, value in messages.items():
        key = str(name)[:_MAX_FIELD_NAME]
        flat[key] = [str(m) for m in value] if isinstance(value, list) else [str(value)]
    return flat

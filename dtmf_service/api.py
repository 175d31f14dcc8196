"""The blueprint: POST /api/dtmf/parse, GET /api/metrics, GET /healthz, GET /api/openapi.json."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from .body import BadRequest, BodyIncomplete, UnsupportedMediaType, parse_object, read_body
from .deadlines import request_read_done
from .errors import error_response, json_response, log_exception
from .gateway import Gateway
from .idempotency import valid_key
from .schemas import DTMFRequestSchema, summarise
from .tracing import child_traceparent

log = logging.getLogger("dtmf_service")
bp = Blueprint("dtmf", __name__)
_schema = DTMFRequestSchema()
_MAX_FIELD_NAME = 64


def gateway() -> Gateway:
    return current_app.extensions["dtmf"]


@bp.post("/api/dtmf/parse")
def parse() -> Response:
    gw = gateway()
    started = time.perf_counter()
    denied = gw.authenticate(request)
    if denied is not None:
        return denied  # 401: not counted, not audited (CONTRACT.md section 4)
    attempt = Attempt()
    try:
        response, counted = _process(gw, attempt, started)
    except Exception as exc:  # noqa: BLE001 - the caller gets 500 with no detail; the log gets the type
        log_exception(log, f"request {g.get('request_id')} failed unexpectedly", exc)
        attempt.outcome = "internal_error"
        response, counted = error_response(500, "internal_error"), True
    if counted:
        # The figure the caller saw is the one audited and averaged, so they always agree.
        latency_ms = attempt.latency_ms if attempt.latency_ms is not None else _elapsed_ms(started)
        try:
            gw.record(attempt, client_ip=request.remote_addr, latency_ms=latency_ms)
        except Exception as exc:  # noqa: BLE001 - the answer stands; the event is recorded without what broke it
            log_exception(log, f"request {g.get('request_id')}: audit event could not be built", exc)
            attempt.sent, attempt.invalid_fields = None, set()
            gw.record(attempt, client_ip=request.remote_addr, latency_ms=latency_ms)
    return response


class Attempt:
    """What one POST produced, for the audit event and the metrics."""

    __slots__ = (
        "event_id",
        "sent",
        "valid",
        "invalid_fields",
        "outcome",
        "cxone_status",
        "cxone_response",
        "latency_ms",
        "audit_ticket",
        "audit_event",
    )

    def __init__(self) -> None:
        self.event_id = str(uuid.uuid4())  # also the CorrelationId sent upstream
        self.sent: dict[str, Any] | None = None
        self.valid: dict[str, Any] | None = None
        self.invalid_fields: set[str] = set()
        self.outcome: str | None = None
        self.cxone_status: int | None = None
        self.cxone_response: str | None = None
        self.latency_ms: float | None = None
        self.audit_ticket: Any = None  # the outbox's handle on this request's placeholder
        self.audit_event: dict[str, Any] | None = None  # the placeholder itself


def _process(gw: Gateway, attempt: Attempt, started: float) -> tuple[Response, bool]:
    """The response, and whether this request counts (replays and idempotency refusals do not)."""
    attempt.outcome = "invalid_request"
    try:
        raw = read_body(request.environ, gw.max_body)
    except RequestEntityTooLarge:
        return error_response(413, "invalid_request", f"request body larger than {gw.max_body} bytes"), True
    except UnsupportedMediaType:
        return error_response(415, "invalid_request", "Content-Type must be application/json"), True
    except BodyIncomplete:
        return error_response(408, "invalid_request", "the request body did not arrive in time"), True
    finally:
        request_read_done()  # the body is in (or refused): the slow-client alarm has done its job
    key = request.headers.get("Idempotency-Key")
    if key is not None and not valid_key(key):
        error = "Idempotency-Key must be 1 to 255 printable ASCII characters"
        return error_response(400, "invalid_request", error), True
    try:
        attempt.sent = parse_object(raw)
    except BadRequest as exc:
        return error_response(400, "invalid_request", str(exc)), True
    try:
        valid = _schema.load(attempt.sent)
    except ValidationError as exc:
        errors = _flatten(exc.messages)
        attempt.invalid_fields = set(errors)
        attempt.outcome = "validation_failed"
        return error_response(400, "validation_failed", summarise(errors), errors=errors), True
    attempt.valid = valid
    if key is None:
        return _submit(gw, attempt, valid, started), True
    # Validation failures above are never stored; only requests that reach CXone claim the key.
    scope = g.get("caller", "")
    response, processed = gw.idempotency.run(
        key, scope, raw, lambda: _submit(gw, attempt, valid, started), valid["digits"]
    )
    if not processed:
        # Not counted nor audited (nothing was sent), but an operator can still see it happened.
        log.info(
            "request %s: Idempotency-Key answered %d without calling CXone", g.get("request_id"), response.status_code
        )
    return response, processed


def _submit(gw: Gateway, attempt: Attempt, valid: dict[str, Any], started: float) -> Response:
    gw.intend(attempt, client_ip=request.remote_addr)  # durable before any byte goes to CXone
    trace = {"traceparent": child_traceparent(g.trace_id, g.trace_flags)}
    result = gw.client.submit(valid["interaction_id"], valid["digits"], valid["timeout_ms"], attempt.event_id, trace)
    attempt.outcome = result.status
    attempt.cxone_status = result.cxone_status
    attempt.cxone_response = result.cxone_response
    if result.http_status == 200:
        attempt.latency_ms = _elapsed_ms(started)
        return json_response(
            {
                "status": "dtmf_submitted",
                "interaction_id": valid["interaction_id"],
                "digits": valid["digits"],
                "cxone_status": result.cxone_status,
                "attempts": result.attempts,
                "latency_ms": attempt.latency_ms,
            }
        )
    log.warning(
        "request %s trace %s: %s (http %d, cxone_status %s, attempts %d): %s",
        g.get("request_id"),
        g.get("trace_id"),
        result.status,
        result.http_status,
        result.cxone_status,
        result.attempts,
        result.error,
    )
    headers = {"Retry-After": str(result.retry_after_s)} if result.retry_after_s is not None else None
    return error_response(
        result.http_status, result.status, result.error, headers=headers, cxone_status=result.cxone_status
    )


def _flatten(messages: Any) -> dict[str, list[str]]:
    if not isinstance(messages, dict):
        return {"_schema": [str(messages)]}
    flat: dict[str, list[str]] = {}
    for name, value in messages.items():
        key = str(name)[:_MAX_FIELD_NAME]
        flat[key] = [str(m) for m in value] if isinstance(value, list) else [str(value)]
    return flat


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _metrics_denied(gw: Gateway) -> Response | None:
    """Both metrics endpoints need the API key unless METRICS_PUBLIC=true."""
    return None if gw.config["METRICS_PUBLIC"] else gw.authenticate(request)


@bp.get("/api/metrics")
def metrics() -> Response:
    gw = gateway()
    denied = _metrics_denied(gw)
    if denied is not None:
        return denied
    snapshot = gw.metrics_snapshot()
    if snapshot is None:
        return error_response(404, "invalid_request", "the 'memory' metrics exporter is not enabled")
    return json_response(snapshot)


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """The Prometheus exposition (CONTRACT.md section 11), protected like /api/metrics."""
    gw = gateway()
    denied = _metrics_denied(gw)
    if denied is not None:
        return denied
    exporter = gw.exporters.get("prometheus")
    if exporter is None:
        return error_response(404, "invalid_request", "the 'prometheus' metrics exporter is not enabled")
    return Response(exporter.render(gw.core_figures()), content_type=exporter.content_type)


@bp.get("/healthz")
def healthz() -> Response:
    gw = gateway()
    return json_response({"status": "ok", "mode": gw.mode, "api": gw.config["CXONE_API"]})


@bp.get("/api/openapi.json")
def openapi() -> Response:
    return json_response(gateway().openapi_document())

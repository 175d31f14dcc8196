"""The blueprint: POST /api/dtmf/parse, GET /api/metrics, GET /metrics, GET /healthz, GET /api/openapi.json.

Views stay thin: authenticate (``before_request``), read the body, call ``handle_parse``,
count and audit the outcome, render it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Blueprint, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from dtmf_service.deadlines import request_read_done
from dtmf_service.hookspecs import RenderingExporter
from dtmf_service.ids import uuid4
from dtmf_service.outcome import Facts, Outcome, RequestContext
from dtmf_service.parse import internal_error, invalid
from dtmf_service.web.body import BadRequest, BodyIncomplete, UnsupportedMediaType, read_body
from dtmf_service.web.errors import error_response, json_response
from dtmf_service.web.response import Response
from dtmf_service.web.security import authenticate

if TYPE_CHECKING:
    from dtmf_service.wiring import Components

bp = Blueprint("dtmf", __name__)


def components() -> Components:
    return current_app.extensions["dtmf"]


@bp.before_request
def _authenticate() -> Response | None:
    c = components()
    return authenticate(c.authenticator, bool(c.config["METRICS_PUBLIC"]), c.metrics.auth_failure)


@bp.post("/api/dtmf/parse")
def parse() -> Response:
    c = components()
    state, environ = g._get_current_object(), request.environ
    ctx = RequestContext(
        request_id=state.request_id,
        trace_id=state.trace_id,
        trace_flags=state.trace_flags,
        caller=state.caller,
        client_ip=environ.get("REMOTE_ADDR"),  # werkzeug's remote_addr
        started=state.started,
        idempotency_key=environ.get("HTTP_IDEMPOTENCY_KEY"),
    )
    outcome = _handle(c, ctx, environ)
    if outcome.counted:
        c.metrics.count_request(outcome)
        c.trail.record(outcome, ctx)
    return render(outcome)


def _handle(c: Components, ctx: RequestContext, environ: dict[str, Any]) -> Outcome:
    try:
        raw = read_body(environ, c.max_body)
    except RequestEntityTooLarge:
        return invalid(413, f"request body larger than {c.max_body} bytes", _no_facts(), ctx)
    except UnsupportedMediaType:
        return invalid(415, "Content-Type must be application/json", _no_facts(), ctx)
    except BodyIncomplete:
        return invalid(408, "the request body did not arrive in time", _no_facts(), ctx)
    except BadRequest as exc:
        return invalid(400, str(exc), _no_facts(), ctx)
    except Exception as exc:  # noqa: BLE001 - counted as section 4 asks, like any unexpected error
        return internal_error(exc, _no_facts(), ctx)
    finally:
        request_read_done()  # the body is in (or refused): the slow-client alarm has done its job
    return c.parser.handle_parse(raw, ctx)


def _no_facts() -> Facts:
    return Facts(event_id=uuid4())


def render(outcome: Outcome) -> Response:
    response = Response(outcome.body_json(), status=outcome.http_status, content_type="application/json")
    if outcome.headers:
        response.headers.update(dict(outcome.headers))
    return response


@bp.get("/api/metrics")
def metrics() -> Response:
    c = components()
    if "memory" not in c.exporters:
        # CONTRACT.md section 5: the ``memory`` exporter is what serves this endpoint.
        return error_response(404, "invalid_request", "the 'memory' metrics exporter is not enabled")
    return json_response(c.metrics.snapshot())


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """The Prometheus exposition (CONTRACT.md section 11), protected like /api/metrics."""
    c = components()
    exporter = c.exporters.get("prometheus")
    if not isinstance(exporter, RenderingExporter):
        return error_response(404, "invalid_request", "the 'prometheus' metrics exporter is not enabled")
    return Response(exporter.render(c.metrics.core_figures()), content_type=exporter.content_type)


@bp.get("/healthz")
def healthz() -> Response:
    c = components()
    body = {"status": "ok", "mode": c.mode, "api": c.config["CXONE_API"]}
    if c.config["API_KEYS_FILE"]:
        # Still "ok" (the service answers), but an operator sees that a reload kept the old keys, and why.
        body["api_keys"] = "stale" if c.api_keys_stale else "ok"
        if c.api_keys_stale:
            body["api_keys_error"] = c.api_keys_stale
    return json_response(body)


@bp.get("/api/openapi.json")
def openapi() -> Response:
    document: dict[str, Any] | None = current_app.extensions.get("dtmf.openapi")
    if document is None:
        from dtmf_service.web.openapi import build_document

        document = current_app.extensions["dtmf.openapi"] = build_document(components().config, components().exporters)
    return json_response(document)

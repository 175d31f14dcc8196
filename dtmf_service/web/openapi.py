"""The OpenAPI 3.1 document, generated from the same marshmallow schemas that validate.

Complete enough to generate a client from (CONTRACT.md section 2, *rev 3*): every status each
operation can answer, the headers that matter both ways, an operationId for each operation, a
``servers`` entry, and the bearer scheme declared whatever the serving instance's keys (a client
generated against a dev instance without keys must still send one in production). Only the
endpoints this configuration serves are listed: /metrics without the ``prometheus`` exporter
answers 404, so a client generated from the document must not offer it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from dtmf_service import __version__
from dtmf_service.hookspecs import RenderingExporter
from dtmf_service.web.schemas import (
    DTMFRequestSchema,
    HealthSchema,
    IdempotencyConflictSchema,
    IdempotencyInProgressSchema,
    InternalErrorSchema,
    InvalidRequestSchema,
    MetricsSchema,
    SubmissionErrorSchema,
    SubmittedSchema,
    UnauthorizedSchema,
    ValidationFailedSchema,
)

SCHEMAS = {
    "DTMFRequest": DTMFRequestSchema,
    "Submitted": SubmittedSchema,
    "InvalidRequest": InvalidRequestSchema,
    "ValidationFailed": ValidationFailedSchema,
    "Unauthorized": UnauthorizedSchema,
    "SubmissionError": SubmissionErrorSchema,
    "IdempotencyInProgress": IdempotencyInProgressSchema,
    "IdempotencyConflict": IdempotencyConflictSchema,
    "InternalError": InternalErrorSchema,
    "Metrics": MetricsSchema,
    "Health": HealthSchema,
}
BEARER = "bearerAuth"

# Response headers. Inlined rather than $ref'd: every generator and validator reads them alike.
# web/edge.py's rule (and nginx's): a supplied id is kept only when it matches, so every answer's does.
REQUEST_ID_PATTERN = "^[A-Za-z0-9._:-]{1,128}$"
_REQUEST_ID = {
    "description": "the caller's X-Request-ID when it matched the pattern, else one generated here; "
    "also in the logs and the audit event",
    "required": True,
    "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
}
_REPLAYED = {
    "description": "present (value `true`) when this answer is the stored outcome of an earlier request with "
    "the same Idempotency-Key: nothing was sent to CXone this time",
    "required": False,
    "schema": {"type": "string", "enum": ["true"]},
}
_RETRY_AFTER = {
    "description": "seconds to wait before trying again (delta-seconds, never an HTTP-date)",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
_WWW_AUTHENTICATE = {
    "description": "the scheme to use: Bearer",
    "required": True,
    "schema": {"type": "string"},
}
_ALLOW = {
    "description": "the methods this path answers",
    "required": True,
    "schema": {"type": "string"},
}


def _param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"in": "header", "name": name, "required": False, "description": description, "schema": schema}


# Request headers every operation reads. Neither is refused when malformed (a bad X-Request-ID is
# replaced, a bad traceparent starts a new trace), so their schemas are plain strings: a stricter
# one would promise a 400 the service never sends.
_COMMON_PARAMETERS = [
    _param(
        "X-Request-ID",
        "your id for this request (1-128 of A-Z a-z 0-9 . _ : -), echoed in the answer, the logs and the "
        "audit event; replaced by a generated one when absent or not matching",
        {"type": "string"},
    ),
    _param(
        "traceparent",
        "W3C Trace Context: the trace is continued into the CXone call and the audit event; a missing or "
        "malformed one starts a new trace",
        {"type": "string"},
    ),
]
_IDEMPOTENCY_KEY = _param(
    "Idempotency-Key",
    "makes retries safe: a repeat with the same key and body gets the first outcome again "
    "(Idempotent-Replayed: true) without pressing the digits twice; 1-255 printable ASCII",
    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
)


def _response(description: str, schema: dict[str, Any], media: str = "application/json", **headers: Any) -> Any:
    return {
        "description": description,
        "headers": {"X-Request-ID": _REQUEST_ID, **{name.replace("_", "-"): h for name, h in headers.items()}},
        "content": {media: {"schema": schema}},
    }


def _json(component: str, description: str, **headers: Any) -> dict[str, Any]:
    return _response(description, {"$ref": f"#/components/schemas/{component}"}, **headers)


def _common_errors(secured: bool) -> dict[str, Any]:
    """What any operation can answer besides its own statuses."""
    errors = {
        "405": _json("InvalidRequest", "this path does not answer this method (OPTIONS included)", Allow=_ALLOW),
        "500": _json("InternalError", "unexpected error (no detail)"),
    }
    if secured:
        errors["401"] = _json(
            "Unauthorized",
            "missing or wrong API key (only when API keys are configured)",
            WWW_Authenticate=_WWW_AUTHENTICATE,
        )
    return errors


def _parse_operation(config: Mapping[str, Any]) -> dict[str, Any]:
    dialect_note = (
        " With CXONE_API=agent, interaction_id carries the CXone agent session id."
        if config.get("CXONE_API") == "agent"
        else ""
    )
    replayable = {"Idempotent_Replayed": _REPLAYED}
    return {
        "operationId": "submitDtmf",
        "summary": "Validate DTMF digits and submit them to a CXone interaction",
        "description": "An Idempotency-Key makes retries safe." + dialect_note,
        "security": [{BEARER: []}],
        "parameters": [_IDEMPOTENCY_KEY, *_COMMON_PARAMETERS],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DTMFRequest"}}},
        },
        "responses": {
            "200": _json("Submitted", "submitted; CXone answered 2xx", **replayable),
            "400": _response(
                "invalid_request (not a UTF-8 JSON object, or a bad Idempotency-Key; no errors) or "
                "validation_failed (errors names each field)",
                {
                    "oneOf": [
                        {"$ref": "#/components/schemas/InvalidRequest"},
                        {"$ref": "#/components/schemas/ValidationFailed"},
                    ]
                },
            ),
            "404": _json("SubmissionError", "CXone: interaction not found", **replayable),
            "408": _json("InvalidRequest", "the body did not arrive in time (REQUEST_READ_TIMEOUT_S)"),
            "409": _json("IdempotencyInProgress", "a request with this Idempotency-Key is still being processed"),
            "413": _json("InvalidRequest", "body larger than MAX_CONTENT_LENGTH"),
            "415": _json("InvalidRequest", "Content-Type is not application/json"),
            "422": _json("IdempotencyConflict", "this Idempotency-Key was used with a different body"),
            "502": _json(
                "SubmissionError", "CXone failed, refused authentication, or could not be reached", **replayable
            ),
            "503": _json(
                "SubmissionError", "CXone still rate limiting after the last attempt", Retry_After=_RETRY_AFTER
            ),
            "504": _json(
                "SubmissionError",
                "submission_unknown: sent, no answer; not re-sent (the digits may have been played)",
                **replayable,
            ),
            **_common_errors(secured=True),
        },
    }


def _get(operation_id: str, summary: str, security: list[Any], ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "security": security,
        "parameters": list(_COMMON_PARAMETERS),
        "responses": {"200": ok, **_common_errors(secured=bool(security))},
    }


def build_document(config: Mapping[str, Any], exporters: Mapping[str, object]) -> dict[str, Any]:
    """Every endpoint this configuration serves, and every response of CONTRACT.md section 2."""
    spec = APISpec(
        title="DTMF gateway",
        version=__version__,
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        info={"description": "Send DTMF digits to an active NICE CXone interaction."},
        servers=[
            {
                "url": "/",
                "description": "this gateway: paths are relative to the address this document was fetched from",
            }
        ],
        security=[{BEARER: []}],
    )
    for name, schema in SCHEMAS.items():
        spec.components.schema(name, schema=schema)
    spec.components.security_scheme(
        BEARER,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key: Authorization: Bearer <key>. Send it always; an instance without keys "
            "(sandbox, ALLOW_UNAUTHENTICATED) ignores it",
        },
    )
    spec.path(path="/api/dtmf/parse", operations={"post": _parse_operation(config)})
    metrics_security: list[Any] = [] if config.get("METRICS_PUBLIC") else [{BEARER: []}]
    # Listed only when served: the same rules as the views (web/views.py) that answer 404 otherwise.
    if "memory" in exporters:
        spec.path(
            path="/api/metrics",
            operations={
                "get": _get(
                    "getMetrics",
                    "Totals across every worker process",
                    metrics_security,
                    _json("Metrics", "metrics"),
                )
            },
        )
    if isinstance(exporters.get("prometheus"), RenderingExporter):
        spec.path(
            path="/metrics",
            operations={
                "get": _get(
                    "getPrometheusMetrics",
                    "Prometheus text format, exact across every worker",
                    metrics_security,
                    _response("Prometheus exposition format 0.0.4", {"type": "string"}, media="text/plain"),
                )
            },
        )
    spec.path(
        path="/healthz",
        operations={"get": _get("getHealth", "Liveness; no upstream call", [], _json("Health", "ok"))},
    )
    spec.path(
        path="/api/openapi.json",
        operations={
            "get": _get(
                "getOpenApiDocument",
                "This document",
                [],
                _response("OpenAPI 3.1", {"type": "object"}),
            )
        },
    )
    return spec.to_dict()

"""The OpenAPI 3.1 document, generated from the same marshmallow schemas that validate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from dtmf_service import __version__
from dtmf_service.web.schemas import (
    DTMFRequestSchema,
    ErrorSchema,
    HealthSchema,
    InvalidRequestSchema,
    MetricsSchema,
    SubmissionErrorSchema,
    SubmittedSchema,
    ValidationFailedSchema,
)


def _json(schema: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if headers:
        response["headers"] = headers
    return response


def build_document(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every endpoint and every response of CONTRACT.md section 2."""
    spec = APISpec(
        title="DTMF gateway",
        version=__version__,
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        info={"description": "Send DTMF digits to an active NICE CXone interaction."},
    )
    for name, schema in (
        ("DTMFRequest", DTMFRequestSchema),
        ("Submitted", SubmittedSchema),
        ("Error", ErrorSchema),
        ("InvalidRequest", InvalidRequestSchema),
        ("ValidationFailed", ValidationFailedSchema),
        ("SubmissionError", SubmissionErrorSchema),
        ("Metrics", MetricsSchema),
        ("Health", HealthSchema),
    ):
        spec.components.schema(name, schema=schema)
    spec.components.security_scheme("apiKey", {"type": "http", "scheme": "bearer"})
    secured: list[dict[str, list[str]]] = [{"apiKey": []}] if config.get("API_KEYS") else []
    unauthorized = _json("Error", "missing or wrong API key (when API_KEYS is set)")
    retry_after = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    dialect_note = (
        " With CXONE_API=agent, interaction_id carries the CXone agent session id."
        if config.get("CXONE_API") == "agent"
        else ""
    )
    spec.path(
        path="/api/dtmf/parse",
        operations={
            "post": {
                "summary": "Validate DTMF digits and submit them to a CXone interaction",
                "description": "Optional Idempotency-Key header makes retries safe." + dialect_note,
                "security": secured,
                "parameters": [
                    {
                        "in": "header",
                        "name": "Idempotency-Key",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DTMFRequest"}}},
                },
                "responses": {
                    "200": _json("Submitted", "submitted; CXone answered 2xx"),
                    "400": {
                        "description": "invalid_request (not a UTF-8 JSON object; no errors) or validation_failed",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/InvalidRequest"},
                                        {"$ref": "#/components/schemas/ValidationFailed"},
                                    ]
                                }
                            }
                        },
                    },
                    "401": unauthorized,
                    "404": _json("SubmissionError", "CXone: interaction not found"),
                    "409": _json("Error", "idempotency_in_progress"),
                    "413": _json("Error", "body too large"),
                    "415": _json("Error", "Content-Type is not application/json"),
                    "422": _json("Error", "idempotency_conflict"),
                    "500": _json("Error", "internal_error"),
                    "502": _json("SubmissionError", "CXone failed, refused authentication, or could not be reached"),
                    "503": _json("SubmissionError", "CXone still rate limiting after the last attempt", retry_after),
                    "504": _json("SubmissionError", "submission_unknown: sent, no answer; not re-sent"),
                },
            }
        },
    )
    metrics_security = [] if config.get("METRICS_PUBLIC") else secured
    spec.path(
        path="/api/metrics",
        operations={
            "get": {
                "summary": "Totals across every worker process",
                "security": metrics_security,
                "responses": {
                    "200": _json("Metrics", "metrics"),
                    "401": unauthorized,
                    "404": _json("Error", "the memory exporter is not enabled"),
                },
            }
        },
    )
    spec.path(
        path="/metrics",
        operations={
            "get": {
                "summary": "Prometheus text format, exact across every worker (with METRICS_EXPORTERS=prometheus)",
                "security": metrics_security,
                "responses": {
                    "200": {
                        "description": "Prometheus exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": unauthorized,
                    "404": _json("Error", "the prometheus exporter is not enabled"),
                },
            }
        },
    )
    spec.path(
        path="/healthz",
        operations={"get": {"summary": "Liveness; no upstream call", "responses": {"200": _json("Health", "ok")}}},
    )
    spec.path(
        path="/api/openapi.json",
        operations={
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    )
    return spec.to_dict()

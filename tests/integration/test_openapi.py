"""CONTRACT.md sections 2 and 5: the OpenAPI document, and schemathesis against the running service.

The generated client driving a real gunicorn is in test_openapi_client.py.
"""

import re

import jsonschema_rs  # schemathesis' own validator
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dtmf_service.web.edge import request_id
from dtmf_service.web.schemas import DTMFRequestSchema
from tests.integration.conftest import dialect_env

KEY = "schemathesis-key-0123456789"
PATHS = {"/api/dtmf/parse", "/api/metrics", "/metrics", "/healthz", "/api/openapi.json"}


def operations(document):
    return [(path, method, op) for path, item in document["paths"].items() for method, op in item.items()]


def test_document_is_openapi_31_with_every_status(client):
    document = client.get("/api/openapi.json").get_json()
    assert document["openapi"] == "3.1.0"
    responses = document["paths"]["/api/dtmf/parse"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "404", "405", "408", "409", "413", "415", "422", "500", "502",
                              "503", "504"}  # fmt: skip
    for path, method, operation in operations(document):
        assert {"405", "500"} <= set(operation["responses"]), (path, method)


def test_every_operation_has_an_id_and_the_document_a_server(make_app):
    document = make_app(METRICS_EXPORTERS=["memory", "prometheus"]).test_client().get("/api/openapi.json").get_json()
    ids = {op["operationId"] for _, _, op in operations(document)}
    assert ids == {"submitDtmf", "getMetrics", "getPrometheusMetrics", "getHealth", "getOpenApiDocument"}
    assert document["servers"] and document["servers"][0]["url"] == "/"


def test_bearer_scheme_declared_when_the_instance_has_no_keys(make_app):
    for keys in ([], ["a-key-0123456789abcdef"]):
        document = make_app(API_KEYS=keys).test_client().get("/api/openapi.json").get_json()
        assert document["components"]["securitySchemes"]["bearerAuth"] == {
            "type": "http", "scheme": "bearer", "description": document["components"]["securitySchemes"]
            ["bearerAuth"]["description"],
        }  # fmt: skip
        parse = document["paths"]["/api/dtmf/parse"]["post"]
        assert parse["security"] == [{"bearerAuth": []}], keys
        assert document["paths"]["/api/metrics"]["get"]["security"] == [{"bearerAuth": []}]
        assert document["paths"]["/healthz"]["get"]["security"] == []
    public = make_app(METRICS_PUBLIC=True).test_client().get("/api/openapi.json").get_json()
    assert public["paths"]["/api/metrics"]["get"]["security"] == []
    assert "401" not in public["paths"]["/api/metrics"]["get"]["responses"]


def test_headers_that_matter_are_documented_both_ways(client):
    document = client.get("/api/openapi.json").get_json()
    parse = document["paths"]["/api/dtmf/parse"]["post"]
    assert {p["name"] for p in parse["parameters"] if p["in"] == "header"} == {
        "Idempotency-Key", "X-Request-ID", "traceparent"
    }  # fmt: skip
    responses = parse["responses"]
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            assert response["headers"]["X-Request-ID"]["required"] is True, (path, method, status)
        assert {p["name"] for p in operation["parameters"]} >= {"X-Request-ID", "traceparent"}
    # The documented X-Request-ID holds for whatever a caller sends (web/edge.py keeps or replaces it).
    pattern = re.compile(responses["200"]["headers"]["X-Request-ID"]["schema"]["pattern"])
    for supplied in (None, "", "order-1.2:3_a", "has space", "x" * 129, "caf\u00e9"):
        assert pattern.fullmatch(request_id(supplied)), supplied
    assert request_id("order-1.2:3_a") == "order-1.2:3_a"
    assert responses["503"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    assert responses["503"]["headers"]["Retry-After"]["required"] is True
    assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert responses["405"]["headers"]["Allow"]["required"] is True
    for status in ("200", "404", "502", "504"):  # the outcomes the idempotency store keeps and replays
        assert responses[status]["headers"]["Idempotent-Replayed"]["schema"] == {"type": "string", "enum": ["true"]}


@pytest.mark.parametrize(
    ("exporters", "listed"),
    [
        (["memory"], PATHS - {"/metrics"}),
        (["memory", "prometheus"], PATHS),
        ([], PATHS - {"/metrics", "/api/metrics"}),
    ],
)
def test_only_served_endpoints_are_listed(make_app, exporters, listed):
    client = make_app(METRICS_EXPORTERS=exporters).test_client()
    document = client.get("/api/openapi.json").get_json()
    assert set(document["paths"]) == listed
    for path in listed:
        assert client.get(path).status_code != 404 or path == "/api/dtmf/parse", path
    for path in PATHS - listed:
        assert client.get(path).status_code == 404, path


def test_request_schema_comes_from_the_validating_schema(client):
    document = client.get("/api/openapi.json").get_json()
    request = document["components"]["schemas"]["DTMFRequest"]
    assert set(request["properties"]) == set(DTMFRequestSchema().fields)
    assert request["additionalProperties"] is False
    assert request["properties"]["digits"]["pattern"] == "^[0-9*#]{1,16}$"
    assert request["properties"]["timeout_ms"]["type"] == "integer"
    assert (request["properties"]["timeout_ms"]["minimum"], request["properties"]["timeout_ms"]["maximum"]) == (
        1000,
        30000,
    )
    assert request["properties"]["node_transition_flag"]["type"] == "boolean"
    assert set(request["required"]) == {"interaction_id", "digits", "timeout_ms", "sequence_matrix_key"}


def test_both_shapes_of_400_validate_against_the_document_exactly(client):
    document = client.get("/api/openapi.json").get_json()
    described = document["paths"]["/api/dtmf/parse"]["post"]["responses"]["400"]
    schema = {**described["content"]["application/json"]["schema"], "components": document["components"]}
    validator = jsonschema_rs.Draft202012Validator(schema)
    invalid = client.post("/api/dtmf/parse", data=b"{not json", content_type="application/json")
    failed = client.post("/api/dtmf/parse", json={"digits": "x"})
    assert invalid.get_json()["status"] == "invalid_request" and "errors" not in invalid.get_json()
    assert failed.get_json()["status"] == "validation_failed"
    for body in (invalid.get_json(), failed.get_json()):
        validator.validate(body)
    # Each shape matches exactly one branch: a strict client can tell them apart.
    assert not validator.is_valid({"status": "validation_failed", "error": "x"})
    assert not validator.is_valid({"status": "invalid_request"})


@pytest.fixture
def gateway(gateway_env, sim_url, start_gateway):
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_API_KEYS": KEY,
        "DTMF_METRICS_EXPORTERS": "memory,prometheus",
    }
    return start_gateway(env, workers=2, threads=4)


@pytest.mark.slow
def test_every_method_a_path_lacks_is_a_documented_405(gateway):
    document = requests.get(f"{gateway.url}/api/openapi.json", timeout=10).json()
    for path, item in document["paths"].items():
        (method, operation), *_ = item.items()
        described = operation["responses"]["405"]
        schema = {**described["content"]["application/json"]["schema"], "components": document["components"]}
        for other in {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"} - {method.upper()}:
            answer = requests.request(other, f"{gateway.url}{path}", timeout=10)
            assert answer.status_code == 405, (other, path)
            assert answer.headers["Allow"] and answer.headers["X-Request-ID"]
            jsonschema_rs.validate(schema, answer.json())


@pytest.mark.slow
def test_schemathesis_against_the_running_service_with_header_conformance(gateway):
    # Driven by hand with Hypothesis (schemathesis' pytest plugin lags behind pytest 9): same checks,
    # named explicitly so response header conformance is sure to run.
    schema = schemathesis.openapi.from_url(f"{gateway.url}/api/openapi.json")
    # Header conformance has teeth only where headers are documented: every response has some.
    for path, method, operation in operations(schema.raw_schema):
        for status, response in operation["responses"].items():
            assert "X-Request-ID" in response.get("headers", {}), (path, method, status)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        negative_data_rejection,
        ignored_auth,  # sends each authenticated case again without the key: must be 401
    ]
    found = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the operation that serves the document it was loaded from.
    assert {op.label for op in found} == {"POST /api/dtmf/parse", "GET /api/metrics", "GET /metrics", "GET /healthz"}
    auth = {"Authorization": f"Bearer {KEY}"}
    with requests.Session() as session:
        for operation in found:
            modes = [(GenerationMode.POSITIVE, 20)]
            if operation.method.upper() == "POST":  # the GETs' only inputs are headers any string of which is valid
                modes.append((GenerationMode.NEGATIVE, 20))
            for mode, examples in modes:

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck),
                )  # fmt: skip
                def check(case):
                    # Valid requests may meet 409/422 (an Idempotency-Key reused by an earlier example):
                    # stateful, documented answers, so "valid data must be accepted" is not among the checks.
                    # Also checked: the body's media type and schema, against the document.
                    case.call_and_validate(session=session, headers=auth, checks=checks)

                check()

"""CONTRACT.md sections 2, 4 and 5 through the Flask application (sandbox simulator in-process)."""

import json
import logging

import pytest

from tests.conftest import VALID

SUBMITTED_KEYS = {"status", "interaction_id", "digits", "cxone_status", "attempts", "latency_ms"}


def post(client, body=None, data=None, content_type="application/json", headers=None):
    payload = data if data is not None else json.dumps(body if body is not None else VALID)
    return client.post("/api/dtmf/parse", data=payload, content_type=content_type, headers=headers or {})


def metrics(client):
    return client.get("/api/metrics").get_json()


def test_submitted_body_is_exact(client):
    response = post(client)
    body = response.get_json()
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert set(body) == SUBMITTED_KEYS
    assert body["status"] == "dtmf_submitted"
    assert (body["interaction_id"], body["digits"], body["cxone_status"], body["attempts"]) == ("call-1", "12#", 200, 1)
    assert isinstance(body["latency_ms"], float)


def test_content_type_with_charset_is_accepted(client):
    assert post(client, content_type="application/json; charset=utf-8").status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", ""])
def test_wrong_content_type_is_415(client, content_type):
    response = post(client, content_type=content_type)
    assert response.status_code == 415
    assert response.get_json()["status"] == "invalid_request"


def test_body_over_64_kib_is_413(client):
    body = {**VALID, "sequence_matrix_key": "x" * (64 * 1024)}
    response = post(client, body)
    assert response.status_code == 413
    assert response.get_json()["status"] == "invalid_request"


def test_body_of_exactly_the_limit_is_read(client):
    base = json.dumps({**VALID, "pad": ""})
    data = json.dumps({**VALID, "pad": "x" * (64 * 1024 - len(base))})
    assert len(data) == 64 * 1024
    assert post(client, data=data).status_code == 400  # read and validated: "pad" is unknown


@pytest.mark.parametrize(
    "data, reason",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        ("[1, 2]", "JSON object"),
        ('"text"', "JSON object"),
        ("null", "JSON object"),
        ('{"timeout_ms": NaN}', "not valid JSON"),
        ('{"timeout_ms": Infinity}', "not valid JSON"),
        ('{"digits": "1", "digits": "2"}', "duplicate key"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ("[" * 100 + "]" * 100, "JSON object"),
        ("[" * 50000, "not valid JSON"),
    ],
)
def test_not_a_utf8_json_object_is_400_invalid_request(client, data, reason):
    response = post(client, data=data)
    body = response.get_json()
    assert response.status_code == 400
    assert body["status"] == "invalid_request"
    assert reason in body["error"]


def test_schema_violation_is_400_validation_failed_with_errors(client):
    response = post(client, {**VALID, "digits": "12A", "timeout_ms": "5000", "bogus": 1})
    body = response.get_json()
    assert response.status_code == 400
    assert set(body) == {"status", "error", "errors"}
    assert body["status"] == "validation_failed"
    assert set(body["errors"]) == {"digits", "timeout_ms", "bogus"}
    assert all(isinstance(m, list) and m for m in body["errors"].values())
    assert "\n" not in body["error"]


def test_interaction_not_found_is_404_submission_failed(client):
    response = post(client, {**VALID, "interaction_id": "missing-7"})
    assert response.status_code == 404
    assert response.get_json() == {
        "status": "submission_failed",
        "error": response.get_json()["error"],
        "cxone_status": 404,
    }


def test_unknown_path_is_json_404(client):
    response = client.get("/nope")
    assert (response.status_code, response.mimetype) == (404, "application/json")
    assert response.get_json()["status"] == "invalid_request"


def test_wrong_method_is_json_405(client):
    response = client.get("/api/dtmf/parse")
    assert (response.status_code, response.mimetype) == (405, "application/json")
    assert response.get_json()["status"] == "invalid_request"
    assert "POST" in response.headers["Allow"]


def test_unexpected_error_is_500_internal_error_without_detail(app, client):
    class Broken:
        def submit(self, *args):
            raise RuntimeError("token=abc secret internals")

    app.extensions["dtmf"].parser.client = Broken()
    response = post(client)
    assert response.status_code == 500
    assert response.get_json() == {"status": "internal_error"}
    assert metrics(client)["submission_failures"] == 1


def test_healthz_reports_sandbox_mode(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "mode": "sandbox", "api": "tutorial"}


def test_healthz_reports_cxone_mode(make_app, upstream_config):
    client = make_app(**upstream_config).test_client()
    assert client.get("/healthz").get_json()["mode"] == "cxone"


def test_sandbox_start_up_warns_that_no_real_call_gets_digits(make_app, caplog):
    with caplog.at_level(logging.WARNING, logger="dtmf_service"):
        make_app()
    assert any("SANDBOX" in r.getMessage() and "no real call" in r.getMessage() for r in caplog.records)


# -- metrics (section 4) ---------------------------------------------------------------------------
def test_metrics_before_any_request_are_null_not_nan(client):
    body = metrics(client)
    assert body["total_submissions"] == 0
    assert body["average_latency_ms"] is None
    assert body["accuracy_rate"] is None


def test_every_post_counts_once_in_exactly_one_category(client):
    post(client)  # 200
    post(client)  # 200
    post(client, data="{")  # 400 invalid
    post(client, {**VALID, "digits": "x"})  # 400 validation
    post(client, content_type="text/plain")  # 415
    post(client, {**VALID, "sequence_matrix_key": "x" * 70000})  # 413
    post(client, {**VALID, "interaction_id": "missing-1"})  # 404
    body = metrics(client)
    assert body["total_submissions"] == 7
    assert body["successful_parses"] == 2
    assert body["validation_failures"] == 4
    assert body["submission_failures"] == 1
    assert body["total_submissions"] == (
        body["successful_parses"] + body["validation_failures"] + body["submission_failures"]
    )
    assert body["accuracy_rate"] == pytest.approx(2 / 7)
    assert body["average_latency_ms"] > 0


def test_average_latency_is_over_successful_submissions_only(client):
    latencies = [post(client).get_json()["latency_ms"] for _ in range(3)]
    post(client, {**VALID, "interaction_id": "missing-1"})
    assert metrics(client)["average_latency_ms"] == pytest.approx(sum(latencies) / 3, abs=0.001)


def test_get_on_parse_is_not_counted(client):
    client.get("/api/dtmf/parse")
    assert metrics(client)["total_submissions"] == 0


def test_metrics_need_memory_exporter(make_app):
    client = make_app(METRICS_EXPORTERS=[]).test_client()
    response = client.get("/api/metrics")
    assert response.status_code == 404
    assert response.get_json()["status"] == "invalid_request"


def test_every_response_is_json_with_status(client):
    responses = [
        post(client),
        post(client, data="{"),
        post(client, content_type="text/plain"),
        client.get("/x"),
        client.delete("/healthz"),
        client.get("/healthz"),
        client.get("/api/metrics"),
    ]
    for response in responses:
        assert response.mimetype == "application/json"
        body = response.get_json()
        assert "status" in body or "total_submissions" in body


def test_request_id_is_echoed_or_generated(client):
    assert post(client, headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    assert len(post(client).headers["X-Request-ID"]) == 32
    assert post(client, headers={"X-Request-ID": "bad\x01"}).headers["X-Request-ID"] != "bad\x01"


def test_digits_never_reach_application_logs(client, caplog):
    secret = "4111111111111111"
    with caplog.at_level(logging.DEBUG):
        post(client, {**VALID, "digits": secret})
        post(client, {**VALID, "digits": secret, "interaction_id": "missing-1"})
        post(client, {**VALID, "digits": secret + "9"})
        post(client, {**VALID, "digits": secret, "timeout_ms": 1})
    assert secret not in caplog.text


def test_unexpected_error_messages_stay_out_of_the_log(app, client, caplog):
    class Broken:
        def submit(self, interaction_id, digits, *args):
            raise ValueError(f"upstream said {digits}")

    app.extensions["dtmf"].parser.client = Broken()
    with caplog.at_level(logging.ERROR):
        assert post(client, {**VALID, "digits": "98765"}).status_code == 500
    assert "ValueError" in caplog.text
    assert "98765" not in caplog.text


def test_healthz_makes_no_upstream_call(make_app, upstream_config, sim):
    client = make_app(**upstream_config).test_client()
    assert client.get("/healthz").status_code == 200
    assert list(sim.requests) == []


@pytest.mark.parametrize("path", ["/api//dtmf/parse", "//api/dtmf/parse", "/api/dtmf/parse/", "/api/dtmf//parse"])
def test_paths_that_merely_look_like_a_route_are_404_json_never_a_redirect(client, path):
    response = client.post(path, json=VALID, headers={"Host": "evil.example"})
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert response.get_json()["status"] == "invalid_request"
    assert "Location" not in response.headers


@pytest.mark.parametrize(("path", "allow"), [("/api/dtmf/parse", "POST"), ("/healthz", "GET, HEAD")])
def test_options_is_405_json_with_allow(client, path, allow):
    response = client.options(path)
    assert response.status_code == 405
    assert response.mimetype == "application/json"
    assert set(response.headers["Allow"].split(", ")) == set(allow.split(", "))
    assert "Access-Control-Allow-Origin" not in response.headers


def test_deeply_nested_body_is_400_invalid_request_and_still_counted_and_audited(make_app, tmp_path):
    app = make_app(AUDIT_SINKS=["file"], AUDIT_FILE_PATH=str(tmp_path / "audit.jsonl"))
    client = app.test_client()
    body = '{"interaction_id":"c","digits":"1","timeout_ms":5000,"sequence_matrix_key":' + "[" * 980 + "]" * 980 + "}"
    response = client.post("/api/dtmf/parse", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["status"] == "invalid_request"
    assert "nested" in response.get_json()["error"]
    assert client.get("/api/metrics").get_json()["validation_failures"] == 1
    app.extensions["dtmf"].delivery.flush(5)
    import json as _json

    (event,) = [_json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert event["outcome"] == "invalid_request"


def test_an_event_that_cannot_be_built_is_still_recorded(make_app, tmp_path, monkeypatch):
    from dtmf_service.audit import trail as trail_module

    app = make_app(AUDIT_SINKS=["file"], AUDIT_FILE_PATH=str(tmp_path / "audit.jsonl"))
    real = trail_module.build_event
    calls = []

    def fragile(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RecursionError("simulated")
        return real(**kwargs)

    monkeypatch.setattr(trail_module, "build_event", fragile)
    response = app.test_client().post("/api/dtmf/parse", json=VALID)
    assert response.status_code == 200
    assert app.test_client().get("/api/metrics").get_json()["successful_parses"] == 1
    app.extensions["dtmf"].delivery.flush(5)
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 1


def test_trace_context_reaches_cxone_and_the_audit_event(make_app, tmp_path):
    app = make_app(AUDIT_SINKS=["file"], AUDIT_FILE_PATH=str(tmp_path / "audit.jsonl"))
    client = app.test_client()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = client.post("/api/dtmf/parse", json=VALID, headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert sent.status_code == 200
    started = client.post("/api/dtmf/parse", json=VALID)  # no header: a new trace
    broken = client.post("/api/dtmf/parse", json=VALID, headers={"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"})
    assert started.status_code == broken.status_code == 200
    upstream = [r["headers"]["traceparent"] for r in app.extensions["dtmf"].simulator.seen("dtmf")]
    assert upstream[0].startswith(f"00-{trace}-") and not upstream[0].endswith("-00f067aa0ba902b7-01")
    assert all(len(value.split("-")[1]) == 32 for value in upstream)
    assert upstream[2].split("-")[1] != "0" * 32
    app.extensions["dtmf"].delivery.flush(5)
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["trace_id"] for e in events] == [value.split("-")[1] for value in upstream]

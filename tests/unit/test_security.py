"""CONTRACT.md section 8: API keys, redaction reaching every sink, secrets kept out of logs."""

import json
import logging

import pytest

from tests.conftest import VALID
from tests.helpers import WebhookReceiver

KEYS = ["key-old-0001-abcdefgh", "key-new-0002-abcdefgh"]


@pytest.fixture
def secured(make_app):
    return make_app(API_KEYS=KEYS).test_client()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        auth("wrong"),
        {"Authorization": KEYS[0]},
        {"Authorization": "Basic a2V5LW9sZC0wMDAxLWFiY2RlZmdoOg=="},
        auth(""),
    ],
)
def test_missing_or_wrong_key_is_401_json(secured, headers):
    response = secured.post("/api/dtmf/parse", json=VALID, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["status"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_is_accepted_for_rotation(secured, key):
    assert secured.post("/api/dtmf/parse", json=VALID, headers=auth(key)).status_code == 200


def test_401_is_not_counted(secured):
    secured.post("/api/dtmf/parse", json=VALID)
    secured.post("/api/dtmf/parse", json=VALID, headers=auth(KEYS[0]))
    body = secured.get("/api/metrics", headers=auth(KEYS[0])).get_json()
    assert body["total_submissions"] == 1


def test_metrics_need_a_key_unless_public(make_app):
    private = make_app(API_KEYS=KEYS).test_client()
    assert private.get("/api/metrics").status_code == 401
    public = make_app(API_KEYS=KEYS, METRICS_PUBLIC=True).test_client()
    assert public.get("/api/metrics").status_code == 200


def test_healthz_is_always_open(secured):
    assert secured.get("/healthz").status_code == 200


def test_keys_never_reach_logs(secured, caplog):
    with caplog.at_level(logging.DEBUG):
        secured.post("/api/dtmf/parse", json=VALID, headers=auth(KEYS[0]))
        secured.post("/api/dtmf/parse", json={**VALID, "interaction_id": "missing-1"}, headers=auth(KEYS[1]))
        secured.post("/api/dtmf/parse", json=VALID, headers=auth("key-guess-9999-abcdefgh"))
    for key in KEYS + ["key-guess-9999-abcdefgh"]:
        assert key not in caplog.text


@pytest.fixture
def webhook():
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"AUDIT_DIGITS": "full"}, "4111#"),
        ({"AUDIT_DIGITS": "masked"}, "*****"),
        ({"AUDIT_DIGITS": "hashed", "AUDIT_HASH_KEY": "k"}, "hmac-sha256:"),
        ({"AUDIT_DIGITS": "full", "AUDIT_SENSITIVE_KEYS": ["pay.*"]}, "*****"),
    ],
)
def test_redaction_applies_to_every_sink_and_exporter(make_app, tmp_path, webhook, settings, expected):
    app = make_app(
        AUDIT_SINKS=["file", "webhook"],
        AUDIT_FILE_PATH=str(tmp_path / "a.jsonl"),
        AUDIT_WEBHOOK_URL=webhook.url,
        **settings,
    )
    app.test_client().post("/api/dtmf/parse", json={**VALID, "digits": "4111#", "sequence_matrix_key": "pay.card"})
    app.extensions["dtmf"].delivery.flush(5)
    (line,) = (tmp_path / "a.jsonl").read_text().splitlines()
    for event in (json.loads(line), webhook.events[0]):
        assert event["digits"].startswith(expected)
        if expected != "4111#":
            assert "4111" not in json.dumps(event)


def test_webhook_is_signed_when_a_secret_is_set(make_app, webhook):
    app = make_app(AUDIT_SINKS=["webhook"], AUDIT_WEBHOOK_URL=webhook.url, AUDIT_WEBHOOK_SECRET="whsec")
    app.test_client().post("/api/dtmf/parse", json=VALID)
    app.extensions["dtmf"].delivery.flush(5)
    assert webhook.headers[0]["X-DTMF-Signature"].startswith("t=")


def test_audit_event_records_the_real_client_behind_proxy_count(make_app, tmp_path):
    app = make_app(AUDIT_SINKS=["file"], AUDIT_FILE_PATH=str(tmp_path / "a.jsonl"), PROXY_COUNT=1)
    app.test_client().post(
        "/api/dtmf/parse",
        json=VALID,
        headers={"X-Forwarded-For": "6.6.6.6, 10.1.2.3"},
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    app.extensions["dtmf"].delivery.flush(5)
    assert json.loads((tmp_path / "a.jsonl").read_text())["client_ip"] == "10.1.2.3"


def test_forwarded_for_is_ignored_without_proxy_count(make_app, tmp_path):
    app = make_app(AUDIT_SINKS=["file"], AUDIT_FILE_PATH=str(tmp_path / "a.jsonl"))
    app.test_client().post(
        "/api/dtmf/parse", json=VALID, headers={"X-Forwarded-For": "6.6.6.6"}, environ_base={"REMOTE_ADDR": "127.0.0.9"}
    )
    app.extensions["dtmf"].delivery.flush(5)
    assert json.loads((tmp_path / "a.jsonl").read_text())["client_ip"] == "127.0.0.9"

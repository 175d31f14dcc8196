"""The CXone Agent API dialect against the simulator on loopback."""

import base64
import json
import threading
from urllib.parse import parse_qs

import pytest

from dtmf_service import config as cfg
from dtmf_service.cxone.dialects.agent import basic_authorization
from tests.conftest import VALID


@pytest.fixture
def agent_config(sim_url, tmp_path):
    return {
        "CXONE_API": "agent",
        "CXONE_AUTH_BASE": sim_url,
        "CXONE_TENANT_ID": "tenant-1",
        "CXONE_CLIENT_ID": "app-id",
        "CXONE_CLIENT_SECRET": "p:ss wörd&=",
        "CXONE_ACCESS_KEY_ID": "AKID",
        "CXONE_ACCESS_KEY_SECRET": "ak&secret=+",
        "ALLOW_UNAUTHENTICATED": True,
        "AUDIT_SINKS": ["file"],
        "AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
    }


def test_submission_speaks_the_agent_api(make_app, agent_config, sim):
    app = make_app(**agent_config)
    response = app.test_client().post("/api/dtmf/parse", json=VALID)
    assert response.status_code == 200
    assert response.get_json()["cxone_status"] == 202
    (token,) = sim.seen("token")
    assert token["path"] == "/auth/token"
    assert token["headers"]["authorization"] == "Basic " + base64.b64encode("app-id:p:ss wörd&=".encode()).decode()
    assert parse_qs(token["body"]) == {"grant_type": ["password"], "username": ["AKID"], "password": ["ak&secret=+"]}
    (dtmf,) = sim.seen("dtmf")
    assert dtmf["path"] == "/InContactAPI/services/v23.0/agent-sessions/call-1/send-dtmf"
    assert json.loads(dtmf["body"]) == {"dtmfSequence": "12#", "toneDurationMS": 340, "toneSpacingMS": 0}
    app.extensions["dtmf"].delivery.flush(5)
    event = json.loads(open(agent_config["AUDIT_FILE_PATH"]).read())
    assert dtmf["headers"]["correlationid"] == event["event_id"]


def test_basic_authorization_is_exact():
    assert basic_authorization("id", "a:b") == "Basic " + base64.b64encode(b"id:a:b").decode()
    assert basic_authorization("ïd", "sé") == "Basic " + base64.b64encode("ïd:sé".encode()).decode()


def test_tone_settings_and_version_are_configurable(make_app, agent_config, sim):
    app = make_app(**agent_config, CXONE_TONE_DURATION_MS=200, CXONE_TONE_SPACING_MS=50, CXONE_AGENT_API_VERSION="24.0")
    assert app.test_client().post("/api/dtmf/parse", json=VALID).status_code == 200
    (dtmf,) = sim.seen("dtmf")
    assert dtmf["path"].startswith("/InContactAPI/services/v24.0/")
    assert json.loads(dtmf["body"]) == {"dtmfSequence": "12#", "toneDurationMS": 200, "toneSpacingMS": 50}


def test_discovery_happens_once_per_process(make_app, agent_config, sim):
    client = make_app(**agent_config).test_client()
    for _ in range(5):
        assert client.post("/api/dtmf/parse", json=VALID).status_code == 200
    paths = [r["path"] for r in sim.seen("discovery")]
    assert paths == ["/.well-known/openid-configuration", "/.well-known/cxone-configuration"]
    assert sim.seen("discovery")[1]["query"] == "tenantId=tenant-1"


def test_failed_discovery_is_502_and_retried_on_the_next_request(make_app, agent_config, sim):
    client = make_app(**agent_config).test_client()
    sim.script("discovery", [{"status": 500}])
    failed = client.post("/api/dtmf/parse", json=VALID)
    assert failed.status_code == 502
    assert failed.get_json()["cxone_status"] is None
    assert "discovery" in failed.get_json()["error"]
    assert client.post("/api/dtmf/parse", json=VALID).status_code == 200


def test_failed_discovery_is_shared_by_concurrent_requests(make_app, agent_config, sim):
    app = make_app(**agent_config)
    sim.script("discovery", [{"status": 500, "delay_s": 0.5}])
    statuses = []
    threads = [
        threading.Thread(
            target=lambda: statuses.append(app.test_client().post("/api/dtmf/parse", json=VALID).status_code)
        )
        for _ in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert statuses == [502] * 10
    assert len(sim.seen("discovery")) == 1  # one fetch, its failure shared


def test_configured_endpoints_skip_discovery(make_app, agent_config, sim, sim_url):
    client = make_app(**agent_config, CXONE_API_ENDPOINT=sim_url, CXONE_TOKEN_URL=f"{sim_url}/auth/token").test_client()
    assert client.post("/api/dtmf/parse", json=VALID).status_code == 200
    assert sim.seen("discovery") == []


def test_request_timeout_bounds_the_retry_budget(make_app, agent_config, sim):
    sim.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": "2"}}] * 3)
    client = make_app(**agent_config, CXONE_BACKOFF_MAX_S=8).test_client()
    response = client.post("/api/dtmf/parse", json={**VALID, "timeout_ms": 1500})
    # 2 s of waiting would pass the 1.5 s the caller allowed: give up at once.
    assert response.status_code == 503
    assert len(sim.seen("dtmf")) == 1


def test_healthz_reports_the_dialect(make_app, agent_config):
    body = make_app(**agent_config).test_client().get("/healthz").get_json()
    assert body == {"status": "ok", "mode": "cxone", "api": "agent"}


def test_missing_keys_stop_start_up_naming_them():
    with pytest.raises(cfg.ConfigError) as info:
        cfg.finalise({"CXONE_API": "agent", "CXONE_CLIENT_ID": "x", "ALLOW_UNAUTHENTICATED": True})
    message = str(info.value)
    for key in (
        "CXONE_CLIENT_SECRET",
        "CXONE_ACCESS_KEY_ID",
        "CXONE_ACCESS_KEY_SECRET",
        "CXONE_API_ENDPOINT or CXONE_TENANT_ID",
    ):
        assert key in message
    assert "CXONE_API=agent" in message


def test_agent_dialect_refreshes_ten_minutes_early_by_default(agent_config):
    config = dict(agent_config)
    cfg.finalise(config)
    assert config["CXONE_TOKEN_REFRESH_MARGIN_S"] == 600


def test_openapi_says_interaction_id_is_the_agent_session(make_app, agent_config):
    document = make_app(**agent_config).test_client().get("/api/openapi.json").get_json()
    assert "agent session" in document["paths"]["/api/dtmf/parse"]["post"]["description"]


@pytest.mark.parametrize(
    "document",
    [
        {"token_endpoint": "http://cxone.example.com/auth/token"},  # plain http off loopback
        {"token_endpoint": "ftp://cxone.example.com/token"},
    ],
)
def test_discovered_endpoints_must_be_https(make_app, agent_config, sim, document):
    client = make_app(**agent_config).test_client()
    sim.script("discovery", [{"status": 200, "body": document}])
    failed = client.post("/api/dtmf/parse", json=VALID)
    assert failed.status_code == 502
    assert "https" in failed.get_json()["error"]
    assert sim.seen("token") == [] and sim.seen("dtmf") == []


def test_plain_http_is_followed_only_between_loopback_addresses():
    from dtmf_service.cxone.dialects.common import trusted_endpoint

    assert trusted_endpoint("https://api-na1.niceincontact.com", "https://cxone.niceincontact.com")
    assert not trusted_endpoint("http://api-na1.niceincontact.com", "https://cxone.niceincontact.com")
    assert not trusted_endpoint("http://127.0.0.1:9000", "https://cxone.niceincontact.com")
    assert not trusted_endpoint("http://evil.example", "http://127.0.0.1:9000")
    assert trusted_endpoint("http://127.0.0.1:9000/x", "http://localhost:9000")
    assert not trusted_endpoint(None, "http://127.0.0.1:9000")

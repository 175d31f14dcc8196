"""CONTRACT.md section 3: the DTMF call, token reuse and refresh, retries, budget, unknown outcomes.

The simulator runs as a real HTTP server on loopback; sleeps and clocks are injected.
"""

import email.utils
import json
import socket
import time
from urllib.parse import parse_qs

import pytest

from dtmf_service import config as cfg
from dtmf_service.cxone.client import CXoneClient
from tests.helpers import as_answered


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time():
    return FakeTime()


@pytest.fixture
def make_client(upstream_config, fake_time):
    def factory(**overrides):
        config = {**upstream_config, "CXONE_BACKOFF_BASE_S": 1.0, "CXONE_BACKOFF_MAX_S": 8.0, **overrides}
        cfg.finalise(config)
        return CXoneClient.from_config(
            config,
            sleep=fake_time.sleep,
            clock=fake_time.clock,
            wall_clock=lambda: 1_800_000_000.0,
            rand=lambda: 1.0,
        )

    return factory


def submit(client, interaction_id="call-1", digits="12#", timeout_ms=5000):
    return as_answered(client.submit(interaction_id, digits, timeout_ms, "corr-1"))


def test_success_sends_exact_request(make_client, sim):
    result = submit(make_client())
    assert (result.http_status, result.status, result.cxone_status, result.attempts) == (200, "dtmf_submitted", 200, 1)
    (dtmf,) = sim.seen("dtmf")
    assert dtmf["path"] == "/api/v2/interactions/call-1/dtmf"
    assert json.loads(dtmf["body"]) == {"digits": "12#", "timeout": 5000}
    assert dtmf["body"] == '{"digits":"12#","timeout":5000}'
    assert dtmf["headers"]["authorization"].startswith("Bearer ")
    assert dtmf["headers"]["content-type"] == "application/json"
    assert dtmf["headers"]["accept"] == "application/json"


def test_token_form_is_url_encoded_so_secrets_arrive_intact(make_client, sim):
    submit(make_client(CXONE_CLIENT_SECRET="a&b=c+d %e", CXONE_SCOPE="interaction:write"))
    (token,) = sim.seen("token")
    assert token["headers"]["content-type"] == "application/x-www-form-urlencoded"
    form = parse_qs(token["body"])
    assert form == {
        "grant_type": ["client_credentials"],
        "client_id": ["client-id"],
        "client_secret": ["a&b=c+d %e"],
        "scope": ["interaction:write"],
    }


def test_token_is_reused_and_connections_kept_alive(make_client, sim):
    client = make_client()
    for _ in range(5):
        assert submit(client).http_status == 200
    assert len(sim.seen("token")) == 1
    peers = {r["peer"] for r in sim.seen("dtmf")}
    assert len(peers) == 1  # one keep-alive connection served all five


def test_retry_after_seconds_is_honoured(make_client, sim, fake_time):
    sim.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": "2"}}])
    result = submit(make_client())
    assert (result.http_status, result.attempts) == (200, 2)
    assert fake_time.sleeps == [2.0]


def test_retry_after_http_date_is_honoured(make_client, sim, fake_time):
    date = email.utils.formatdate(1_800_000_000 + 3, usegmt=True)
    sim.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": date}}])
    assert submit(make_client()).http_status == 200
    assert fake_time.sleeps == [pytest.approx(3.0)]


def test_retry_after_is_capped_by_backoff_max(make_client, sim, fake_time):
    sim.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": "120"}}])
    assert submit(make_client(CXONE_RETRY_BUDGET_S=60)).http_status == 200
    assert fake_time.sleeps == [8.0]


def test_exponential_backoff_without_retry_after(make_client, sim, fake_time):
    sim.script("dtmf:call-1", [{"status": 503}, {"status": 503}, {"status": 503}])
    result = submit(make_client(CXONE_MAX_ATTEMPTS=4, CXONE_RETRY_BUDGET_S=60))
    assert (result.http_status, result.attempts) == (200, 4)
    assert fake_time.sleeps == [1.0, 2.0, 4.0]  # rand=1.0: the jitter ceiling


def test_still_rate_limited_after_last_attempt_is_503_with_retry_after(make_client, sim, fake_time):
    sim.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": "1"}}] * 3)
    result = submit(make_client())
    assert (result.http_status, result.status, result.cxone_status, result.attempts) == (
        503,
        "submission_failed",
        429,
        3,
    )
    assert result.retry_after_s == 1
    assert fake_time.sleeps == [1.0, 1.0]  # never a sleep after the last attempt


def test_never_waits_past_the_budget(make_client, sim, fake_time):
    sim.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": "6"}}] * 3)
    result = submit(make_client(CXONE_RETRY_BUDGET_S=10))
    # 6 s fits in 10; a second 6 s would end at 12: give up at once instead.
    assert (result.http_status, result.attempts) == (503, 2)
    assert fake_time.sleeps == [6.0]


def test_503_from_cxone_after_last_attempt_is_502(make_client, sim):
    sim.script("dtmf:call-1", [{"status": 503}] * 3)
    result = submit(make_client())
    assert (result.http_status, result.cxone_status, result.attempts) == (502, 503, 3)


@pytest.mark.parametrize("status", [400, 403, 409, 500, 502])
def test_other_errors_are_502_and_not_retried(make_client, sim, status, fake_time):
    sim.script("dtmf:call-1", [{"status": status, "body": {"error": "x"}}])
    result = submit(make_client())
    assert (result.http_status, result.status, result.cxone_status, result.attempts) == (
        502,
        "submission_failed",
        status,
        1,
    )
    assert fake_time.sleeps == []


def test_interaction_not_found_is_404(make_client):
    result = submit(make_client(), interaction_id="missing-42")
    assert (result.http_status, result.status, result.cxone_status, result.attempts) == (
        404,
        "submission_failed",
        404,
        1,
    )


def test_401_refreshes_the_token_once_and_retries(make_client, sim, fake_time):
    client = make_client()
    assert submit(client).http_status == 200
    sim.script("dtmf:call-1", [{"status": 401}])
    result = submit(client)
    assert (result.http_status, result.attempts) == (200, 2)
    assert len(sim.seen("token")) == 2
    assert fake_time.sleeps == []


def test_second_401_is_502(make_client, sim):
    sim.script("dtmf:call-1", [{"status": 401}, {"status": 401}])
    result = submit(make_client())
    assert (result.http_status, result.cxone_status, result.attempts) == (502, 401, 2)
    assert len(sim.seen("token")) == 2


def test_expired_token_is_refreshed_mid_way(make_client, sim):
    sim.configure(token_ttl_s=2)  # shorter than the 30 s margin: used for half its life, 1 s
    client = make_client()
    assert submit(client).http_status == 200
    time.sleep(1.1)
    assert submit(client).http_status == 200
    assert len(sim.seen("token")) == 2


def test_connection_dropped_after_sending_is_504_and_not_resent(make_client, sim, fake_time):
    sim.script("dtmf:call-1", [{"status": 200, "drop": True}])
    result = submit(make_client())
    assert (result.http_status, result.status, result.cxone_status, result.attempts) == (
        504,
        "submission_unknown",
        None,
        1,
    )
    assert len(sim.seen("dtmf")) == 1
    assert fake_time.sleeps == []


def test_read_timeout_is_504_and_not_resent(make_client, sim):
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 1.0}])
    result = submit(make_client(CXONE_READ_TIMEOUT_S=0.2))
    assert (result.http_status, result.status, result.attempts) == (504, "submission_unknown", 1)
    assert len(sim.seen("dtmf")) == 1


def test_connect_failure_is_retried_then_502(make_client, upstream_config, closed_port, fake_time):
    client = make_client(
        CXONE_BASE_URL=f"http://127.0.0.1:{closed_port}/api/v2",
        CXONE_TOKEN_URL=upstream_config["CXONE_BASE_URL"] + "/oauth/token",
    )
    result = submit(client)
    assert (result.http_status, result.status, result.cxone_status, result.attempts) == (
        502,
        "submission_failed",
        None,
        3,
    )
    assert fake_time.sleeps == [1.0, 2.0]


def test_token_endpoint_failure_is_502_and_dtmf_never_sent(make_client, sim):
    sim.script("token", [{"status": 500}])
    result = submit(make_client())
    assert (result.http_status, result.cxone_status, result.attempts) == (502, None, 0)
    assert sim.seen("dtmf") == []


def test_rejected_credentials_are_502_with_a_clear_error(make_client, sim):
    sim.configure(client_id="client-id", client_secret="other")
    result = submit(make_client())
    assert (result.http_status, result.cxone_status) == (502, None)
    assert "authentication with CXone failed" in result.error
    assert "s3cr" not in result.error


def test_unreachable_token_endpoint_is_502(make_client, closed_port):
    result = submit(make_client(CXONE_TOKEN_URL=f"http://127.0.0.1:{closed_port}/token"))
    assert (result.http_status, result.cxone_status) == (502, None)


@pytest.fixture
def black_hole_port():
    """A loopback listener whose accept queue is full: new connections hang until they time out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.1)
    yield port
    for sock in [*fillers, listener]:
        sock.close()


def test_connect_timeout_is_not_sent_and_retried(make_client, upstream_config, black_hole_port, fake_time):
    client = make_client(
        CXONE_BASE_URL=f"http://127.0.0.1:{black_hole_port}/api/v2",
        CXONE_TOKEN_URL=upstream_config["CXONE_BASE_URL"] + "/oauth/token",
        CXONE_CONNECT_TIMEOUT_S=0.2,
    )
    started = time.monotonic()
    result = submit(client)
    assert (result.http_status, result.cxone_status, result.attempts) == (502, None, 3)
    assert fake_time.sleeps == [1.0, 2.0]  # retried: nothing can have reached CXone
    assert time.monotonic() - started < 3  # each attempt gave up after the 0.2 s connect timeout

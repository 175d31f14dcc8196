"""CONTRACT.md section 3 (*rev 2*): what "sent" means, and one deadline per request, on real sockets.

The DTMF endpoint is a raw loopback server that misbehaves on purpose; tokens come from the simulator.
"""

import time

import pytest

from dtmf_service import config as cfg
from dtmf_service.cxone.client import CXoneClient
from dtmf_service.cxone.transport import HttpTransport, NotSent, Unknown
from tests.helpers import as_answered
from tests.upstreams import RawUpstream, answer_ok, garbage_outside_tls, make_certificate, trickle


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def upstream():
    servers = []

    def start(behaviour, certificate=None):
        server = RawUpstream(behaviour, certificate)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def client_for(upstream_server, sim_url, **overrides):
    config = {
        "CXONE_BASE_URL": upstream_server.base_url,
        "CXONE_TOKEN_URL": f"{sim_url}/api/v2/oauth/token",
        "CXONE_CLIENT_ID": "id",
        "CXONE_CLIENT_SECRET": "secret",
        "ALLOW_UNAUTHENTICATED": True,
        "CXONE_BACKOFF_BASE_S": 0.01,
        "CXONE_BACKOFF_MAX_S": 0.02,
        **overrides,
    }
    cfg.finalise(config)
    return CXoneClient.from_config(config)


def test_tls_error_after_the_request_was_written_is_unknown_and_not_resent(upstream, certificate, sim_url):
    server = upstream(garbage_outside_tls, certificate)
    client = client_for(server, sim_url, CXONE_CA_BUNDLE=str(certificate[0]))
    result = as_answered(client.submit("call-1", "12#", 5000, "corr"))
    assert (result.http_status, result.status, result.cxone_status) == (504, "submission_unknown", None)
    assert result.attempts == 1
    assert len(server.requests) == 1  # the POST arrived whole, once


def test_tls_handshake_that_fails_before_writing_is_not_sent_and_retried(upstream, certificate, sim_url):
    server = upstream(answer_ok, certificate)  # a certificate the client does not trust: no CA bundle
    client = client_for(server, sim_url)
    result = as_answered(client.submit("call-1", "12#", 5000, "corr"))
    assert (result.http_status, result.status, result.cxone_status) == (502, "submission_failed", None)
    assert result.attempts == 3
    assert server.requests == []  # nothing of the request was ever written


def test_ca_bundle_adds_trust_for_a_private_ca(upstream, certificate, sim_url):
    server = upstream(answer_ok, certificate)
    client = client_for(server, sim_url, CXONE_CA_BUNDLE=str(certificate[0]))
    assert as_answered(client.submit("call-1", "12#", 5000, "corr")).http_status == 200


def test_a_trickling_answer_is_cut_at_budget_plus_read_timeout(upstream, sim_url):
    # One byte every 0.3 s never trips a 1 s read timeout; only the deadline can end this.
    server = upstream(trickle(0.3, 30))
    client = client_for(server, sim_url, CXONE_RETRY_BUDGET_S=1.0, CXONE_READ_TIMEOUT_S=1.0)
    started = time.monotonic()
    result = as_answered(client.submit("call-1", "12#", 5000, "corr"))
    elapsed = time.monotonic() - started
    assert (result.http_status, result.status) == (504, "submission_unknown")
    assert elapsed < 2.0 + 0.5, elapsed
    assert len(server.requests) == 1


def test_transport_sorts_failures_by_phase(upstream, closed_port):
    transport = HttpTransport(1.0, 1.0)
    with pytest.raises(NotSent):
        transport.request("POST", f"http://127.0.0.1:{closed_port}/x", b"{}", {}, 2.0)
    server = upstream(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Len"))  # partial answer, then EOF
    with pytest.raises(Unknown):
        transport.request("POST", f"http://127.0.0.1:{server.port}/x", b"{}", {}, 2.0)


def test_deadline_applies_to_the_token_fetch_too(upstream, sim, sim_url):
    server = upstream(answer_ok)
    sim.script("token", [{"status": 200, "body": {"access_token": "t", "expires_in": 60}, "delay_s": 5}])
    client = client_for(server, sim_url, CXONE_RETRY_BUDGET_S=0.5, CXONE_READ_TIMEOUT_S=0.5)
    started = time.monotonic()
    result = as_answered(client.submit("call-1", "12#", 5000, "corr"))
    assert time.monotonic() - started < 1.5
    assert (result.http_status, result.cxone_status) == (502, None)
    assert server.requests == []

"""Integration fixtures: the gateway (gunicorn or granian, ``server_kind``) with 4 workers in front of
the simulator, in either dialect."""

import subprocess
import sys

import pytest
import requests

from tests import helpers
from tests.helpers import ROOT, SERVERS, Gateway, RedisServer, WebhookReceiver, free_port, wait_until


def dialect_env(dialect, sim_url):
    common = {
        "DTMF_CXONE_CLIENT_ID": "client-id",
        "DTMF_CXONE_CLIENT_SECRET": "s3cr&t=+ value",
        "DTMF_ALLOW_UNAUTHENTICATED": "true",
        "DTMF_IDEMPOTENCY_HASH_KEY": "test-fingerprint-key",  # required outside sandbox mode
        "DTMF_CXONE_BACKOFF_BASE_S": "0.05",
        "DTMF_CXONE_BACKOFF_MAX_S": "0.2",
    }
    if dialect == "agent":
        return {
            **common,
            "DTMF_CXONE_API": "agent",
            "DTMF_CXONE_AUTH_BASE": sim_url,
            "DTMF_CXONE_TENANT_ID": "tenant-1",
            "DTMF_CXONE_ACCESS_KEY_ID": "AK1",
            "DTMF_CXONE_ACCESS_KEY_SECRET": "ak:secret",
        }
    return {**common, "DTMF_CXONE_BASE_URL": f"{sim_url}/api/v2"}


@pytest.fixture
def gateway_env(tmp_path):
    return {
        "DTMF_METRICS_DIR": str(tmp_path / "metrics"),
        "DTMF_AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
        "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{tmp_path / 'idem.db'}",
        "DTMF_IDEMPOTENCY_HASH_KEY": "test-fingerprint-key",  # required outside sandbox mode
        "DTMF_ACCESS_LOG": "off",
        "DTMF_GUNICORN_LOG_LEVEL": "warning",
    }


@pytest.fixture(params=SERVERS)
def server_kind(request, monkeypatch):
    """Every test that starts the gateway runs under each server: through ``start_gateway``, or with
    ``pytestmark = pytest.mark.usefixtures("server_kind")`` where a module builds ``Gateway`` itself.
    ``@pytest.mark.gunicorn_only("why")``: a guarantee about a mechanism granian does not have."""
    marker = request.node.get_closest_marker("gunicorn_only")
    if request.param != "gunicorn" and marker is not None:
        pytest.skip(f"gunicorn only: {marker.args[0]}")
    monkeypatch.setattr(helpers, "SERVER", request.param)
    return request.param


@pytest.fixture
def start_gateway(tmp_path, server_kind):
    started = []

    def factory(env, workers=4, threads=8):
        server = Gateway(env, workers=workers, threads=threads, log_path=tmp_path / "server.log").start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(tmp_path):
    if RedisServer.BINARY is None:
        pytest.skip("REDIS NOT INSTALLED: .ci/run installs redis-server; these tests did not run")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    return redis_server.url


@pytest.fixture
def webhook():
    """A real webhook receiver on a free loopback port."""
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


class SimulatorProcess:
    """The CXone simulator as its own process (``python -m dtmf_service.simulator``), driven and
    read over HTTP: what it records is what reached "CXone", whatever happened to the gateway."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dtmf_service.simulator", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._up, timeout=10)

    def _up(self) -> bool:
        try:
            return requests.get(f"{self.url}/_sim/requests", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def script(self, target: str, responses: list[dict]) -> None:
        requests.post(f"{self.url}/_sim/script", json={"target": target, "responses": responses}, timeout=5)

    def presses(self, interaction_id: str) -> int:
        seen = requests.get(f"{self.url}/_sim/requests", timeout=5).json()
        return sum(1 for r in seen if r["path"].endswith(f"/interactions/{interaction_id}/dtmf"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@pytest.fixture
def sim_process():
    simulator = SimulatorProcess()
    yield simulator
    simulator.stop()

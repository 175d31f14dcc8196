"""Shared fixtures: applications, the CXone simulator on loopback, gunicorn, receivers."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from dtmf_service import create_app
from dtmf_service.simulator import make_server
from tests.helpers import free_port

VALID = {"interaction_id": "call-1", "digits": "12#", "timeout_ms": 5000, "sequence_matrix_key": "menu.main"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    # A developer's own DTMF_* settings must not leak into the suite.
    for name in list(os.environ):
        if name.startswith("DTMF_"):
            monkeypatch.delenv(name)


@pytest.fixture
def base_config(tmp_path):
    return {
        "METRICS_DIR": str(tmp_path / "metrics"),
        "AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
        "IDEMPOTENCY_STORE": f"sqlite:///{tmp_path / 'idempotency.db'}",
        "IDEMPOTENCY_HASH_KEY": "test-fingerprint-key",  # required outside sandbox mode
        "CXONE_BACKOFF_BASE_S": 0.01,
        "CXONE_BACKOFF_MAX_S": 0.05,
    }


@pytest.fixture
def make_app(base_config):
    apps = []

    def factory(**overrides):
        app = create_app({**base_config, **overrides})
        app.testing = True
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["dtmf"].close(2.0)


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def sim_server():
    """The CXone simulator as a real HTTP server on a free loopback port."""
    server = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def sim(sim_server):
    return sim_server.simulator


@pytest.fixture
def sim_url(sim_server):
    host, port = sim_server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture
def upstream_config(sim_url):
    """Configuration that points the tutorial dialect at the simulator server."""
    return {
        "CXONE_BASE_URL": f"{sim_url}/api/v2",
        "CXONE_CLIENT_ID": "client-id",
        "CXONE_CLIENT_SECRET": "s3cr&t=+ value",
        "ALLOW_UNAUTHENTICATED": True,
    }


@pytest.fixture
def closed_port():
    """A loopback port with nothing listening: connections are refused."""
    port = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts real tmpfs file systems of a given size, to fill up (needs root, as CI and this project's
    machines have); unmounted afterwards."""
    import subprocess

    mounted = []

    def mount(size: str):
        mount_point = tmp_path / f"fs{len(mounted)}"
        mount_point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_tmpfs(tmpfs):
    return tmpfs("64k")

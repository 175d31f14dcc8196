"""CONTRACT.md section 5: the simulator runs as a real HTTP server, `python -m dtmf_service.simulator`."""

import subprocess
import sys

import pytest
import requests

from tests.helpers import ROOT, free_port, wait_until

pytestmark = pytest.mark.slow


def test_simulator_module_serves_both_dialects():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtmf_service.simulator", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert f"listening on http://127.0.0.1:{port}" in proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(f"{base}/_sim/requests", timeout=1).status_code == 200)
        token = requests.post(
            f"{base}/api/v2/oauth/token",
            data={"grant_type": "client_credentials", "client_id": "a", "client_secret": "b"},
            timeout=5,
        ).json()["access_token"]

        def dtmf(interaction_id, token=token):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return requests.post(
                f"{base}/api/v2/interactions/{interaction_id}/dtmf",
                json={"digits": "1", "timeout": 1000},
                headers=headers,
                timeout=5,
            )

        assert dtmf("c-1").status_code == 200
        assert dtmf("missing-1").status_code == 404
        requests.post(
            f"{base}/_sim/script",
            json={"target": "dtmf:*", "responses": [{"status": 429, "headers": {"Retry-After": "3"}}]},
            timeout=5,
        )
        limited = dtmf("c-1")
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "3")
        assert dtmf("c-1", token=None).status_code == 401
        agent = requests.post(
            f"{base}/InContactAPI/services/v23.0/agent-sessions/s-1/send-dtmf",
            json={"dtmfSequence": "1", "toneDurationMS": 340, "toneSpacingMS": 0},
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert agent.status_code == 202
    finally:
        proc.terminate()
        proc.wait(5)

"""End to end through real gunicorn (4 workers) and the simulator on loopback, in both dialects."""

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import BIN, ROOT, free_port, healthy, post, wait_until, worker_pids
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow


@pytest.fixture(params=["tutorial", "agent"])
def dialect(request):
    return request.param


@pytest.fixture
def gateway(dialect, sim_url, gateway_env, start_gateway):
    return start_gateway({**gateway_env, **dialect_env(dialect, sim_url)})


def test_valid_request_is_submitted(gateway, sim, dialect):
    response = post(gateway.url, VALID)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "dtmf_submitted"
    assert body["cxone_status"] == (202 if dialect == "agent" else 200)
    (dtmf,) = sim.seen("dtmf")
    if dialect == "agent":
        assert dtmf["path"] == "/InContactAPI/services/v23.0/agent-sessions/call-1/send-dtmf"
        assert dtmf["body"] == '{"dtmfSequence":"12#","toneDurationMS":340,"toneSpacingMS":0}'
        assert dtmf["headers"]["correlationid"]
    else:
        assert dtmf["body"] == '{"digits":"12#","timeout":5000}'


def test_error_mappings(gateway, sim):
    assert post(gateway.url, {**VALID, "interaction_id": "missing-1"}).status_code == 404
    sim.script("dtmf:*", [{"status": 500}])
    failed = post(gateway.url, VALID)
    assert (failed.status_code, failed.json()["cxone_status"]) == (502, 500)
    sim.script("dtmf:*", [{"status": 429, "headers": {"Retry-After": "0"}}] * 3)
    limited = post(gateway.url, VALID)
    assert (limited.status_code, limited.json()["cxone_status"]) == (503, 429)
    assert int(limited.headers["Retry-After"]) >= 1
    sim.script("dtmf:*", [{"status": 200, "drop": True}])
    unknown = post(gateway.url, VALID)
    assert unknown.status_code == 504
    assert unknown.json() == {"status": "submission_unknown", "error": unknown.json()["error"], "cxone_status": None}
    invalid = requests.post(f"{gateway.url}/api/dtmf/parse", data="{", headers={"Content-Type": "application/json"})
    assert (invalid.status_code, invalid.json()["status"]) == (400, "invalid_request")
    wrong_type = requests.post(f"{gateway.url}/api/dtmf/parse", data="{}", headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    too_big = post(gateway.url, {**VALID, "sequence_matrix_key": "x" * 70000})
    assert (too_big.status_code, too_big.headers["Content-Type"]) == (413, "application/json")


def test_token_failure_is_502_with_null_status(gateway, sim):
    sim.configure(client_id="someone-else", client_secret="x")
    response = post(gateway.url, VALID)
    assert (response.status_code, response.json()["cxone_status"]) == (502, None)


def test_metrics_are_exact_across_four_workers(gateway, sim):
    bodies = [VALID] * 200 + [{**VALID, "digits": "X"}] * 60 + [{**VALID, "interaction_id": "missing-2"}] * 40
    session_local = requests.Session

    def send(body):
        with session_local() as session:
            return session.post(f"{gateway.url}/api/dtmf/parse", json=body, timeout=30).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(send, bodies))
    assert statuses.count(200) == 200 and statuses.count(400) == 60 and statuses.count(404) == 40
    served_by = {r["peer"] for r in sim.seen("dtmf")}
    assert len(served_by) >= 2  # several workers (each with its own keep-alive connection) answered
    for _ in range(8):  # whichever worker answers, the totals are the same
        body = requests.get(f"{gateway.url}/api/metrics", timeout=5).json()
        assert body["total_submissions"] == 300
        assert (body["successful_parses"], body["validation_failures"], body["submission_failures"]) == (200, 60, 40)
        assert body["accuracy_rate"] == pytest.approx(200 / 300)


def test_metrics_survive_a_worker_restart(gateway):
    for _ in range(20):
        assert post(gateway.url, VALID).status_code == 200
    victim = gateway.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in gateway.worker_pids() and len(gateway.worker_pids()) == 4, timeout=15)
    for _ in range(8):
        assert requests.get(f"{gateway.url}/api/metrics", timeout=5).json()["successful_parses"] == 20


def test_failing_token_endpoint_is_not_hammered(gateway, sim):
    sim.configure(client_id="someone-else", client_secret="x")  # every token request fails

    def send(_):
        with requests.Session() as session:
            return session.post(f"{gateway.url}/api/dtmf/parse", json=VALID, timeout=30).status_code

    sim.configure(delay_s=0.3)  # slow failures: concurrent requests pile onto the same fetch
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(send, range(32)))
    assert statuses == [502] * 32
    # One fetch at a time per worker, shared by its waiting threads: far fewer than 32.
    assert len(sim.seen("token")) <= 16


def test_gunicorn_conf_reads_bind_workers_threads_from_the_environment(tmp_path, gateway_env):
    port = free_port()
    env = {**os.environ, **gateway_env, "DTMF_BIND": f"127.0.0.1:{port}", "DTMF_WORKERS": "3", "DTMF_THREADS": "5"}
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "app:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), timeout=20)
        # Workers are forked one after another: healthy only means the first one answers.
        wait_until(lambda: len(worker_pids(proc.pid)) >= 3, timeout=20)
        time.sleep(0.5)
        assert len(worker_pids(proc.pid)) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize(
    "bad, key",
    [({"DTMF_CXONE_MAX_ATTEMPTS": "lots"}, "CXONE_MAX_ATTEMPTS"), ({"DTMF_AUDIT_SINKS": "kafka"}, "AUDIT_SINKS")],
)
def test_bad_configuration_stops_gunicorn_with_one_line(tmp_path, gateway_env, bad, key):
    log = tmp_path / "g.log"
    env = {**os.environ, **gateway_env, **bad}
    with open(log, "wb") as out:
        proc = subprocess.run(
            [
                str(BIN / "gunicorn"),
                "-c",
                "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{free_port()}",
                "--workers",
                "2",
                "app:app",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
            timeout=60,
        )
    assert proc.returncode != 0
    lines = [line for line in log.read_text().splitlines() if "configuration error" in line]
    assert lines and all(key in line for line in lines)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("size, status", [(0, 200), (70000, 413)])
def test_chunked_bodies_are_limited_too(gateway, size, status):
    import http.client
    import json as _json

    body = _json.dumps({**VALID, "sequence_matrix_key": "k" * max(1, size)} if size else VALID).encode()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.putrequest("POST", "/api/dtmf/parse")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for start in range(0, len(body), 8192):
        chunk = body[start : start + 8192]
        conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    payload = _json.loads(response.read())
    assert response.status == status
    assert payload["status"] == ("dtmf_submitted" if status == 200 else "invalid_request")

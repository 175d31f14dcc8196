"""Issue 9, operations: key rotation on reload, a forge-proof access log, bounded counter files, slow clients.

Real gunicorn on loopback; faults made for real (SIGHUP, SIGKILL, raw sockets that stall).
"""

import http.client
import json
import os
import signal
import socket
import time

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import healthy, wait_until
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow


def test_api_keys_file_rotation_takes_effect_on_reload(tmp_path, gateway_env, sim_url, start_gateway):
    keys = tmp_path / "api-keys"
    keys.write_text("# rotated by ops\nold-key-0123456789\n")
    env = {**gateway_env, **dialect_env("tutorial", sim_url), "DTMF_API_KEYS_FILE": str(keys)}
    env.pop("DTMF_ALLOW_UNAUTHENTICATED")
    gateway = start_gateway(env, workers=3)

    def status(key):
        return requests.post(
            f"{gateway.url}/api/dtmf/parse", json=VALID, headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).status_code

    assert status("old-key-0123456789") == 200 and status("new-key-0123456789") == 401
    before = set(gateway.worker_pids())
    keys.write_text("new-key-0123456789\n")
    os.kill(gateway.proc.pid, signal.SIGHUP)
    wait_until(lambda: not (set(gateway.worker_pids()) & before) and len(gateway.worker_pids()) == 3, timeout=30)
    wait_until(lambda: healthy(gateway.url), timeout=10)
    # Every worker now refuses the revoked key (many requests spread over all of them).
    assert {status("old-key-0123456789") for _ in range(30)} == {401}
    assert {status("new-key-0123456789") for _ in range(30)} == {200}


def test_every_access_log_line_is_json_whatever_the_caller_sends(tmp_path, gateway_env, sim_url, start_gateway):
    log = tmp_path / "access.log"
    env = {**gateway_env, **dialect_env("tutorial", sim_url), "DTMF_ACCESS_LOG": str(log)}
    gateway = start_gateway(env, workers=1)  # one writer: lines in request order
    nasty = [
        ("/api/dtmf/parse%0A%7B%22forged%22%3A1%7D", {"User-Agent": "ua"}),
        ("/healthz", {"User-Agent": "trailing backslash \\", "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}),
        ("/healthz", {"X-Request-ID": "rid\\", "User-Agent": 'quote " and \\" mix'}),
        ("/api/metrics%22%2C%22status%22%3A200", {"User-Agent": "tab\there"}),
    ]
    for path, headers in nasty:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        conn.request("GET", path, headers=headers)
        conn.getresponse().read()
        conn.close()

    def ours():  # every line parses; the start-up health checks (python-requests) are left aside
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [r for r in records if not str(r["user_agent"]).startswith("python-requests")]

    wait_until(lambda: len(ours()) >= len(nasty), timeout=10)
    time.sleep(0.2)
    records = ours()
    assert len(records) == len(nasty)  # no forged extra line
    by_agent = {r["user_agent"]: r for r in records}  # threads may write their lines in any order
    assert by_agent["ua"]["path"] == '/api/dtmf/parse\n{"forged":1}'
    assert by_agent["trailing backslash \\"]["trace_id"] == "ab" * 16  # the caller's trace, followed
    # "rid\\" breaks the shared X-Request-ID rule (CONTRACT.md section 8, *rev 3*): a new id is logged.
    assert by_agent['quote " and \\" mix']["request_id"] not in ("", "rid\\")
    assert all(set(r) >= {"remote", "method", "path", "status", "duration_ms"} for r in records)


def test_dead_workers_counter_files_are_folded_and_totals_stay_exact(gateway_env, sim_url, start_gateway):
    gateway = start_gateway({**gateway_env, **dialect_env("tutorial", sim_url)}, workers=2)
    metrics_dir = gateway_env["DTMF_METRICS_DIR"]
    sent = 0
    for _ in range(6):
        for _ in range(5):
            assert requests.post(f"{gateway.url}/api/dtmf/parse", json=VALID, timeout=10).status_code == 200
            sent += 1
        victim = gateway.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda v=victim: v not in gateway.worker_pids() and len(gateway.worker_pids()) == 2, timeout=20)
    wait_until(lambda: healthy(gateway.url), timeout=10)
    files = sorted(name for name in os.listdir(metrics_dir) if not name.startswith("."))
    counter_files = [name for name in files if name.startswith("counters-")]
    assert len(counter_files) <= 2, files  # live workers only; the six dead ones are in the archive
    assert "archive.json" in files
    figures = requests.get(f"{gateway.url}/api/metrics", timeout=10).json()
    assert (figures["total_submissions"], figures["successful_parses"]) == (sent, sent)


def _stall(port, payload):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(payload)
    return sock


def test_slow_clients_cannot_hold_the_threads(gateway_env, sim_url, start_gateway):
    env = {**gateway_env, **dialect_env("tutorial", sim_url), "DTMF_REQUEST_READ_TIMEOUT_S": "1"}
    gateway = start_gateway(env, workers=1, threads=2)
    head = b"POST /api/dtmf/parse HTTP/1.1\r\nHost: x\r\n"
    stalled = [_stall(gateway.port, head) for _ in range(4)]  # part of the headers, then silence
    try:
        started = time.monotonic()
        assert requests.get(f"{gateway.url}/healthz", timeout=10).status_code == 200
        assert time.monotonic() - started < 5
        for sock in stalled:  # closed once the read bound has passed (granian: without an answer)
            sock.settimeout(10)
            while sock.recv(65536):
                pass
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.gunicorn_only("granian has no body read timeout (README, Servers): nginx in front answers 408")
def test_a_stalled_body_is_answered_408_and_frees_its_thread(gateway_env, sim_url, start_gateway):
    env = {**gateway_env, **dialect_env("tutorial", sim_url), "DTMF_REQUEST_READ_TIMEOUT_S": "1"}
    gateway = start_gateway(env, workers=1, threads=2)
    stalled: list[socket.socket] = []
    try:
        # A body that stops half-way is answered 408 once the read bound passes, and counted.
        body = json.dumps(VALID).encode()
        head = (
            f"POST /api/dtmf/parse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        slow = _stall(gateway.port, head + body[:10])
        stalled.append(slow)
        answer = b""
        while not answer.endswith(b"}") and (chunk := slow.recv(65536)):  # headers and body may come apart
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "invalid_request"
        slow.close()
        figures = requests.get(f"{gateway.url}/api/metrics", timeout=10).json()
        assert figures["validation_failures"] == 1
    finally:
        for sock in stalled:
            sock.close()

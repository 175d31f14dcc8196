"""CONTRACT.md section 9: a real nginx with deploy/nginx.conf in front of real gunicorn."""

import http.client
import json
import re
import shutil
import subprocess
import time

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import ROOT, free_port, wait_until
from tests.integration.conftest import dialect_env

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if shutil.os.path.exists("/usr/sbin/nginx") else None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)"),
]


@pytest.fixture
def nginx(tmp_path):
    """Starts nginx with the site config of deploy/nginx.conf, pointed at free loopback ports."""
    processes = []

    def start(upstream_port):
        port = free_port()
        site = (ROOT / "deploy" / "nginx.conf").read_text()
        site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
        site = site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
        site = re.sub(r"access_log \S+ dtmf_gateway;", f"access_log {tmp_path}/nginx-access.log dtmf_gateway;", site)
        (tmp_path / "site.conf").write_text(site)
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / "nginx.conf").write_text(f"""
            user root;
            worker_processes 1;
            daemon off;
            pid {tmp_path}/nginx.pid;
            error_log {tmp_path}/nginx-error.log warn;
            events {{ worker_connections 256; }}
            http {{
                client_body_temp_path {tmp_path}/body;
                proxy_temp_path {tmp_path}/proxy;
                fastcgi_temp_path {tmp_path}/fastcgi;
                uwsgi_temp_path {tmp_path}/uwsgi;
                scgi_temp_path {tmp_path}/scgi;
                include {tmp_path}/site.conf;
            }}
        """)
        proc = subprocess.Popen(
            [NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(proc)
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                requests.get(f"{url}/healthz", timeout=1)  # nginx answers (even 502): it is up
                return True
            except requests.RequestException:
                return False

        wait_until(up, timeout=10)
        return port

    yield start
    for proc in processes:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def behind_nginx(tmp_path, sim_url, gateway_env, start_gunicorn, nginx):
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_PROXY_COUNT": "1",
        "DTMF_AUDIT_SINKS": "file",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
        "DTMF_ACCESS_LOG": str(tmp_path / "gunicorn-access.log"),
    }
    gateway = start_gunicorn(env, workers=2)
    return nginx(gateway.port)


def send_from(port, body, headers=None, source="127.0.0.2", path="/api/dtmf/parse"):
    """POST from a chosen loopback source address, as a distinct client would."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response, payload


def events(tmp_path, count):
    path = tmp_path / "audit.jsonl"
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= count, timeout=10)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_request_through_nginx_records_the_real_client(behind_nginx, tmp_path):
    response, payload = send_from(behind_nginx, VALID)
    assert response.status == 200
    assert json.loads(payload)["status"] == "dtmf_submitted"
    (event,) = events(tmp_path, 1)
    assert event["client_ip"] == "127.0.0.2"


def test_spoofed_forwarded_for_is_not_trusted_beyond_proxy_count(behind_nginx, tmp_path):
    response, _ = send_from(behind_nginx, VALID, {"X-Forwarded-For": "6.6.6.6"})
    assert response.status == 200
    (event,) = events(tmp_path, 1)
    assert event["client_ip"] == "127.0.0.2"


def test_request_id_is_generated_passed_and_returned(behind_nginx, tmp_path):
    generated, _ = send_from(behind_nginx, VALID)
    supplied, _ = send_from(behind_nginx, VALID, {"X-Request-ID": "caller-rid-1"})
    assert re.fullmatch(r"[0-9a-f]{32}", generated.getheader("X-Request-ID"))
    assert supplied.getheader("X-Request-ID") == "caller-rid-1"
    recorded = {e["request_id"] for e in events(tmp_path, 2)}
    assert recorded == {generated.getheader("X-Request-ID"), "caller-rid-1"}


def test_body_over_the_limit_is_json_413_from_nginx(behind_nginx):
    response, payload = send_from(behind_nginx, {**VALID, "sequence_matrix_key": "x" * 70000})
    assert response.status == 413
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(payload)["status"] == "invalid_request"


def test_query_strings_never_reach_the_access_logs(behind_nginx, tmp_path):
    send_from(behind_nginx, VALID, path="/api/dtmf/parse?digits=5551234")
    time.sleep(0.5)
    for name in ("nginx-access.log", "gunicorn-access.log"):
        text = (tmp_path / name).read_text()
        assert "/api/dtmf/parse" in text
        assert "5551234" not in text


def test_worker_killed_after_the_request_was_passed_on_is_504_submission_unknown(
    tmp_path, sim, sim_url, gateway_env, start_gunicorn, nginx
):
    import os
    import signal
    import threading

    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 3.0, "body": {"ok": True}}])
    gateway = start_gunicorn({**gateway_env, **dialect_env("tutorial", sim_url), "DTMF_PROXY_COUNT": "1"}, workers=1)
    port = nginx(gateway.port)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", send_from(port, VALID)))
    thread.start()
    wait_until(lambda: sim.seen("dtmf"), timeout=10)
    (worker,) = gateway.worker_pids()
    os.kill(worker, signal.SIGKILL)  # as the OOM killer would, after the digits went to CXone
    thread.join(30)
    response, payload = result["r"]
    assert response.status == 504
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(payload) == {**json.loads(payload), "status": "submission_unknown", "cxone_status": None}


def test_gateway_down_before_anything_was_passed_on_is_502_nothing_sent(nginx, closed_port):
    port = nginx(closed_port)
    response, payload = send_from(port, VALID)
    assert response.status == 502
    body = json.loads(payload)
    assert body["status"] == "submission_failed" and body["cxone_status"] is None

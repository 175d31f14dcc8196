"""CONTRACT.md section 9: a real nginx with deploy/nginx.conf in front of real gunicorn."""

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import ROOT, free_port, wait_until
from tests.integration.conftest import dialect_env

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
OPENSSL = shutil.which("openssl")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)"),
    pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed (.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 made with openssl, as an operator's CA would issue one."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@dataclass
class Front:
    """A running nginx with the shipped site: TLS on ``port``, plain HTTP on ``http_port``."""

    port: int
    http_port: int
    cafile: str
    directory: Path

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)


@pytest.fixture
def nginx(tmp_path, certificate):
    """Starts nginx with the site config of deploy/nginx.conf, pointed at free loopback ports.
    ``edit`` changes the site text first (shorter timeouts, a lower rate) for one test."""
    processes = []
    cert, key = certificate

    def start(upstream_port, edit=None):
        port, http_port = free_port(), free_port()
        site = (ROOT / "deploy" / "nginx.conf").read_text()
        assert "listen 443 ssl;" in site and "listen 80;" in site
        site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
        site = site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
        site = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", site)
        site = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", site)
        site = re.sub(r"access_log \S+ dtmf_gateway;", f"access_log {tmp_path}/nginx-access.log dtmf_gateway;", site)
        if edit:
            site = edit(site)
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

        def up():
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {proc.stderr.read().decode()}")
            try:
                # nginx answers (even 502): it is up
                requests.get(f"https://127.0.0.1:{port}/healthz", timeout=1, verify=str(cert))
                return True
            except requests.RequestException:
                return False

        wait_until(up, timeout=10)
        return Front(port, http_port, str(cert), tmp_path)

    yield start
    for proc in processes:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def behind_nginx(tmp_path, sim_url, gateway_env, start_gateway, nginx):
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_PROXY_COUNT": "1",
        "DTMF_AUDIT_SINKS": "file",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
        "DTMF_ACCESS_LOG": str(tmp_path / "gunicorn-access.log"),
    }
    gateway = start_gateway(env, workers=2)
    return nginx(gateway.port)


def send_from(front, body, headers=None, source="127.0.0.2", path="/api/dtmf/parse", method="POST"):
    """A request over TLS from a chosen loopback source address, as a distinct client would."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", front.port, timeout=30, source_address=(source, 0), context=front.context()
    )
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response, payload


def raw(front, data, tls=True, port=None, timeout=10.0):
    """Bytes as sent, over TLS (or plain, to any port): nginx's answer, read until it closes."""
    sock = socket.create_connection(("127.0.0.1", port or (front.port if tls else front.http_port)), timeout=timeout)
    if tls:
        sock = front.context().wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            pass
    if not chunks:
        return None, {}, b""  # closed without an answer
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


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
    tmp_path, sim, sim_url, gateway_env, start_gateway, nginx
):
    import signal
    import threading

    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 3.0, "body": {"ok": True}}])
    gateway = start_gateway({**gateway_env, **dialect_env("tutorial", sim_url), "DTMF_PROXY_COUNT": "1"}, workers=1)
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


# --- CONTRACT.md section 8 *rev 3*: encrypted transport, trust at the edge; section 9 *rev 3* ---


def s_client(front, *flags):
    """openssl s_client against the site: (handshake completed, output). SECLEVEL=0 lets the client
    offer old protocols, so a refusal comes from the site's ssl_protocols, not from OpenSSL 3's defaults."""
    run = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{front.port}", "-CAfile", front.cafile]
        + ["-cipher", "DEFAULT:@SECLEVEL=0", *flags],
        input=b"",
        capture_output=True,
        timeout=20,
    )
    output = (run.stdout + run.stderr).decode(errors="replace")
    return run.returncode == 0 and "Cipher is (NONE)" not in output, output


def test_tls_offers_1_2_and_1_3_and_nothing_older(nginx, closed_port):
    front = nginx(closed_port)
    for flag in ("-tls1_2", "-tls1_3"):
        ok, output = s_client(front, flag)
        assert ok, output
        assert "Verify return code: 0 (ok)" in output
    for flag in ("-tls1", "-tls1_1"):
        ok, output = s_client(front, flag)
        assert not ok, output
    # The site's own setting, whatever the local OpenSSL would refuse by itself.
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.findall(r"^\s*ssl_protocols\s+([^;]+);", site, re.M) == ["TLSv1.2 TLSv1.3"]


def test_https_answers_carry_hsts_and_no_server_version(behind_nginx):
    ok, _ = send_from(behind_nginx, VALID)
    error, _ = send_from(behind_nginx, {**VALID, "sequence_matrix_key": "x" * 70000})
    for response in (ok, error):
        assert response.getheader("Server") == "nginx"
        assert "max-age=" in response.getheader("Strict-Transport-Security")


def test_plain_http_is_426_json_naming_https_and_never_proxied(behind_nginx, tmp_path):
    status, headers, body = raw(
        behind_nginx,
        b"POST /api/dtmf/parse HTTP/1.1\r\nHost: gw.example.com\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(json.dumps(VALID)), json.dumps(VALID).encode()),
        tls=False,
    )
    assert status == 426
    assert "location" not in headers  # never a redirect a POST would follow in clear
    assert headers["content-type"] == "application/json" and headers["server"] == "nginx"
    payload = json.loads(body)
    assert payload["https_url"] == "https://gw.example.com/api/dtmf/parse"
    assert "https://gw.example.com/api/dtmf/parse" in payload["error"]
    time.sleep(0.3)
    assert not (tmp_path / "audit.jsonl").exists() or not (tmp_path / "audit.jsonl").read_text()
    # A Host that would break the JSON is not echoed.
    status, _, body = raw(behind_nginx, b'GET / HTTP/1.0\r\nHost: a"b\r\n\r\n', tls=False)
    assert status in (400, 426) and json.loads(body)["status"] == "invalid_request"


ERRORS = {
    "bad request line (400)": (b"GARBAGE\r\n\r\n", 400),
    "URI too long (414)": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "headers too large (494)": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 400),
    "unknown transfer encoding (501)": (
        b"POST /api/dtmf/parse HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
    ),
    "CL and TE together (400)": (
        b"POST /api/dtmf/parse HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "body too large (413)": (
        b"POST /api/dtmf/parse HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + b"{" * 100,
        413,
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_every_error_nginx_answers_itself_is_json(nginx, closed_port, case):
    front = nginx(closed_port)
    request, expected = ERRORS[case]
    status, headers, body = raw(front, request)
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    assert headers["server"] == "nginx"
    assert json.loads(body)["status"] == "invalid_request"


def test_plain_http_to_the_tls_port_and_a_stalled_body_are_json(nginx, closed_port):
    front = nginx(closed_port, edit=lambda site: site.replace("client_body_timeout 10s;", "client_body_timeout 1s;"))
    status, headers, body = raw(front, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", tls=False, port=front.port)
    assert (status, headers["content-type"]) == (400, "application/json")
    assert "https" in json.loads(body)["error"]
    # A stalled body: nginx 1.22 closes the connection without a page (it logs 408); a build that
    # answers gets the JSON page. Never HTML either way.
    stalled = b"POST /api/dtmf/parse HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
    status, headers, body = raw(front, stalled)
    assert status is None or (status, headers["content-type"]) == (408, "application/json")
    assert status is None or json.loads(body)["status"] == "invalid_request"


def test_every_json_error_page_of_the_site_is_valid_json():
    """Each status nginx itself can answer has a JSON page, and every body in the file parses."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    tls_server = site[site.index("listen 443 ssl;") :]
    covered = {int(code) for line in re.findall(r"error_page ([\d ]+)", tls_server) for code in line.split()}
    assert covered >= {400, 408, 413, 414, 429, 494, 495, 496, 497, 500, 501, 502, 503, 504}
    for body in re.findall(r"return \d+ '([^']*)'", site):
        json.loads(re.sub(r"\$[a-z_]+", "x", body))


def test_request_id_kept_only_when_plain_and_shared_with_the_audit_event(behind_nginx, tmp_path):
    long_id, odd_id = "a" * 4004, "rid with spaces"
    kept, _ = send_from(behind_nginx, VALID, {"X-Request-ID": "caller.rid:1-2_3"})
    replaced_long, _ = send_from(behind_nginx, VALID, {"X-Request-ID": long_id})
    replaced_odd, _ = send_from(behind_nginx, VALID, {"X-Request-ID": odd_id})
    assert kept.getheader("X-Request-ID") == "caller.rid:1-2_3"
    ids = [r.getheader("X-Request-ID") for r in (replaced_long, replaced_odd)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    recorded = [e["request_id"] for e in events(tmp_path, 3)]
    assert recorded == ["caller.rid:1-2_3", *ids]
    wait_until(lambda: len((tmp_path / "nginx-access.log").read_text().splitlines()) >= 3)
    logged = re.findall(r"/api/dtmf/parse.* rid=(\S+)", (tmp_path / "nginx-access.log").read_text())
    assert logged == recorded
    assert long_id not in (tmp_path / "nginx-access.log").read_text()


def test_rate_limit_per_client_address_is_429_json_with_retry_after(behind_nginx, tmp_path, nginx):
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"limit_req_zone \$binary_remote_addr zone=dtmf_per_client:\S+ rate=\d+r/s;", site)
    upstream = int(re.search(r"server 127.0.0.1:(\d+);", (tmp_path / "site.conf").read_text())[1])
    # The shipped zone, with a rate a bounded loop reaches for sure on a busy machine.
    front = nginx(upstream, edit=lambda s: re.sub(r"rate=\d+r/s", "rate=1r/m", s).replace("burst=40", "burst=3"))
    statuses = [send_from(front, b"", path="/healthz", method="GET")[0] for _ in range(8)]
    assert [r.status for r in statuses[:4]] == [200] * 4
    limited = statuses[-1]
    assert limited.status == 429
    assert limited.getheader("Content-Type") == "application/json"
    assert limited.getheader("Retry-After") == "1"
    assert limited.getheader("Strict-Transport-Security")
    # Per address: another client is still served.
    assert send_from(front, b"", path="/healthz", method="GET", source="127.0.0.3")[0].status == 200


@pytest.mark.parametrize("path", ["/metrics", "/api/metrics", "/api/metrics?x=1", "/api/%6detrics"])
def test_public_site_does_not_serve_metrics(behind_nginx, path):
    response, payload = send_from(behind_nginx, b"", path=path, method="GET")
    assert response.status == 404
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(payload)["status"] == "invalid_request"

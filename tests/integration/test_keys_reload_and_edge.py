"""CONTRACT.md section 8, *rev 3*, with real gunicorn: a keys file broken at a reload keeps the old keys and
the master running; a direct caller cannot choose its audited address; a malformed chunk is 400."""

import http.client
import json
import os
import signal
import socket
import time

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import Gateway, healthy, read_jsonl, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_kind")]

GOOD = "good-key-0123456789"
OTHER = "other-key-0123456789"


def status(url, key):
    return requests.post(
        f"{url}/api/dtmf/parse", json=VALID, headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).status_code


def reload(gateway):
    """kill -HUP the master and wait until every worker is a new one that answers."""
    before = set(gateway.worker_pids())
    os.kill(gateway.proc.pid, signal.SIGHUP)
    wait_until(
        lambda: (
            not (set(gateway.worker_pids()) & before)
            and len(gateway.worker_pids()) == gateway.workers
            and healthy(gateway.url)
        ),
        timeout=30,
    )
    assert gateway.proc.poll() is None, "the master stopped"


def make_oversized(path):
    path.write_text(f"{GOOD}\n" * 60000)  # 1.2 MB of valid keys: too large all the same


def make_dev_zero(path):
    path.unlink()
    path.symlink_to("/dev/zero")


BAD_FILES = {
    "inline comment": lambda p: p.write_text(f"{GOOD} # ops team\n{OTHER}\n"),
    "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe" + OTHER.encode("utf-16-le")),
    "missing": lambda p: p.unlink(),
    "empty": lambda p: p.write_bytes(b""),
    "symlink to /dev/zero": make_dev_zero,
    "oversized": make_oversized,
    "weak key": lambda p: p.write_text(f"{OTHER}\nshort\n"),
}


def test_a_bad_keys_file_at_a_reload_keeps_the_old_keys_and_the_master(tmp_path, gateway_env, start_gateway):
    keys = tmp_path / "api-keys"
    keys.write_text(f"# ops\n{GOOD}\n")
    env = {**gateway_env, "DTMF_API_KEYS_FILE": str(keys), "DTMF_ALLOW_UNAUTHENTICATED": "true"}
    gateway = start_gateway(env, workers=2, threads=2)
    assert (status(gateway.url, GOOD), status(gateway.url, OTHER)) == (200, 401)
    assert requests.get(f"{gateway.url}/healthz", timeout=10).json()["api_keys"] == "ok"
    for name, spoil in BAD_FILES.items():
        if keys.is_symlink() or not keys.exists():
            keys.unlink(missing_ok=True)
        keys.write_text(f"{GOOD}\n")
        spoil(keys)
        reload(gateway)
        # Every worker (several requests) keeps answering as before the broken edit: never open, never 502.
        assert {status(gateway.url, GOOD) for _ in range(4)} == {200}, name
        assert {status(gateway.url, OTHER) for _ in range(4)} == {401}, name
        health = requests.get(f"{gateway.url}/healthz", timeout=10).json()
        assert health["api_keys"] == "stale" and health["api_keys_error"], name
        assert GOOD not in json.dumps(health) and OTHER not in json.dumps(health)
    # A good file (BOM, CRLF, comments) is taken at the next reload: OTHER in, GOOD revoked.
    keys.unlink()
    keys.write_bytes(f"\ufeff# rotated\r\n{OTHER}\r\n".encode())
    reload(gateway)
    assert {status(gateway.url, OTHER) for _ in range(4)} == {200}
    assert {status(gateway.url, GOOD) for _ in range(4)} == {401}
    assert "api_keys_error" not in requests.get(f"{gateway.url}/healthz", timeout=10).json()
    # Every key commented out on purpose: nobody is accepted (authentication never turns itself off).
    keys.write_text(f"# {OTHER}\n")
    reload(gateway)
    assert {status(gateway.url, OTHER) for _ in range(4)} | {status(gateway.url, "") for _ in range(2)} == {401}
    log = (tmp_path / "server.log").read_text()
    assert "API_KEYS_FILE not reloaded" in log and GOOD not in log and OTHER not in log


def test_a_bad_keys_file_at_start_stops_start_up_with_one_line(tmp_path, gateway_env):
    keys = tmp_path / "api-keys"
    keys.write_text(f"# ops\n{GOOD}\ntoo-short\n")
    gateway = Gateway({**gateway_env, "DTMF_API_KEYS_FILE": str(keys)}, workers=1, log_path=tmp_path / "g.log")
    with pytest.raises(RuntimeError, match="exited with 4"):
        gateway.start()
    log = (tmp_path / "g.log").read_text()
    assert f"line 3 of {keys}: the key is shorter than 16 characters" in log
    assert "too-short" not in log and GOOD not in log and "Traceback" not in log


@pytest.fixture
def behind_proxy(tmp_path, gateway_env, start_gateway):
    env = {
        **gateway_env,
        "DTMF_PROXY_COUNT": "1",
        "DTMF_AUDIT_SINKS": "file",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
    }
    return start_gateway(env, workers=1, threads=2)


def post_from(source, port, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    conn.request(
        "POST", "/api/dtmf/parse", body=json.dumps(VALID), headers={"Content-Type": "application/json", **headers}
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def test_a_direct_caller_cannot_set_its_audited_address(behind_proxy, tmp_path):
    # 127.0.0.2 is loopback but not in FORWARDED_ALLOW_IPS (default 127.0.0.1, ::1): not the proxy.
    assert post_from("127.0.0.2", behind_proxy.port, {"X-Forwarded-For": "6.6.6.6"}) == 200
    assert post_from("127.0.0.1", behind_proxy.port, {"X-Forwarded-For": "10.1.2.3"}) == 200
    events = wait_until(lambda: (e := read_jsonl(tmp_path / "audit.jsonl")) and len(e) == 2 and e)
    assert [e["client_ip"] for e in events] == ["127.0.0.2", "10.1.2.3"]


MALFORMED_CHUNKS = [
    b'5;ext="unterminated\r\n{"a":\r\n0\r\n\r\n',  # bad chunk extension
    b'5;\x01=1\r\n{"a":\r\n0\r\n\r\n',  # control character in an extension
    b'zz\r\n{"a":\r\n0\r\n\r\n',  # chunk size not hex
    b'5\r\n{"a":1}\r\n0\r\n\r\n',  # chunk longer than its size
]


def test_a_malformed_chunked_body_is_400_invalid_request(behind_proxy):
    head = (
        b"POST /api/dtmf/parse HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    for chunks in MALFORMED_CHUNKS:
        with socket.create_connection(("127.0.0.1", behind_proxy.port), timeout=10) as sock:
            sock.sendall(head + chunks)
            answer, deadline = b"", time.monotonic() + 10
            while time.monotonic() < deadline and (data := sock.recv(65536)):
                answer += data
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 400"), (chunks, answer[:300])
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["status"] == "invalid_request", chunks

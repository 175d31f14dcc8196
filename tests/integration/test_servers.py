"""``dtmf-gateway serve`` and the lifecycle both servers drive (issue 21): one audit delivery process
per host, supervised; nothing left behind by a killed master; no serving without the lifecycle."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import BIN, ROOT, Gateway, free_port, is_delivery_process, post, read_jsonl, wait_until

pytestmark = pytest.mark.slow

VALID = {"interaction_id": "call-1", "digits": "12#", "timeout_ms": 5000, "sequence_matrix_key": "menu.main"}


def audited(path) -> set[str]:
    return {e["request_id"] for e in read_jsonl(path)} if path.exists() else set()


def test_one_delivery_process_per_host_respawned_when_it_dies(tmp_path, gateway_env, server_kind):
    audit = tmp_path / "audit.jsonl"
    env = {**gateway_env, "DTMF_AUDIT_SINKS": "file", "DTMF_AUDIT_FILE_PATH": str(audit)}
    with Gateway(env, workers=3, threads=4, log_path=tmp_path / "g.log") as server:
        first = wait_until(server.delivery_pid, timeout=10)
        assert sum(1 for _ in filter(is_delivery_process, server.worker_pids())) == 0
        ids = {post(server.url, VALID).headers["X-Request-ID"] for _ in range(5)}
        wait_until(lambda: ids <= audited(audit), timeout=15)
        wait_until(lambda: delivered(server.url) >= 5, timeout=15)  # acknowledged and counted
        # The delivery process dies: events written meanwhile wait in the outbox, and a new process
        # (started by the master within a few seconds) delivers them.
        os.kill(first, signal.SIGKILL)
        more = {post(server.url, VALID).headers["X-Request-ID"] for _ in range(5)}
        second = wait_until(lambda: (pid := server.delivery_pid()) not in (None, first) and pid, timeout=15)
        wait_until(lambda: more <= audited(audit), timeout=20)
        assert second != first
        # The dead process's count is kept too.
        wait_until(lambda: delivered(server.url) >= 10, timeout=15)
        wait_until(lambda: requests.get(f"{server.url}/api/metrics", timeout=5).json()["audit_pending"] == 0)


def delivered(url: str) -> int:
    counts = requests.get(f"{url}/api/metrics", timeout=5).json()
    return int(counts["audit_sinks"]["file"]["audit_delivered"] or 0)


def test_a_killed_master_leaves_no_delivery_process(tmp_path, gateway_env, server_kind):
    env = {**gateway_env, "DTMF_AUDIT_SINKS": "file", "DTMF_AUDIT_FILE_PATH": str(tmp_path / "a.jsonl")}
    server = Gateway(env, workers=2, threads=4, log_path=tmp_path / "g.log").start()
    delivery = wait_until(server.delivery_pid, timeout=10)
    workers = server.worker_pids()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)
    wait_until(lambda: not is_delivery_process(delivery), timeout=10)
    # Nor do the workers stay behind, serving on the shared port (granian's would, but for serve.py).
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() and _not_zombie(pid) for pid in workers), timeout=10)


def _not_zombie(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_a_reload_replaces_the_delivery_process(tmp_path, gateway_env, server_kind):
    audit = tmp_path / "audit.jsonl"
    env = {**gateway_env, "DTMF_AUDIT_SINKS": "file", "DTMF_AUDIT_FILE_PATH": str(audit)}
    with Gateway(env, workers=2, threads=4, log_path=tmp_path / "g.log") as server:
        first = wait_until(server.delivery_pid, timeout=10)
        server.reload()
        wait_until(lambda: server.delivery_pid() not in (None, first), timeout=30)
        wait_until(lambda: not is_delivery_process(first), timeout=30)
        wait_until(lambda: len(server.worker_pids()) == 2, timeout=30)
        ids = {post(server.url, VALID).headers["X-Request-ID"] for _ in range(3)}
        wait_until(lambda: ids <= audited(audit), timeout=15)


def test_serve_refuses_an_unknown_server_with_one_line(tmp_path, gateway_env):
    env = {**os.environ, **gateway_env, "DTMF_SERVER": "uwsgi"}
    proc = subprocess.run([str(BIN / "dtmf-gateway"), "serve"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dtmf-gateway serve: DTMF_SERVER: expected one of gunicorn, granian, got 'uwsgi'"
    ]


@pytest.mark.parametrize("how", ["gunicorn -c own.conf.py app:app", "granian app:app"])
def test_the_app_refuses_a_server_that_ran_no_lifecycle(tmp_path, gateway_env, how):
    # uWSGI, or either server started by hand without the lifecycle, imports app:app itself: it must
    # not serve without journal recovery, delivery and exact metrics.
    port = free_port()
    server = how.split()[0]
    own_conf = tmp_path / "own.conf.py"
    own_conf.write_text("workers = 1\n")
    argv = {
        # gunicorn reads ./gunicorn.conf.py by default (the lifecycle): here a configuration of one's own.
        "gunicorn": [str(BIN / "gunicorn"), "-c", str(own_conf), "--bind", f"127.0.0.1:{port}", "app:app"],
        "granian": [str(BIN / "granian"), "--interface", "wsgi", "--port", str(port), "app:app"],
    }[server]
    env = {k: v for k, v in {**os.environ, **gateway_env}.items() if k not in ("DTMF_LIFECYCLE", "DTMF_DELIVERY")}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{server} kept running without the lifecycle:\n{out[-2000:]}")
    assert proc.returncode != 0
    refusals = [line for line in out.splitlines() if "refusing to serve" in line]
    assert refusals and "dtmf-gateway serve" in refusals[0]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens


def test_serve_tells_systemd_it_is_ready(tmp_path, gateway_env, server_kind):
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(30)
        port = free_port()
        env = {
            **os.environ,
            **gateway_env,
            "NOTIFY_SOCKET": str(notify),
            "DTMF_SERVER": server_kind,
            "DTMF_BIND": f"127.0.0.1:{port}",
            "DTMF_WORKERS": "1",
            "DTMF_THREADS": "2",
        }
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([str(BIN / "dtmf-gateway"), "serve"], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            started = time.monotonic()
            messages = []
            while time.monotonic() - started < 30 and not any(b"READY=1" in m for m in messages):
                messages.append(listener.recv(4096))
            assert any(b"READY=1" in m for m in messages), messages
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        finally:
            proc.terminate()
            proc.wait(40)
            log.close()


def test_a_worker_killed_again_right_after_its_respawn_is_replaced_again(tmp_path, gateway_env, server_kind):
    # granian's own rule would stop the whole server here (a slot dying within 5.5 s of its respawn).
    with Gateway(gateway_env, workers=2, threads=4, log_path=tmp_path / "g.log") as server:
        for _ in range(3):
            before = set(server.worker_pids())
            os.kill(sorted(before)[0], signal.SIGKILL)
            wait_until(lambda b=before: len(set(server.worker_pids()) - b) == 1 and len(server.worker_pids()) == 2)
            time.sleep(0.5)
        assert server.proc is not None and server.proc.poll() is None
        wait_until(lambda: post(server.url, VALID).status_code == 200, timeout=10)

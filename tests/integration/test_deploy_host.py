"""The systemd install, run as the unit runs it (CONTRACT.md section 8 *rev 3* "The host", section 9
*rev 3* pid file, section 11 *rev 3* "One environment"): gunicorn started from the unit's ExecStart
with README's env file and nothing else, then README's CLI invocation and kill commands."""

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import VALID
from tests.deploy_files import (
    mapped,
    parse_environment_file,
    readme_cli_function,
    readme_env_file,
    readme_lines,
    split,
    unit_value,
)
from tests.helpers import ROOT, all_descendants, free_port, wait_until, worker_pids

pytestmark = pytest.mark.slow
KEY = "deploy-test-key-0123456789abcdef"
SECRET = "credential-value-never-in-environ"
BARE = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


@pytest.fixture
def installed(tmp_path, closed_port):
    """README's install in tmp_path: the directories systemd makes (0700), README's env file with the
    host's paths moved here, sandbox CXone, and a webhook sink that is down so events wait."""
    paths = {
        "/run/dtmf-gateway": str(tmp_path / "run"),
        "/var/lib/dtmf-gateway": str(tmp_path / "lib"),
        "/var/log/dtmf-gateway": str(tmp_path / "log"),
        "/etc/dtmf-gateway": str(tmp_path / "etc"),
        "/opt/dtmf-gateway": str(ROOT),
        "/run/credentials/dtmf-gateway.service": str(tmp_path / "credentials"),
    }
    for name in ("run", "lib", "log", "etc", "credentials"):
        (tmp_path / name).mkdir(mode=0o700)
    (tmp_path / "etc" / "api-keys").write_text(KEY + "\n")
    port = free_port()
    lines = [
        line
        for line in mapped(readme_env_file(), paths).splitlines()
        # Sandbox CXone (its secret too), no remote syslog.
        if not line.startswith(("DTMF_CXONE_", "DTMF_AUDIT_SYSLOG", "DTMF_BIND=", "DTMF_AUDIT_SINKS="))
    ]
    # What LoadCredential= would have copied: one file per remaining _FILE key, a newline at the end
    # as `base64` writes it.
    for line in lines:
        key, _, path = line.partition("=")
        if key.endswith("_FILE") and key != "DTMF_API_KEYS_FILE":
            assert path.startswith(str(tmp_path / "credentials")), line
            Path(path).write_text(f"{SECRET}-{key}\n")
            Path(path).chmod(0o400)
    lines += [
        f"DTMF_BIND=127.0.0.1:{port}",
        "DTMF_WORKERS=2",
        "DTMF_THREADS=4",
        "DTMF_GUNICORN_LOG_LEVEL=warning",
        "DTMF_ACCESS_LOG=off",
        "DTMF_AUDIT_SINKS=file,webhook",
        f"DTMF_AUDIT_FILE_PATH={tmp_path / 'log' / 'audit' / 'audit.jsonl'}",
        f"DTMF_AUDIT_WEBHOOK_URL=http://127.0.0.1:{closed_port}/events",
    ]
    env_file = tmp_path / "etc" / "env"
    env_file.write_text("\n".join(lines) + "\n")
    env_file.chmod(0o640)
    paths[unit_value("EnvironmentFile")] = str(env_file)
    argv = split(mapped(unit_value("ExecStart"), paths))
    cwd = mapped(unit_value("WorkingDirectory"), paths)
    log = open(tmp_path / "gunicorn.log", "ab")  # noqa: SIM115
    # systemd's environment: the env file's lines, nothing from this test process.
    proc = subprocess.Popen(
        argv, cwd=cwd, env={**BARE, **parse_environment_file(env_file.read_text())}, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
        try:
            return requests.get(f"{url}/healthz", timeout=1).status_code == 200 and len(worker_pids(proc.pid)) == 2
        except requests.RequestException:
            return False

    wait_until(up, timeout=30)
    yield proc, url, paths
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    log.close()


def readme_command(pattern, paths):
    pidfile = parse_environment_file(readme_env_file())["DTMF_PIDFILE"]
    (line,) = [x for x in readme_lines(pattern) if f"$(cat {pidfile})" in x]
    return mapped(line.removeprefix("sudo "), paths)


def test_readme_cli_invocation_reaches_the_running_service_outbox(installed):
    proc, url, paths = installed
    for n in range(3):
        response = requests.post(
            f"{url}/api/dtmf/parse",
            json={**VALID, "interaction_id": f"env-{n}"},
            headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": f"env-key-{n}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
    # README's function, as written, with the install paths moved (the test runs as root: no sudo).
    function = mapped(readme_cli_function(), paths).replace("sudo -u dtmf ", "")

    def status():
        done = subprocess.run(
            ["bash", "-c", f"{function}\ndtmf audit status --json"], env=BARE, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    rows = wait_until(lambda: (s := status())["file"]["pending"] == 0 and s, timeout=20, interval=0.3)
    assert rows["webhook"]["pending"] == 3  # the backlog the running service holds for the down sink
    # The secrets came from credential files: none is in the processes' environment.
    for pid in [proc.pid, *all_descendants(proc.pid)]:  # the delivery process too
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert SECRET.encode() not in environ and b"DTMF_IDEMPOTENCY_HASH_KEY_FILE=" in environ


def test_pid_file_drives_readme_reload_and_stop(installed, tmp_path):
    proc, url, paths = installed
    pidfile = mapped(parse_environment_file(readme_env_file())["DTMF_PIDFILE"], paths)
    assert int(open(pidfile).read()) == proc.pid
    before = set(worker_pids(proc.pid))
    subprocess.run(["sh", "-c", readme_command(r"kill -HUP ", paths)], check=True)
    wait_until(lambda: len(set(worker_pids(proc.pid)) - before) == 2, timeout=30)
    subprocess.run(["sh", "-c", readme_command(r"kill -TERM ", paths)], check=True)
    assert proc.wait(40) == 0
    assert not os.path.exists(pidfile)


def test_every_file_the_service_creates_is_0600_in_0700_directories(installed, tmp_path):
    proc, url, paths = installed
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "modes-1"}
    assert requests.post(f"{url}/api/dtmf/parse", json=VALID, headers=headers, timeout=10).status_code == 200
    audit = tmp_path / "log" / "audit" / "audit.jsonl"
    wait_until(lambda: audit.exists() and audit.read_text(), timeout=20)
    # A reload: old workers exit and the master folds their counters into the metrics archive.
    before = set(worker_pids(proc.pid))
    os.kill(proc.pid, signal.SIGHUP)
    wait_until(lambda: len(set(worker_pids(proc.pid)) - before) == 2, timeout=30)
    wait_until(lambda: (tmp_path / "run" / "metrics" / "archive.json").exists(), timeout=10)
    time.sleep(0.2)
    pidfile = mapped(parse_environment_file(readme_env_file())["DTMF_PIDFILE"], paths)
    seen, wrong = [], []
    for top in ("run", "lib", "log"):
        for directory, dirnames, filenames in os.walk(tmp_path / top):
            mode = stat.S_IMODE(os.stat(directory).st_mode)
            seen.append(directory)
            if mode != 0o700:
                wrong.append((directory, oct(mode)))
            for name in filenames:
                path = os.path.join(directory, name)
                if path == pidfile:
                    continue  # gunicorn's own chmod 0644, inside the 0700 runtime directory
                seen.append(path)
                mode = stat.S_IMODE(os.lstat(path).st_mode)
                if mode != 0o600:
                    wrong.append((path, oct(mode)))
    assert not wrong, wrong
    names = {os.path.basename(p) for p in seen}
    assert {"audit.jsonl", "archive.json", "metrics", "spool", "idempotency"} <= names, names

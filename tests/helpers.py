"""Test helpers: free ports, the gateway under gunicorn or granian, real receivers for audit sinks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def as_answered(submission: Any) -> Any:
    """A CXone client's Submission together with what the caller is told about it (the one
    mapping, dtmf_service.parse.answer): http_status, status, error, retry_after_s."""
    from types import SimpleNamespace

    from dtmf_service.outcome import Facts, RequestContext
    from dtmf_service.parse import answer

    valid = {"interaction_id": "call-1", "digits": "12#", "timeout_ms": 5000}
    ctx = RequestContext("request", "0" * 31 + "1", "01", "", None, time.perf_counter())
    outcome = answer(submission, Facts("event", sent=valid, valid=valid), ctx)
    retry_after = outcome.headers.get("Retry-After")
    return SimpleNamespace(
        result=submission.result,
        attempts=submission.attempts,
        http_status=outcome.http_status,
        status=outcome.status,
        cxone_status=outcome.cxone_status,
        error=outcome.body.get("error"),
        retry_after_s=int(retry_after) if retry_after is not None else None,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (no procps needed)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


# The server integration tests start: "gunicorn" or "granian" (tests/conftest.py's ``server_kind``
# fixture sets it for each parametrised test; DTMF_TEST_SERVER for a whole run).
SERVERS = ("gunicorn", "granian")
SERVER = os.environ.get("DTMF_TEST_SERVER", "gunicorn")


def is_delivery_process(pid: int) -> bool:
    """The host's audit delivery process (dtmf_service/wiring/delivery_process.py), not a worker."""
    try:
        return b"delivery_process" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def worker_pids(master: int) -> list[int]:
    """A server master's worker processes: its children but the audit delivery process."""
    return [pid for pid in child_pids(master) if not is_delivery_process(pid)]


class Gateway:
    """The real gateway on a free loopback port: gunicorn with gunicorn.conf.py (``gunicorn -c
    gunicorn.conf.py app:app``), or granian through ``dtmf-gateway serve`` (DTMF_SERVER=granian)."""

    def __init__(
        self,
        env: dict[str, str],
        workers: int = 4,
        threads: int = 8,
        port: int | None = None,
        log_path: Path | None = None,
        server: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server or SERVER
        self.env = {**os.environ, **env}
        self.workers = workers
        self.threads = threads
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        if self.server == "granian":
            self.env.update(
                {
                    "DTMF_SERVER": "granian",
                    "DTMF_BIND": f"127.0.0.1:{self.port}",
                    "DTMF_WORKERS": str(self.workers),
                    "DTMF_THREADS": str(self.threads),
                }
            )
            return [str(BIN / "dtmf-gateway"), "serve"]
        return [
            str(BIN / "gunicorn"),
            "-c",
            "gunicorn.conf.py",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(self.workers),
            "--threads",
            str(self.threads),
            "app:app",
        ]

    def start(self, timeout: float = 20.0) -> Gateway:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv(), cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:] if self.log_path else ""
                raise RuntimeError(f"{self.server} exited with {self.proc.returncode}:\n{tail}")
            # Healthy means one worker answers; tests that count or kill workers need all of them.
            if len(self.worker_pids()) == self.workers and healthy(self.url):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.server} did not become healthy")

    def worker_pids(self) -> list[int]:
        """The worker processes (the master's children but the audit delivery process)."""
        assert self.proc is not None
        return worker_pids(self.proc.pid)

    def delivery_pid(self) -> int | None:
        assert self.proc is not None
        return next((pid for pid in all_descendants(self.proc.pid) if is_delivery_process(pid)), None)

    def reload(self) -> None:
        """SIGHUP to the master: gunicorn and granian both replace their workers gracefully."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def all_descendants(pid: int) -> list[int]:
    """Every process below ``pid``, whichever of its threads started it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(p) for p in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


class WebhookReceiver:
    """A real HTTP receiver for the webhook sink: can fail (status), be slow, or be down (stopped)."""

    def __init__(self, port: int | None = None, certificate: tuple[Path, Path] | None = None) -> None:
        self.port = port or free_port()
        self.certificate = certificate  # (cert, key): serve https
        self.url = f"{'https' if certificate else 'http'}://127.0.0.1:{self.port}/audit"
        self.events: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.bodies: list[bytes] = []
        self.status = 200
        self.refuse_ids: set[str] = set()  # events answered 500 whatever ``status`` says
        self.reject_ids: set[str] = set()  # events answered 400 (refused for good: dead letters)
        self.reject_if: Callable[[dict[str, Any]], bool] | None = None  # likewise, by content
        self.posts = 0
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                status = receiver.status
                if self.headers.get("Content-Type") == "application/x-ndjson":
                    events = [json.loads(line) for line in body.decode().splitlines()]
                else:
                    events = [json.loads(body)]
                ids = {e.get("event_id") for e in events}
                if ids & receiver.refuse_ids:
                    status = 500
                if ids & receiver.reject_ids or (receiver.reject_if and any(map(receiver.reject_if, events))):
                    status = 400
                with receiver._lock:
                    receiver.posts += 1
                    if 200 <= status < 300:
                        receiver.events.extend(events)
                        receiver.bodies.append(body)
                        receiver.headers.append(dict(self.headers.items()))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        if self.certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, self.certificate))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self) -> list[str]:
        with self._lock:
            return [e["event_id"] for e in self.events]


class UdpReceiver:
    """A real UDP socket (statsd or syslog server) collecting datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.datagrams: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams.append(data)

    def close(self) -> None:
        self._stop = True
        self._thread.join(1)
        self.sock.close()


def post(url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 30) -> requests.Response:
    return requests.post(f"{url}/api/dtmf/parse", json=body, headers=headers or {}, timeout=timeout)


class RedisServer:
    """A real redis-server in the foreground on a free loopback port, no persistence; can be killed and restarted."""

    BINARY = shutil.which("redis-server")

    def __init__(self, data_dir: Path, persistent: bool = False) -> None:
        self.persistent = persistent  # AOF with fsync always: what survives a kill -9, as in production
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.data_dir = data_dir
        self.extra: list[str] = []  # more redis-server options (--replicaof ...)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        assert self.BINARY is not None
        self.proc = subprocess.Popen(
            [self.BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
             "--dir", str(self.data_dir), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self.ping, timeout=10)
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")  # the write lock, as an operator's sqlite3 session or a backup takes it
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""


class SqliteLockHolder:
    """Another process holding a SQLite file's write lock (``BEGIN IMMEDIATE``) until ``release()``."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.proc: subprocess.Popen[bytes] | None = None

    def hold(self) -> SqliteLockHolder:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, self.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"locked":
            raise RuntimeError("the lock holder could not take the lock")
        return self

    def release(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"done\n")
            self.proc.stdin.flush()
            self.proc.wait(10)


class RedisSentinelTrio:
    """A real Redis Sentinel set-up on loopback: a master, a replica and three redis-sentinel
    processes (quorum 2), each on its own free port with its own directory; fails over within a
    couple of seconds once the master is killed."""

    BINARY = shutil.which("redis-sentinel")
    SERVICE = "dtmf"

    def __init__(self, data_dir: Path) -> None:
        (data_dir / "master").mkdir(parents=True)
        (data_dir / "replica").mkdir()
        self.master = RedisServer(data_dir / "master")
        self.replica = RedisServer(data_dir / "replica")
        self.master.extra = self.replica.extra = ["--repl-diskless-sync-delay", "0"]  # no 5 s wait to sync
        self.replica.extra = [*self.replica.extra, "--replicaof", "127.0.0.1", str(self.master.port)]
        self.data_dir = data_dir
        self.ports = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        self.url = f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def start(self) -> RedisSentinelTrio:
        assert self.BINARY is not None
        self.master.start()
        self.replica.start()
        for index, port in enumerate(self.ports):
            directory = self.data_dir / f"sentinel-{index}"
            directory.mkdir()
            conf = directory / "sentinel.conf"  # sentinel rewrites its file: one each, writable
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 500\n"
                f"sentinel failover-timeout {self.SERVICE} 2000\n"
            )
            with open(directory / "log", "wb") as log:  # the child keeps its own copy of the descriptor
                self.procs.append(subprocess.Popen([self.BINARY, str(conf)], stdout=log, stderr=subprocess.STDOUT))
        wait_until(lambda: self.master_port() == self.master.port and self._replica_attached(), timeout=15)
        return self

    @staticmethod
    def master_binary() -> str | None:
        return RedisServer.BINARY

    def master_port(self) -> int | None:
        import redis

        for port in self.ports:
            try:
                address = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(self.SERVICE)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def _replica_attached(self) -> bool:
        import redis

        try:
            return (
                redis.Redis(port=self.replica.port, socket_timeout=1).info("replication")["master_link_status"] == "up"
            )
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)
        self.replica.stop()
        self.master.stop()


PROMETHEUS = shutil.which("prometheus")
RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None)


def start_prometheus(directory: Path, target_port: int) -> tuple[subprocess.Popen[bytes], str]:
    """A real Prometheus scraping 127.0.0.1:target_port every second, with its own config and
    storage in ``directory``: (the process, its query API base URL ``.../api/v1``)."""
    assert PROMETHEUS is not None
    port = free_port()
    (directory / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: dtmf
    static_configs:
      - targets: ["127.0.0.1:{target_port}"]
""")
    (directory / "tsdb").mkdir()
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}/api/v1"


def start_rsyslogd(conf: Path, ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
    """A real rsyslogd in the foreground with ``conf`` (its pid file beside it), once ``ready()``;
    its own output in the error when it never gets there."""
    assert RSYSLOGD is not None
    proc = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(conf.with_suffix(".pid"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(ready, timeout=15)
    except AssertionError:
        proc.kill()
        output = proc.stdout.read().decode()[-2000:] if proc.stdout else ""
        raise AssertionError(f"rsyslogd did not start: {output}") from None
    return proc


def tcp_listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0

"""CPU per request of the request path alone, in one process: no HTTP server, no load generator.

    python -m bench.cpu_inproc                     # audit on (webhook+file sinks, statsd), 3 x 3000 requests
    python -m bench.cpu_inproc --audit off -n 5000 --rounds 5
    python -m bench.cpu_inproc --profile 20        # cProfile: the 20 costliest functions (own time)

The application is built as a worker builds it (``DTMF_DELIVERY=process``: the host's delivery
process would deliver, so this process only writes: placeholder and event into the journal, the
writer thread moving them into SQLite, the exporters). Requests go straight into the WSGI callable
with an environ like a server's, one after another on one thread, against a real fake CXone on
loopback (bench/upstream.py, no delay). CPU is this process's (every thread: the outbox writer and
the watchdog included), from ``time.process_time``; the fake upstream's is not counted. Numbers are
steadier than a wrk run's and meant for before/after comparisons of the code, not for capacity.

On a machine shared with other work, CPU time still varies by 10-20% between runs; instructions do
not. Per request, under valgrind (about a minute each): the difference of two runs divided by 800,
``valgrind --tool=callgrind python -m bench.cpu_inproc -n 200 --rounds 1`` and the same with
``-n 1000`` (``totals:`` in each callgrind.out file).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, free_port

BODY = b'{"interaction_id":"bench-1","digits":"12#","timeout_ms":5000,"sequence_matrix_key":"menu.main"}'


def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the fake upstream did not start")


def _environ(body: bytes) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/api/dtmf/parse",
        "QUERY_STRING": "",
        "RAW_URI": "/api/dtmf/parse",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_USER_AGENT": "bench",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def build_app(up_port: int, workdir: Path, audit: bool, statsd_port: int) -> Any:
    env = {
        "DTMF_CXONE_BASE_URL": f"http://127.0.0.1:{up_port}/api/v2",
        "DTMF_CXONE_CLIENT_ID": "bench",
        "DTMF_CXONE_CLIENT_SECRET": "bench",
        "DTMF_ALLOW_UNAUTHENTICATED": "true",
        "DTMF_IDEMPOTENCY_HASH_KEY": "bench-fingerprint-key",
        "DTMF_AUDIT_SPOOL_DIR": str(workdir / "spool"),
        "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{workdir / 'idem.db'}",
        "DTMF_METRICS_EXPORTERS": "memory",
        "DTMF_METRICS_DIR": str(workdir / "metrics"),
        "DTMF_LOG_LEVEL": "WARNING",
        "DTMF_DELIVERY": "process",
    }
    if audit:
        env.update(
            {
                "DTMF_AUDIT_SINKS": "webhook,file",
                "DTMF_METRICS_EXPORTERS": "memory,statsd",
                "DTMF_AUDIT_FILE_PATH": str(workdir / "audit.jsonl"),
                "DTMF_AUDIT_WEBHOOK_URL": f"http://127.0.0.1:{up_port}/audit",
                "DTMF_AUDIT_WEBHOOK_BATCH_MAX": "50",
                "DTMF_STATSD_PORT": str(statsd_port),
            }
        )
    os.environ.update(env)
    from dtmf_service import create_app

    return create_app()


def drive(app: Any, count: int) -> tuple[float, float, float]:
    """``count`` requests; (CPU seconds of the process, of the requesting thread alone, wall seconds)."""
    statuses: dict[str, int] = {}

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses[status] = statuses.get(status, 0) + 1
        return lambda data: None

    wsgi = app.wsgi_app
    cpu0, own0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
    for _ in range(count):
        for _chunk in wsgi(_environ(BODY), start_response):
            pass
    cpu, own, wall = time.process_time() - cpu0, time.thread_time() - own0, time.perf_counter() - wall0
    if set(statuses) != {"200 OK"}:
        raise RuntimeError(f"unexpected answers: {statuses}")
    return cpu, own, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audit", choices=("on", "off"), default="on")
    parser.add_argument("-n", type=int, default=3000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=int, metavar="TOP", help="cProfile one round: the TOP functions")
    parser.add_argument("--callers", help="with --profile: who calls the functions matching this")
    parser.add_argument("--sort", default="tottime", help="with --profile: tottime (own time) or cumulative")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="dtmf-cpu-inproc-"))
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream", "--port", str(up_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    statsd.bind(("127.0.0.1", 0))  # never read: the kernel drops what overflows its buffer
    try:
        _wait_port(up_port)
        app = build_app(up_port, workdir, args.audit == "on", statsd.getsockname()[1])
        drive(app, 300)  # warm-up: token, connections, journal, writer thread
        if args.profile:
            profiler = cProfile.Profile(time.thread_time)  # this thread's CPU, not waits
            profiler.enable()
            cpu, _, _ = drive(app, args.n)
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats(args.sort).print_stats(args.profile)
            if args.callers:
                stats.print_callers(args.callers)
            print(out.getvalue())
            print(f"(profiled: {cpu / args.n * 1000:.3f} ms CPU per request, profiler included)")
            return 0
        per_request = []
        for round_number in range(1, args.rounds + 1):
            cpu, own, wall = drive(app, args.n)
            per_request.append(cpu / args.n * 1000)
            print(
                f"  round {round_number}: {cpu / args.n * 1000:.3f} ms CPU/request "
                f"({own / args.n * 1000:.3f} on the request thread, {(cpu - own) / args.n * 1000:.3f} elsewhere), "
                f"{wall / args.n * 1000:.3f} ms wall/request",
                flush=True,
            )
        median = statistics.median(per_request)
        print(f"audit {args.audit}: median {median:.3f} ms CPU per request ({args.n} x {args.rounds})")
        app.extensions["dtmf"].close(5.0)
    finally:
        upstream.terminate()
        upstream.wait(5)
        statsd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

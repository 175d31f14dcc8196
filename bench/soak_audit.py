"""Audit soak: SIGKILL a random worker every 1.5 s for two minutes under load while the webhook
flaps, another process holds the outbox's write lock for a minute, and operator commands run.

    python -m bench.soak_audit                  # 120 s of faults, about 2.5 minutes in all
    python -m bench.soak_audit --seconds 30 --lock-seconds 10
    python -m bench.soak_audit --redis          # fleet mode: the outbox in Redis, restarted mid-soak

What issues 3 and 10 ask to hold in production, run for their real duration (the test suite runs the
same mechanisms for seconds): 4 workers, AUDIT_SINKS=file,webhook,syslog (webhook batches of 50) and
METRICS_EXPORTERS=memory,statsd, steady load from a few callers, a random worker SIGKILLed every
--kill-every seconds (what the OOM killer does), the webhook receiver answering 500 or closed for
stretches of a few seconds, and one graceful restart (SIGTERM, start again) halfway. Issue 17 adds:
a process holding the SQLite outbox's write lock (``BEGIN IMMEDIATE``, as an operator's ``sqlite3``
session or a backup does) for --lock-seconds from a quarter of the way in (so the restart falls
inside it), and ``dtmf-gateway audit status`` run as a subprocess every --cli-every seconds. Each
request carries its own X-Request-ID, which its audit event records; afterwards every answered
request's event must be in the file and at the webhook, at least once (duplicates are allowed, and
counted). Each answer's time is measured: the report gives the worst under each fault (the
upstream is instant, so that time is the gateway's own, audit work included).
With --redis the outbox is a real redis-server (AUDIT_OUTBOX=redis://..., AOF with fsync always, as
in production) and, in place of the SQLite lock holder, Redis is killed (kill -9) a quarter of the
way in, stays down for --lock-seconds, and is started again: answers must not wait on it, and the
events of the requests answered meanwhile reach every sink once it is back.
Sandbox mode (the in-process simulator), loopback only; the load is bounded in count and time.
Exit status 0 when no answered request's event is missing, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import requests

from tests.helpers import (
    BIN,
    ROOT,
    Gunicorn,
    RedisServer,
    SqliteLockHolder,
    UdpReceiver,
    WebhookReceiver,
    free_port,
    read_jsonl,
)

VALID = {"interaction_id": "soak-1", "digits": "12#", "timeout_ms": 5000, "sequence_matrix_key": "menu.main"}
MAX_REQUESTS = 100_000
_RESTARTING = "graceful restart (SIGTERM until the new workers answer)"  # a bound on the load whatever the durations


class Load:
    """A few callers posting at a steady pace; remembers which request ids got an answer."""

    def __init__(self, url: str, callers: int, pause_s: float) -> None:
        self.url = url
        self.answered: dict[str, int] = {}
        self.timings: list[tuple[float, float]] = []  # (start, seconds to the answer), monotonic
        self.no_answer = 0
        self.failures: list[float] = []  # when each request without an answer started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pause_s = pause_s
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(callers)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set() and len(self.answered) + self.no_answer < MAX_REQUESTS:
            rid = uuid.uuid4().hex
            started = time.monotonic()
            try:
                response = session.post(
                    f"{self.url}/api/dtmf/parse", json=VALID, headers={"X-Request-ID": rid}, timeout=30
                )
                with self._lock:
                    self.answered[rid] = response.status_code
                    self.timings.append((started, time.monotonic() - started))
            except requests.RequestException:
                # A worker killed mid-request, or nobody listening during the restart: no answer, no promise.
                with self._lock:
                    self.no_answer += 1
                    self.failures.append(started)
                session.close()
                session = requests.Session()
            self._stop.wait(self._pause_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the faults last")
    parser.add_argument("--lock-seconds", type=float, default=60.0, help="how long the outbox lock is held")
    parser.add_argument("--cli-every", type=float, default=10.0, help="seconds between `audit status` runs")
    parser.add_argument("--kill-every", type=float, default=1.5, help="seconds between worker SIGKILLs")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds each caller waits between requests")
    parser.add_argument("--redis", action="store_true", help="fleet mode: the outbox in Redis, restarted mid-soak")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="dtmf-soak-"))
    webhook = WebhookReceiver().start()
    syslog, statsd = UdpReceiver(), UdpReceiver()
    audit_file = workdir / "audit.jsonl"
    env = {
        "DTMF_METRICS_DIR": str(workdir / "metrics"),
        "DTMF_AUDIT_SPOOL_DIR": str(workdir / "spool"),
        "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{workdir / 'idem' / 'idem.db'}",
        "DTMF_ACCESS_LOG": "off",
        "DTMF_GUNICORN_LOG_LEVEL": "warning",
        "DTMF_LOG_LEVEL": "ERROR",
        "DTMF_AUDIT_SINKS": "file,webhook,syslog",
        "DTMF_METRICS_EXPORTERS": "memory,statsd",
        "DTMF_AUDIT_FILE_PATH": str(audit_file),
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
        "DTMF_AUDIT_WEBHOOK_BATCH_MAX": "50",
        "DTMF_AUDIT_SYSLOG_ADDRESS": f"udp://127.0.0.1:{syslog.port}",
        "DTMF_STATSD_PORT": str(statsd.port),
        "DTMF_AUDIT_BACKOFF_MAX_S": "2",
        "DTMF_AUDIT_LEASE_S": "5",
    }
    redis_server = None
    if args.redis:
        (workdir / "redis").mkdir()
        redis_server = RedisServer(workdir / "redis", persistent=True).start()
        env["DTMF_AUDIT_OUTBOX"] = redis_server.url
    port = free_port()
    log = workdir / "gunicorn.log"
    server = Gunicorn(env, workers=4, port=port, log_path=log).start()
    load = Load(server.url, args.callers, args.pause).start()
    started = time.monotonic()
    kills = flaps = 0
    restarted = False
    holder = (
        _RedisOutage(redis_server) if redis_server is not None else SqliteLockHolder(workdir / "spool" / "outbox.db")
    )
    fault = "Redis down" if redis_server is not None else "lock held"
    lock_at = args.seconds / 4
    windows: dict[str, list[tuple[float, float]]] = {
        fault: [],
        "audit status running": [],
        _RESTARTING: [],
        "5 s after the restart": [],
        "1 s after a SIGKILL": [],
    }
    cli_runs: list[tuple[int, float]] = []
    next_cli = time.monotonic() + args.cli_every / 2

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    say(f"load on; SIGKILL of a random worker every {args.kill_every} s, webhook flapping, for {args.seconds:.0f} s")
    try:
        next_kill = time.monotonic() + args.kill_every
        next_flap = time.monotonic() + random.uniform(1, 4)
        while time.monotonic() - started < args.seconds:
            now = time.monotonic()
            if now >= next_kill:
                pids = server.worker_pids()
                if pids:
                    os.kill(random.choice(pids), signal.SIGKILL)
                    kills += 1
                    windows["1 s after a SIGKILL"].append((now, now + 1.0))
                next_kill = now + args.kill_every
            if holder.proc is None and now - started >= lock_at:
                if redis_server is not None:
                    say(f"redis-server killed (kill -9); started again in {args.lock_seconds:.0f} s")
                else:
                    say(
                        f"another process takes the outbox's write lock (BEGIN IMMEDIATE) for {args.lock_seconds:.0f} s"
                    )
                holder.hold()
                lock_window = [time.monotonic(), 0.0]
            elif holder.proc is not None and holder.proc.poll() is None and now - lock_window[0] >= args.lock_seconds:
                holder.release()
                windows[fault].append((lock_window[0], time.monotonic()))
                say("redis-server back" if redis_server is not None else "lock released")
            if now >= next_cli:
                run_started = time.monotonic()
                status = subprocess.run([str(BIN / "dtmf-gateway"), "audit", "status"], cwd=ROOT,
                                        env={**os.environ, **env}, capture_output=True, timeout=60)  # fmt: skip
                windows["audit status running"].append((run_started, time.monotonic()))
                cli_runs.append((status.returncode, time.monotonic() - run_started))
                if status.returncode:
                    say(f"audit status exited {status.returncode}: {status.stderr.decode()[-300:]}")
                next_cli = time.monotonic() + args.cli_every
            if now >= next_flap:
                flaps += 1
                mode = flaps % 3
                if mode == 1:
                    webhook.status = 500
                elif mode == 2:
                    webhook.stop()  # closed port
                else:
                    webhook.start()
                    webhook.status = 200
                next_flap = now + random.uniform(1, 4)
            if not restarted and now - started > args.seconds / 2:
                say("SIGTERM to gunicorn, then started again on the same port (graceful restart)")
                stopping = time.monotonic()
                server.stop(signal.SIGTERM)
                server = Gunicorn(env, workers=4, port=port, log_path=log).start()
                restarted = True
                windows[_RESTARTING].append((stopping, time.monotonic()))
                windows["5 s after the restart"].append((time.monotonic(), time.monotonic() + 5.0))
            time.sleep(0.05)
        if holder.proc is not None and holder.proc.poll() is None:
            holder.release()
            windows[fault].append((lock_window[0], time.monotonic()))
        webhook.stop()
        webhook.start()
        webhook.status = 200
        load.stop()
        answered = {rid for rid, status in load.answered.items() if status != 401}
        say(f"load stopped: {len(answered)} answered, {load.no_answer} without an answer; {kills} SIGKILLs")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            in_file = {e.get("request_id") for e in read_jsonl(audit_file)}
            at_webhook = {e.get("request_id") for e in webhook.events}
            if answered <= in_file and answered <= at_webhook:
                break
            time.sleep(1.0)
        say("audit caught up" if time.monotonic() < deadline else "audit NOT caught up within 180 s")
    finally:
        holder.release()
        load.stop()
        server.stop()
        webhook.stop()
        syslog.close()
        statsd.close()
        if redis_server is not None:
            redis_server.stop()

    file_events = read_jsonl(audit_file)
    file_rids = Counter(e.get("request_id") for e in file_events)
    hook_rids = Counter(e.get("request_id") for e in webhook.events)
    recovered = sum(1 for e in file_events if e.get("recovered"))
    missing_file = answered - set(file_rids)
    missing_hook = answered - set(hook_rids)
    figures = {
        "outbox": "redis (killed and restarted)" if redis_server is not None else "sqlite (lock holder)",
        "seconds": args.seconds,
        "sigkills": kills,
        "webhook_flaps": flaps,
        "answered_requests": len(answered),
        "requests_without_answer": load.no_answer,
        "file_events": len(file_events),
        "file_duplicates": sum(n - 1 for n in file_rids.values()),
        "file_missing": len(missing_file),
        "webhook_events": sum(hook_rids.values()),
        "webhook_duplicates": sum(n - 1 for n in hook_rids.values()),
        "webhook_missing": len(missing_hook),
        "recovered_as_submission_unknown": recovered,
        "syslog_datagrams": len(syslog.datagrams),
        "audit_status_runs": len(cli_runs),
        "audit_status_failures": sum(1 for code, _ in cli_runs if code),
        "audit_status_seconds": [round(s, 2) for _, s in cli_runs],
        "worst_answer_s": _worst_answers(load.timings, windows),
        "per_10_s_answered_unanswered_slowest": _timeline(load, started),
        "gunicorn_log": str(log),
    }
    print(json.dumps(figures, indent=2))
    ok = not missing_file and not missing_hook
    print("PASS: every answered request's event arrived" if ok else "FAIL: answered events missing; see above")
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


class _RedisOutage:
    """The soak's second fault in fleet mode, shaped as the lock holder: hold() kills redis-server,
    release() starts it again on the same port and data (AOF) directory."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.proc: _Down | None = None

    def hold(self) -> None:
        self.server.kill()
        self.proc = _Down()

    def release(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.server.start()
            self.proc.done = True


class _Down:
    """Looks like a running holder process until the outage ends (poll() is None meanwhile)."""

    def __init__(self) -> None:
        self.done = False

    def poll(self) -> int | None:
        return 0 if self.done else None


def _worst_answers(timings: list[tuple[float, float]], windows: dict[str, list[tuple[float, float]]]) -> dict:
    """The slowest answer to a request started inside each fault's windows, and outside all of them."""
    worst: dict[str, float] = {}
    restarting = windows[_RESTARTING]
    for name, spans in windows.items():
        # A request sent while gunicorn restarts waits for a new worker to boot: counted there only.
        inside = [took for start, took in timings if any(a <= start <= b for a, b in spans)
                  and (name == _RESTARTING or not any(a <= start <= b for a, b in restarting))]  # fmt: skip
        worst[name] = round(max(inside), 3) if inside else None
    # SIGKILLs and webhook flaps go on all the time: "otherwise" is outside the other faults only.
    others = [span for name, spans in windows.items() if name != "1 s after a SIGKILL" for span in spans]
    quiet = [took for start, took in timings if not any(a <= start <= b for a, b in others)]
    worst["otherwise (SIGKILLs and webhook flaps only)"] = round(max(quiet), 3) if quiet else None
    worst["all"] = round(max((took for _, took in timings), default=0.0), 3)
    return worst


def _timeline(load: Load, origin: float) -> list[str]:
    """Per 10 s of the run: answers, requests without an answer, the slowest answer."""
    rows = []
    end = max([start for start, _ in load.timings] + load.failures + [origin])
    for first in range(0, int(end - origin) + 1, 10):
        a, b = origin + first, origin + first + 10
        took = [t for start, t in load.timings if a <= start < b]
        failed = sum(1 for start in load.failures if a <= start < b)
        rows.append(f"{first:3d}-{first + 10:3d} s: {len(took):5d} {failed:5d} {max(took, default=0.0):6.3f}")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())

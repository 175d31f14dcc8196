"""Audit soak: SIGKILL a random worker every 1.5 s for a minute under load while the webhook flaps.

    python -m bench.soak_audit                  # 60 s of faults, about 1.5 minutes in all
    python -m bench.soak_audit --seconds 20

What issues 3 and 10 ask to hold in production, run for their real duration (the test suite runs the
same mechanisms for seconds): 4 workers, AUDIT_SINKS=file,webhook,syslog (webhook batches of 50) and
METRICS_EXPORTERS=memory,statsd, steady load from a few callers, a random worker SIGKILLed every
--kill-every seconds (what the OOM killer does), the webhook receiver answering 500 or closed for
stretches of a few seconds, and one graceful restart (SIGTERM, start again) halfway. Each request
carries its own X-Request-ID, which its audit event records; afterwards every answered request's
event must be in the file and at the webhook, at least once (duplicates are allowed, and counted).
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
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import requests

from tests.helpers import Gunicorn, UdpReceiver, WebhookReceiver, free_port, read_jsonl

VALID = {"interaction_id": "soak-1", "digits": "12#", "timeout_ms": 5000, "sequence_matrix_key": "menu.main"}
MAX_REQUESTS = 100_000  # a bound on the load whatever the durations


class Load:
    """A few callers posting at a steady pace; remembers which request ids got an answer."""

    def __init__(self, url: str, callers: int, pause_s: float) -> None:
        self.url = url
        self.answered: dict[str, int] = {}
        self.no_answer = 0
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
            try:
                response = session.post(
                    f"{self.url}/api/dtmf/parse", json=VALID, headers={"X-Request-ID": rid}, timeout=30
                )
                with self._lock:
                    self.answered[rid] = response.status_code
            except requests.RequestException:
                # A worker killed mid-request, or nobody listening during the restart: no answer, no promise.
                with self._lock:
                    self.no_answer += 1
                session.close()
                session = requests.Session()
            self._stop.wait(self._pause_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the faults last")
    parser.add_argument("--kill-every", type=float, default=1.5, help="seconds between worker SIGKILLs")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds each caller waits between requests")
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
    port = free_port()
    log = workdir / "gunicorn.log"
    server = Gunicorn(env, workers=4, port=port, log_path=log).start()
    load = Load(server.url, args.callers, args.pause).start()
    started = time.monotonic()
    kills = flaps = 0
    restarted = False

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
                next_kill = now + args.kill_every
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
                server.stop(signal.SIGTERM)
                server = Gunicorn(env, workers=4, port=port, log_path=log).start()
                restarted = True
            time.sleep(0.05)
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
        load.stop()
        server.stop()
        webhook.stop()
        syslog.close()
        statsd.close()

    file_events = read_jsonl(audit_file)
    file_rids = Counter(e.get("request_id") for e in file_events)
    hook_rids = Counter(e.get("request_id") for e in webhook.events)
    recovered = sum(1 for e in file_events if e.get("recovered"))
    missing_file = answered - set(file_rids)
    missing_hook = answered - set(hook_rids)
    figures = {
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
        "gunicorn_log": str(log),
    }
    print(json.dumps(figures, indent=2))
    ok = not missing_file and not missing_hook
    print("PASS: every answered request's event arrived" if ok else "FAIL: answered events missing; see above")
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

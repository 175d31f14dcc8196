"""Audit soak: the webhook receiver down for a minute under load, gunicorn restarted meanwhile.

    python -m bench.soak_audit                  # 60 s down, about 2 minutes in all
    python -m bench.soak_audit --down-seconds 10

What issue 3 asks to hold in production, run for its real duration (the test suite runs the same
mechanism for seconds): 4 workers, AUDIT_SINKS=file,webhook,syslog and METRICS_EXPORTERS=memory,statsd,
steady load from a few callers, the webhook receiver stopped for --down-seconds, and gunicorn
stopped with SIGTERM and started again halfway through the outage. Afterwards every event the file
sink recorded must have reached the webhook (at least once), and the file sink must hold exactly one
event per answered request. Sandbox mode (the in-process simulator), loopback only; the load is
bounded in count and time. Exit status 0 when nothing was lost, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from tests.helpers import Gunicorn, UdpReceiver, WebhookReceiver, free_port

VALID = {"interaction_id": "soak-1", "digits": "12#", "timeout_ms": 5000, "sequence_matrix_key": "menu.main"}
MAX_REQUESTS = 100_000  # a bound on the load whatever the durations


class Load:
    """A few callers posting at a steady pace; counts answers and refused connections."""

    def __init__(self, url: str, callers: int, pause_s: float) -> None:
        self.url = url
        self.callers = callers
        self.pause_s = pause_s
        self.answered = Counter()
        self.refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(callers)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def total(self) -> int:
        with self._lock:
            return sum(self.answered.values()) + self.refused

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set() and self.total() < MAX_REQUESTS:
            try:
                status = session.post(f"{self.url}/api/dtmf/parse", json=VALID, timeout=30).status_code
                with self._lock:
                    self.answered[status] += 1
            except requests.ConnectionError:
                # During the restart nobody listens: the request was never accepted, so it has no event.
                with self._lock:
                    self.refused += 1
                session.close()
                session = requests.Session()
            self._stop.wait(self.pause_s)


def file_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--down-seconds", type=float, default=60.0, help="how long the webhook receiver is down")
    parser.add_argument("--callers", type=int, default=4, help="concurrent callers")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds each caller waits between requests")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="dtmf-soak-"))
    webhook = WebhookReceiver().start()
    syslog, statsd = UdpReceiver(), UdpReceiver()
    audit_file = workdir / "audit.jsonl"
    env = {
        "DTMF_METRICS_DIR": str(workdir / "metrics"),
        "DTMF_AUDIT_SPOOL_DIR": str(workdir / "spool"),
        "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{workdir / 'idem.db'}",
        "DTMF_ACCESS_LOG": "off",
        "DTMF_GUNICORN_LOG_LEVEL": "warning",
        "DTMF_LOG_LEVEL": "WARNING",
        "DTMF_AUDIT_SINKS": "file,webhook,syslog",
        "DTMF_METRICS_EXPORTERS": "memory,statsd",
        "DTMF_AUDIT_FILE_PATH": str(audit_file),
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
        "DTMF_AUDIT_SYSLOG_ADDRESS": f"udp://127.0.0.1:{syslog.port}",
        "DTMF_STATSD_PORT": str(statsd.port),
    }
    port = free_port()
    log = workdir / "gunicorn.log"
    server = Gunicorn(env, workers=4, port=port, log_path=log).start()
    load = Load(server.url, args.callers, args.pause).start()
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    try:
        time.sleep(5)
        webhook.stop()
        say(f"webhook receiver stopped (port closed) for {args.down_seconds:.0f} s")
        time.sleep(args.down_seconds / 2)
        say("SIGTERM to gunicorn (graceful: queued webhook events go to the spool)")
        code = server.stop(signal.SIGTERM)
        say(f"gunicorn exited with {code}; starting it again on the same port")
        server = Gunicorn(env, workers=4, port=port, log_path=log).start()
        time.sleep(args.down_seconds / 2)
        webhook.start()
        say("webhook receiver back")
        time.sleep(5)
        load.stop()
        say(f"load stopped: {sum(load.answered.values())} answered {dict(load.answered)}, {load.refused} refused")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            expected = set(file_ids(audit_file))
            if expected <= set(webhook.ids()) and _pending(server.url) == 0:
                break
            time.sleep(0.5)
        say("audit drained" if time.monotonic() < deadline else "audit NOT drained within 120 s")
    finally:
        load.stop()
        server.stop()
        webhook.stop()
        syslog.close()
        statsd.close()

    on_disk = file_ids(audit_file)
    hooked = Counter(webhook.ids())
    lost = set(on_disk) - set(hooked)
    answered = sum(load.answered.values())
    print(
        json.dumps(
            {
                "answered_requests": answered,
                "refused_during_restart": load.refused,
                "file_events": len(on_disk),
                "file_unique": len(set(on_disk)),
                "webhook_unique": len(hooked),
                "webhook_duplicates": sum(n - 1 for n in hooked.values()),
                "webhook_missing": len(lost),
                "syslog_datagrams": len(syslog.datagrams),
                "gunicorn_log": str(log),
            },
            indent=2,
        )
    )
    ok = not lost and len(on_disk) == len(set(on_disk)) == answered
    print("PASS: no event lost" if ok else "FAIL: events lost or counted twice; see the figures above")
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def _pending(url: str) -> int | None:
    try:
        return requests.get(f"{url}/api/metrics", timeout=5).json()["audit_pending"]
    except (requests.RequestException, ValueError, KeyError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())

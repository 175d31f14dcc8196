"""Issue 10: crash-proof audit. SIGKILL workers and the master under load while the webhook flaps;
afterwards every answered request's event is at the webhook and in the file (at least once).

Answered requests are known by the X-Request-ID each one sends, which the audit event carries.
"""

import os
import random
import signal
import threading
import time
import uuid

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import Gateway, read_jsonl, wait_until
from tests.integration.conftest import dialect_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_kind")]


def audit_env(tmp_path, gateway_env, sim_url, webhook, **extra):
    return {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "file,webhook",
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
        "DTMF_AUDIT_WEBHOOK_BATCH_MAX": "20",
        "DTMF_AUDIT_BACKOFF_BASE_S": "0.05",
        "DTMF_AUDIT_BACKOFF_MAX_S": "0.5",
        "DTMF_AUDIT_LEASE_S": "2",
        **extra,
    }


class Load:
    """A few caller threads for a bounded time; remembers the request ids that got an answer."""

    def __init__(self, url_of, threads=6, seconds=6.0):
        self.url_of, self.threads, self.seconds = url_of, threads, seconds
        self.answered: list[str] = []
        self._lock = threading.Lock()

    def _caller(self, deadline):
        session = requests.Session()
        while time.monotonic() < deadline:
            rid = uuid.uuid4().hex
            try:
                response = session.post(
                    f"{self.url_of()}/api/dtmf/parse", json=VALID, headers={"X-Request-ID": rid}, timeout=10
                )
            except requests.RequestException:
                session.close()
                session = requests.Session()  # the worker died with the connection: no answer, no promise
                continue
            if response.status_code in (200, 400, 502, 504):
                with self._lock:
                    self.answered.append(rid)
        session.close()

    def run(self, during=None):
        deadline = time.monotonic() + self.seconds
        callers = [threading.Thread(target=self._caller, args=(deadline,)) for _ in range(self.threads)]
        for caller in callers:
            caller.start()
        if during is not None:
            during(deadline)
        for caller in callers:
            caller.join(30)
        return set(self.answered)


def flap(webhook, deadline, also=None):
    """Webhook failing part of the time (500s), while ``also`` does its damage."""
    while time.monotonic() < deadline:
        webhook.status = 500 if webhook.status == 200 else 200
        if also is not None:
            also()
        time.sleep(0.7)
    webhook.status = 200


def request_ids(events):
    return {e.get("request_id") for e in events}


def test_sigkill_of_workers_under_load_loses_no_answered_event(tmp_path, gateway_env, sim_url, webhook):
    env = audit_env(tmp_path, gateway_env, sim_url, webhook)
    server = Gateway(env, workers=4, threads=8, log_path=tmp_path / "g.log").start()
    kills = []

    def kill_one():
        pids = server.worker_pids()
        if pids:
            victim = random.choice(pids)
            os.kill(victim, signal.SIGKILL)  # what the OOM killer does
            kills.append(victim)

    try:
        answered = Load(lambda: server.url).run(lambda deadline: flap(webhook, deadline, kill_one))
        assert len(kills) >= 5 and len(answered) > 100
        wait_until(lambda: answered <= request_ids(read_jsonl(tmp_path / "audit.jsonl")), timeout=60, interval=0.5)
        wait_until(lambda: answered <= request_ids(webhook.events), timeout=60, interval=0.5)
    finally:
        server.stop()


def test_sigkill_of_the_master_loses_no_answered_event(tmp_path, gateway_env, sim_url, webhook):
    env = audit_env(tmp_path, gateway_env, sim_url, webhook)
    webhook.status = 500  # nothing gets out before the crash: it all has to come from the outbox
    first = Gateway(env, workers=2, threads=8, log_path=tmp_path / "g1.log").start()
    answered = Load(lambda: first.url, seconds=3.0).run()
    assert len(answered) > 30
    os.killpg(first.proc.pid, signal.SIGKILL)  # master and workers, at once
    first.proc.wait(10)
    webhook.status = 200
    second = Gateway(env, workers=2, threads=8, log_path=tmp_path / "g2.log").start()
    try:
        wait_until(lambda: answered <= request_ids(webhook.events), timeout=60, interval=0.5)
        wait_until(lambda: answered <= request_ids(read_jsonl(tmp_path / "audit.jsonl")), timeout=30)
    finally:
        second.stop()


def test_a_request_killed_after_the_post_reached_cxone_is_audited_as_submission_unknown(
    tmp_path, gateway_env, sim, sim_url, webhook
):
    env = audit_env(tmp_path, gateway_env, sim_url, webhook)
    sim.script("dtmf:call-1", [{"status": 200, "delay_s": 5.0, "body": {"ok": True}}])
    server = Gateway(env, workers=1, threads=4, log_path=tmp_path / "g.log").start()
    try:
        (worker,) = server.worker_pids()
        rid = uuid.uuid4().hex
        caller = threading.Thread(
            target=lambda: _quietly(
                lambda: requests.post(
                    f"{server.url}/api/dtmf/parse", json=VALID, headers={"X-Request-ID": rid}, timeout=30
                )
            )
        )
        caller.start()
        wait_until(lambda: sim.seen("dtmf"), timeout=10)  # the digits are on their way to the call
        os.kill(worker, signal.SIGKILL)
        caller.join(30)

        def audited():
            found = [e for e in read_jsonl(tmp_path / "audit.jsonl") if e.get("request_id") == rid]
            return found[0] if found else None

        event = wait_until(audited, timeout=30, interval=0.3)  # recovered by the next worker
        assert event["outcome"] == "submission_unknown" and event["recovered"] is True
        assert event["cxone_status"] is None and event["validation_passed"] is True
        wait_until(lambda: rid in request_ids(webhook.events), timeout=30)
    finally:
        server.stop()


def _quietly(call):
    try:
        call()
    except requests.RequestException:
        pass

"""CONTRACT.md section 7 rev 3 "Routing" and section 11 rev 3 "The CLI reads and never re-routes":
the operator CLI as a subprocess beside real gunicorn masters, on SQLite and on a real redis-server."""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests

from dtmf_service.audit.outbox_redis import RedisOutbox
from dtmf_service.audit.outbox_sqlite import SqliteOutbox
from tests.conftest import VALID
from tests.helpers import ROOT, wait_until
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "dtmf-gateway")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def run(env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DTMF_")}
    return subprocess.run([CLI, *args], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60)


def post(gateway, n, prefix):
    ids = []
    for i in range(n):
        body = {**VALID, "interaction_id": f"{prefix}-{i}"}
        assert requests.post(f"{gateway.url}/api/dtmf/parse", json=body, timeout=10).status_code == 200
        ids.append(body["interaction_id"])
    return ids


def file_ids(path):
    if not path.exists():
        return set()
    return {json.loads(line)["interaction_id"] for line in path.read_text().splitlines() if line.strip()}


def hook_ids(receiver):
    return {e["interaction_id"] for e in list(receiver.events)}


def test_check_config_with_other_sinks_changes_no_routing(tmp_path, gateway_env, sim_url, start_gateway, webhook):
    """Issue 17: `DTMF_AUDIT_SINKS=file dtmf-gateway check-config` took the running service's other
    sink away (the shared sink list was rewritten)."""
    audit_file = tmp_path / "audit.jsonl"
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": "file,webhook",
        "DTMF_AUDIT_FILE_PATH": str(audit_file),
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
    }
    gateway = start_gateway(env, workers=2)
    post(gateway, 2, "before")  # the outbox exists and both sinks deliver
    wait_until(lambda: len(hook_ids(webhook)) == 2 and len(file_ids(audit_file)) == 2, timeout=20)
    other = {**env, "DTMF_AUDIT_SINKS": "file"}
    for args in (("check-config",), ("audit", "status"), ("audit", "dead-letters"), ("audit", "redeliver", "--all")):
        run(other, *args)
    ids = set(post(gateway, 10, "after"))
    wait_until(lambda: ids <= hook_ids(webhook) and ids <= file_ids(audit_file), timeout=20)


def snapshot(directory):
    return sorted((str(p.relative_to(directory)), p.is_dir()) for p in directory.rglob("*"))


def test_the_cli_against_no_outbox_creates_nothing_and_names_the_path(tmp_path):
    home = tmp_path / "srv"
    home.mkdir()
    env = {
        "DTMF_AUDIT_SPOOL_DIR": str(home / "spool"),
        "DTMF_METRICS_DIR": str(home / "metrics"),
        "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{home / 'idem' / 'idem.db'}",
        "DTMF_AUDIT_SINKS": "file",
        "DTMF_AUDIT_FILE_PATH": str(home / "log" / "audit.jsonl"),
    }
    before = snapshot(home)
    outbox_path = str(home / "spool" / "outbox.db")
    for args in (("audit", "status"), ("audit", "status", "--json"), ("audit", "dead-letters"),
                 ("audit", "redeliver", "--all"), ("audit", "purge", "--sink", "webhook")):  # fmt: skip
        done = run(env, *args)
        assert done.returncode != 0, args
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and outbox_path in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr
    config = run(env, "check-config")  # a new install: the configuration is fine, nothing is made
    assert config.returncode == 0, config.stderr
    assert "SANDBOX MODE" not in config.stderr  # issue 20: the CLI serves no request
    flask = subprocess.run(
        [str(Path(sys.executable).parent / "flask"), "--app", "app", "dtmf", "audit", "status"],
        cwd=ROOT, env={**{k: v for k, v in os.environ.items() if not k.startswith("DTMF_")}, **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert flask.returncode != 0 and outbox_path in flask.stderr
    assert snapshot(home) == before == []


def test_the_cli_against_a_redis_without_an_outbox_creates_nothing(tmp_path, redis_url):
    env = {"DTMF_AUDIT_OUTBOX": redis_url, "DTMF_AUDIT_SINKS": "file",
           "DTMF_AUDIT_FILE_PATH": str(tmp_path / "a.jsonl"), "DTMF_METRICS_DIR": str(tmp_path / "m"),
           "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{tmp_path / 'i.db'}"}  # fmt: skip
    for args in (("audit", "status"), ("audit", "redeliver", "--all"), ("audit", "dead-letters")):
        done = run(env, *args)
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert redis_url.rsplit("/", 1)[0] in done.stderr
    assert redis.Redis.from_url(redis_url).dbsize() == 0
    assert list(tmp_path.iterdir()) == []


def _sinks_env(gateway_env, sim_url, tmp_path, sinks, webhook):
    return {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_AUDIT_SINKS": sinks,
        "DTMF_AUDIT_FILE_PATH": str(tmp_path / "audit.jsonl"),
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
        "DTMF_AUDIT_RETRY_ATTEMPTS": "1",
        "DTMF_AUDIT_BACKOFF_BASE_S": "0.05",
        "DTMF_AUDIT_BACKOFF_MAX_S": "0.2",
    }


def test_a_removed_sink_keeps_its_events_until_purged(tmp_path, gateway_env, sim_url, start_gateway, webhook):
    webhook.reject_if = lambda event: event.get("interaction_id") == "poison-0"
    env = _sinks_env(gateway_env, sim_url, tmp_path, "file,webhook", webhook)
    gateway = start_gateway(env, workers=2)
    post(gateway, 1, "poison")
    wait_until(lambda: json.loads(run(env, "audit", "status", "--json").stdout)["webhook"]["dead_letters"] == 1,
               timeout=20, interval=0.3)  # fmt: skip
    webhook.status = 503  # the receiver goes down: its events wait
    waiting = post(gateway, 5, "waiting")
    wait_until(lambda: set(waiting) <= file_ids(tmp_path / "audit.jsonl"), timeout=20)
    gateway.stop()
    # The webhook leaves the configuration; its events and its dead letter stay, shown as not configured.
    env = {**env, "DTMF_AUDIT_SINKS": "file"}
    gateway = start_gateway(env, workers=2)
    later = post(gateway, 3, "later")
    wait_until(lambda: set(later) <= file_ids(tmp_path / "audit.jsonl"), timeout=20)
    status = json.loads(run(env, "audit", "status", "--json").stdout)
    assert status["webhook"]["configured"] is False and status["file"]["configured"] is True
    assert status["webhook"]["pending"] == 5 and status["webhook"]["dead_letters"] == 1
    assert RFC3339.match(status["webhook"]["oldest_pending_at"])  # issue 20: times as RFC 3339
    table = run(env, "audit", "status").stdout
    assert "not configured" in [line for line in table.splitlines() if line.startswith("webhook")][0]
    (letter,) = [json.loads(line) for line in run(env, "audit", "dead-letters", "--json").stdout.splitlines()]
    assert RFC3339.match(letter["failed"]) and letter["configured"] is False
    # Redeliver to a sink this configuration lacks is refused; the letter is kept.
    for args in (["--all"], ["--sink", "webhook", "--all"], ["--event-id", letter["event_id"]]):
        refused = run(env, "audit", "redeliver", *args)
        assert refused.returncode != 0 and "not configured" in refused.stderr, args
    unknown = run(env, "audit", "redeliver", "--event-id", str(uuid.uuid4()))
    assert unknown.returncode != 0 and "no dead letter with that id" in unknown.stderr
    assert json.loads(run(env, "audit", "status", "--json").stdout)["webhook"]["dead_letters"] == 1
    # Purge: on purpose, counted as dropped, logged; never a configured sink's backlog.
    assert run(env, "audit", "purge", "--sink", "file").returncode != 0
    purged = run(env, "audit", "purge", "--sink", "webhook")
    assert purged.returncode == 0, purged.stderr
    assert "dropped 5 pending event(s) and 1 dead letter(s)" in purged.stdout and "webhook" in purged.stderr
    status = json.loads(run(env, "audit", "status", "--json").stdout)
    assert status["webhook"]["pending"] == 0 and status["webhook"]["dead_letters"] == 0
    assert status["webhook"]["dropped"] == 6 and status["file"]["pending"] == 0


def _dead_letters(outbox, n):
    for _ in range(n):
        outbox.commit({"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted"})
    outbox.flush(10)
    left = n
    while left:
        claimed = outbox.claim("webhook", "test", 100, 30.0)
        for item in claimed:
            outbox.dead_letter("webhook", item, "refused")
        left -= len(claimed)
        assert claimed or left == 0


# The console script's command in two processes that run it at the same instant (after loading the
# app as the script does), so the two runs overlap as two operators' may, not a start-up apart.
AT_ONCE = (
    "import sys, time; from dtmf_service.cli import _create_app, audit_redeliver; app = _create_app();"
    "app.app_context().push(); time.sleep(max(0.0, float(sys.argv[1]) - time.time()));"
    "audit_redeliver.main(['--all'], prog_name='dtmf-gateway audit redeliver')"
)


def _redeliver_twice_at_once(env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DTMF_")}
    start = str(time.time() + 6.0)  # both loaded by then, even on a busy machine

    def one(_):
        return subprocess.run([sys.executable, "-c", AT_ONCE, start], cwd=ROOT, env={**clean, **env},
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = list(pool.map(one, range(2)))
    for result in done:
        assert result.returncode == 0, result.stderr
    return sum(int(result.stdout.split()[0]) for result in done)


def test_two_redeliver_all_at_once_queue_each_letter_once_sqlite(tmp_path):
    path = tmp_path / "spool" / "outbox.db"
    outbox = SqliteOutbox(str(path), ("webhook",), 64 << 20)
    _dead_letters(outbox, 300)
    env = {"DTMF_AUDIT_SPOOL_DIR": str(path.parent), "DTMF_AUDIT_SINKS": "webhook",
           "DTMF_AUDIT_WEBHOOK_URL": "http://127.0.0.1:9/audit"}  # fmt: skip
    assert _redeliver_twice_at_once(env) == 300
    assert outbox.backlog()["webhook"].pending == 300 and outbox.backlog()["webhook"].dead_letters == 0
    outbox.close()


def test_two_redeliver_all_at_once_queue_each_letter_once_redis(redis_url):
    outbox = RedisOutbox(redis_url, ("webhook",), 64 << 20)
    _dead_letters(outbox, 300)
    env = {"DTMF_AUDIT_OUTBOX": redis_url, "DTMF_AUDIT_SINKS": "webhook",
           "DTMF_AUDIT_WEBHOOK_URL": "http://127.0.0.1:9/audit"}  # fmt: skip
    assert _redeliver_twice_at_once(env) == 300
    queued = []
    while claimed := outbox.claim("webhook", "test", 100, 30.0):
        queued += [c.event["event_id"] for c in claimed]
        outbox.ack("webhook", [c.ref for c in claimed])
    assert len(queued) == len(set(queued)) == 300
    outbox.close()


def test_two_gunicorns_with_different_sinks_on_one_redis(tmp_path, gateway_env, sim_url, start_gateway,
                                                          redis_url, webhook):  # fmt: skip
    """A rolling change: host A has the file sink only, host B file and webhook. Each event goes to
    the sinks of the instance that answered it; A never trims B's webhook events away."""
    audit_file = tmp_path / "audit.jsonl"
    common = {**gateway_env, **dialect_env("tutorial", sim_url), "DTMF_AUDIT_OUTBOX": redis_url,
              "DTMF_AUDIT_FILE_PATH": str(audit_file), "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
              "DTMF_AUDIT_BACKOFF_BASE_S": "0.05", "DTMF_AUDIT_BACKOFF_MAX_S": "0.3"}  # fmt: skip
    a = start_gateway({**common, "DTMF_AUDIT_SINKS": "file", "DTMF_AUDIT_SPOOL_DIR": str(tmp_path / "a")}, workers=1)
    b = start_gateway({**common, "DTMF_AUDIT_SINKS": "file,webhook", "DTMF_AUDIT_SPOOL_DIR": str(tmp_path / "b")},
                       workers=1)  # fmt: skip
    webhook.status = 503  # down for a while: B's webhook events wait in the stream while A trims
    from_b = set(post(b, 10, "host-b"))
    from_a = set(post(a, 10, "host-a"))
    wait_until(lambda: from_a | from_b <= file_ids(audit_file), timeout=30)
    time.sleep(6)  # A's maintenance trims (every 5 s) while the webhook group has read nothing
    webhook.status = 200
    wait_until(lambda: from_b <= hook_ids(webhook), timeout=30)
    time.sleep(1)
    assert hook_ids(webhook) == from_b  # host A's events never go to a sink A does not have
    stored = redis.Redis.from_url(redis_url, decode_responses=True).hgetall("dtmf:audit:dropped")
    assert not any(int(v) for v in stored.values()), stored

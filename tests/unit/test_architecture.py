"""The seams issue 11 set down: modules import alone, built-in plugins meet the written
interfaces, one mapping from what CXone did to what the caller is told, the simulator's
control endpoints for loopback only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dtmf_service.cxone.client import Result, Submission
from dtmf_service.cxone.tokens import DiscoveryError, NotReady, TokenError
from dtmf_service.hookspecs import AuditSink, BatchAuditSink, MetricsExporter, RenderingExporter
from dtmf_service.simulator import Simulator, _loopback
from tests.helpers import ROOT, UdpReceiver, WebhookReceiver, as_answered

PACKAGES = ("dtmf_service", "plugins")


def all_modules() -> list[str]:
    names = ["app"]
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def test_every_module_imports_alone_in_a_fresh_interpreter():
    # An import cycle shows only when a module of the cycle is imported first, so each gets its own process.
    # The WSGI entry points refuse to serve outside the lifecycle (tested in test_lifecycle.py): as under it here.
    env = {**os.environ, "DTMF_LIFECYCLE": "1"}
    pending = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=env,
                                      stderr=subprocess.PIPE)
               for name in all_modules()}  # fmt: skip
    failed = {}
    for name, proc in pending.items():
        _, err = proc.communicate(timeout=60)
        if proc.returncode:
            failed[name] = err.decode(errors="replace").strip().splitlines()[-1:]
    assert len(pending) > 40
    assert not failed, failed


def test_no_module_grows_long_without_saying_why():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if text.count("\n") > 320:
                assert "Longer than the project's usual module" in text.split('"""', 2)[1], path


def test_builtin_plugins_meet_the_written_interfaces(make_app, tmp_path):
    webhook, statsd = WebhookReceiver().start(), UdpReceiver()
    try:
        app = make_app(
            AUDIT_SINKS=["file", "webhook", "syslog"],
            AUDIT_FILE_PATH=str(tmp_path / "audit.jsonl"),
            AUDIT_WEBHOOK_URL=webhook.url,
            AUDIT_SYSLOG_ADDRESS=f"udp://127.0.0.1:{statsd.port}",
            METRICS_EXPORTERS=["memory", "statsd", "prometheus"],
            STATSD_HOST="127.0.0.1",
            STATSD_PORT=statsd.port,
        )
        parts = app.extensions["dtmf"]
        sinks = parts.delivery.sinks
        assert all(isinstance(sink, AuditSink) for sink in sinks.values())
        assert isinstance(sinks["webhook"], BatchAuditSink) and isinstance(sinks["file"], BatchAuditSink)
        assert not isinstance(sinks["syslog"], BatchAuditSink)
        assert all(isinstance(exporter, MetricsExporter) for exporter in parts.exporters.values())
        assert isinstance(parts.exporters["prometheus"], RenderingExporter)
        assert not isinstance(parts.exporters["statsd"], RenderingExporter)
    finally:
        webhook.stop()
        statsd.close()


def told(submission: Submission) -> tuple:
    answered = as_answered(submission)
    return answered.http_status, answered.status, answered.cxone_status, answered.retry_after_s


@pytest.mark.parametrize(
    ("submission", "expected"),
    [
        (Submission(Result.ACCEPTED, 1, 202), (200, "dtmf_submitted", 202, None)),
        (Submission(Result.NOT_FOUND, 1, 404), (404, "submission_failed", 404, None)),
        (Submission(Result.REJECTED, 1, 400), (502, "submission_failed", 400, None)),
        (Submission(Result.REJECTED, 4, 500), (502, "submission_failed", 500, None)),
        (Submission(Result.RATE_LIMITED, 4, 429, retry_after_s=2.2), (503, "submission_failed", 429, 3)),
        (Submission(Result.RATE_LIMITED, 4, 429), (503, "submission_failed", 429, 1)),
        (Submission(Result.UNREACHABLE, 4), (502, "submission_failed", None, None)),
        (Submission(Result.UNKNOWN, 1), (504, "submission_unknown", None, None)),
        (Submission(Result.NOT_READY, 0, detail="token fetch failed"), (502, "submission_failed", None, None)),
    ],
)
def test_one_mapping_from_what_cxone_did_to_what_the_caller_is_told(submission, expected):
    # CONTRACT.md section 2's table; the CXone client itself knows no HTTP status of ours.
    assert told(submission) == expected


def test_not_ready_is_reported_with_its_safe_detail():
    assert (
        as_answered(Submission(Result.NOT_READY, 0, detail="CXone discovery failed")).error == "CXone discovery failed"
    )


def test_discovery_and_token_failures_are_both_not_ready():
    # One kind of failure for the client to catch, two names for the operator's log.
    assert issubclass(DiscoveryError, NotReady) and issubclass(TokenError, NotReady)
    assert not issubclass(DiscoveryError, TokenError)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:10.0.0.1", False),
     ("10.0.0.1", False), ("192.168.1.9", False), ("not-an-address", False)],
)  # fmt: skip
def test_simulator_control_endpoints_are_for_loopback_clients(host, allowed):
    assert _loopback(host) is allowed


def test_simulator_reset_keeps_the_constructors_token_lifetime():
    sim = Simulator(token_ttl_s=60)
    sim.configure(token_ttl_s=5)
    sim.reset()
    assert sim.token_ttl_s == 60

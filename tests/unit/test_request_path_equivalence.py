"""The request path's cheaper ways of doing things write exactly what the plain ways wrote: the JSON
of bodies and events, the audit timestamp's form, the statsd datagrams (CONTRACT.md sections 2, 7)."""

import datetime as dt
import json
import re
import time

import statsd

from dtmf_service.audit.event import _now
from dtmf_service.jsontext import compact
from plugins.statsd import StatsdExporter
from tests.helpers import UdpReceiver, wait_until


def test_compact_json_is_json_dumps_with_compact_separators():
    values = [
        {"status": "dtmf_submitted", "digits": "12#", "latency_ms": 51.123, "attempts": 1, "cxone_status": 200},
        {"cxone_response": 'é "quoted" \\ \u2028 \x00 \U0001f600', "sent": [1, 2.5, None, True, {"a": []}]},
        {"n": 10**30, "f": 1e-7, "neg": -0.0},
    ]
    for value in values:
        assert compact(value) == json.dumps(value, separators=(",", ":"))


def test_audit_timestamp_is_rfc3339_utc_to_the_millisecond_and_now():
    before = dt.datetime.now(dt.UTC)
    stamp = _now()
    after = dt.datetime.now(dt.UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    parsed = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - dt.timedelta(milliseconds=1) <= parsed <= after
    time.sleep(1.01)  # the cached second moves on
    assert _now()[:19] != stamp[:19]


def _event(outcome, cxone_status, latency_ms=12.5):
    return {"outcome": outcome, "cxone_status": cxone_status, "latency_ms": latency_ms}


def _pipeline_datagrams(prefix, event):
    """What the statsd package's pipeline sent for one event (the exporter's earlier code)."""
    server = UdpReceiver()
    try:
        client = statsd.StatsClient("127.0.0.1", server.port, prefix=prefix or None)
        category = {"dtmf_submitted": "successful_parses", "validation_failed": "validation_failures"}.get(
            event["outcome"], "submission_failures"
        )
        with client.pipeline() as pipe:
            pipe.incr("total_submissions")
            pipe.incr(category)
            if category == "successful_parses":
                pipe.timing("latency_ms", float(event["latency_ms"]))
            if event.get("cxone_status") is not None:
                pipe.incr(f"cxone_status.{int(event['cxone_status'])}")
        client.close()
        wait_until(lambda: server.datagrams, timeout=5)
        time.sleep(0.05)
        return list(server.datagrams)
    finally:
        server.close()


def test_statsd_datagrams_are_the_statsd_pipelines():
    # A long prefix makes the pipeline split the lines over several datagrams at 512 bytes.
    for prefix in ("", "dtmf", "p" * 150):
        for event in (
            _event("dtmf_submitted", 200, 51.123456789),
            _event("validation_failed", None),
            _event("submission_failed", 404),
            _event("submission_unknown", None),
        ):
            server = UdpReceiver()
            try:
                exporter = StatsdExporter(
                    {"STATSD_HOST": "127.0.0.1", "STATSD_PORT": server.port, "STATSD_PREFIX": prefix}
                )
                exporter.record(event)
                exporter.close()
                expected = _pipeline_datagrams(prefix, event)
                wait_until(lambda server=server, expected=expected: len(server.datagrams) >= len(expected), timeout=5)
                assert server.datagrams == expected, (prefix, event)
            finally:
                server.close()

"""The built-in sinks and exporters against real sockets, files and HTTP receivers on loopback."""

import hashlib
import hmac
import json
import os
import re
import socket
import threading
import time
import uuid

import pytest

from dtmf_service import DeliveryIncomplete
from dtmf_service.config import ConfigError
from plugins.file import FileSink
from plugins.statsd import StatsdExporter
from plugins.syslog import SyslogSink
from plugins.webhook import WebhookSink, signature
from tests.helpers import UdpReceiver, WebhookReceiver, wait_until

LOCAL0_INFO = 16 * 8 + 6


def make_event(**kw):
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", "latency_ms": 12.5, "cxone_status": 200, **kw}


@pytest.fixture
def receiver():
    r = WebhookReceiver().start()
    yield r
    r.stop()


def test_webhook_posts_one_event_as_json(receiver):
    event = make_event()
    WebhookSink(receiver.url, 5, None).deliver(event)
    assert receiver.events == [event]
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert "X-DTMF-Signature" not in receiver.headers[0]


def test_webhook_non_2xx_is_a_failure(receiver):
    receiver.status = 500
    with pytest.raises(RuntimeError):
        WebhookSink(receiver.url, 5, None).deliver(make_event())


def test_webhook_down_is_a_failure(closed_port):
    with pytest.raises(Exception):  # noqa: B017 - any transport error
        WebhookSink(f"http://127.0.0.1:{closed_port}/x", 1, None).deliver(make_event())


def test_signature_format():
    sig = signature("k", 1700000000, b'{"a":1}')
    expected = hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert sig == f"t=1700000000,v1={expected}"


def test_file_sink_writes_json_lines(tmp_path):
    sink = FileSink(str(tmp_path / "audit" / "events.jsonl"), "always")
    events = [make_event() for _ in range(3)]
    sink.deliver(events[0])
    sink.deliver_many(events[1:])
    lines = (tmp_path / "audit" / "events.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == events


def test_file_sink_follows_rotation(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = FileSink(str(path), "never")
    sink.deliver(make_event())
    path.rename(tmp_path / "events.jsonl.1")
    sink.deliver(make_event())
    assert len(path.read_text().splitlines()) == 1


def collect_stream(listener):
    """Accept one connection on ``listener`` and collect what it sends until it closes."""
    received = bytearray()

    def accept():
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread, received


RFC5424 = re.compile(
    r"^<(?P<pri>\d+)>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>\S+) (?P<app>\S+)"
    r" (?P<pid>\d+) audit - (?P<msg>\{.*\})$"
)


def parse_5424(message):
    match = RFC5424.match(message)
    assert match, message
    return match


def test_syslog_udp_one_rfc5424_event_per_message():
    server = UdpReceiver()
    try:
        sink = SyslogSink(f"udp://127.0.0.1:{server.port}", "local0", app_name="dtmf gw!")
        event = make_event()
        sink.deliver(event)
        wait_until(lambda: server.datagrams, timeout=5)
        message = parse_5424(server.datagrams[0].decode())
        assert int(message["pri"]) == LOCAL0_INFO
        assert message["app"] == "dtmfgw!"  # header fields hold no spaces
        assert int(message["pid"]) == os.getpid()
        assert json.loads(message["msg"]) == event
    finally:
        server.close()


def test_syslog_tcp_octet_counted_and_facility_configurable():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    thread, received = collect_stream(listener)
    sink = SyslogSink(f"tcp://127.0.0.1:{listener.getsockname()[1]}", "auth")
    events = [make_event(), {**make_event(), "cxone_response": "line one\nline two"}]
    for event in events:
        sink.deliver(event)
    sink.close()
    thread.join(5)
    listener.close()
    data, frames = bytes(received), []
    while data:  # RFC 6587 3.4.1: "<length> <message>", back to back
        length, _, rest = data.partition(b" ")
        frames.append(rest[: int(length)].decode())
        data = rest[int(length) :]
    assert [json.loads(parse_5424(f)["msg"]) for f in frames] == events
    assert int(parse_5424(frames[0])["pri"]) == 4 * 8 + 6


def test_syslog_tcp_down_raises(closed_port):
    with pytest.raises(OSError):
        SyslogSink(f"tcp://127.0.0.1:{closed_port}", "local0").deliver(make_event())


def test_syslog_unix_datagram_socket(tmp_path):
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    try:
        sink = SyslogSink(path, "local0")
        event = make_event()
        sink.deliver(event)
        assert json.loads(parse_5424(server.recv(65536).decode())["msg"]) == event
    finally:
        server.close()


def test_syslog_unix_stream_socket_as_syslog_ng_listens(tmp_path):
    """syslog-ng's unix-stream("/dev/log"): the sink used to force datagrams and never delivered."""
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    thread, received = collect_stream(server)
    sink = SyslogSink(path, "local0")
    events = [make_event(), make_event()]
    for event in events:
        sink.deliver(event)
    sink.close()
    thread.join(5)
    server.close()
    lines = bytes(received).decode().splitlines()
    assert [json.loads(parse_5424(line)["msg"]) for line in lines] == events


@pytest.mark.parametrize("address", ["udp://127.0.0.1", "http://x:1", "relative/path"])
def test_syslog_bad_address_stops_start_up(address):
    with pytest.raises(ConfigError, match="AUDIT_SYSLOG_ADDRESS"):
        SyslogSink(address, "local0")


def test_syslog_bad_facility_stops_start_up():
    with pytest.raises(ConfigError, match="AUDIT_SYSLOG_FACILITY"):
        SyslogSink("/dev/log", "local9")


def test_statsd_names_one_datagram_per_request():
    server = UdpReceiver()
    try:
        exporter = StatsdExporter({"STATSD_HOST": "127.0.0.1", "STATSD_PORT": server.port, "STATSD_PREFIX": "p"})
        exporter.record(make_event())
        exporter.record(make_event(outcome="validation_failed", cxone_status=None))
        exporter.record(make_event(outcome="submission_failed", cxone_status=404))
        exporter.record(make_event(outcome="submission_unknown", cxone_status=None))
        wait_until(lambda: len(server.datagrams) == 4, timeout=5)
        first, second, third, fourth = (d.decode().split("\n") for d in server.datagrams)
        assert first == [
            "p.total_submissions:1|c",
            "p.successful_parses:1|c",
            "p.latency_ms:12.500000|ms",
            "p.cxone_status.200:1|c",
        ]
        assert second == ["p.total_submissions:1|c", "p.validation_failures:1|c"]
        assert third == ["p.total_submissions:1|c", "p.submission_failures:1|c", "p.cxone_status.404:1|c"]
        assert fourth == ["p.total_submissions:1|c", "p.submission_failures:1|c"]
    finally:
        server.close()


def test_webhook_batches_go_out_concurrently(receiver):
    receiver.delay_s = 0.2
    sink = WebhookSink(receiver.url, 5, None, concurrency=8)
    events = [make_event() for _ in range(8)]
    started = time.monotonic()
    sink.deliver_many(events)
    assert time.monotonic() - started < 1.0  # 8 x 0.2 s serially would be 1.6 s
    assert sorted(receiver.ids()) == sorted(e["event_id"] for e in events)
    sink.close()


@pytest.mark.parametrize("concurrency", [1, 8])
def test_webhook_batch_reports_exactly_the_events_that_failed(receiver, concurrency):
    events = [make_event() for _ in range(10)]
    receiver.refuse_ids = {events[3]["event_id"], events[7]["event_id"]}
    with pytest.raises(DeliveryIncomplete) as failure:
        WebhookSink(receiver.url, 5, None, concurrency).deliver_many(events)
    assert isinstance(failure.value.__cause__, RuntimeError)  # the first real error, for the log
    undelivered = {e["event_id"] for e in failure.value.undelivered}
    accepted = set(receiver.ids())
    assert undelivered >= receiver.refuse_ids
    assert accepted.isdisjoint(undelivered)  # nothing delivered is reported for another try
    assert accepted | undelivered == {e["event_id"] for e in events}
    if concurrency > 1:
        assert undelivered == receiver.refuse_ids  # in parallel, only the refused ones are left


def test_webhook_batches_are_ndjson_signed_over_the_whole_body(receiver):
    sink = WebhookSink(receiver.url, 5.0, "s3cret", concurrency=2, batch_max=10)
    events = [make_event() for _ in range(25)]
    sink.deliver_many(events)
    assert sorted(e["event_id"] for e in receiver.events) == sorted(e["event_id"] for e in events)
    assert receiver.posts == 3  # 10 + 10 + 5, two at a time
    for body, headers in zip(receiver.bodies, receiver.headers, strict=True):
        assert headers["Content-Type"] == "application/x-ndjson"
        timestamp = headers["X-DTMF-Signature"].split(",")[0][2:]
        assert headers["X-DTMF-Signature"] == signature("s3cret", int(timestamp), body)
        assert all(json.loads(line) for line in body.decode().splitlines())
    sink.close()


def test_webhook_refusal_isolates_the_bad_event_and_reports_it_rejected(receiver):
    sink = WebhookSink(receiver.url, 5.0, None, concurrency=1, batch_max=10)
    events = [make_event() for _ in range(5)]
    receiver.reject_ids = {events[2]["event_id"]}
    with pytest.raises(DeliveryIncomplete) as caught:
        sink.deliver_many(events)
    assert [e["event_id"] for e in caught.value.undelivered] == [events[2]["event_id"]]
    assert [e["event_id"] for e in caught.value.rejected] == [events[2]["event_id"]]
    assert len(receiver.events) == 4  # the others went one by one once the batch was refused


@pytest.mark.parametrize(("status", "rejected"), [(400, True), (404, True), (408, False), (429, False), (503, False)])
def test_webhook_refusal_for_good_is_a_4xx_other_than_408_425_429(receiver, status, rejected):
    from dtmf_service import DeliveryRejected

    receiver.status = status
    with pytest.raises(DeliveryRejected if rejected else RuntimeError):
        WebhookSink(receiver.url, 5.0, None).deliver(make_event())


def test_webhook_carries_the_events_trace_context(receiver):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    WebhookSink(receiver.url, 5.0, None).deliver({**make_event(), "trace_id": trace})
    assert receiver.headers[0]["traceparent"].startswith(f"00-{trace}-")

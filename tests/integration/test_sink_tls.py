"""Audit sinks over TLS (CONTRACT.md section 8, *rev 3*): a webhook behind a private CA trusted
through AUDIT_WEBHOOK_CA_BUNDLE, and syslog over TLS (RFC 5425) to a real rsyslogd with its gtls
driver, certificates made by openssl for the test. Without the bundle nothing is delivered: the
certificate is always verified."""

import json
import os
import uuid

import pytest

from dtmf_service.config import ConfigError
from plugins.syslog import SyslogSink
from plugins.webhook import WebhookSink
from tests.helpers import RSYSLOGD, WebhookReceiver, free_port, start_rsyslogd, tcp_listening, wait_until
from tests.upstreams import make_certificate

GTLS = any(
    os.path.exists(f"{d}/lmnsd_gtls.so")
    for d in ("/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog", "/usr/lib/rsyslog")
)  # noqa: E501


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def event():
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", "interaction_id": "tls-1"}


def test_webhook_over_https_needs_the_private_ca_and_delivers_with_it(certificate):
    receiver = WebhookReceiver(certificate=certificate).start()
    try:
        with pytest.raises(Exception):  # noqa: B017 - certificate verify failed: not delivered
            WebhookSink(receiver.url, 5, None).deliver(event())
        assert receiver.events == []
        sent = event()
        WebhookSink(receiver.url, 5, None, ca_bundle=str(certificate[0])).deliver(sent)
        assert receiver.events == [sent]
    finally:
        receiver.stop()


def test_a_ca_bundle_that_cannot_be_loaded_stops_start_up_naming_the_key(tmp_path):
    from plugins.syslog import dtmf_audit_sink as syslog_factory
    from plugins.webhook import dtmf_audit_sink as webhook_factory

    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate")
    config = {"AUDIT_WEBHOOK_URL": "https://127.0.0.1:1/x", "AUDIT_WEBHOOK_TIMEOUT_S": 1}
    config["AUDIT_WEBHOOK_CA_BUNDLE"] = str(bad)
    with pytest.raises(ConfigError, match="AUDIT_WEBHOOK_CA_BUNDLE"):
        webhook_factory("webhook", config)
    with pytest.raises(ConfigError, match="AUDIT_SYSLOG_CA_BUNDLE"):
        syslog_factory("syslog", {"AUDIT_SYSLOG_ADDRESS": "tls://127.0.0.1:6514", "AUDIT_SYSLOG_CA_BUNDLE": str(bad)})


@pytest.fixture
def rsyslogd_tls(tmp_path, certificate):
    if RSYSLOGD is None or not GTLS:
        pytest.skip("rsyslog with its gtls driver is not installed (.ci/run installs rsyslog-gnutls)")
    port = free_port()
    out = tmp_path / "out.log"
    (tmp_path / "work").mkdir()
    cert, key = certificate
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(f"""
global(workDirectory="{tmp_path}/work" DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{cert}" DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="fields" type="string" string="%app-name%|%msgid%|%msg%\\n")
*.* action(type="omfile" file="{out}" template="fields")
""")
    proc = start_rsyslogd(conf, lambda: tcp_listening(port))
    yield f"tls://127.0.0.1:{port}", out
    proc.terminate()
    proc.wait(10)


@pytest.mark.slow
def test_syslog_over_tls_reaches_rsyslog_parsed_and_needs_the_ca(rsyslogd_tls, certificate):
    address, out = rsyslogd_tls
    untrusted = SyslogSink(address, "local0")
    with pytest.raises(OSError):  # certificate verify failed: the event stays in the outbox
        untrusted.deliver(event())
    untrusted.close()
    sink = SyslogSink(address, "local0", ca_bundle=str(certificate[0]))
    sent = [event() for _ in range(3)]
    for e in sent:  # one connection, kept: the TLS 1.3 session tickets must not look like a close
        sink.deliver(e)
    sink.close()
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3, timeout=15)
    records = [line.split("|", 2) for line in out.read_text().splitlines()]
    assert [json.loads(msg) for _, _, msg in records] == sent
    assert {(app, msgid) for app, msgid, _ in records} == {("dtmf-gateway", "audit")}

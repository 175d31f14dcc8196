"""Every built-in audit sink passes the sink test kit (dtmf_service.testing, CONTRACT.md section 7
*rev 3*), against its real receiver: a webhook receiver on loopback (one event per POST, and
batches), a real file, and a real rsyslogd over TCP."""

import json
from pathlib import Path

import pytest

from dtmf_service.testing import AuditSinkContract, sink_from_plugin
from plugins import file as file_plugin
from plugins import syslog as syslog_plugin
from plugins import webhook as webhook_plugin
from tests.helpers import RSYSLOGD, WebhookReceiver, free_port, read_jsonl, start_rsyslogd, tcp_listening


class TestWebhookSink(AuditSinkContract):
    batch_max = 1

    @pytest.fixture(autouse=True)
    def receiver(self):
        self.server = WebhookReceiver().start()
        yield
        self.server.stop()

    def make_sink(self):
        config = {"AUDIT_WEBHOOK_URL": self.server.url, "AUDIT_WEBHOOK_BATCH_MAX": self.batch_max}
        return sink_from_plugin(webhook_plugin, "webhook", config)

    def received_ids(self):
        return self.server.ids()

    def take_down(self):
        self.server.stop()

    def bring_back(self):
        self.server.start()

    def refuse_for_good(self, event):
        self.server.reject_ids.add(event["event_id"])
        return event


class TestWebhookSinkBatches(TestWebhookSink):
    batch_max = 50


class TestFileSink(AuditSinkContract):
    @pytest.fixture(autouse=True)
    def directory(self, tmp_path):
        self.dir = tmp_path / "audit"
        self.dir.mkdir()
        self.path = self.dir / "audit.jsonl"

    def make_sink(self):
        return sink_from_plugin(file_plugin, "file", {"AUDIT_FILE_PATH": str(self.path)})

    def received_ids(self):
        return [e["event_id"] for e in read_jsonl(self.path)] if self.path.exists() else []

    def take_down(self):
        # The folder moved away and a plain file in its place: every open or stat fails (root
        # ignores permission bits, so a chmod would not do).
        self.dir.rename(self.dir.with_name("away"))
        self.dir.write_text("")

    def bring_back(self):
        self.dir.unlink()
        self.dir.with_name("away").rename(self.dir)


@pytest.mark.slow
@pytest.mark.skipif(RSYSLOGD is None, reason="rsyslog is not installed (.ci/run installs it)")
class TestSyslogSink(AuditSinkContract):
    @pytest.fixture(autouse=True)
    def rsyslogd(self, tmp_path):
        self.port = free_port()
        self.out = tmp_path / "out.log"
        (tmp_path / "work").mkdir()
        self.conf = tmp_path / "rsyslog.conf"
        self.conf.write_text(f"""
global(workDirectory="{tmp_path}/work")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{self.port}")
template(name="msg" type="string" string="%msg%\\n")
*.* action(type="omfile" file="{self.out}" template="msg")
""")
        self.proc = None
        self.bring_back()
        yield
        self.take_down()

    def make_sink(self):
        return sink_from_plugin(syslog_plugin, "syslog", {"AUDIT_SYSLOG_ADDRESS": f"tcp://127.0.0.1:{self.port}"})

    def received_ids(self):
        if not self.out.exists():
            return []
        return [json.loads(line)["event_id"] for line in Path(self.out).read_text().splitlines() if line]

    def take_down(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def bring_back(self):
        self.proc = start_rsyslogd(self.conf, lambda: tcp_listening(self.port))

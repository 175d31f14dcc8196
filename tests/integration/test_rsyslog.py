"""CONTRACT.md section 7 (*rev 2*): a real rsyslogd parses the syslog sink's RFC 5424 messages right.

rsyslogd runs in the foreground with its own config, work dir and pid file, on free loopback ports
and its own Unix socket; the machine's syslog service is never touched.
"""

import datetime as dt
import json
import os
import socket
import uuid

import pytest

from plugins.syslog import SyslogSink
from tests.helpers import RSYSLOGD, free_port, start_rsyslogd, tcp_listening, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(RSYSLOGD is None, reason="rsyslog is not installed (.ci/run installs it)"),
]

FIELDS = "%hostname%|%app-name%|%procid%|%msgid%|%timereported:::date-rfc3339%|%syslogfacility-text%|%syslogseverity-text%|%msg%\\n"  # noqa: E501


@pytest.fixture
def rsyslogd(tmp_path):
    udp_port, tcp_port = free_port(), free_port()
    unix_path = tmp_path / "log.sock"
    out = tmp_path / "out.log"
    (tmp_path / "work").mkdir()
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(f"""
global(workDirectory="{tmp_path}/work")
module(load="imudp")
module(load="imtcp")
module(load="imuxsock" SysSock.Use="off")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
input(type="imuxsock" Socket="{unix_path}" UseSpecialParser="off" UseSysTimeStamp="off" HostName="-")
template(name="fields" type="string" string="{FIELDS}")
*.* action(type="omfile" file="{out}" template="fields")
""")
    proc = start_rsyslogd(conf, lambda: tcp_listening(tcp_port) and unix_path.exists())
    yield {"udp": f"udp://127.0.0.1:{udp_port}", "tcp": f"tcp://127.0.0.1:{tcp_port}", "unix": str(unix_path)}, out
    proc.terminate()
    proc.wait(10)


def test_rsyslog_parses_app_name_hostname_timestamp_and_the_json(rsyslogd):
    addresses, out = rsyslogd
    sent = {}
    for kind, address in addresses.items():
        event = {"event_id": str(uuid.uuid4()), "interaction_id": f"via-{kind}", "outcome": "dtmf_submitted",
                 "cxone_response": 'a "quoted" line\nand another'}  # fmt: skip
        sink = SyslogSink(address, "local0")
        sink.deliver(event)
        sink.close()
        sent[event["interaction_id"]] = event
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3, timeout=15)
    records = [line.split("|", 7) for line in out.read_text().splitlines()]
    assert len(records) == 3
    expected_host = "".join(c for c in socket.gethostname() if 33 <= ord(c) <= 126)
    for host, app, procid, msgid, timestamp, facility, severity, msg in records:
        event = json.loads(msg)
        assert event == sent[event["interaction_id"]]
        assert (app, msgid, facility, severity) == ("dtmf-gateway", "audit", "local0", "info")
        assert host == expected_host
        assert procid == str(os.getpid())
        when = dt.datetime.fromisoformat(timestamp)
        assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60

"""The PostgreSQL sink passes the gateway's sink test kit against a real PostgreSQL server, started
here on a free loopback port with its own data directory (initdb refuses to run as root: the
server then runs as the ``postgres`` account that Debian's package creates)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import dtmf_audit_postgres
import psycopg
import pytest

from dtmf_service.testing import AuditSinkContract, sample_event, sink_from_plugin


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


PG_BIN = _pg_bin()
pytestmark = pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL is not installed (.ci/run installs postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dtmf-pg-"))
        self.port = _free_port()
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        assert PG_BIN is not None
        subprocess.run([*self._as, str(PG_BIN / tool), *args], check=True, capture_output=True, cwd=self.dir)

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def event_ids(self) -> list[str]:
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    exists = conn.execute("SELECT to_regclass('dtmf_audit')").fetchone()
                    if exists is None or exists[0] is None:
                        return []
                    return [row[0] for row in conn.execute("SELECT event_id FROM dtmf_audit")]
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    server.start()
    yield server
    try:
        server.stop()
    finally:
        server.remove()


class TestPostgresSink(AuditSinkContract):
    @pytest.fixture(autouse=True)
    def receiver(self, postgres):
        self.server = postgres
        yield
        try:
            self.server.start()  # a test that took it down and failed must not leave it down
        except subprocess.CalledProcessError:
            pass  # already running

    def make_sink(self):
        return sink_from_plugin(dtmf_audit_postgres, "postgres", {"AUDIT_POSTGRES_DSN": self.server.dsn})

    def received_ids(self):
        return self.server.event_ids()

    def take_down(self):
        self.server.stop()

    def bring_back(self):
        self.server.start()

    def refuse_for_good(self, event):
        return {**event, "outcome": None}  # NOT NULL: refused for good, whatever the retry


def test_fields_as_sent_with_control_characters_and_nul_are_stored(postgres):
    sink = sink_from_plugin(dtmf_audit_postgres, "postgres", {"AUDIT_POSTGRES_DSN": postgres.dsn})
    event = sample_event(outcome="validation_failed", sequence_matrix="a\x00b\x1b[31m\u2028", digits=None)
    sink.deliver(event)
    sink.deliver(event)  # a redelivery: stored once
    sink.close()
    with psycopg.connect(postgres.dsn) as conn:
        rows = conn.execute("SELECT body::text FROM dtmf_audit WHERE event_id=%s", (event["event_id"],)).fetchall()
    assert len(rows) == 1
    import json

    assert json.loads(rows[0][0])["sequence_matrix"] == "a\x00b\x1b[31m\u2028"

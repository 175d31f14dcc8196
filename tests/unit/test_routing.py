"""CONTRACT.md section 7 rev 3 "Routing" on the SQLite outbox: an event goes to the sinks of the
process that wrote it, whatever other processes with other sinks open the file; an earlier
version's file opens and keeps its pending events."""

import json
import sqlite3
import subprocess
import sys
import time
import uuid

from dtmf_service.audit.outbox import routed, unrouted
from dtmf_service.audit.outbox_sqlite import SqliteOutbox
from tests.helpers import ROOT

# The schema of the previous version (one shared ``sinks`` table that every process rewrote at start).
PREVIOUS = (
    "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL,"
    " created REAL NOT NULL, body TEXT NOT NULL, only_sink TEXT)",
    "CREATE TABLE pending (event INTEGER NOT NULL, sink TEXT NOT NULL, next_try REAL NOT NULL DEFAULT 0,"
    " lease_until REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, token TEXT,"
    " PRIMARY KEY (event, sink)) WITHOUT ROWID",
    "CREATE INDEX pending_token ON pending (token) WHERE token IS NOT NULL",
    "CREATE TABLE sinks (name TEXT PRIMARY KEY)",
    "CREATE TABLE intents (event_id TEXT PRIMARY KEY, pid INTEGER NOT NULL, lease_until REAL NOT NULL,"
    " body TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE dead_letters (sink TEXT NOT NULL, event_id TEXT NOT NULL, failed REAL NOT NULL,"
    " reason TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (sink, event_id))",
    "CREATE TABLE dropped (sink TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    "CREATE TRIGGER events_fan_out AFTER INSERT ON events BEGIN"
    " INSERT INTO pending (event, sink) SELECT NEW.id, name FROM sinks"
    " WHERE NEW.only_sink IS NULL OR name = NEW.only_sink;"
    " DELETE FROM intents WHERE event_id = NEW.event_id; END",
    "CREATE TRIGGER events_settled AFTER DELETE ON pending"
    " WHEN NOT EXISTS (SELECT 1 FROM pending WHERE event = OLD.event) BEGIN"
    " DELETE FROM events WHERE id = OLD.event; END",
)


def event(**extra):
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", **extra}


def pending(outbox):
    return {sink: b.pending for sink, b in outbox.backlog().items()}


def test_each_process_routes_its_own_events_whoever_opens_the_file(tmp_path):
    path = str(tmp_path / "outbox.db")
    service = SqliteOutbox(path, ("file", "webhook"), 64 << 20)
    other = SqliteOutbox(path, ("file",), 64 << 20)  # check-config or a CLI run with another AUDIT_SINKS
    service.commit(event())
    other.commit(event())
    SqliteOutbox(path, ("syslog",), 64 << 20).close()  # and one more process starting later
    service.commit(event())
    service.flush(5)
    other.flush(5)
    assert pending(service) == {"file": 3, "webhook": 2}
    assert service.backlog()["webhook"].configured and not other.backlog()["webhook"].configured
    service.close()
    other.close()


def test_an_earlier_versions_file_opens_keeps_its_events_and_routes_by_writer(tmp_path):
    path = str(tmp_path / "outbox.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in PREVIOUS:
        db.execute(statement)
    db.execute("INSERT INTO sinks VALUES ('file'), ('webhook')")
    for _ in range(3):
        db.execute("INSERT INTO events (event_id, created, body) VALUES (?, ?, ?)",
                   (str(uuid.uuid4()), time.time(), json.dumps(event())))  # fmt: skip
    db.close()
    outbox = SqliteOutbox(path, ("file",), 64 << 20)  # the new version, with the webhook removed
    assert pending(outbox) == {"file": 3, "webhook": 3}  # the earlier version's events are all kept
    outbox.commit(event())
    outbox.flush(5)
    assert pending(outbox) == {"file": 4, "webhook": 3}
    claimed = outbox.claim("webhook", "c", 10, 30.0)
    assert len(claimed) == 3 and all(c.event["outcome"] == "dtmf_submitted" for c in claimed)
    outbox.ack("webhook", [c.ref for c in claimed])
    assert pending(outbox) == {"file": 4}  # a removed sink with nothing left is no longer listed
    outbox.close()


def test_a_journaled_event_keeps_its_sinks_when_another_process_recovers_it(tmp_path):
    path = str(tmp_path / "outbox.db")
    placeholder = event(outcome="submission_unknown")
    # A worker with two sinks writes its placeholder to its journal and dies (no commit).
    script = (
        "import os, sys, json; from dtmf_service.audit.outbox_sqlite import SqliteOutbox;"
        f"box = SqliteOutbox({path!r}, ('file', 'webhook'), 64 << 20);"
        f"box.intend(json.loads({json.dumps(json.dumps(placeholder))}), 30.0); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    survivor = SqliteOutbox(path, ("file",), 64 << 20)  # another configuration takes the journal over
    assert survivor.recover() == 1
    assert pending(survivor) == {"file": 1, "webhook": 1}
    (recovered,) = survivor.claim("webhook", "c", 10, 30.0)
    assert recovered.event["event_id"] == placeholder["event_id"] and recovered.event["recovered"] is True
    assert "dtmf:sinks" not in recovered.event  # the route travels beside the event, never inside it
    survivor.close()


def test_the_journal_payload_is_still_the_events_json():
    body = json.dumps(event(note='x,"dtmf:sinks":["evil"]}'), separators=(",", ":"))
    payload = routed(body, ("file", "webhook"))
    assert json.loads(payload)["event_id"] == json.loads(body)["event_id"]  # recovery can read its id
    assert unrouted(payload) == (body, ("file", "webhook"))
    assert unrouted(body.encode()) == (body, None)  # an earlier version's journal

"""CONTRACT.md section 7 (rev 3), costs stay flat as backlogs grow (issue 19 items 1 and 2).

No statement of the SQLite outbox walks the backlog (query plans of every statement it runs,
collected as it runs them); per-sink counts are maintained, not counted; files of the earlier
version keep their events; the spool bound counts every byte on disk under traffic with the
receiver down; space comes back after a drain. A real SQLite outbox, a real webhook sink
against a closed port.
"""

import os
import re
import sqlite3
import threading
import time
import uuid

import pytest

from dtmf_service.audit.delivery import DeliveryEngine
from dtmf_service.audit.outbox_sqlite import COUNT_EXISTING, SqliteOutbox
from dtmf_service.metrics import Metrics
from plugins.webhook import WebhookSink
from tests.helpers import free_port

# The schema of the previous version (main before issue 19), verbatim: its files must keep working.
_OLD_SCHEMA = (
    "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL,"
    " created REAL NOT NULL, body TEXT NOT NULL, only_sink TEXT)",
    "CREATE TABLE pending (event INTEGER NOT NULL, sink TEXT NOT NULL,"
    " next_try REAL NOT NULL DEFAULT 0, lease_until REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,"
    " token TEXT, PRIMARY KEY (event, sink)) WITHOUT ROWID",
    "CREATE INDEX pending_token ON pending (token) WHERE token IS NOT NULL",
    "CREATE TABLE sinks (name TEXT PRIMARY KEY)",
    "CREATE TABLE intents (event_id TEXT PRIMARY KEY, pid INTEGER NOT NULL,"
    " lease_until REAL NOT NULL, body TEXT NOT NULL) WITHOUT ROWID",
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
_BACKLOG_TABLES = {"pending", "events"}


def make_event(pad=""):
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", "pad": pad}


def settle(box):
    assert box.flush(10)


def on_disk(path):
    """Every file the outbox keeps, measured here independently of the outbox's own figure."""
    directory = os.path.dirname(path)
    files = [os.path.join(directory, name) for name in os.listdir(directory) if name.startswith("outbox.db")]
    journals = os.path.join(directory, "journals")
    if os.path.isdir(journals):
        files += [os.path.join(journals, name) for name in os.listdir(journals)]
    total = 0
    for file in files:
        try:
            total += os.stat(file).st_size
        except FileNotFoundError:
            pass
    return total


def scans_of_the_backlog(db, sql):
    """The plan lines of ``sql`` that walk ``pending`` or ``events`` (by name or by alias)."""
    names = set(_BACKLOG_TABLES)
    for table, alias in re.findall(r"\b(?:FROM|JOIN|UPDATE|INTO)\s+(\w+)(?:\s+AS)?\s+(\w+)", sql, re.IGNORECASE):
        if table in _BACKLOG_TABLES and alias.upper() not in {"WHERE", "SET", "ON", "VALUES", "JOIN", "ORDER"}:
            names.add(alias)
    params = [None] * sql.count("?")
    plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
    return [line for line in plan if re.match(r"SCAN (\w+)", line) and line.split()[1] in names]


def trigger_statements(db):
    """Each statement inside the file's triggers (and their WHEN tests), NEW./OLD. made parameters."""
    statements = []
    for (sql,) in db.execute("SELECT sql FROM sqlite_master WHERE type='trigger'"):
        when = re.search(r"\bWHEN\s+(.*?)\s+BEGIN\b", sql, re.IGNORECASE | re.DOTALL)
        if when:
            statements.append(f"SELECT 1 WHERE {when.group(1)}")
        body = re.search(r"\bBEGIN\b(.*)\bEND\s*$", sql, re.IGNORECASE | re.DOTALL).group(1)
        statements += [part.strip() for part in body.split(";") if part.strip()]
    return [re.sub(r"\b(?:NEW|OLD)\.\w+", "?", statement) for statement in statements]


def test_no_statement_the_outbox_runs_walks_the_backlog(tmp_path, monkeypatch):
    """Every statement executed while the outbox writes, claims, acknowledges, retries, sets aside,
    redelivers, counts, recovers and enforces its bound is collected as SQLite runs it; its query
    plan (and each trigger's) must find rows through an index or a counter, never by a SCAN of
    ``pending`` or ``events``."""
    executed: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        db.set_trace_callback(executed.append)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    path = str(tmp_path / "spool" / "outbox.db")
    spool = tmp_path / "spool" / "webhook"
    spool.mkdir(parents=True)
    (spool / "00000000000000000001-1-1-n1.jsonl").write_text('{"event_id": "legacy-1"}\n')
    box = SqliteOutbox(path, ("webhook", "file"), 1024 * 1024)
    box.import_legacy_spool()
    for _ in range(300):
        box.commit(make_event("x" * 300))
    box.intend(make_event(), 30)
    settle(box)
    claimed = box.claim("file", "c", 50, 30)
    box.ack("file", [c.ref for c in claimed[:40]])
    box.retry("file", [c.ref for c in claimed[40:45]], 0)
    box.dead_letter("file", claimed[45], "refused")
    box.redeliver("file")
    box.dead_letters()
    box.backlog()
    box.recover()
    box.check_file()
    for _ in range(400):
        box.commit(make_event("y" * 2000))
    settle(box)
    assert box.enforce_bound()  # past the bound: the oldest dropped
    while claimed := box.claim("webhook", "c", 500, 30):
        box.ack("webhook", [c.ref for c in claimed])
    while claimed := box.claim("file", "c", 500, 30):
        box.ack("file", [c.ref for c in claimed])
    box.enforce_bound()  # drained: space given back
    box.close()
    monkeypatch.undo()

    statements = {s.strip() for s in executed if re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH|REPLACE)\b", s, re.I)}
    statements.discard(COUNT_EXISTING)  # once per file, when the counters are created (a migration)
    assert any("FROM pending" in s for s in statements)  # the collection saw the delivery side
    with sqlite3.connect(path) as db:
        statements |= set(trigger_statements(db))
        walks = {sql: found for sql in sorted(statements) if (found := scans_of_the_backlog(db, sql))}
    assert walks == {}


def count_by_scanning(path):
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT sink, count(*) FROM pending GROUP BY sink").fetchall())


def test_per_sink_counts_are_maintained_and_match_the_rows(tmp_path):
    path = str(tmp_path / "spool" / "outbox.db")
    box = SqliteOutbox(path, ("a", "b"), 1 << 30)
    for _ in range(120):
        box.commit(make_event())
    settle(box)
    claimed = box.claim("a", "c", 30, 30)
    box.ack("a", [c.ref for c in claimed[:20]])
    box.dead_letter("a", claimed[20], "refused")
    box.redeliver("a")
    box.retry("a", [c.ref for c in claimed[21:]], 0)
    with sqlite3.connect(path) as db:
        maintained = dict(db.execute("SELECT sink, pending FROM sink_counts WHERE pending > 0").fetchall())
    assert maintained == count_by_scanning(path) == {"a": 100, "b": 120}
    backlog = box.backlog()
    assert (backlog["a"].pending, backlog["b"].pending) == (100, 120)
    assert backlog["a"].oldest_pending_s is not None and backlog["a"].oldest_pending_s >= 0
    box.close()


def test_a_file_of_the_previous_version_keeps_its_events_and_gains_index_and_counts(tmp_path):
    path = str(tmp_path / "spool" / "outbox.db")
    os.makedirs(os.path.dirname(path))
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode=WAL")
        for statement in _OLD_SCHEMA:
            db.execute(statement)
        db.executemany("INSERT INTO sinks VALUES (?)", [("webhook",), ("file",)])
        db.executemany(
            "INSERT INTO events (event_id, created, body) VALUES (?, ?, ?)",
            [(f"old-{n}", time.time() - 60, f'{{"event_id": "old-{n}"}}') for n in range(500)],
        )
        db.execute("DELETE FROM pending WHERE sink='file' AND event <= 200")
        db.execute("INSERT INTO dead_letters VALUES ('webhook', 'dead-1', 0, 'refused', '{\"event_id\": \"dead-1\"}')")
    box = SqliteOutbox(path, ("webhook", "file"), 1 << 30)
    backlog = box.backlog()
    assert (backlog["webhook"].pending, backlog["file"].pending) == (500, 300)
    assert backlog["webhook"].dead_letters == 1
    assert backlog["webhook"].oldest_pending_s >= 59
    box.commit(make_event())
    settle(box)
    assert box.backlog()["file"].pending == 301
    with sqlite3.connect(path) as db:
        plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN SELECT 1 FROM pending WHERE sink=? LIMIT 1", ("x",))]
    assert any("pending_sink" in line for line in plan)
    claimed = box.claim("file", "c", 1000, 30)
    assert [c.event["event_id"] for c in claimed[:2]] == ["old-200", "old-201"]  # oldest first, as before
    box.ack("file", [c.ref for c in claimed])
    while claimed := box.claim("webhook", "c", 1000, 30):
        box.ack("webhook", [c.ref for c in claimed])
    assert count_by_scanning(path) == {}
    box.enforce_bound()  # drained: the one-time conversion to a file that gives space back
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert box.backlog()["webhook"].dead_letters == 1
    box.close()


def test_space_is_given_back_after_a_drain(tmp_path):
    path = str(tmp_path / "spool" / "outbox.db")
    box = SqliteOutbox(path, ("s",), 1 << 30)
    box.enforce_bound()

    def outbox_file():
        return os.path.getsize(path) + os.path.getsize(path + "-wal")

    empty = outbox_file()
    for _ in range(6000):
        box.commit(make_event("z" * 500))
    settle(box)
    assert outbox_file() > 10 * empty
    while claimed := box.claim("s", "c", 1000, 30):
        box.ack("s", [c.ref for c in claimed])
    for _ in range(20):  # maintenance rounds: a little at a time
        box.enforce_bound()
    assert outbox_file() < 2 * empty, f"{outbox_file()} bytes after the drain, {empty} empty"
    box.close()


def test_a_file_larger_than_a_lowered_bound_comes_back_within_it(tmp_path):
    path = str(tmp_path / "spool" / "outbox.db")
    box = SqliteOutbox(path, ("s",), 1 << 30)
    for _ in range(8000):
        box.commit(make_event("w" * 500))
    settle(box)
    box.close()
    bound = 3 * 1024 * 1024  # the process's 2 MiB journal included
    box = SqliteOutbox(path, ("s",), bound)
    box.commit(make_event())  # this process's journal exists, as in a worker
    settle(box)
    for _ in range(20):
        box.enforce_bound()
    assert box.backlog()["s"].dropped > 0
    assert on_disk(path) <= 1.25 * bound, f"{on_disk(path) / bound:.2f} x the bound"
    box.close()


@pytest.fixture
def down_webhook_config(tmp_path):
    return {
        "AUDIT_BATCH_SIZE": 50,
        "AUDIT_BATCH_WAIT_S": 0.05,
        "AUDIT_RETRY_ATTEMPTS": 5,
        "AUDIT_BACKOFF_BASE_S": 0.05,
        "AUDIT_BACKOFF_MAX_S": 0.5,
        "AUDIT_LEASE_S": 30.0,
        "AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
    }


def test_the_bound_counts_every_byte_on_disk_under_traffic_with_the_receiver_down(tmp_path, down_webhook_config):
    """1,000 events a second (2 KiB each) for 5 s into an 8 MiB outbox whose webhook refuses
    connections: the files (database, WAL, shared memory, journal) stay within 1.25 x the bound,
    the oldest are dropped and counted."""
    bound = 8 * 1024 * 1024
    path = str(tmp_path / "spool" / "outbox.db")
    box = SqliteOutbox(path, ("webhook",), bound)
    metrics = Metrics(str(tmp_path / "metrics"))
    sink = WebhookSink(f"http://127.0.0.1:{free_port()}/audit", 1.0, None)
    engine = DeliveryEngine({"webhook": sink}, box, down_webhook_config, metrics)
    engine.start()
    peak, stop = [0], threading.Event()
    parts: dict[str, int] = {}

    def sample():
        while not stop.wait(0.01):
            size = on_disk(path)
            if size > peak[0]:
                peak[0] = size
                names = ("outbox.db", "outbox.db-wal")
                parts.update({name: os.path.getsize(os.path.join(os.path.dirname(path), name)) for name in names})

    sampler = threading.Thread(target=sample)
    sampler.start()
    sent = 0
    started = time.monotonic()
    next_at = started
    try:
        while (now := time.monotonic()) - started < 5.0:
            if now >= next_at:
                box.commit(make_event("p" * 2000))
                sent += 1
                # Steady traffic of at most 1,000 a second: a stall of this thread is not made up in a burst.
                next_at = max(next_at + 0.001, now - 0.01)
            else:
                time.sleep(0.001)
        time.sleep(0.5)  # a last round of maintenance
    finally:
        stop.set()
        sampler.join()
        engine.stop(5)
    dropped = box.backlog()["webhook"].dropped
    assert dropped > 0  # it did overflow
    assert dropped + box.backlog()["webhook"].pending == sent
    assert metrics.snapshot()["audit_dropped"] == dropped
    print(f"peak {peak[0] / bound:.2f} x the bound on disk, {dropped} of {sent} dropped")
    assert peak[0] <= 1.25 * bound, f"{peak[0] / bound:.2f} x the bound on disk ({parts} at the peak)"
    box.close()

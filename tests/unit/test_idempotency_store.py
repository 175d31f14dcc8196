"""The idempotency store under configuration and store faults, and at scale (issue 17 item 7,
issue 19 item 4, CONTRACT.md sections 7 and 9 *rev 3*): real SQLite files, injected clocks and
injected store errors; no mocks."""

import sqlite3
import threading

import pytest

from dtmf_service.config import ConfigError
from dtmf_service.idempotency import Idempotency, fingerprint_key
from dtmf_service.idempotency.sqlite_store import SqliteStore
from dtmf_service.outcome import Facts, Outcome
from tests.conftest import VALID


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


class TracedStore(SqliteStore):
    """A real SqliteStore that records every statement it runs, with the thread that ran it."""

    statements: list  # (thread name, SQL with its values)

    def _connect(self):
        db = super()._connect()
        if not hasattr(self, "statements"):
            self.statements = []
        name = threading.current_thread().name
        db.set_trace_callback(lambda sql: self.statements.append((name, sql)))
        return db


class FailsAfterClaim(SqliteStore):
    """The claim is written, then the store fails (as main's purge after the claim did when the
    database was locked): the call raises although the key is now marked."""

    def claim(self, *args, **kwargs):
        super().claim(*args, **kwargs)
        raise sqlite3.OperationalError("database is locked")


def pressed(counter, status=200):
    def handle():
        counter.append(1)
        return Outcome(status, {"status": "dtmf_submitted", "digits": "12"}, Facts("e"))

    return handle


def run(idem, key="k-1", body=b'{"digits":"12"}', handle=None):
    return idem.run(key, "caller", body, handle or pressed([]), "12", Facts("e"))


def test_a_store_error_after_the_claim_never_leaves_the_key_in_flight(tmp_path):
    path = str(tmp_path / "idem.db")
    presses, errors = [], []
    faulty = Idempotency(FailsAfterClaim(path), 60, 30.0, b"key", on_store_error=lambda: errors.append(1))
    with pytest.raises(sqlite3.OperationalError):
        run(faulty, handle=pressed(presses))
    assert presses == []  # nothing was sent
    healthy = Idempotency(SqliteStore(path), 60, 30.0, b"key")
    outcome = run(healthy, handle=pressed(presses))
    # Not 409 "in progress" (and not 504 "unknown" once the lease lapsed): the retry is processed.
    assert (outcome.http_status, presses) == (200, [1])
    assert errors == [1]  # the failure was counted
    faulty.close()
    healthy.close()


def test_the_in_flight_mark_outlives_a_replay_window_shorter_than_the_request(tmp_path):
    """IDEMPOTENCY_TTL_S=15 and a request that can last 40 s: a repeat at 20 s is 409, never run."""
    clock = Clock()
    store = SqliteStore(str(tmp_path / "idem.db"), clock=clock)
    assert store.claim("k", "fp", "first", 40.0, 15) is None
    clock.now += 20
    assert store.claim("k", "fp", "second", 40.0, 15).state == "in_flight"
    clock.now += 25  # the lease lapsed: the first request's worker died
    lapsed = store.claim("k", "fp", "third", 40.0, 15)
    assert (lapsed.state, lapsed.status) == ("done", 504)
    clock.now += 9  # 54 s: it stays "unknown" for a whole replay window after the lease (40 + 15)
    assert store.claim("k", "fp", "fourth", 40.0, 15).status == 504
    clock.now += 2
    assert store.claim("k", "fp", "fifth", 40.0, 15) is None  # forgotten only after lease + window
    store.close()


def test_release_and_finish_touch_only_their_own_claim(tmp_path):
    clock = Clock()
    store = SqliteStore(str(tmp_path / "idem.db"), clock=clock)
    assert store.claim("k", "fp", "first", 40.0, 15) is None
    store.release("k", "someone-else")  # a stray release (a failed claim of the same key)
    assert store.claim("k", "fp", "second", 40.0, 15).state == "in_flight"
    store.release("k", "first")
    assert store.claim("k", "fp", "third", 40.0, 15) is None
    store.close()


def test_expiry_never_runs_in_a_request_thread(tmp_path):
    """Main purged every 500 claims, inside the request that made the 500th (1.49 s at 1M keys)."""
    store = TracedStore(str(tmp_path / "idem.db"))
    idem = Idempotency(store, 1, 30.0, b"key")
    for n in range(600):
        run(idem, key=f"k-{n}")
    me = threading.current_thread().name
    assert not [sql for thread, sql in store.statements if thread == me and "DELETE" in sql and "expires" in sql]
    idem.close()


def test_the_maintenance_thread_deletes_expired_keys_in_batches(tmp_path):
    clock = Clock()
    store = TracedStore(str(tmp_path / "idem.db"), clock=clock)
    store.PURGE_BATCH = 7
    idem = Idempotency(store, 10, 30.0, b"key", maintenance_interval_s=0.02)
    for n in range(50):
        run(idem, key=f"k-{n}")
    clock.now += 11  # every record is past its replay window
    done = threading.Event()
    original = store.maintain

    def maintain():
        deleted = original()
        if deleted:
            done.set()
        return deleted

    store.maintain = maintain
    run(idem, key="late")  # starts this process's maintenance thread (already running here)
    assert done.wait(5)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM idempotency").fetchone()[0] == 1  # only "late"
    purges = [(thread, sql) for thread, sql in store.statements if sql.startswith("DELETE") and "expires" in sql]
    assert purges and {thread for thread, _ in purges} == {"idempotency-expiry"}
    assert len(purges) >= 50 // 7  # in batches, each its own short transaction
    idem.close()


def test_one_process_of_the_host_purges_per_interval(tmp_path):
    clock = Clock()
    first = SqliteStore(str(tmp_path / "idem.db"), clock=clock)
    second = SqliteStore(str(tmp_path / "idem.db"), clock=clock)
    for n in range(3):
        first.claim(f"k-{n}", "fp", "o", 1.0, 1)
    clock.now += 5
    assert first.maintain() == 3
    assert second.maintain() == 0  # the host's turn was taken: no second walk of the index
    clock.now += SqliteStore.PURGE_INTERVAL_S
    assert second.maintain() == 0  # its turn now, nothing left
    first.close()
    second.close()


def test_every_statement_the_store_runs_uses_an_index(tmp_path):
    """EXPLAIN QUERY PLAN of each statement of a claim, a finish, a release, a lapse and a purge
    shows no SCAN of the table: a keyed request costs the same with 10M keys as with none."""
    clock = Clock()
    store = TracedStore(str(tmp_path / "idem.db"), clock=clock)
    idem = Idempotency(store, 1, 30.0, b"key")
    run(idem, key="done")
    run(idem, key="released", handle=pressed([], status=503))
    store.claim("lapsed", "fp", "o", 1.0, 1)
    clock.now += 1.5
    store.claim("lapsed", "fp", "o2", 1.0, 1)
    clock.now += 10
    store.maintain()
    idem.close()
    statements = {
        sql for _, sql in store.statements if sql.split()[0].upper() in ("SELECT", "INSERT", "UPDATE", "DELETE")
    }
    assert any("expires<=" in sql for sql in statements)  # the purge is among them
    with sqlite3.connect(store.path) as db:
        for sql in statements:
            plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"))
            assert "SCAN" not in plan, (sql, plan)


def test_outside_sandbox_the_fingerprint_key_comes_from_configuration_only(tmp_path):
    with pytest.raises(ConfigError, match="^IDEMPOTENCY_HASH_KEY: required outside sandbox mode"):
        fingerprint_key({"SANDBOX": False})
    assert fingerprint_key({"SANDBOX": False, "AUDIT_HASH_KEY": "a"}) == b"a"
    assert fingerprint_key({"SANDBOX": False, "AUDIT_HASH_KEY": "a", "IDEMPOTENCY_HASH_KEY": "i"}) == b"i"
    # Sandbox: one in-memory key per process, the same for every caller in it (gunicorn's master
    # makes it before forking, so its workers agree).
    assert fingerprint_key({"SANDBOX": True}) == fingerprint_key({"SANDBOX": True})


def test_no_key_outside_sandbox_refuses_to_start_and_writes_no_key_file(make_app, upstream_config, tmp_path):
    config = {**upstream_config, "IDEMPOTENCY_HASH_KEY": None, "IDEMPOTENCY_STORE": f"sqlite:///{tmp_path}/i/i.db"}
    with pytest.raises(ConfigError, match="IDEMPOTENCY_HASH_KEY"):
        make_app(**config)
    assert not list(tmp_path.glob("i/*.key"))


def test_sandbox_mode_writes_no_key_beside_the_store(make_app, tmp_path):
    app = make_app(IDEMPOTENCY_HASH_KEY=None, IDEMPOTENCY_STORE=f"sqlite:///{tmp_path}/s/s.db")
    client = app.test_client()
    body = VALID
    assert client.post("/api/dtmf/parse", json=body, headers={"Idempotency-Key": "a"}).status_code == 200
    replay = client.post("/api/dtmf/parse", json=body, headers={"Idempotency-Key": "a"})
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert {p.name for p in (tmp_path / "s").iterdir()} <= {"s.db", "s.db-wal", "s.db-shm"}

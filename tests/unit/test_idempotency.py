"""CONTRACT.md section 9: Idempotency-Key on the SQLite store."""

import threading

import pytest

from tests.conftest import VALID


def post(client, body=VALID, key="order-1", headers=None):
    return client.post("/api/dtmf/parse", json=body, headers={"Idempotency-Key": key, **(headers or {})})


def dtmf_calls(app):
    return len(app.extensions["dtmf"].simulator.seen("dtmf"))


def test_repeat_returns_the_stored_response_without_calling_cxone(app, client):
    first = post(client)
    second = post(client)
    assert first.status_code == second.status_code == 200
    assert first.get_json() == second.get_json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert dtmf_calls(app) == 1


def test_replays_are_not_counted_again(client):
    post(client)
    post(client)
    assert client.get("/api/metrics").get_json()["total_submissions"] == 1


def test_same_key_different_body_is_422(client):
    post(client)
    response = post(client, {**VALID, "digits": "9"})
    assert response.status_code == 422
    assert response.get_json()["status"] == "idempotency_conflict"


def test_repeat_while_in_flight_is_409(app, client):
    simulator = app.extensions["dtmf"].simulator
    simulator.script("dtmf:call-1", [{"status": 200, "delay_s": 0.8, "body": {"ok": True}}])
    result = {}
    first = threading.Thread(target=lambda: result.setdefault("first", post(app.test_client())))
    first.start()
    import time

    deadline = time.monotonic() + 5
    while not simulator.seen("dtmf") and time.monotonic() < deadline:
        time.sleep(0.01)
    second = post(client)
    first.join(5)
    assert second.status_code == 409
    assert second.get_json()["status"] == "idempotency_in_progress"
    assert result["first"].status_code == 200


def test_failed_validation_does_not_store_the_key(client):
    assert post(client, {**VALID, "digits": "x"}).status_code == 400
    assert post(client).status_code == 200


def test_errors_from_cxone_are_stored_and_replayed(app, client):
    response = post(client, {**VALID, "interaction_id": "missing-9"})
    replay = post(client, {**VALID, "interaction_id": "missing-9"})
    assert response.status_code == replay.status_code == 404
    assert replay.headers["Idempotent-Replayed"] == "true"


def test_rate_limited_answer_is_not_stored_so_a_retry_is_processed(app, client):
    simulator = app.extensions["dtmf"].simulator
    simulator.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": "0"}}] * 3)
    assert post(client).status_code == 503
    retried = post(client)
    assert retried.status_code == 200
    assert "Idempotent-Replayed" not in retried.headers


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_key_is_400(client, key):
    response = client.post(
        "/api/dtmf/parse", json=VALID, headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")}
    )
    assert response.status_code == 400
    assert response.get_json()["status"] == "invalid_request"


def test_keys_are_scoped_to_the_api_key(make_app):
    client = make_app(API_KEYS=["a-key-1-0123456789", "b-key-2-0123456789"]).test_client()
    first = post(client, headers={"Authorization": "Bearer a-key-1-0123456789"})
    other = post(client, {**VALID, "digits": "7"}, headers={"Authorization": "Bearer b-key-2-0123456789"})
    assert first.status_code == other.status_code == 200
    assert "Idempotent-Replayed" not in other.headers


def test_expired_keys_are_processed_again(make_app):
    app = make_app(IDEMPOTENCY_TTL_S=1)
    client = app.test_client()
    post(client)
    import time

    time.sleep(1.1)
    again = post(client)
    assert again.status_code == 200
    assert "Idempotent-Replayed" not in again.headers


def test_the_store_never_holds_the_digits(app, client, tmp_path):
    import sqlite3

    first = post(client, {**VALID, "digits": "4111111111111111"})
    replay = post(client, {**VALID, "digits": "4111111111111111"})
    assert replay.get_json() == first.get_json()
    assert replay.get_json()["digits"] == "4111111111111111"
    path = app.config["IDEMPOTENCY_STORE"][len("sqlite:///") :]
    rows = sqlite3.connect(path).execute("SELECT body FROM idempotency").fetchall()
    assert rows and all("4111" not in (body or "") for (body,) in rows)


def test_fingerprint_is_keyed_when_a_hash_key_is_set(make_app):
    import hashlib
    import sqlite3

    app = make_app(AUDIT_HASH_KEY="k")
    client = app.test_client()
    body = b'{"interaction_id":"call-1","digits":"1234","timeout_ms":5000,"sequence_matrix_key":"m"}'
    client.post("/api/dtmf/parse", data=body, content_type="application/json", headers={"Idempotency-Key": "x"})
    path = app.config["IDEMPOTENCY_STORE"][len("sqlite:///") :]
    (stored,) = sqlite3.connect(path).execute("SELECT fingerprint FROM idempotency").fetchone()
    assert stored != hashlib.sha256(body).hexdigest()


def _open_store_at_once(path, barrier, errors):
    from dtmf_service.idempotency.sqlite_store import SqliteStore

    barrier.wait(10)
    try:
        SqliteStore(path).close()
    except Exception as exc:
        errors.put(repr(exc))


def test_workers_booting_together_all_open_a_fresh_sqlite_store(tmp_path):
    """Eight processes create the same new store at the same instant (as gunicorn workers booting)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = str(tmp_path / f"fresh-{attempt}.db")
        barrier, errors = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open_store_at_once, args=(path, barrier, errors)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert errors.empty(), errors.get()
        assert all(p.exitcode == 0 for p in procs)


def test_scope_is_the_callers_identity_not_the_header_text(make_app):
    client = make_app(API_KEYS=["a-key-1-0123456789"]).test_client()
    first = post(client, headers={"Authorization": "Bearer a-key-1-0123456789"})
    again = post(client, headers={"Authorization": "bearer  a-key-1-0123456789"})
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"


def test_store_files_are_private_and_a_pin_cannot_be_brute_forced(make_app, tmp_path):
    """The README's PCI settings and no hash key: the store must not give a 4-digit PIN back."""
    import hashlib
    import os
    import sqlite3
    import stat

    store_dir = tmp_path / "idem"
    app = make_app(
        IDEMPOTENCY_STORE=f"sqlite:///{store_dir / 'idem.db'}", AUDIT_DIGITS="masked", AUDIT_SENSITIVE_KEYS=["pin.*"]
    )
    body = '{"interaction_id":"call-1","digits":"%s","timeout_ms":5000,"sequence_matrix_key":"pin.entry"}'
    response = app.test_client().post(
        "/api/dtmf/parse", data=body % "4821", content_type="application/json", headers={"Idempotency-Key": "p"}
    )
    assert response.status_code == 200
    assert stat.S_IMODE(os.stat(store_dir).st_mode) == 0o700
    for path in store_dir.iterdir():  # the database, its -wal and -shm files, and the key
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path.name
    with sqlite3.connect(store_dir / "idem.db") as db:
        rows = db.execute("SELECT key, fingerprint, body FROM idempotency").fetchall()
    stored = {value for row in rows for value in row if value}
    guesses = {hashlib.sha256((body % f"{pin:04d}").encode()).hexdigest() for pin in range(10000)}
    assert not stored & guesses
    assert not any("4821" in value for value in stored)

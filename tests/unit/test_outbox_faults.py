"""Issue 10: a full or unwritable outbox never costs the caller its answer; the loss is counted and logged.

The outbox sits on a real 64 KiB tmpfs, filled up for real, then remounted read-only.
"""

import logging
import subprocess

from tests.conftest import VALID


def test_a_full_then_read_only_outbox_still_answers_and_counts_the_loss(make_app, tmpfs, tmp_path, caplog):
    small_tmpfs = tmpfs("512k")
    app = make_app(
        AUDIT_SINKS=["file"],
        AUDIT_FILE_PATH=str(tmp_path / "audit.jsonl"),
        AUDIT_OUTBOX=f"sqlite:///{small_tmpfs / 'outbox.db'}",
    )
    gateway = app.extensions["dtmf"]
    gateway.delivery.stop(1)  # nothing drains it: the disk fills up
    client = app.test_client()
    free = __import__("shutil").disk_usage(small_tmpfs).free
    (small_tmpfs / "filler").write_bytes(b"x" * (free - 40 * 1024))  # about 40 KiB left
    with caplog.at_level(logging.ERROR, logger="dtmf_service"):
        for _ in range(200):
            body = {**VALID, "sequence_matrix_key": "m" * 120}
            assert client.post("/api/dtmf/parse", json=body).status_code == 200
    figures = client.get("/api/metrics").get_json()
    assert figures["successful_parses"] == 200
    assert figures["audit_outbox_errors"] > 0 and figures["audit_dropped"] > 0
    assert "it is lost" in caplog.text
    caplog.clear()
    gateway.outbox.close()  # a read-only remount needs no file open for writing
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with caplog.at_level(logging.ERROR, logger="dtmf_service"):
        assert client.post("/api/dtmf/parse", json=VALID).status_code == 200
    assert client.get("/api/metrics").get_json()["audit_outbox_errors"] > figures["audit_outbox_errors"]
    assert "audit outbox" in caplog.text


_SCANS = {"os.listdir", "os.scandir", "glob.glob", "open", "sqlite3.connect"}
_seen_on: dict[int, list[str]] = {}


def _hook(event, args):
    seen = _seen_on.get(__import__("threading").get_ident())
    if seen is not None and event in _SCANS:
        seen.append(event)


def test_the_request_path_does_a_small_constant_amount_of_audit_work(make_app, tmp_path):
    """CONTRACT.md section 7: no directory scans, no new files, no waiting on a sink, whatever the backlog."""
    import sys
    import threading

    app = make_app(AUDIT_SINKS=["file", "webhook"], AUDIT_FILE_PATH=str(tmp_path / "a.jsonl"),
                   AUDIT_WEBHOOK_URL="http://127.0.0.1:9/down")  # fmt: skip
    client = app.test_client()
    for _ in range(50):  # a backlog (the webhook is down) and a process that has opened what it needs
        assert client.post("/api/dtmf/parse", json=VALID).status_code == 200
    sys.addaudithook(_hook)  # the interpreter's own record of file-system calls, by thread
    _seen_on[threading.get_ident()] = seen = []
    try:
        for _ in range(20):
            assert client.post("/api/dtmf/parse", json=VALID).status_code == 200
    finally:
        del _seen_on[threading.get_ident()]
    assert seen == []


def test_fsync_is_a_setting_off_by_default(tmp_path):
    from dtmf_service.audit.outbox_sqlite import SqliteOutbox

    default = SqliteOutbox(str(tmp_path / "a" / "outbox.db"), ("s",), 1 << 30)
    durable = SqliteOutbox(str(tmp_path / "b" / "outbox.db"), ("s",), 1 << 30, fsync=True)
    assert default._db().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: survives a process crash
    assert durable._db().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: survives a machine crash

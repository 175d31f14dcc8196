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

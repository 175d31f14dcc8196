"""CONTRACT.md section 7 (*rev 2*): the file sink never leaves a torn line, on a really full disk (tmpfs)."""

import json
import os
import uuid

from dtmf_service.builtin_plugins.file import FileSink


def event(size=300):
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", "pad": "x" * size}


def test_a_short_write_on_a_full_disk_is_undone(small_tmpfs):
    sink = FileSink(str(small_tmpfs / "audit.jsonl"), fsync="batch")
    delivered, failures = [], 0
    for _ in range(400):  # 64 KiB holds far fewer than 400 batches of ~1.2 KiB
        batch = [event(), event(), event(), event()]
        try:
            sink.deliver_many(batch)
            delivered += batch
        except OSError:
            failures += 1
    assert failures > 0  # the disk really filled up
    lines = (small_tmpfs / "audit.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends on a whole line
    parsed = [json.loads(line) for line in lines[:-1]]
    assert [e["event_id"] for e in parsed] == [e["event_id"] for e in delivered]
    # Room again: the retried event lands after a complete line and is readable.
    os.unlink(small_tmpfs / "audit.jsonl")
    retry = event(10)
    sink.deliver(retry)
    assert json.loads((small_tmpfs / "audit.jsonl").read_text())["event_id"] == retry["event_id"]

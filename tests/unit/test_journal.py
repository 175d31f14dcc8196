"""The per-process audit journal: a copy cut short keeps the previous version; a dead process's
journal is taken over, a live one's never."""

import json
import os
import signal
import subprocess
import sys

from dtmf_service.audit.journal import _HALF, _HEAD, FINAL, INTENT, Journal, read_slots, recover_orphans
from tests.helpers import ROOT, wait_until


def test_the_final_event_replaces_the_placeholder(tmp_path):
    journal = Journal(str(tmp_path))
    slot = journal.acquire()
    journal.write(slot, INTENT, b'{"outcome":"submission_unknown"}')
    journal.write(slot, FINAL, b'{"outcome":"dtmf_submitted"}')
    assert list(read_slots(open(journal.path, "rb").read())) == [(FINAL, b'{"outcome":"dtmf_submitted"}')]
    journal.release(slot)
    assert list(read_slots(open(journal.path, "rb").read())) == []


def test_a_copy_cut_short_leaves_the_previous_version(tmp_path):
    journal = Journal(str(tmp_path))
    slot = journal.acquire()
    journal.write(slot, INTENT, b'{"outcome":"submission_unknown"}')
    journal.write(slot, FINAL, b'{"outcome":"dtmf_submitted"}')
    data = bytearray(open(journal.path, "rb").read())
    final_half = slot * 2 * _HALF + _HALF  # the second write went to the other half
    data[final_half + _HEAD.size + 3] ^= 0xFF  # as if the process died half-way through the copy
    assert list(read_slots(bytes(data))) == [(INTENT, b'{"outcome":"submission_unknown"}')]


HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from dtmf_service.audit.journal import Journal, INTENT
journal = Journal(sys.argv[1])
slot = journal.acquire()
journal.write(slot, INTENT, b'{"event_id":"e-1","outcome":"submission_unknown"}')
print("written", flush=True)
time.sleep(60)
"""


def test_a_dead_processs_journal_is_taken_over_a_live_ones_never(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"written"
        moved = []
        assert recover_orphans(str(tmp_path), moved.extend) == 0  # alive: its flock stands
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        wait_until(lambda: recover_orphans(str(tmp_path), moved.extend), timeout=5)
        assert [(state, json.loads(payload)["event_id"]) for state, payload in moved] == [(INTENT, "e-1")]
        assert not list(tmp_path.glob("journal-*.bin"))  # taken over once, then gone
    finally:
        holder.kill()


def test_a_journal_closed_while_a_request_still_runs_takes_its_final_event(tmp_path):
    """CONTRACT.md section 7 rev 3: the journal stays usable until the last request has written."""
    journal = Journal(str(tmp_path))
    slot = journal.acquire()
    journal.write(slot, INTENT, b'{"event_id":"e-1","outcome":"submission_unknown"}')
    journal.close(remove=True)  # worker_exit, with a request thread still waiting on CXone
    journal.write(slot, FINAL, b'{"event_id":"e-1","outcome":"dtmf_submitted"}')
    assert list(read_slots(open(journal.path, "rb").read())) == [
        (FINAL, b'{"event_id":"e-1","outcome":"dtmf_submitted"}')
    ]
    later = journal.acquire()  # a request that starts after close() gets a journal too
    journal.write(later, FINAL, b'{"event_id":"e-2","outcome":"dtmf_submitted"}')


def test_an_outbox_closed_under_a_running_request_still_commits_its_event(tmp_path):
    from dtmf_service.audit.outbox_sqlite import SqliteOutbox

    box = SqliteOutbox(str(tmp_path / "outbox.db"), ("s",), 1 << 30)
    event = {"event_id": "e-1", "outcome": "submission_unknown"}
    ticket = box.intend(event, lease_s=60)
    box.close()
    box.commit({**event, "outcome": "dtmf_submitted"}, ticket)
    assert box.flush(5)
    assert [c.event["outcome"] for c in box.claim("s", "c", 10, 30)] == ["dtmf_submitted"]


PAUSED_OWNER = """
import fcntl, sys, time
sys.path.insert(0, sys.argv[2])
real_flock = fcntl.flock
paused = []

def flock_after_a_pause(fd, operation):
    # The window between creating the journal file and locking it, widened: wait for the test.
    if not paused:
        paused.append(fd)
        print("created", flush=True)
        sys.stdin.readline()
    return real_flock(fd, operation)

fcntl.flock = flock_after_a_pause
from dtmf_service.audit.journal import Journal, FINAL
journal = Journal(sys.argv[1])
slot = journal.acquire()
journal.write(slot, FINAL, b'{"event_id":"e-1","outcome":"dtmf_submitted"}')
print("written", flush=True)
time.sleep(60)
"""


def test_no_recovery_sees_a_journal_before_its_owner_holds_the_lock(tmp_path):
    owner = subprocess.Popen(
        [sys.executable, "-c", PAUSED_OWNER, str(tmp_path), str(ROOT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert owner.stdout.readline().strip() == b"created"  # the file exists, not yet locked
        moved = []
        assert recover_orphans(str(tmp_path), moved.extend) == 0  # another worker's maintenance round
        owner.stdin.write(b"go\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == b"written"
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        wait_until(lambda: recover_orphans(str(tmp_path), moved.extend), timeout=5)
        assert [json.loads(payload)["outcome"] for _state, payload in moved] == ["dtmf_submitted"]
    finally:
        owner.kill()


SPILLER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from dtmf_service.audit.journal import Journal, INTENT, FINAL
journal = Journal(sys.argv[1], slots=1, spill_max_bytes=1 << 20)
held = journal.acquire()  # the one slot
journal.write(held, INTENT, b'{"event_id":"e-0","outcome":"submission_unknown"}')
answered, running = journal.acquire(), journal.acquire()  # no slot left: both spill
journal.write(answered, INTENT, b'{"event_id":"e-1","outcome":"submission_unknown"}')
journal.write(running, INTENT, b'{"event_id":"e-2","outcome":"submission_unknown"}')
journal.write(answered, FINAL, b'{"event_id":"e-1","outcome":"dtmf_submitted"}')
print("written", flush=True)
time.sleep(60)
"""


def test_events_spill_when_every_slot_is_taken_and_survive_the_process(tmp_path):
    spiller = subprocess.Popen([sys.executable, "-c", SPILLER, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE)
    try:
        assert spiller.stdout.readline().strip() == b"written"
        assert len(list(tmp_path.glob("spill-*.log"))) == 1
        from dtmf_service.audit.journal import waiting_in

        assert waiting_in(str(tmp_path)) == 1  # the final event: pending for the backlog figures
        os.kill(spiller.pid, signal.SIGKILL)
        spiller.wait(10)
        moved = []
        wait_until(lambda: recover_orphans(str(tmp_path), moved.extend), timeout=5)
        outcomes = {
            json.loads(payload)["event_id"]: (state, json.loads(payload)["outcome"]) for state, payload in moved
        }
        assert outcomes == {
            "e-0": (INTENT, "submission_unknown"),
            "e-1": (FINAL, "dtmf_submitted"),  # the final record replaces its placeholder
            "e-2": (INTENT, "submission_unknown"),
        }
        assert not list(tmp_path.iterdir())
    finally:
        spiller.kill()


def test_a_spill_file_goes_once_none_of_its_events_waits(tmp_path):
    journal = Journal(str(tmp_path), slots=1, spill_max_bytes=1 << 20)
    journal.acquire()
    spilled = journal.acquire()
    journal.write(spilled, FINAL, b'{"event_id":"e-1","outcome":"dtmf_submitted"}')
    (spill,) = tmp_path.glob("spill-*.log")
    assert spill.stat().st_size > 0 and journal.spilled() == 1
    journal.release(spilled)  # moved into the outbox
    assert spill.stat().st_size == 0 and journal.spilled() == 0  # its space given back


def test_abandoned_temporary_files_are_removed_fresh_ones_left_alone(tmp_path):
    from dtmf_service.audit.journal import _remove_abandoned

    (tmp_path / ".journal-1-abc.bin.tmp").write_bytes(b"")
    _remove_abandoned(str(tmp_path))
    assert (tmp_path / ".journal-1-abc.bin.tmp").exists()  # its owner may be about to lock it
    _remove_abandoned(str(tmp_path), now=__import__("time").time() + 3600)
    assert not (tmp_path / ".journal-1-abc.bin.tmp").exists()


def test_without_a_journal_a_locked_outbox_costs_a_caller_a_moment_not_seconds(tmp_path):
    import time

    import pytest

    from dtmf_service.audit.outbox_sqlite import SqliteOutbox
    from tests.helpers import SqliteLockHolder

    box = SqliteOutbox(str(tmp_path / "outbox.db"), ("s",), 1 << 30)
    box._journal = Journal(box._journal.directory, slots=0)  # the journal could not be made
    holder = SqliteLockHolder(tmp_path / "outbox.db").hold()
    try:
        started = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017, PT011 - lost, and the caller counts it so
            box.commit({"event_id": "e-1", "outcome": "dtmf_submitted"})
        assert time.monotonic() - started < 1.0
    finally:
        holder.release()
    box.close()


def test_a_ticket_of_a_closed_journal_never_frees_a_slot_of_the_next(tmp_path):
    journal = Journal(str(tmp_path))
    old = journal.acquire()
    journal.write(old, FINAL, b'{"event_id":"e-1"}')
    old_path = journal.path
    journal.close(remove=True)  # only a final event waits (no request runs): closed, left on disk
    assert list(read_slots(open(old_path, "rb").read())) == [(FINAL, b'{"event_id":"e-1"}')]
    new = journal.acquire()  # a request after close(): a journal of its own
    journal.write(new, INTENT, b'{"event_id":"e-2"}')
    journal.release(old)  # the writer thread, late, after moving e-1
    assert journal.path != old_path and journal.in_use() == 1
    assert list(read_slots(open(journal.path, "rb").read())) == [(INTENT, b'{"event_id":"e-2"}')]

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

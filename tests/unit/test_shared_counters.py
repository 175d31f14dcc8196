"""Cross-process counters: exact sums over every process file, dead ones included for totals."""

import multiprocessing
import os

from dtmf_service.metrics.counters import SharedCounters, wipe


def _child(directory, n):
    counters = SharedCounters(directory)
    for _ in range(n):
        counters.add_many({"successful_parses": 1, "latency_ms_sum": 2.5})
    counters.set("audit.x.pending", 7)


def test_totals_are_exact_across_processes_and_survive_their_exit(tmp_path):
    directory = str(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(directory, 250)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    totals = SharedCounters(directory).totals()
    assert totals["successful_parses"] == 1000
    assert totals["latency_ms_sum"] == 2500


def test_gauges_count_live_processes_only(tmp_path):
    directory = str(tmp_path)
    reader = SharedCounters(directory)
    reader.declare_gauges(["audit.x.pending"])
    process = multiprocessing.get_context("fork").Process(target=_child, args=(directory, 1))
    process.start()
    process.join(10)
    assert "audit.x.pending" not in reader.totals()  # the child is gone: its level no longer counts
    reader.set("audit.x.pending", 3)
    assert reader.totals()["audit.x.pending"] == 3


def test_forked_child_writes_its_own_file(tmp_path):
    counters = SharedCounters(str(tmp_path))
    counters.inc("validation_failures")
    pid = os.fork()
    if pid == 0:
        counters.inc("validation_failures", 2)
        os._exit(0)
    os.waitpid(pid, 0)
    assert counters.totals()["validation_failures"] == 3
    assert len(list(tmp_path.glob("counters-*.bin"))) == 2


def test_wipe_starts_from_zero(tmp_path):
    counters = SharedCounters(str(tmp_path))
    counters.inc("successful_parses")
    wipe(str(tmp_path))
    assert SharedCounters(str(tmp_path)).totals() == {}

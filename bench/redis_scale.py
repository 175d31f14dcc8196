"""Fleet mode at scale (issue 19 item 3): a backlog in Redis, its catch-up, and memory over time.

    python -m bench.redis_scale [--events 200000]

A real redis-server on a free loopback port (no persistence, its own temporary directory); the
outbox's own API writes the backlog for two sinks (in batches, as the host's forwarder does), then a
delivery loop claims and acknowledges it (what the delivery threads do, minus a sink), while the
maintenance step (``enforce_bound``: exact trims of what every group has settled) runs every 5 s as
in a worker. Reported: used memory before the backlog, at its peak, right after the drain and every
5 s for 60 s after it; bytes per entry; the catch-up rate. Target: memory within 20% of its
pre-backlog value 60 s after the drain. ``bench/scale.py`` (make bench-scale) calls ``scale_rows``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from dtmf_service.audit.outbox_redis import RedisOutbox
from tests.helpers import RedisServer

SINKS = ("webhook", "file")
_MAINTENANCE_S = 5.0  # a worker's maintenance thread checks a Redis outbox this often


def _event(n: int) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "timestamp": "2026-12-02T00:00:00Z", "client_ip": "127.0.0.1",
            "interaction_id": f"scale-{n}", "digits": "****", "timeout_ms": 5000, "sequence_matrix": "menu.main",
            "node_transition": False, "latency_ms": 3.2, "cxone_status": 200, "cxone_response": None,
            "validation_passed": True, "outcome": "dtmf_submitted", "request_id": uuid.uuid4().hex}  # fmt: skip


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def catch_up(events: int, after_s: float = 60.0) -> dict[str, Any]:
    """One backlog of ``events`` for two sinks: build, drain, then watch memory for ``after_s``."""
    directory = Path(tempfile.mkdtemp(prefix="dtmf-redis-scale-"))
    server = RedisServer(directory).start()
    try:
        client = redis.Redis(port=server.port)
        outbox = RedisOutbox(server.url, SINKS, max_bytes=4 << 30)
        outbox.enforce_bound()  # the stream and its groups, as a worker's first round makes them
        before = _used(client)
        started = time.monotonic()
        for first in range(0, events, 1000):
            outbox.send([outbox._item("event", _event(n), None) for n in range(first, min(first + 1000, events))])
        build_s = time.monotonic() - started
        peak = _used(client)
        started, last_round = time.monotonic(), time.monotonic()
        for sink in SINKS:  # each sink catches up in turn, as two delivery threads would together
            while claimed := outbox.claim(sink, "bench", 500, 30.0):
                outbox.ack(sink, [c.ref for c in claimed])
                if time.monotonic() - last_round >= _MAINTENANCE_S:
                    outbox.enforce_bound()
                    last_round = time.monotonic()
        drain_s = time.monotonic() - started
        drained_at = time.monotonic()
        over_time = [(0.0, _used(client))]
        while time.monotonic() - drained_at < after_s:
            time.sleep(max(0.0, last_round + _MAINTENANCE_S - time.monotonic()))
            outbox.enforce_bound()
            last_round = time.monotonic()
            over_time.append((round(last_round - drained_at, 1), _used(client)))
        outbox.close()
        return {
            "events": events,
            "build_s": round(build_s, 1),
            "bytes_per_entry": round((peak - before) / events) if events else None,
            "catch_up_per_s": round(events * len(SINKS) / drain_s) if drain_s else None,
            "memory_before": before,
            "memory_peak": peak,
            "memory_over_time": over_time,
            "memory_after_ratio": round(over_time[-1][1] / before, 2),
            # The ratio above is to an otherwise empty Redis (about 1 MiB): this says how much of
            # what the backlog took was given back.
            "backlog_memory_returned": round((peak - over_time[-1][1]) / (peak - before), 4) if peak > before else None,
        }
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def scale_rows(sizes: tuple[int, ...] = (200_000,), after_s: float = 60.0) -> list[dict[str, Any]]:
    rows = []
    for events in sizes:
        row = catch_up(events, after_s)
        print(f"  Redis: {events} events, {row['bytes_per_entry']} B/entry, catch-up {row['catch_up_per_s']}/s, "
              f"memory {row['memory_before'] >> 20} -> {row['memory_peak'] >> 20} MiB, "
              f"{row['memory_after_ratio']:.2f} x the start {after_s:.0f} s after the drain "
              f"({row['backlog_memory_returned']:.1%} of the backlog's memory given back)", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--after", type=float, default=60.0, help="seconds to watch memory after the drain")
    args = parser.parse_args(argv)
    rows = scale_rows((args.events,), args.after)
    print(json.dumps(rows, indent=2))
    ok = all(r["memory_after_ratio"] <= 1.2 for r in rows)
    print(
        f"{'MET' if ok else 'MISSED'}  Redis memory within 20% of its pre-backlog value"
        f" {args.after:.0f} s after a drain"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Idempotency store at scale (issue 19 item 4): does a keyed request cost the same with 10 million
live keys in the SQLite store as with none?

    python -m bench.idempotency_scale                     # 0 / 1M / 10M keys (about 4 minutes)
    python -m bench.idempotency_scale --sizes 0,100000    # a smoke run

``build_store(path, n_keys)`` fills a store with ``n_keys`` live records (done, replayable for an
hour) in one SQL statement per million rows, after the store itself made its schema: 10M keys take
about a minute. ``measure(...)`` starts real gunicorn (2 workers) on that store against a 50 ms
upstream and drives it with wrk, every request carrying a fresh ``Idempotency-Key`` (a claim and a
finish each), and reports req/s, CPU per request, p99 and the store failures counted by the service
(``idempotency_store_errors``). ``scale_rows()`` is what ``make bench-scale`` (bench/scale.py) calls.
Loopback only; every load bounded in time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench.run import TICK, Server, Upstream, gateway_env, proc_cpu_ticks, run_wrk
from dtmf_service.idempotency.sqlite_store import SqliteStore

UPSTREAM_MS = 50
CONNECTIONS = 64
SIZES = (0, 1_000_000, 10_000_000)
# A stored 200 answer as the service writes it (digits blanked), about 150 bytes.
_BODY = (
    '{"status":"dtmf_submitted","interaction_id":"interaction-%d","digits":"","cxone_status":200,'
    '"attempts":1,"latency_ms":52.4}'
)


def build_store(path: str | Path, n_keys: int, ttl_s: float = 3600.0) -> dict[str, Any]:
    """A SQLite idempotency store at ``path`` holding ``n_keys`` live keys; returns build time and
    bytes on disk. The schema (table, indexes) is the store's own; rows go in through SQL in
    batches of a million, keys as wide as the real ones (64 hex characters), expiry spread over
    ``ttl_s`` so the expiry index looks as it does in service."""
    path = str(path)
    SqliteStore(path).close()
    empty = _bytes(path)
    started = time.monotonic()
    db = sqlite3.connect(path, isolation_level=None)
    # A bulk load with no service running: no WAL (each row written once), the expiry index built
    # once at the end from sorted values instead of row by row; the store's own start puts both back.
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-65536")  # 64 MiB: the machine may have little to spare
    db.execute("DROP INDEX IF EXISTS idempotency_expires")
    now = time.time()
    batch = 1_000_000
    for start in range(0, n_keys, batch):
        count = min(batch, n_keys - start)
        db.execute("BEGIN")
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO idempotency (key, fingerprint, state, status, body, headers, expires, lease, owner) "
            "SELECT printf('%064x', i * 2654435761), printf('%064x', i * 40503), 'done', 200, "
            "printf(?, i), '{}', ? + (i % 3600) * (? / 3600.0), NULL, printf('%032x', i) FROM n",
            (start, start + count - 1, _BODY, now + 60, ttl_s),
        )
        db.execute("COMMIT")
    db.close()
    SqliteStore(path).close()  # WAL mode and the expiry index again, as the service opens it
    size = _bytes(path)
    return {
        "keys": n_keys,
        "build_s": round(time.monotonic() - started, 1),
        "bytes": size,
        "bytes_per_key": round((size - empty) / n_keys) if n_keys else None,
    }


def _bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))


def measure(store_path: str | Path, workdir: Path, seconds: float = 20.0, warmup_s: float = 5.0) -> dict[str, Any]:
    """Real gunicorn on ``store_path`` under wrk, each request with a fresh Idempotency-Key."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with Upstream(UPSTREAM_MS) as port:
        env = {
            **gateway_env(f"http://127.0.0.1:{port}/api/v2", workdir, "off"),
            "DTMF_IDEMPOTENCY_STORE": f"sqlite:///{store_path}",
            "DTMF_IDEMPOTENCY_TTL_S": "3600",
            "DTMF_WORKERS": "2",
        }
        server = Server("app:app", env)
        try:
            run_wrk(wrk, server.url, CONNECTIONS, warmup_s, keyed=True)
            before = proc_cpu_ticks(server.pids())
            load = run_wrk(wrk, server.url, CONNECTIONS, seconds, keyed=True)
            cpu_ms = (proc_cpu_ticks(server.pids()) - before) * 1000 / TICK
            metrics = requests.get(f"{server.url}/api/metrics", timeout=10).json()
        finally:
            server.stop()
    return {
        "rps": round(load["rps"], 1),
        "cpu_ms_per_request": round(cpu_ms / max(load["requests"], 1), 3),
        "p99_ms": load["p99_ms"],
        "requests": load["requests"],
        "non_200": load["other"],
        "store_errors": metrics.get("idempotency_store_errors", 0),
    }


def scale_rows(sizes: tuple[int, ...] = SIZES, seconds: float = 20.0) -> list[dict[str, Any]]:
    """One row per store size: build, then measure; each store deleted before the next is built."""
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="dtmf-idem-scale-"))
    try:
        for n_keys in sizes:
            store = workdir / f"idem-{n_keys}" / "idempotency.db"
            row = build_store(store, n_keys)
            print(f"  idempotency store {n_keys:>9} keys: built in {row['build_s']} s, "
                  f"{row['bytes_per_key']} bytes/key", flush=True)  # fmt: skip
            row.update(measure(store, workdir, seconds))
            print(
                f"  idempotency store {n_keys:>9} keys: {row['rps']:.0f} req/s, {row['cpu_ms_per_request']:.2f} ms "
                f"CPU/req, p99 {row['p99_ms']:.1f} ms, {row['store_errors']} store errors",
                flush=True,
            )
            rows.append(row)
            shutil.rmtree(store.parent, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'keys':>10} {'build s':>7} {'B/key':>6} {'req/s':>6} {'CPU ms/req':>10} {'p99 ms':>7} {'errors':>6} "
          f"{'non-200':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['keys']:>10} {r['build_s']:>7} {r['bytes_per_key'] or '-':>6} {r['rps']:6.0f} "
              f"{r['cpu_ms_per_request']:10.2f} {r['p99_ms']:7.1f} {r['store_errors']:>6} "
              f"{r['non_200']:>7}")  # fmt: skip
    empty, big = rows[0], rows[-1]
    if empty["keys"] == 0 and big is not empty:
        rps, cpu = big["rps"] / empty["rps"], big["cpu_ms_per_request"] / empty["cpu_ms_per_request"]
        met = rps >= 0.85 and cpu <= 1.15 and all(r["store_errors"] == 0 and r["non_200"] == 0 for r in rows)
        print(f"\ntarget: {big['keys']:,} keys within 15% of an empty store, 0 store failures: "
              f"req/s {rps:.2f} x, CPU/request {cpu:.2f} x -> {'MET' if met else 'MISSED'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated key counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured load per size")
    args = parser.parse_args(argv)
    report(scale_rows(tuple(int(s) for s in args.sizes.split(",")), args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

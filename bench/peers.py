"""Benchmark: the gateway against the seed's Go service (issue 21 item 5), same load, one run.

    python -m bench.peers             # 2 rounds of 8 s per scenario (about 8 minutes)
    python -m bench.peers --quick     # 1 round of 4 s (about 3 minutes)
    python -m bench.peers --profile   # where the CPU goes: granian + durable audit, 50 ms, 64 conn (py-spy)

Targets, alternating within each round: go-seed (built here from ../shared/peers/go-seed/main.go
with Debian's golang-go), the gateway under gunicorn (gunicorn.conf.py) and under granian, each with
audit off and with durable audit (webhook batches of 50 to the upstream's /audit, file sink, statsd).
One fake upstream (bench/upstream.py) for the whole run, its delay switched between 0 and 50 ms;
16 and 64 connections. wrk, CPU from /proc and the medians come from bench/run.py. Loopback only.
Prints a table with ratios to go-seed and every issue 21 target marked met or missed, and writes
bench/results/peers-<timestamp>.{json,txt}.

Both gateway servers start through ``dtmf-gateway serve`` (DTMF_SERVER, DTMF_BIND, DTMF_WORKERS,
DTMF_THREADS), so each runs the service's lifecycle and its one audit delivery process per host.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.run import Result, Server, UdpDrain, Upstream, _median, ensure_wrk, gateway_env, measure, run_wrk
from tests.helpers import BIN, ROOT, free_port

GO_SEED_RELATIVE = Path("shared") / "peers" / "go-seed" / "main.go"  # ../shared/... from the clone
GO_SEED = "go-seed"
GUNICORN, GUNICORN_AUDIT = "gunicorn", "gunicorn+audit"
GRANIAN, GRANIAN_AUDIT = "granian", "granian+audit"
TARGETS = (GO_SEED, GUNICORN, GUNICORN_AUDIT, GRANIAN, GRANIAN_AUDIT)
FAST, FAST_AUDIT = GRANIAN, GRANIAN_AUDIT  # the native-HTTP server option the targets are about
WORKERS, THREADS = 2, 64  # gunicorn.conf.py's defaults on this 2-core machine; granian gets the same

# Issue 21's table (this machine, 2 rounds of 8 s, 64 connections): the "no regression" baseline for
# gunicorn, compared as ratios to go-seed so that the machine's load in this run cancels out.
# (target, upstream delay ms) -> (req/s, CPU ms per request, p99 ms or None)
ISSUE_FIGURES: dict[tuple[str, int], tuple[float, float, float | None]] = {
    (GO_SEED, 50): (1236, 0.24, 56),
    (GO_SEED, 0): (6642, 0.18, None),
    (GUNICORN_AUDIT, 50): (1038, 1.19, 93),
    (GUNICORN_AUDIT, 0): (1939, 0.86, None),
    (GUNICORN, 50): (1118, 1.04, 78),
    (GUNICORN, 0): (2132, 0.77, None),
}


@dataclass
class Check:
    """One issue 21 target: what was measured, whether it is met, and by how much (signed, + is good)."""

    name: str
    measured: str
    met: bool
    margin: str


# --- building the Go seed ------------------------------------------------------------------------


class GoBuildError(Exception):
    pass


def go_seed_source() -> Path:
    """../shared/peers/go-seed/main.go beside the clone; from a git worktree, beside the main clone."""
    here = ROOT.parent / GO_SEED_RELATIVE
    if here.is_file():
        return here
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return here
    main_clone = Path(common).parent
    return main_clone.parent / GO_SEED_RELATIVE if (main_clone.parent / GO_SEED_RELATIVE).is_file() else here


def build_go_seed(source: Path, out_dir: Path) -> tuple[Path | None, str]:
    """``go build`` into out_dir, caches there too, no network. (None, reason) when go or the source
    is missing (the go-seed rows are skipped); GoBuildError when the build fails or needs a download."""
    go = shutil.which("go")
    if go is None:
        return None, "go not found (apt-get install golang-go)"
    if not source.is_file():
        return None, f"{source} not found (shared/ is expected beside the project's clone)"
    binary = out_dir / "go-seed-bin"
    env = {
        **os.environ,
        "GOCACHE": str(out_dir / "gocache"),
        "GOPATH": str(out_dir / "gopath"),
        "GOPROXY": "off",  # a build that needs a module fails instead of downloading it
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
        "GO111MODULE": "auto",
        "CGO_ENABLED": "0",
    }
    proc = subprocess.run(
        [go, "build", "-o", str(binary), source.name],
        cwd=source.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        text = (proc.stderr or proc.stdout).strip()
        first = text.splitlines()[0] if text else f"exit {proc.returncode}"
        needs_download = ("GOPROXY=off", "module lookup disabled", "downloading", "go.mod", "cannot find package")
        if any(phrase in text for phrase in needs_download):
            raise GoBuildError(f"go-seed: the build needs a download, and this benchmark has no network: {first}")
        raise GoBuildError(f"go-seed: go build failed: {first}")
    return binary, subprocess.run([go, "version"], capture_output=True, text=True).stdout.strip()


# --- starting the targets ------------------------------------------------------------------------


def start_target(target: str, up_port: int, workdir: Path, statsd_port: int, go_binary: Path | None) -> Server:
    """One target on a free loopback port, pointed at the one fake upstream."""
    port = free_port()
    up = f"http://127.0.0.1:{up_port}"
    if target == GO_SEED:
        assert go_binary is not None
        env = {
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "CXONE_BASE_URL": f"{up}/api/v2",
            "CXONE_TOKEN_URL": f"{up}/api/v2/oauth/token",
            "AUDIT_WEBHOOK_URL": f"{up}/audit",
        }
        return Server(GO_SEED, env, command=[str(go_binary)], ready_path=None, port=port)
    server_name, _, audit = target.partition("+")
    own = workdir / target.replace("+", "-")  # a fresh outbox, spool, idempotency store per target
    own.mkdir(parents=True, exist_ok=True)
    env = {
        "DTMF_ACCESS_LOG": "off",
        "DTMF_GUNICORN_LOG_LEVEL": "warning",
        **gateway_env(f"{up}/api/v2", own, "audit50" if audit else "off", up_port, 0, statsd_port),
    }
    # Both servers through `dtmf-gateway serve` (issue 21 item 1), as `make run` and the unit start them.
    env.update(
        {
            "DTMF_SERVER": server_name,
            "DTMF_BIND": f"127.0.0.1:{port}",
            "DTMF_WORKERS": str(WORKERS),
            "DTMF_THREADS": str(THREADS),
        }
    )
    return Server("app:app", env, command=[str(BIN / "dtmf-gateway"), "serve"], port=port)


# --- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    wrk = ensure_wrk()
    seconds, rounds, warmup = (4.0, 1, 1.0) if args.quick else (8.0, 2, 1.0)
    seconds, rounds = args.seconds or seconds, args.rounds or rounds
    delays, connection_counts = (0, 50), (16, 64)
    workdir = Path(tempfile.mkdtemp(prefix="dtmf-bench-peers-"))
    skipped: dict[str, str] = {}
    targets = list(TARGETS)
    try:
        go_binary, go_note = build_go_seed(args.go_seed or go_seed_source(), workdir)
    except GoBuildError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        sys.exit(str(exc))
    if go_binary is None:
        skipped[GO_SEED] = go_note
        targets.remove(GO_SEED)
        print(f"skipping go-seed: {go_note}", flush=True)
    if shutil.which(str(BIN / "granian")) is None:
        for name in (GRANIAN, GRANIAN_AUDIT):
            skipped[name] = "granian not installed (pip install '.[granian]')"
            targets.remove(name)
        print("skipping granian: not installed (pip install '.[granian]')", flush=True)
    statsd = UdpDrain()
    runs: dict[tuple[str, int, int], list[Result]] = {}
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        upstream = Upstream(0)
        with upstream as up_port:
            for round_number in range(1, rounds + 1):
                for delay in delays:
                    upstream.set_delay(delay)
                    # Alternating: every target once per (round, delay), the order rotated each round.
                    shift = (round_number - 1) % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        server = start_target(target, up_port, workdir, statsd.port, go_binary)
                        try:
                            for connections in connection_counts:
                                result = measure(
                                    wrk,
                                    server,
                                    target,
                                    delay,
                                    connections,
                                    seconds,
                                    warmup,
                                    audit=target.endswith("+audit"),
                                )
                                runs.setdefault((target, delay, connections), []).append(result)
                                print(
                                    f"  round {round_number} {target:15} {delay:3d} ms {connections:3d} conn: "
                                    f"{result.rps:8.0f} req/s cpu {result.cpu_ms_per_request:.2f} ms/req "
                                    f"p99 {result.p99_ms:.1f} ms",
                                    flush=True,
                                )
                        finally:
                            server.stop()
    finally:
        statsd.close()
        shutil.rmtree(workdir, ignore_errors=True)
    results = [_median(found) for found in runs.values()]
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "rounds": rounds,
        "seconds_per_run": seconds,
        "connections": list(connection_counts),
        "delays_ms": list(delays),
        "duration_s": round(time.monotonic() - started),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "versions": versions(go_note if go_binary else None),
        "skipped": skipped,
        "results": [asdict(r) for r in results],
    }


def versions(go_version: str | None) -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version(), "go": go_version}
    for package in ("gunicorn", "granian", "flask"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


# --- the table and the targets (pure functions: tests/unit/test_bench_peers.py) -------------------


def _by(results: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    return {(r["target"], r["delay_ms"], r["connections"]): r for r in results}


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each result with its ratios to go-seed in the same cell (None without a go-seed row)."""
    by = _by(results)
    order = {name: i for i, name in enumerate(TARGETS)}
    rows = []
    for r in sorted(results, key=lambda r: (r["delay_ms"], r["connections"], order.get(r["target"], 99))):
        go = by.get((GO_SEED, r["delay_ms"], r["connections"]))
        rows.append(
            {
                **r,
                "rps_x_go": r["rps"] / go["rps"] if go and go["rps"] else None,
                "cpu_x_go": r["cpu_ms_per_request"] / go["cpu_ms_per_request"]
                if go and go["cpu_ms_per_request"]
                else None,
                "p99_minus_go_ms": r["p99_ms"] - go["p99_ms"] if go else None,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'target':15} {'up ms':>5} {'conn':>4} {'req/s':>8} {'x go':>5} {'p99 ms':>7} {'p99-go':>7} "
        f"{'cpu ms/req':>10} {'x go':>5} {'non200':>6} {'audit 0 in':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        drain = f"{r['audit_drain_s']:.1f} s" if r.get("audit_drain_s") is not None else ""
        delta = f"{r['p99_minus_go_ms']:+.1f}" if r["p99_minus_go_ms"] is not None else "-"
        lines.append(
            f"{r['target']:15} {r['delay_ms']:5d} {r['connections']:4d} {r['rps']:8.0f} {_x(r['rps_x_go']):>5} "
            f"{r['p99_ms']:7.1f} {delta:>7} {r['cpu_ms_per_request']:10.2f} {_x(r['cpu_x_go']):>5} "
            f"{r['non_200']:6d} {drain:>10}"
        )
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _at_least(name: str, value: float, bound: float, shown: str) -> Check:
    return Check(name, shown, value >= bound, f"{(value / bound - 1) * 100:+.0f}%")


def _at_most(name: str, value: float, bound: float, shown: str) -> Check:
    return Check(name, shown, value <= bound, f"{(1 - value / bound) * 100:+.0f}%")


def mark_targets(results: list[dict[str, Any]]) -> list[Check]:
    """Every issue 21 target this run measured, met or missed and by how much (+: to spare, -: short).
    A target whose rows are missing (go-seed or granian skipped) is left out, not marked."""
    by = _by(results)
    checks: list[Check] = []
    fast50, go50 = by.get((FAST_AUDIT, 50, 64)), by.get((GO_SEED, 50, 64))
    if fast50 and go50:
        ratio = fast50["rps"] / go50["rps"]
        checks.append(_at_least(f"{FAST_AUDIT} req/s >= 1.0 x go-seed (50 ms, 64 conn)", ratio, 1.0, f"{ratio:.2f}x"))
        bound = go50["p99_ms"] + 15
        checks.append(
            Check(
                f"{FAST_AUDIT} p99 <= go-seed p99 + 15 ms (50 ms, 64 conn)",
                f"{fast50['p99_ms']:.1f} vs {go50['p99_ms']:.1f} + 15",
                fast50["p99_ms"] <= bound,
                f"{bound - fast50['p99_ms']:+.1f} ms",
            )
        )
        cpu = fast50["cpu_ms_per_request"] / go50["cpu_ms_per_request"]
        checks.append(_at_most(f"{FAST_AUDIT} CPU/req <= 3 x go-seed (50 ms, 64 conn)", cpu, 3.0, f"{cpu:.2f}x"))
    fast0, go0 = by.get((FAST_AUDIT, 0, 64)), by.get((GO_SEED, 0, 64))
    if fast0 and go0:
        ratio = fast0["rps"] / go0["rps"]
        checks.append(_at_least(f"{FAST_AUDIT} req/s >= 0.5 x go-seed (0 ms, 64 conn)", ratio, 0.5, f"{ratio:.2f}x"))
    for off_name, on_name in ((GUNICORN, GUNICORN_AUDIT), (GRANIAN, GRANIAN_AUDIT)):
        off, on = by.get((off_name, 50, 64)), by.get((on_name, 50, 64))
        if off and on and off["rps"]:
            ratio = on["rps"] / off["rps"]
            checks.append(
                _at_least(
                    f"{off_name}: audit on req/s >= 0.95 x audit off (50 ms, 64 conn)", ratio, 0.95, f"{ratio:.2f}"
                )
            )
    checks.extend(_no_regression(by))
    return checks


def _no_regression(by: dict[tuple[str, int, int], dict[str, Any]]) -> list[Check]:
    """gunicorn against issue 21's figures, as ratios to go-seed (the machine's load cancels out)."""
    checks: list[Check] = []
    for target in (GUNICORN_AUDIT, GUNICORN):
        for delay in (50, 0):
            mine, go = by.get((target, delay, 64)), by.get((GO_SEED, delay, 64))
            if not mine or not go:
                continue
            rps0, cpu0, p990 = ISSUE_FIGURES[(target, delay)]
            go_rps0, go_cpu0, go_p990 = ISSUE_FIGURES[(GO_SEED, delay)]
            was, now = rps0 / go_rps0, mine["rps"] / go["rps"]
            checks.append(
                _at_least(
                    f"{target} no regression: req/s x go-seed ({delay} ms, 64 conn)",
                    now,
                    was,
                    f"{now:.2f}x vs {was:.2f}x ({mine['rps']:.0f} vs {rps0:.0f} req/s)",
                )
            )
            was, now = cpu0 / go_cpu0, mine["cpu_ms_per_request"] / go["cpu_ms_per_request"]
            checks.append(
                _at_most(
                    f"{target} no regression: CPU/req x go-seed ({delay} ms, 64 conn)",
                    now,
                    was,
                    f"{now:.2f}x vs {was:.2f}x ({mine['cpu_ms_per_request']:.2f} vs {cpu0:.2f} ms)",
                )
            )
            if p990 is not None and go_p990 is not None:
                was_excess, now_excess = p990 - go_p990, mine["p99_ms"] - go["p99_ms"]
                checks.append(
                    Check(
                        f"{target} no regression: p99 above go-seed's ({delay} ms, 64 conn)",
                        f"{now_excess:+.1f} vs {was_excess:+.1f} ms ({mine['p99_ms']:.1f} vs {p990:.0f} ms)",
                        now_excess <= was_excess,
                        f"{was_excess - now_excess:+.1f} ms",
                    )
                )
    return checks


def format_checks(checks: list[Check]) -> str:
    lines = ["targets (issue 21; margin: + to spare, - short of the target):"]
    for c in checks:
        lines.append(f"  {'MET   ' if c.met else 'MISSED'} {c.name}: {c.measured} [{c.margin}]")
    return "\n".join(lines)


def report_text(data: dict[str, Any]) -> str:
    rows = table_rows(data["results"])
    checks = mark_targets(data["results"])
    load = data["load_average_before"]
    head = (
        f"make bench-peers{' --quick' if data['quick'] else ''}: {data['date']}, {data['rounds']} round(s) of "
        f"{data['seconds_per_run']:.0f} s per scenario, medians; {data['cpus']} CPUs, load average before "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v)
    )
    parts = [head, "", format_table(rows), "", format_checks(checks)]
    parts += [f"skipped {name}: {why}" for name, why in data.get("skipped", {}).items()]
    return "\n".join(parts)


def write_results(data: dict[str, Any], text: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    data = {
        **data,
        "rows": table_rows(data["results"]),
        "targets": [asdict(c) for c in mark_targets(data["results"])],
    }
    (out_dir / f"peers-{stamp}.json").write_text(json.dumps(data, indent=2) + "\n")
    path = out_dir / f"peers-{stamp}.txt"
    path.write_text(text + "\n")
    return path


# --- where the CPU goes --------------------------------------------------------------------------


# Where a leaf frame's file lives -> the part of the stack it belongs to (first match wins).
PROFILE_GROUPS = (
    ("/dtmf_service/", "gateway code (dtmf_service, plugins)"),
    ("/plugins/", "gateway code (dtmf_service, plugins)"),
    ("/granian/", "granian's Python glue"),
    ("/flask/", "Flask and Werkzeug"),
    ("/werkzeug/", "Flask and Werkzeug"),
    ("/http/client.py", "http.client (upstream and webhook)"),
    ("/socket.py", "sockets"),
    ("/json/", "json"),
    ("/threading.py", "threads, locks, queues"),
    ("/queue.py", "threads, locks, queues"),
    ("/statsd/", "statsd client"),
    ("/marshmallow/", "marshmallow"),
)


def self_time(raw: str, top: int = 10) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """py-spy's raw (collapsed) stacks -> (the ``top`` leaf functions by share of samples, i.e. self
    time; the same samples grouped by PROFILE_GROUPS)."""
    counts: dict[str, int] = {}
    groups: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if leaf.startswith("process "):
            continue  # a process frame alone: no Python frame under it
        name, _, where = leaf.partition(" (")
        path = where.rstrip(")").rsplit(":", 1)[0]
        # One entry per function: drop the line number, keep the file's last two path parts.
        parts = path.split("/")[-2:]
        file = "/".join(p for p in parts if not p.startswith(("python3", "site-packages")))
        key = f"{name} ({file})" if file else name
        counts[key] = counts.get(key, 0) + int(count)
        group = next((label for part, label in PROFILE_GROUPS if part in path), "other (stdlib, libraries)")
        groups[group] = groups.get(group, 0) + int(count)
        total += int(count)
    if not total:
        return [], []
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    grouped = sorted(groups.items(), key=lambda kv: -kv[1])
    return [(k, n / total) for k, n in ranked], [(k, n / total) for k, n in grouped]


def profile(args: argparse.Namespace) -> int:
    """py-spy on granian + durable audit at 50 ms, 64 connections: the top 10 functions by self time.

    --gil samples only the thread holding the GIL, i.e. Python code running on a CPU: waits (lock,
    socket) are left out, and granian's Rust side (HTTP parsing, its own threads) is not seen."""
    py_spy = shutil.which("py-spy") or shutil.which(str(BIN / "py-spy"))
    if py_spy is None:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    wrk = ensure_wrk()
    seconds = args.seconds or 10.0
    workdir = Path(tempfile.mkdtemp(prefix="dtmf-bench-profile-"))
    statsd = UdpDrain()
    try:
        with Upstream(50) as up_port:
            server = start_target(GRANIAN_AUDIT, up_port, workdir, statsd.port, None)
            try:
                run_wrk(wrk, server.url, 64, 2)
                out = workdir / "profile.txt"
                spy = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(server.proc.pid),
                        "--subprocesses",
                        "--nonblocking",
                        "--gil",
                        "--full-filenames",
                    ]
                    + ["--rate", "200", "--duration", str(int(seconds)), "--format", "raw", "--output", str(out)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                time.sleep(1)  # py-spy attaches before the load starts
                load = run_wrk(wrk, server.url, 64, seconds)
                _, err = spy.communicate(timeout=seconds + 60)
                if spy.returncode != 0 or not out.exists():
                    sys.exit(f"py-spy failed: {err.strip().splitlines()[-1] if err.strip() else spy.returncode}")
                ranked, grouped = self_time(out.read_text(), 10)
            finally:
                server.stop()
    finally:
        statsd.close()
    print(f"granian + durable audit, 50 ms upstream, 64 connections: {load['rps']:.0f} req/s during the profile")
    print("top 10 functions by self time (share of py-spy samples of the thread holding the GIL, all workers):")
    for name, share in ranked:
        print(f"  {share * 100:5.1f}%  {name}")
    print("the same samples by where the leaf function lives:")
    for name, share in grouped:
        print(f"  {share * 100:5.1f}%  {name}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--go-seed", type=Path, help="main.go of the Go seed (default ../shared/peers/go-seed)")
    parser.add_argument("--quick", action="store_true", help="1 round of 4 s instead of 2 rounds of 8 s")
    parser.add_argument("--seconds", type=float, help="seconds of load per scenario")
    parser.add_argument("--rounds", type=int, help="rounds; each figure is the median over them")
    parser.add_argument("--profile", action="store_true", help="py-spy: where granian + audit spends its CPU")
    args = parser.parse_args(argv)
    if args.profile:
        return profile(args)
    data = run(args)
    text = report_text(data)
    print("\n" + text)
    path = write_results(data, text, ROOT / "bench" / "results")
    print(f"\nwritten to {path.relative_to(ROOT)} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

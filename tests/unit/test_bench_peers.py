"""bench/peers.py's table builder and target marking, on canned numbers (no servers, no timing)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.peers import GoBuildError, build_go_seed, format_checks, format_table, mark_targets, self_time, table_rows


def _row(target: str, delay: int, conns: int, rps: float, cpu: float, p99: float) -> dict[str, Any]:
    return {
        "target": target,
        "delay_ms": delay,
        "connections": conns,
        "rps": rps,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "cpu_ms_per_request": cpu,
        "peak_rss_mb": 100.0,
        "requests": int(rps * 8),
        "non_200": 0,
        "audit_drain_s": 0.1 if target.endswith("+audit") else None,
        "extra": {},
    }


CANNED = [
    _row("go-seed", 50, 64, 1000, 0.25, 60),
    _row("gunicorn", 50, 64, 900, 1.00, 80),
    _row("gunicorn+audit", 50, 64, 840, 1.20, 95),  # 0.93 of audit off: missed by 2%
    _row("granian", 50, 64, 1050, 0.70, 70),
    _row("granian+audit", 50, 64, 1020, 0.80, 74),  # 1.02x go, p99 +14 ms, 3.2x CPU (missed)
    _row("go-seed", 0, 64, 6000, 0.20, 20),
    _row("granian+audit", 0, 64, 2900, 0.60, 40),  # 0.48x go: missed by 3%
    _row("gunicorn+audit", 0, 64, 1800, 0.90, 60),
    _row("gunicorn", 0, 64, 2000, 0.80, 50),
]


def test_table_rows_carry_ratios_to_go_seed_in_the_same_cell() -> None:
    rows = {(r["target"], r["delay_ms"]): r for r in table_rows(CANNED)}
    fast = rows[("granian+audit", 50)]
    assert round(fast["rps_x_go"], 2) == 1.02
    assert round(fast["cpu_x_go"], 2) == 3.2
    assert fast["p99_minus_go_ms"] == 14
    assert rows[("go-seed", 0)]["rps_x_go"] == 1.0
    text = format_table(table_rows(CANNED))
    assert len(text.splitlines()) == 2 + len(CANNED)  # header, rule, one line per result
    assert "granian+audit      50   64     1020  1.02" in text


def test_no_go_seed_row_leaves_ratios_blank_and_go_targets_unmarked() -> None:
    without_go = [r for r in CANNED if r["target"] != "go-seed"]
    assert all(r["rps_x_go"] is None for r in table_rows(without_go))
    names = [c.name for c in mark_targets(without_go)]
    assert not any("go-seed" in n for n in names)
    assert any("audit on req/s >= 0.95" in n for n in names)  # needs no go-seed


def test_every_target_is_marked_met_or_missed_with_its_margin() -> None:
    checks = {c.name: c for c in mark_targets(CANNED)}
    assert checks["granian+audit req/s >= 1.0 x go-seed (50 ms, 64 conn)"].met
    assert checks["granian+audit req/s >= 1.0 x go-seed (50 ms, 64 conn)"].margin == "+2%"
    p99 = checks["granian+audit p99 <= go-seed p99 + 15 ms (50 ms, 64 conn)"]
    assert p99.met and p99.margin == "+1.0 ms"
    cpu = checks["granian+audit CPU/req <= 3 x go-seed (50 ms, 64 conn)"]
    assert not cpu.met and cpu.margin == "-7%"
    zero = checks["granian+audit req/s >= 0.5 x go-seed (0 ms, 64 conn)"]
    assert not zero.met and zero.margin == "-3%"
    gunicorn_audit = checks["gunicorn: audit on req/s >= 0.95 x audit off (50 ms, 64 conn)"]
    assert not gunicorn_audit.met and gunicorn_audit.margin == "-2%"
    assert checks["granian: audit on req/s >= 0.95 x audit off (50 ms, 64 conn)"].met
    # gunicorn against issue 21's figures, as ratios to go-seed: 0.84x then, 0.84x now at 50 ms.
    regression = checks["gunicorn+audit no regression: req/s x go-seed (50 ms, 64 conn)"]
    assert regression.met and "0.84x vs 0.84x" in regression.measured
    assert checks["gunicorn+audit no regression: CPU/req x go-seed (50 ms, 64 conn)"].met  # 4.80x vs 4.96x
    p99_then = checks["gunicorn+audit no regression: p99 above go-seed's (50 ms, 64 conn)"]
    assert p99_then.met and p99_then.margin == "+2.0 ms"  # +35 ms now vs +37 ms then
    assert checks["gunicorn no regression: req/s x go-seed (0 ms, 64 conn)"].met  # 0.33x vs 0.32x
    report = format_checks(list(checks.values()))
    assert report.count("MET") + report.count("MISSED") == len(checks)


def test_self_time_ranks_leaf_functions_and_groups_them() -> None:
    raw = "\n".join(
        [
            'process 1:"granian";_runner (/v/granian/wsgi.py:10);dispatch (/w/dtmf_service/web/app.py:5) 30',
            'process 1:"granian";_runner (/v/site-packages/granian/wsgi.py:12) 50',
            'process 1:"granian";dispatch (/w/dtmf_service/web/app.py:9) 10',
            'process 1:"granian" 99',
            "wait (/usr/lib/python3.11/threading.py:320) 10",
        ]
    )
    ranked, grouped = self_time(raw, top=2)
    assert ranked == [("_runner (granian/wsgi.py)", 0.5), ("dispatch (web/app.py)", 0.4)]
    assert dict(grouped)["gateway code (dtmf_service, plugins)"] == 0.4
    assert dict(grouped)["threads, locks, queues"] == 0.1


def test_go_seed_rows_are_skipped_with_a_reason_when_the_source_is_missing(tmp_path: Path) -> None:
    binary, reason = build_go_seed(tmp_path / "absent" / "main.go", tmp_path)
    assert binary is None and "not found" in reason


@pytest.mark.skipif(shutil.which("go") is None, reason="go not installed (apt-get install golang-go)")
def test_a_go_seed_that_needs_a_download_fails_with_one_clear_line(tmp_path: Path) -> None:
    source = tmp_path / "src" / "main.go"
    source.parent.mkdir()
    source.write_text('package main\n\nimport "github.com/example/nothing"\n\nfunc main() { nothing.X() }\n')
    with pytest.raises(GoBuildError, match="needs a download"):
        build_go_seed(source, tmp_path)

"""Every figure the core keeps, in one place: the names, what each outcome counts in, the writes
and the snapshot behind GET /api/metrics (CONTRACT.md section 4) and GET /metrics (section 11).

Values live in ``counters.SharedCounters`` (one memory-mapped file per worker, merged on
read), so totals are exact across the gunicorn master's workers and survive their restarts.
The core writes every figure whichever exporters are enabled; exporters only export:
``memory`` serves the snapshot as JSON, ``prometheus`` renders ``core_figures`` beside its own
request histogram, ``statsd`` forwards each event as it happens.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from dtmf_service.metrics.counters import SharedCounters, shared_counters
from dtmf_service.outcome import Outcome

log = logging.getLogger("dtmf_service")

# The counter each counted outcome (the response ``status``) belongs to (CONTRACT.md section 4).
CATEGORY = {
    "dtmf_submitted": "successful_parses",
    "invalid_request": "validation_failures",
    "validation_failed": "validation_failures",
    "submission_failed": "submission_failures",
    "submission_unknown": "submission_failures",
    "internal_error": "submission_failures",
}
REQUEST_COUNTERS = ("successful_parses", "validation_failures", "submission_failures", "latency_ms_sum")
# dtmf_request_duration_seconds: for a CXone that answers in 5 to 500 ms, with room above for
# retries and back-off. Stored per bucket (not cumulative): one increment per request.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 25.0)
ATTEMPT_RESULTS = ("2xx", "4xx", "429", "5xx", "not_sent", "unknown")  # dtmf_cxone_attempts_total{result}
TOKEN_FETCH_RESULTS = ("ok", "error")
ERROR_COUNTERS = ("idempotency_store_errors", "audit_dropped", "audit_outbox_errors", "auth_failures")
SINK_COUNTERS = ("delivered", "failed_attempts", "dead_letters")


def outcome_category(status: str) -> str | None:
    """The section 4 counter an outcome's ``status`` belongs to (None: not counted)."""
    return CATEGORY.get(status)


class Backlog(Protocol):
    pending: int
    oldest_pending_s: float | None
    dead_letters: int
    dropped: int


class BacklogSource(Protocol):
    def backlog(self) -> Mapping[str, Any]: ...  # sink name -> a Backlog


class Metrics:
    """The core's counters for one application; every worker process writes its own file."""

    def __init__(self, directory: str) -> None:
        self.counters = shared_counters(directory)
        self.counters.declare(REQUEST_COUNTERS)
        for status in CATEGORY:
            self.counters.declare([f"requests.{status}", f"duration.{status}.sum"])
            self.counters.declare([f"duration.{status}.{i}" for i in range(len(DURATION_BUCKETS_S) + 1)])
        self.counters.declare([f"cxone_attempts.{r}" for r in ATTEMPT_RESULTS])
        self.counters.declare([f"cxone_token_fetches.{r}" for r in TOKEN_FETCH_RESULTS])
        self.counters.declare(ERROR_COUNTERS)
        # Each status's counter names, made once: a request's count is then one lookup and one write.
        self._names = {
            status: (
                category,
                f"requests.{status}",
                f"duration.{status}.sum",
                tuple(f"duration.{status}.{i}" for i in range(len(DURATION_BUCKETS_S) + 1)),
            )
            for status, category in CATEGORY.items()
        }
        self._attempts = {r: f"cxone_attempts.{r}" for r in ATTEMPT_RESULTS}
        self._sinks: list[str] = []
        self._outbox: BacklogSource | None = None

    # -- writes ----------------------------------------------------------------------------------
    def count_request(self, outcome: Outcome) -> None:
        """One counted request: in exactly one section 4 category (average latency over successes
        only), and by status with its duration (section 11)."""
        names = self._names.get(outcome.status)
        if names is None:
            return
        category, requests, duration_sum, buckets = names
        amounts = {category: 1.0, requests: 1.0}
        if outcome.latency_ms is not None:
            seconds = outcome.latency_ms / 1000.0
            amounts[buckets[bisect.bisect_left(DURATION_BUCKETS_S, seconds)]] = 1.0
            amounts[duration_sum] = seconds
            if category == "successful_parses":
                amounts["latency_ms_sum"] = outcome.latency_ms
        self.counters.add_many(amounts)

    def auth_failure(self) -> None:
        """A request refused 401 (not counted in section 4's figures; one total, never per key)."""
        self.counters.inc("auth_failures")

    def cxone_attempt(self, result: str) -> None:
        self.counters.inc(self._attempts.get(result) or f"cxone_attempts.{result}")

    def token_fetch(self, result: str) -> None:
        self.counters.inc(f"cxone_token_fetches.{result}")

    def idempotency_store_error(self) -> None:
        self.counters.inc("idempotency_store_errors")

    def audit_outbox_error(self) -> None:
        self.counters.inc("audit_outbox_errors")

    def audit_lost(self) -> None:
        """An answered request's event could not be written at all."""
        self.counters.add_many({"audit_dropped": 1.0, "audit_outbox_errors": 1.0})

    def audit_dropped(self, count: int) -> None:
        """Events the outbox bound pushed out."""
        self.counters.inc("audit_dropped", count)

    def sink(self, name: str) -> SinkCounters:
        """The delivery counters of one audit sink."""
        if name not in self._sinks:
            self._sinks.append(name)
        return SinkCounters(self.counters, name)

    def watch_outbox(self, outbox: BacklogSource) -> None:
        """Where the audit backlog figures come from (host-wide; fleet-wide with Redis)."""
        self._outbox = outbox

    # -- reads -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """GET /api/metrics: exact totals across every worker; ratios are None when undefined."""
        totals = self.counters.totals()
        ok = int(totals.get("successful_parses", 0))
        bad = int(totals.get("validation_failures", 0))
        failed = int(totals.get("submission_failures", 0))
        total = ok + bad + failed
        sinks = self._audit_sinks(totals)
        pending = [s["audit_pending"] for s in sinks.values()]
        return {
            "total_submissions": total,
            "successful_parses": ok,
            "validation_failures": bad,
            "submission_failures": failed,
            "average_latency_ms": round(totals.get("latency_ms_sum", 0.0) / ok, 3) if ok else None,
            "accuracy_rate": ok / total if total else None,
            "audit_pending": None if None in pending else sum(pending),
            "audit_dropped": int(totals.get("audit_dropped", 0)),
            "audit_sinks": sinks,
            "idempotency_store_errors": int(totals.get("idempotency_store_errors", 0)),
            "audit_outbox_errors": int(totals.get("audit_outbox_errors", 0)),
            "auth_failures": int(totals.get("auth_failures", 0)),
        }

    def core_figures(self) -> dict[str, Any]:
        """Every figure by label, for exporters that are scraped (Prometheus): requests and their
        duration by status (cumulative buckets, +Inf last), CXone attempts and token fetches by
        result, the audit figures per sink."""
        totals = self.counters.totals()
        duration = {}
        for status in CATEGORY:
            running, buckets = 0, []
            for i in range(len(DURATION_BUCKETS_S) + 1):
                running += int(totals.get(f"duration.{status}.{i}", 0))
                buckets.append(running)
            duration[status] = {"buckets": buckets, "sum": totals.get(f"duration.{status}.sum", 0.0)}
        return {
            "requests": {status: int(totals.get(f"requests.{status}", 0)) for status in CATEGORY},
            "duration_buckets_s": DURATION_BUCKETS_S,
            "duration": duration,
            "cxone_attempts": {r: int(totals.get(f"cxone_attempts.{r}", 0)) for r in ATTEMPT_RESULTS},
            "cxone_token_fetches": {r: int(totals.get(f"cxone_token_fetches.{r}", 0)) for r in TOKEN_FETCH_RESULTS},
            "audit_sinks": self._audit_sinks(totals),
            "auth_failures": int(totals.get("auth_failures", 0)),
        }

    def _audit_sinks(self, totals: Mapping[str, float]) -> dict[str, dict[str, Any]]:
        """Per sink: the backlog from the outbox, the counts from the counters. An outbox that cannot
        be read (disk gone read-only, Redis down) gives null backlog figures."""
        if not self._sinks:
            return {}
        backlog: Mapping[str, Any] | None = None
        try:
            backlog = self._outbox.backlog() if self._outbox is not None else {}
        except Exception as exc:  # noqa: BLE001 - metrics must answer while the outbox is in trouble
            log.error("audit outbox: cannot read the backlog (%s)", type(exc).__name__)
        sinks = {}
        for name in self._sinks:
            found = backlog.get(name) if backlog is not None else None
            sinks[name] = {
                "audit_pending": (found.pending if found else 0) if backlog is not None else None,
                "audit_oldest_pending_s": found.oldest_pending_s if found else None,
                "audit_delivered": int(totals.get(f"audit.{name}.delivered", 0)),
                "audit_failed_attempts": int(totals.get(f"audit.{name}.failed_attempts", 0)),
                "audit_dead_letters": found.dead_letters if found else 0,
                "audit_dropped": found.dropped if found else 0,
            }
        return sinks


class SinkCounters:
    """One audit sink's running totals: delivered events, failed attempts, dead letters."""

    def __init__(self, counters: SharedCounters, sink: str) -> None:
        self._counters = counters
        self._prefix = f"audit.{sink}."
        counters.declare([self._prefix + name for name in SINK_COUNTERS])

    def delivered(self, count: int) -> None:
        self._counters.inc(self._prefix + "delivered", count)

    def failed_attempt(self) -> None:
        self._counters.inc(self._prefix + "failed_attempts")

    def dead_letter(self) -> None:
        self._counters.inc(self._prefix + "dead_letters")

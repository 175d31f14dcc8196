"""Metrics exporter ``prometheus``: GET /metrics in the Prometheus text format (CONTRACT.md section 11).

Exact across every gunicorn worker and across worker restarts with prometheus_client's
multiprocess mode: gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a directory of the
master's (wiped when it starts) before any worker imports the client, and calls
``mark_process_dead`` when a worker exits. Outside gunicorn (tests, ``flask run``) the values live
in this process. The core's own figures (CXone attempts and token fetches by result, the audit
backlog) are added at scrape time from the shared counters and the outbox.

Histogram buckets are chosen for a CXone that answers in 5 to 500 ms, with room above for
retries and back-off: 5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 750 ms, 1, 2.5, 5, 10, 25 s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from dtmf_service import hookimpl

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 25.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The section 4 counters' outcomes: a request answered from the idempotency store, or 401, is none.
_COUNTED = frozenset(
    {"dtmf_submitted", "invalid_request", "validation_failed", "submission_failed", "submission_unknown",
     "internal_error"}
)  # fmt: skip


class PrometheusExporter:
    """Counts each request and observes its duration; renders the whole host's figures on scrape."""

    content_type = CONTENT_TYPE

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._own = CollectorRegistry()  # this process's values when not in multiprocess mode
        into = None if self.multiproc_dir else self._own
        self.requests = Counter(
            "dtmf_requests_total", "POSTs to /api/dtmf/parse, by response status", ["outcome"], registry=into
        )
        self.duration = Histogram(
            "dtmf_request_duration_seconds",
            "Wall time of handling a POST to /api/dtmf/parse, by response status",
            ["outcome"],
            buckets=BUCKETS,
            registry=into,
        )

    def record(self, event: dict[str, Any]) -> None:
        outcome = event.get("outcome")
        if outcome not in _COUNTED:
            return
        self.requests.labels(outcome).inc()
        latency_ms = event.get("latency_ms")
        if latency_ms is not None:
            self.duration.labels(outcome).observe(float(latency_ms) / 1000.0)

    def render(self, core: Mapping[str, Any]) -> bytes:
        """The exposition: every worker's request metrics, plus the core's figures."""
        registry = CollectorRegistry()
        if self.multiproc_dir:
            MultiProcessCollector(registry, path=self.multiproc_dir)
        else:
            for collector in (self.requests, self.duration):
                registry.register(collector)
        registry.register(_CoreCollector(core))
        return generate_latest(registry)


class _CoreCollector:
    def __init__(self, core: Mapping[str, Any]) -> None:
        self.core = core

    def collect(self) -> Iterator[Any]:
        attempts = CounterMetricFamily("dtmf_cxone_attempts", "DTMF POSTs made to CXone, by result", labels=["result"])
        for result, count in self.core.get("cxone_attempts", {}).items():
            attempts.add_metric([result], count)
        yield attempts
        tokens = CounterMetricFamily(
            "dtmf_cxone_token_fetches", "Token requests made to CXone, by result", labels=["result"]
        )
        for result, count in self.core.get("cxone_token_fetches", {}).items():
            tokens.add_metric([result], count)
        yield tokens
        sinks = self.core.get("audit_sinks", {})
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "pending": GaugeMetricFamily("dtmf_audit_pending", "Audit events not yet delivered", labels=["sink"]),
            "delivered": CounterMetricFamily("dtmf_audit_delivered", "Audit events delivered", labels=["sink"]),
            "dropped": CounterMetricFamily(
                "dtmf_audit_dropped", "Audit events dropped by the outbox bound", labels=["sink"]
            ),
            "dead": GaugeMetricFamily(
                "dtmf_audit_dead_letters", "Audit events set aside as dead letters", labels=["sink"]
            ),  # fmt: skip
            "oldest": GaugeMetricFamily(
                "dtmf_audit_oldest_pending_seconds", "Age of the oldest undelivered audit event", labels=["sink"]
            ),
        }
        for sink, figures in sinks.items():
            if figures.get("audit_pending") is not None:
                families["pending"].add_metric([sink], figures["audit_pending"])
            families["delivered"].add_metric([sink], figures.get("audit_delivered", 0))
            families["dropped"].add_metric([sink], figures.get("audit_dropped", 0))
            families["dead"].add_metric([sink], figures.get("audit_dead_letters", 0))
            families["oldest"].add_metric([sink], figures.get("audit_oldest_pending_s") or 0.0)
        yield from families.values()


@hookimpl
def dtmf_metrics_exporter(name: str, config: Mapping[str, Any]) -> PrometheusExporter | None:
    return PrometheusExporter(config) if name == "prometheus" else None

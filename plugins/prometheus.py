"""Metrics exporter ``prometheus``: GET /metrics in the Prometheus text format (CONTRACT.md section 11).

It only exports. Every figure is the core's (dtmf_service.metrics), kept in the shared counter
files that are exact across every gunicorn worker and across worker restarts, and rendered
here with prometheus_client's exposition code at scrape time. prometheus_client's own
multiprocess mode is not used: it keeps a file per worker that ever lived (its
``mark_process_dead`` removes live gauges only), so a scrape would read more files after every
restart, and a second store would have to agree with the first.

Histogram buckets (dtmf_service.metrics.DURATION_BUCKETS_S) are chosen for a CXone that answers
in 5 to 500 ms, with room above for retries and back-off: 5, 10, 25, 50, 75, 100, 150, 200,
300, 500, 750 ms, 1, 2.5, 5, 10, 25 s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from dtmf_service import hookimpl

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PrometheusExporter:
    """Renders the core's figures on scrape; there is nothing to do per event."""

    content_type = CONTENT_TYPE

    def record(self, event: dict[str, Any]) -> None:
        pass

    def render(self, core: Mapping[str, Any]) -> bytes:
        """The exposition of the whole host's figures."""
        registry = CollectorRegistry()
        registry.register(_CoreCollector(core))
        return generate_latest(registry)


class _CoreCollector:
    def __init__(self, core: Mapping[str, Any]) -> None:
        self.core = core

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "dtmf_requests", "POSTs to /api/dtmf/parse, by response status", labels=["outcome"]
        )
        for outcome, count in self.core.get("requests", {}).items():
            requests.add_metric([outcome], count)
        yield requests
        duration = HistogramMetricFamily(
            "dtmf_request_duration_seconds",
            "Wall time of handling a POST to /api/dtmf/parse, by response status",
            labels=["outcome"],
        )
        bounds = [floatToGoString(b) for b in self.core.get("duration_buckets_s", ())] + ["+Inf"]
        for outcome, figures in self.core.get("duration", {}).items():
            buckets = list(zip(bounds, figures["buckets"], strict=True))
            duration.add_metric([outcome], buckets, sum_value=figures["sum"])
        yield duration
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
        yield CounterMetricFamily(
            "dtmf_auth_failures", "Requests refused 401 (missing or wrong API key)", self.core.get("auth_failures", 0)
        )
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
    return PrometheusExporter() if name == "prometheus" else None

"""Metrics exporter ``statsd``: counters and a timer over UDP (STATSD_HOST, STATSD_PORT, STATSD_PREFIX)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import statsd as statsd_client

from dtmf_service import hookimpl
from dtmf_service.metrics import outcome_category


class StatsdExporter:
    """One datagram per request (a pipeline), names as CONTRACT.md section 7."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        # StatsClient (UDP) is thread safe; a Pipeline is not, so each record() builds its own.
        self.client = statsd_client.StatsClient(
            config["STATSD_HOST"], int(config["STATSD_PORT"]), prefix=config["STATSD_PREFIX"] or None
        )

    def record(self, event: dict[str, Any]) -> None:
        category = outcome_category(event["outcome"])
        if category is None:
            return
        with self.client.pipeline() as pipe:
            pipe.incr("total_submissions")
            pipe.incr(category)
            if category == "successful_parses":
                pipe.timing("latency_ms", float(event["latency_ms"]))
            if event.get("cxone_status") is not None:
                pipe.incr(f"cxone_status.{int(event['cxone_status'])}")

    def close(self) -> None:
        self.client.close()


@hookimpl
def dtmf_metrics_exporter(name: str, config: Mapping[str, Any]) -> StatsdExporter | None:
    return StatsdExporter(config) if name == "statsd" else None

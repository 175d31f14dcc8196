"""Metrics exporter ``memory``: the exact cross-worker totals behind GET /api/metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dtmf_service import hookimpl
from dtmf_service.events import outcome_category
from dtmf_service.metrics import shared_counters


class MemoryExporter:
    """Adds each event to this process's counter file in METRICS_DIR."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.counters = shared_counters(config["METRICS_DIR"])

    def record(self, event: dict[str, Any]) -> None:
        category = outcome_category(event["outcome"])
        if category is None:
            return
        amounts = {category: 1.0}
        if category == "successful_parses":
            amounts["latency_ms_sum"] = float(event["latency_ms"])
        self.counters.add_many(amounts)


@hookimpl
def dtmf_metrics_exporter(name: str, config: Mapping[str, Any]) -> MemoryExporter | None:
    return MemoryExporter(config) if name == "memory" else None

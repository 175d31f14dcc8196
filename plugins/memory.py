"""Metrics exporter ``memory``: serves GET /api/metrics (CONTRACT.md section 4) as JSON.

It keeps nothing of its own: the core counts every request in its shared counters
(dtmf_service.metrics), exact across every gunicorn worker, whichever exporters are enabled.
Enabling ``memory`` is what makes the endpoint answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dtmf_service import hookimpl


class MemoryExporter:
    """The JSON view of the core's counters; there is nothing to do per event."""

    def record(self, event: dict[str, Any]) -> None:
        pass


@hookimpl
def dtmf_metrics_exporter(name: str, config: Mapping[str, Any]) -> MemoryExporter | None:
    return MemoryExporter() if name == "memory" else None

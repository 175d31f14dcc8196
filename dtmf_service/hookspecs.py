"""Hook markers and every hook specification of the plugin-facing API.

Stable: plugin authors write against these. More may be added; these may not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pluggy

PROJECT = "dtmf_service"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> Any:
    """Return the audit sink called ``name`` (an object with ``deliver(event)``), or None if not this plugin's."""


@hookspec(firstresult=True)
def dtmf_metrics_exporter(name: str, config: Mapping[str, Any]) -> Any:
    """Return the metrics exporter called ``name`` (an object with ``record(event)``), or None if not this plugin's."""

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


class DeliveryIncomplete(Exception):  # noqa: N818 - a plugin-facing name, read as "delivery was incomplete"
    """Raised by a sink's ``deliver_many(events)`` when only some events were delivered.

    ``undelivered`` lists the events to try again; the rest count as delivered and are not sent
    again. Raise it ``from`` the first underlying error so the log names the cause. Any other
    exception from ``deliver_many`` means that none of the batch counts as delivered.
    """

    def __init__(self, undelivered: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(undelivered)} event(s) not delivered")
        self.undelivered = undelivered


@hookspec(firstresult=True)
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> Any:
    """Return the audit sink called ``name`` (an object with ``deliver(event)``), or None if not this plugin's."""


@hookspec(firstresult=True)
def dtmf_metrics_exporter(name: str, config: Mapping[str, Any]) -> Any:
    """Return the metrics exporter called ``name`` (an object with ``record(event)``), or None if not this plugin's."""


@hookspec
def dtmf_config_keys() -> Any:
    """Return the names of the configuration keys this plugin reads (an iterable of strings).

    Keys nobody declares stop start-up, so a plugin must declare its own (CONTRACT.md section 8).
    """

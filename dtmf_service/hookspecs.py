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
    again. ``rejected`` (a subset of ``undelivered``) lists those the receiver refused for good:
    after AUDIT_RETRY_ATTEMPTS tries they become dead letters instead of being tried for ever.
    Raise it ``from`` the first underlying error so the log names the cause. Any other exception
    from ``deliver_many`` means that none of the batch counts as delivered.
    """

    def __init__(self, undelivered: list[dict[str, Any]], rejected: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{len(undelivered)} event(s) not delivered")
        self.undelivered = undelivered
        self.rejected = rejected or []


class DeliveryRejected(Exception):  # noqa: N818 - a plugin-facing name: "the delivery was rejected"
    """Raised by a sink's ``deliver(event)`` when the receiver refuses the event for good (the
    webhook: a 4xx other than 408, 425 and 429). After AUDIT_RETRY_ATTEMPTS tries the core sets it
    aside as a dead letter (CONTRACT.md section 7), so it never blocks the events behind it."""


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

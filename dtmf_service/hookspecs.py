"""The whole plugin-facing API: hook markers, hook specifications, and the interfaces of what
the hooks return (audit sinks, metrics exporters) as ``typing.Protocol``s.

Stable: plugin authors write against these. More may be added; these may not change.
A plugin needs no import from here to conform: any object with these methods will do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class AuditSink(Protocol):
    """Delivers audit events (CONTRACT.md section 7) to one destination.

    A sink never queues, retries or spools: the core's outbox does, and calls ``deliver`` again
    for what was not delivered. Return normally only once the event is delivered; raise
    DeliveryRejected when it never will be, any other exception when it may be later. The event is
    a dict; ``dtmf_service.event_json(event)`` gives its stored compact JSON. An optional
    ``close()`` is called once at shutdown.
    """

    def deliver(self, event: dict[str, Any]) -> None: ...


@runtime_checkable
class BatchAuditSink(AuditSink, Protocol):
    """A sink that can take a whole batch at once (the webhook): ``deliver_many`` is then used
    instead of ``deliver``; a partial delivery raises DeliveryIncomplete."""

    def deliver_many(self, events: list[dict[str, Any]]) -> None: ...


@runtime_checkable
class MetricsExporter(Protocol):
    """Receives each counted request's audit event (digits already redacted), after the answer is
    built and before it is sent: keep ``record`` quick and never block on the network. An optional
    ``close()`` is called once at shutdown."""

    def record(self, event: dict[str, Any]) -> None: ...


@runtime_checkable
class RenderingExporter(MetricsExporter, Protocol):
    """An exporter scraped over HTTP (``prometheus``: GET /metrics). ``render`` receives the core's
    own figures (dtmf_service.metrics.Metrics.core_figures) and returns the whole exposition."""

    content_type: str

    def render(self, core: Mapping[str, Any]) -> bytes: ...


@runtime_checkable
class Closeable(Protocol):
    def close(self) -> None: ...


@hookspec(firstresult=True)
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> AuditSink | None:
    """Return the audit sink called ``name``, or None if it is not this plugin's."""


@hookspec(firstresult=True)
def dtmf_metrics_exporter(name: str, config: Mapping[str, Any]) -> MetricsExporter | None:
    """Return the metrics exporter called ``name``, or None if it is not this plugin's."""


@hookspec
def dtmf_config_keys() -> Iterable[str]:
    """Return the names of the configuration keys this plugin reads: an iterable of strings, or a
    mapping of name to kind (``"str"``, or ``"secret"`` for a value check-config must mask).

    Keys nobody declares stop start-up, so a plugin must declare its own (CONTRACT.md section 8).
    """
    return ()

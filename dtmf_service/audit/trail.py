"""The audit trail of requests (CONTRACT.md section 7): a placeholder before the DTMF POST, the
event after; each durable in the outbox before the caller is answered, then delivered to every
sink by ``DeliveryEngine``. Metrics exporters receive the same event, built once.

Audit trouble never changes a caller's answer: a failure is logged and counted, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from dtmf_service.audit.delivery import DeliveryEngine
from dtmf_service.audit.event import Redactor, build_event, finish_event
from dtmf_service.audit.outbox import Outbox
from dtmf_service.hookspecs import MetricsExporter
from dtmf_service.metrics import Metrics
from dtmf_service.outcome import Facts, Intent, Outcome, RequestContext
from dtmf_service.pluginmanager import close_plugin

log = logging.getLogger("dtmf_service")


class AuditTrail:
    """Builds each counted request's event once; hands it to every exporter and to the outbox."""

    def __init__(
        self,
        redactor: Redactor,
        exporters: Mapping[str, MetricsExporter],
        outbox: Outbox | None,
        delivery: DeliveryEngine | None,
        metrics: Metrics,
        intent_lease_s: float,
    ) -> None:
        self.redactor = redactor
        self.exporters = exporters
        self.outbox = outbox  # None when no sink is configured: then a request writes nothing at all
        self.delivery = delivery
        self._metrics = metrics
        self._intent_lease_s = intent_lease_s

    def intend(self, facts: Facts, ctx: RequestContext) -> Intent | None:
        """Before the DTMF POST: a durable placeholder, so that a worker killed before answering still
        leaves an audit event (``submission_unknown``) behind."""
        if self.outbox is None:
            return None
        try:
            event = self._build(facts, ctx, "submission_unknown", None, None, None)
            return Intent(self.outbox.intend(event, self._intent_lease_s), event)
        except Exception as exc:  # noqa: BLE001 - audit trouble never stops the caller's request
            self._metrics.audit_outbox_error()
            log.error("audit outbox: could not write a request's placeholder (%s)", type(exc).__name__)
            return None

    def record(self, outcome: Outcome, ctx: RequestContext) -> dict[str, Any]:
        """The event of a counted request: to every exporter, then durable in the outbox."""
        try:
            event = self._event(outcome, ctx)
        except Exception as exc:  # noqa: BLE001 - the answer stands; the event is recorded without what broke it
            log.error("request %s: audit event could not be built (%s)", ctx.request_id, type(exc).__name__)
            bare = replace(outcome.facts, sent=None, invalid_fields=frozenset())
            event = self._build(
                bare, ctx, outcome.status, outcome.latency_ms, outcome.cxone_status, outcome.cxone_response
            )
        for name, exporter in self.exporters.items():
            try:
                exporter.record(event)
            except Exception as exc:  # noqa: BLE001 - one exporter failing never stops another
                log.error("metrics exporter %r failed: %s", name, type(exc).__name__)
        if self.outbox is not None:
            ticket = outcome.intent.ticket if outcome.intent is not None else None
            try:
                self.outbox.commit(event, ticket)  # durable before the response leaves this worker
            except Exception as exc:  # noqa: BLE001 - the caller still gets the answer; the loss is counted
                self._metrics.audit_lost()
                log.error("audit outbox: could not write an event (%s); it is lost", type(exc).__name__)
            else:
                if self.delivery is not None:  # else the host's delivery process polls the outbox
                    self.delivery.start()
                    self.delivery.notify()
        return event

    def _event(self, outcome: Outcome, ctx: RequestContext) -> dict[str, Any]:
        facts, intent = outcome.facts, outcome.intent
        if intent is not None and facts.valid is not None:
            # The placeholder already holds every field of the request: finish it, do not build again.
            return finish_event(intent.event, facts.valid, outcome.latency_ms, outcome.cxone_status,
                                outcome.cxone_response, outcome.status, self.redactor)  # fmt: skip
        return self._build(facts, ctx, outcome.status, outcome.latency_ms, outcome.cxone_status, outcome.cxone_response)

    def _build(
        self,
        facts: Facts,
        ctx: RequestContext,
        status: str,
        latency_ms: float | None,
        cxone_status: int | None,
        cxone_response: str | None,
    ) -> dict[str, Any]:
        return build_event(
            client_ip=ctx.client_ip,
            sent=facts.sent,
            valid=facts.valid,
            invalid_fields=facts.invalid_fields,
            latency_ms=latency_ms,
            cxone_status=cxone_status,
            cxone_response=cxone_response,
            outcome=status,
            redactor=self.redactor,
            request_id=ctx.request_id,
            event_id=facts.event_id,
            trace_id=ctx.trace_id,
        )

    def close(self, timeout_s: float) -> None:
        """Stop delivery (every event is already in the outbox) and close the exporters."""
        if self.delivery is not None:
            self.delivery.stop(timeout_s)
        if self.outbox is not None:
            self.outbox.close()
        for name, exporter in self.exporters.items():
            close_plugin(exporter, f"metrics exporter {name!r}")

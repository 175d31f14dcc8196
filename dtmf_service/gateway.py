"""The per-application state: client, plugins, counters, delivery. Kept in app.extensions["dtmf"]."""

from __future__ import annotations

import hashlib
import hmac
import logging
import tempfile
from typing import TYPE_CHECKING, Any

from flask import Request, Response, g

from . import metrics as shared_metrics
from .auth import TokenCache
from .config import is_sandbox, reject_unknown, request_deadline_s
from .cxone import CXoneClient
from .delivery import DeliveryEngine
from .dialects import make_dialect
from .errors import error_response
from .events import Redactor, build_event, finish_event
from .idempotency import LEASE_MARGIN_S, Idempotency
from .outbox import open_outbox
from .pluginmanager import build_plugin_manager, close_plugin, plugin_config_keys, resolve
from .simulator import Simulator
from .transport import HttpTransport, SimulatorTransport, Transport

if TYPE_CHECKING:
    from .api import Attempt

log = logging.getLogger("dtmf_service")

CORE_COUNTERS = ("successful_parses", "validation_failures", "submission_failures", "latency_ms_sum")
ATTEMPT_RESULTS = ("2xx", "4xx", "429", "5xx", "not_sent", "unknown")


class Gateway:
    """Everything one application instance needs to serve a request."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.max_body = int(config["MAX_CONTENT_LENGTH"])
        self.mode = "sandbox" if is_sandbox(config) else "cxone"
        self.simulator = Simulator("http://cxone-sandbox.invalid") if self.mode == "sandbox" else None
        self.transport: Transport = (
            SimulatorTransport(self.simulator)
            if self.simulator is not None
            else HttpTransport(
                float(config["CXONE_CONNECT_TIMEOUT_S"]),
                float(config["CXONE_READ_TIMEOUT_S"]),
                ca_bundle=config.get("CXONE_CA_BUNDLE"),
            )
        )
        dialect = make_dialect(config, self.transport)
        tokens = TokenCache(
            dialect.fetch_token,
            margin_s=float(config["CXONE_TOKEN_REFRESH_MARGIN_S"]),
            on_fetch=lambda result: self.counters.inc(f"cxone_token_fetches.{result}"),
        )
        self.client = CXoneClient(
            config,
            dialect,
            self.transport,
            tokens,
            on_attempt=lambda result: self.counters.inc(f"cxone_attempts.{result}"),
        )
        self.redactor = Redactor(config)
        self._api_keys = [k.encode() for k in config["API_KEYS"]]
        if not config.get("METRICS_DIR"):
            # Outside gunicorn (tests, flask run) each application counts on its own.
            config["METRICS_DIR"] = tempfile.mkdtemp(prefix="dtmf-metrics-")
        self.counters = shared_metrics.shared_counters(config["METRICS_DIR"])
        self.counters.declare(CORE_COUNTERS)
        self.counters.declare([f"cxone_attempts.{r}" for r in ATTEMPT_RESULTS])
        self.counters.declare([f"cxone_token_fetches.{r}" for r in ("ok", "error")])
        self.plugins = build_plugin_manager(config)
        reject_unknown(config, plugin_config_keys(self.plugins))
        self.exporters = resolve(self.plugins, "exporter", config["METRICS_EXPORTERS"], config)
        sinks = resolve(self.plugins, "sink", config["AUDIT_SINKS"], config)
        # No sink, no outbox: with audit off a request writes nothing at all.
        self.outbox = open_outbox(config, sinks) if sinks else None
        self.delivery = DeliveryEngine(sinks, self.outbox, config, self.counters) if self.outbox else None
        self._intent_lease_s = request_deadline_s(config) + LEASE_MARGIN_S
        if config.get("AUDIT_QUEUE_SIZE") is not None:
            log.warning("AUDIT_QUEUE_SIZE is deprecated and ignored: events go straight to the outbox")
        self.counters.declare(["idempotency_store_errors", "audit_dropped", "audit_outbox_errors"])
        self.idempotency = Idempotency.from_config(
            config, on_store_error=lambda: self.counters.inc("idempotency_store_errors")
        )
        self._openapi: dict[str, Any] | None = None
        self._closed = False

    # -- callers -------------------------------------------------------------------------------
    def authenticate(self, request: Request) -> Response | None:
        """None when the caller may proceed, else the 401 response."""
        if not self._api_keys:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and presented:
            candidate = presented.strip().encode()
            matched = False
            for key in self._api_keys:  # every key compared, in constant time each: no early exit to time
                matched |= hmac.compare_digest(candidate, key)
            if matched:
                # The caller's identity (idempotency scope): a hash of the key, never the key in clear.
                g.caller = hashlib.sha256(candidate).hexdigest()[:32]
                return None
        return error_response(
            401,
            "unauthorized",
            "missing or invalid API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": 'Bearer realm="dtmf-gateway"'},
        )

    # -- audit and metrics ---------------------------------------------------------------------
    def _event(self, attempt: Attempt, client_ip: str | None, latency_ms: float | None, outcome: str) -> dict:
        return build_event(
            client_ip=client_ip,
            sent=attempt.sent,
            valid=attempt.valid,
            invalid_fields=attempt.invalid_fields,
            latency_ms=latency_ms,
            cxone_status=attempt.cxone_status,
            cxone_response=attempt.cxone_response,
            outcome=outcome,
            redactor=self.redactor,
            request_id=g.get("request_id"),
            event_id=attempt.event_id,
            trace_id=g.get("trace_id"),
        )

    def intend(self, attempt: Attempt, client_ip: str | None) -> None:
        """Before the DTMF POST: a durable placeholder, so that a worker killed before answering still
        leaves an audit event (``submission_unknown``) behind (CONTRACT.md section 7)."""
        if self.outbox is None:
            return
        try:
            attempt.audit_event = self._event(attempt, client_ip, None, "submission_unknown")
            attempt.audit_ticket = self.outbox.intend(attempt.audit_event, self._intent_lease_s)
        except Exception as exc:  # noqa: BLE001 - audit trouble never stops the caller's request
            self.counters.inc("audit_outbox_errors")
            log.error("audit outbox: could not write a request's placeholder (%s)", type(exc).__name__)

    def record(self, attempt: Attempt, client_ip: str | None, latency_ms: float) -> dict[str, Any]:
        """Build the audit event once, hand it to every exporter, make it durable in the outbox."""
        outcome = attempt.outcome or "internal_error"
        if attempt.audit_event is not None and attempt.valid is not None:
            # The placeholder already holds every field of the request: finish it, do not build again.
            event = finish_event(attempt.audit_event, attempt.valid, latency_ms, attempt.cxone_status,
                                 attempt.cxone_response, outcome, self.redactor)  # fmt: skip
        else:
            event = self._event(attempt, client_ip, latency_ms, outcome)
        for name, exporter in self.exporters.items():
            try:
                exporter.record(event)
            except Exception as exc:  # noqa: BLE001 - one exporter failing never stops another
                log.error("metrics exporter %r failed: %s", name, type(exc).__name__)
        if self.outbox is not None and self.delivery is not None:
            try:
                self.outbox.commit(event, attempt.audit_ticket)  # durable before the response leaves this worker
            except Exception as exc:  # noqa: BLE001 - the caller still gets the answer; the loss is counted
                self.counters.add_many({"audit_dropped": 1.0, "audit_outbox_errors": 1.0})
                log.error("audit outbox: could not write an event (%s); it is lost", type(exc).__name__)
            else:
                self.delivery.start()
                self.delivery.notify()
        return event

    def metrics_snapshot(self) -> dict[str, Any] | None:
        if "memory" not in self.exporters:
            return None
        totals = self.counters.totals()
        ok = int(totals.get("successful_parses", 0))
        bad = int(totals.get("validation_failures", 0))
        failed = int(totals.get("submission_failures", 0))
        total = ok + bad + failed
        snapshot: dict[str, Any] = {
            "total_submissions": total,
            "successful_parses": ok,
            "validation_failures": bad,
            "submission_failures": failed,
            "average_latency_ms": round(totals.get("latency_ms_sum", 0.0) / ok, 3) if ok else None,
            "accuracy_rate": ok / total if total else None,
        }
        if self.delivery is not None:
            snapshot.update(self.delivery.metrics(totals))
        else:
            snapshot.update(
                {"audit_pending": 0, "audit_dropped": int(totals.get("audit_dropped", 0)), "audit_sinks": {}}
            )
        snapshot["idempotency_store_errors"] = int(totals.get("idempotency_store_errors", 0))
        snapshot["audit_outbox_errors"] = int(totals.get("audit_outbox_errors", 0))
        return snapshot

    def core_figures(self) -> dict[str, Any]:
        """Figures only the core knows, for exporters that serve them (Prometheus): CXone attempts and
        token fetches by result (exact across workers), and the audit backlog per sink."""
        totals = self.counters.totals()
        audit = self.delivery.metrics(totals)["audit_sinks"] if self.delivery is not None else {}
        return {
            "cxone_attempts": {r: int(totals.get(f"cxone_attempts.{r}", 0)) for r in ATTEMPT_RESULTS},
            "cxone_token_fetches": {r: int(totals.get(f"cxone_token_fetches.{r}", 0)) for r in ("ok", "error")},
            "audit_sinks": audit,
        }

    def openapi_document(self) -> dict[str, Any]:
        if self._openapi is None:
            from .openapi import build_document

            self._openapi = build_document(self.config)
        return self._openapi

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop audit delivery (every event is already in the outbox) and close plugins; once."""
        if self._closed:
            return
        self._closed = True
        if self.delivery is not None:
            self.delivery.stop(timeout_s)
        if self.outbox is not None:
            self.outbox.close()
        for name, exporter in self.exporters.items():
            close_plugin(exporter, f"metrics exporter {name!r}")
        self.idempotency.close()
        self.transport.close()

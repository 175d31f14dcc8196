"""The one place where the parts are built and connected, from a finished configuration.

    config -> plugins -> metrics -> CXone client -> audit (outbox, delivery, trail)
           -> idempotency -> ParseService

``create_app`` keeps the result in ``app.extensions["dtmf"]``; the views read it from there.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dtmf_service.audit.delivery import DeliveryEngine
from dtmf_service.audit.event import Redactor
from dtmf_service.audit.outbox import Outbox, open_outbox
from dtmf_service.audit.trail import AuditTrail
from dtmf_service.config import reject_unknown, request_lease_s
from dtmf_service.cxone.client import CXoneClient
from dtmf_service.hookspecs import MetricsExporter
from dtmf_service.idempotency import Idempotency
from dtmf_service.metrics import Metrics
from dtmf_service.parse import ParseService
from dtmf_service.pluginmanager import (
    build_plugin_manager,
    check_plugins,
    plugin_config_keys,
    resolve_exporters,
    resolve_sinks,
)
from dtmf_service.simulator import Simulator
from dtmf_service.web import apikeys
from dtmf_service.web.security import Authenticator

log = logging.getLogger("dtmf_service")


@dataclass
class Components:
    """Everything one application serves requests with."""

    config: dict[str, Any]
    mode: str  # "sandbox" | "cxone" (GET /healthz)
    max_body: int
    authenticator: Authenticator
    metrics: Metrics
    exporters: Mapping[str, MetricsExporter]
    client: CXoneClient
    trail: AuditTrail
    idempotency: Idempotency
    parser: ParseService
    api_keys_stale: str | None = None  # API_KEYS_FILE not reloaded: why (GET /healthz says so)
    _closed: bool = False

    @property
    def simulator(self) -> Simulator | None:
        """Sandbox mode's in-process CXone."""
        return self.client.simulator

    @property
    def outbox(self) -> Outbox | None:
        return self.trail.outbox

    @property
    def delivery(self) -> DeliveryEngine | None:
        return self.trail.delivery

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop audit delivery, close plugins, stores and connections; once."""
        if self._closed:
            return
        self._closed = True
        self.trail.close(timeout_s)
        self.idempotency.close()
        self.client.close()


@dataclass
class OperatorComponents:
    """What the operator CLI works with: the finished configuration and nothing the service owns.
    Building it creates no file (no outbox, spool, journal, metrics directory or idempotency
    store): each command opens what already exists (CONTRACT.md section 11 rev 3)."""

    config: dict[str, Any]
    mode: str
    sinks: tuple[str, ...]

    def close(self, timeout_s: float = 10.0) -> None:
        pass


def build_delivery(config: dict[str, Any]) -> tuple[DeliveryEngine, Outbox]:
    """The host's delivery process (delivery_process.py): the sinks, the outbox, the engine."""
    plugins = build_plugin_manager(config)
    reject_unknown(config, plugin_config_keys(plugins))
    sinks = resolve_sinks(plugins, config["AUDIT_SINKS"], config)
    metrics = Metrics(config["METRICS_DIR"] or tempfile.mkdtemp(prefix="dtmf-metrics-"))
    outbox = open_outbox(config, sinks)
    return DeliveryEngine(sinks, outbox, config, metrics), outbox


def build_operator(config: dict[str, Any]) -> OperatorComponents:
    """Check the configuration as start-up does (every plugin's factory runs and is closed again:
    a bad plugin setting fails here too), for a command that serves no request."""
    check_plugins(config)
    return OperatorComponents(
        config=config,
        mode="sandbox" if config["SANDBOX"] else "cxone",
        sinks=tuple(dict.fromkeys(config["AUDIT_SINKS"])),
    )


def build(config: dict[str, Any], deliver: bool = True) -> Components:
    """Build every part the configuration describes (``config`` is finished: config.finalise).

    ``deliver``: this process delivers its own audit events (tests, ``flask run``); under a server's
    lifecycle the host's delivery process does (lifecycle.py), and the sinks are not built here."""
    plugins = build_plugin_manager(config)
    reject_unknown(config, plugin_config_keys(plugins))
    exporters = resolve_exporters(plugins, config["METRICS_EXPORTERS"], config)
    sink_names = tuple(dict.fromkeys(config["AUDIT_SINKS"]))
    if not config.get("METRICS_DIR"):
        # Outside a server's lifecycle (tests, flask run) each application counts on its own.
        config["METRICS_DIR"] = tempfile.mkdtemp(prefix="dtmf-metrics-")
    metrics = Metrics(config["METRICS_DIR"])
    client = CXoneClient.from_config(config, on_attempt=metrics.cxone_attempt, on_token_fetch=metrics.token_fetch)
    # No sink, no outbox: with audit off a request writes nothing at all. The outbox routes by name.
    outbox = open_outbox(config, sink_names) if sink_names else None
    delivery = None
    if outbox is not None:
        if deliver:
            delivery = DeliveryEngine(resolve_sinks(plugins, config["AUDIT_SINKS"], config), outbox, config, metrics)
        for name in sink_names:
            metrics.sink(name)  # counted by whichever process delivers, reported by every worker
        metrics.watch_outbox(outbox)
    if config.get("AUDIT_QUEUE_SIZE") is not None:
        log.warning("AUDIT_QUEUE_SIZE is deprecated and ignored: events go straight to the outbox")
    trail = AuditTrail(Redactor(config), exporters, outbox, delivery, metrics, request_lease_s(config))
    idempotency = Idempotency.from_config(config, on_store_error=metrics.idempotency_store_error)
    if config["API_KEYS_FILE"] and not config["API_KEYS"]:
        log.error("API_KEYS_FILE %s holds no key: every caller is refused", config["API_KEYS_FILE"])
    return Components(
        config=config,
        mode="sandbox" if config["SANDBOX"] else "cxone",
        max_body=int(config["MAX_CONTENT_LENGTH"]),
        authenticator=Authenticator(config["API_KEYS"], required=bool(config["API_KEYS_FILE"])),
        metrics=metrics,
        exporters=exporters,
        client=client,
        trail=trail,
        idempotency=idempotency,
        parser=ParseService(client, idempotency, trail),
        api_keys_stale=apikeys.stale_reason(config["API_KEYS_FILE"]) if config["API_KEYS_FILE"] else None,
    )

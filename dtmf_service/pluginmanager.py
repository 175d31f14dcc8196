"""The plugin manager: built-ins, then PLUGINS modules, then the entry-point group.

Built one per application (never a global), so tests and several apps in one
process do not share registrations.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any

import pluggy

from dtmf_service import hookspecs
from dtmf_service.config import ConfigError, reject_unknown
from dtmf_service.hookspecs import AuditSink, Closeable, MetricsExporter

log = logging.getLogger("dtmf_service")

# The built-in plugins ship in the repository's plugins/ folder, installed as
# dtmf_service.builtin_plugins (setup.cfg package_dir) so that the generic
# top-level name "plugins" never has to be importable in site-packages.
DEFAULT_PLUGINS = ("memory", "statsd", "prometheus", "file", "webhook", "syslog")


def _import_builtin(name: str) -> Any:
    try:
        return importlib.import_module(f"dtmf_service.builtin_plugins.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("dtmf_service.builtin_plugins", f"dtmf_service.builtin_plugins.{name}"):
            raise
    # Running from a source checkout that was never installed: the folder itself.
    return importlib.import_module(f"plugins.{name}")


def build_plugin_manager(config: Mapping[str, Any]) -> pluggy.PluginManager:
    """A plugin manager with every plugin registered and every hook checked."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(_import_builtin(name), name=f"builtin.{name}")
    for module_name in config.get("PLUGINS") or []:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"PLUGINS: cannot import {module_name!r} ({type(exc).__name__})") from None
        if pm.is_registered(module):
            continue
        try:
            pm.register(module, name=module_name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"PLUGINS: plugin {module_name!r} is invalid: {exc}".splitlines()[0]) from None
    try:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        # A misspelt hook name in any plugin fails here, loudly, not silently at run time.
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"PLUGINS: invalid plugin: {exc}".splitlines()[0]) from None
    return pm


def plugin_config_keys(pm: pluggy.PluginManager) -> set[str]:
    """Every configuration key that some plugin declares."""
    keys: set[str] = set()
    for declared in pm.hook.dtmf_config_keys():
        keys.update(str(name) for name in declared or ())
    return keys


def resolve_sinks(pm: pluggy.PluginManager, names: list[str], config: Mapping[str, Any]) -> dict[str, AuditSink]:
    """Ask the plugins for each named audit sink; an unknown name stops start-up."""
    found: dict[str, AuditSink] = {}
    for name in dict.fromkeys(names):
        found[name] = _checked(pm.hook.dtmf_audit_sink(name=name, config=config), name, "AUDIT_SINKS", "deliver")
    return found


def resolve_exporters(
    pm: pluggy.PluginManager, names: list[str], config: Mapping[str, Any]
) -> dict[str, MetricsExporter]:
    """Ask the plugins for each named metrics exporter; an unknown name stops start-up."""
    found: dict[str, MetricsExporter] = {}
    for name in dict.fromkeys(names):
        found[name] = _checked(pm.hook.dtmf_metrics_exporter(name=name, config=config), name, "METRICS_EXPORTERS",
                               "record")  # fmt: skip
    return found


def _checked(instance: Any, name: str, key: str, method: str) -> Any:
    """The hook's answer, if it has the Protocol's methods (hookspecs.py), each callable."""
    if instance is None:
        raise ConfigError(f"{key}: no plugin provides {name!r}")
    for required in (method, *(m for m in ("deliver_many", "close") if hasattr(instance, m))):
        if not callable(getattr(instance, required, None)):
            raise ConfigError(f"{key}: the plugin for {name!r} returned an object without {required}()")
    return instance


def close_plugin(instance: object, what: str) -> None:
    """Call a sink's or exporter's optional close(); a failure is logged, never raised."""
    if not isinstance(instance, Closeable):
        return
    try:
        instance.close()
    except Exception as exc:  # noqa: BLE001 - one plugin failing to close never stops the others
        log.error("%s failed to close: %s", what, type(exc).__name__)


def check_plugins(config: Mapping[str, Any]) -> None:
    """Resolve every configured sink and exporter once, then close them: fail before forking workers."""
    pm = build_plugin_manager(config)
    reject_unknown(config, plugin_config_keys(pm))
    sinks = resolve_sinks(pm, list(config.get("AUDIT_SINKS") or []), config)
    exporters = resolve_exporters(pm, list(config.get("METRICS_EXPORTERS") or []), config)
    for instance in [*sinks.values(), *exporters.values()]:
        if isinstance(instance, Closeable):
            instance.close()

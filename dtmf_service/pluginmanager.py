"""The plugin manager: built-ins, then PLUGINS modules, then the entry-point group.

Built one per application (never a global), so tests and several apps in one
process do not share registrations.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
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


def plugin_config_keys(pm: pluggy.PluginManager) -> dict[str, str]:
    """Every configuration key that some plugin declares, with its kind: ``dtmf_config_keys`` returns
    names (kind ``str``), or a mapping of name to kind (``"secret"`` is masked by check-config)."""
    keys: dict[str, str] = {}
    for declared in pm.hook.dtmf_config_keys():
        kinds = declared if isinstance(declared, Mapping) else dict.fromkeys(declared or (), "str")
        keys.update({str(name): str(kind) for name, kind in kinds.items()})
    return keys


def resolve_sinks(pm: pluggy.PluginManager, names: list[str], config: Mapping[str, Any]) -> dict[str, AuditSink]:
    """Ask the plugins for each named audit sink; an unknown name stops start-up."""
    found: dict[str, AuditSink] = {}
    for name in dict.fromkeys(names):
        made = _made(lambda n=name: pm.hook.dtmf_audit_sink(name=n, config=config), name, "AUDIT_SINKS")
        found[name] = _checked(made, name, "AUDIT_SINKS", "deliver")
    return found


def resolve_exporters(
    pm: pluggy.PluginManager, names: list[str], config: Mapping[str, Any]
) -> dict[str, MetricsExporter]:
    """Ask the plugins for each named metrics exporter; an unknown name stops start-up."""
    found: dict[str, MetricsExporter] = {}
    for name in dict.fromkeys(names):
        made = _made(lambda n=name: pm.hook.dtmf_metrics_exporter(name=n, config=config), name, "METRICS_EXPORTERS")
        found[name] = _checked(made, name, "METRICS_EXPORTERS", "record")
    return found


def _made(factory: Any, name: str, key: str) -> Any:
    """A factory's answer; its failure becomes one line naming the plugin (CONTRACT.md section 7,
    *rev 3*): the plugin's own ConfigError as it says, anything else by its type only (a message
    could hold a setting's secret value), never a traceback."""
    try:
        return factory()
    except ConfigError as exc:
        raise ConfigError(f"{key}: the plugin for {name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a plugin bug must still stop start-up with one line
        raise ConfigError(
            f"{key}: the plugin for {name!r} failed to start ({type(exc).__name__}); "
            "a plugin reports a bad setting by raising dtmf_service.ConfigError"
        ) from None


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


def check_plugins_isolated() -> None:
    """check_plugins in a child process, on the configuration of this process's environment.

    The gunicorn master runs this before forking: it never imports a plugin's module itself, so
    after ``pip install`` of a new version, a graceful reload (``kill -HUP``) runs the new version
    in every new worker (CONTRACT.md section 7, *rev 3*). The child's one-line error is raised here.
    """
    done = subprocess.run(
        [sys.executable, "-c", "from dtmf_service.pluginmanager import _check_main; _check_main()"],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ConfigError(lines[-1] if lines else f"the plugin check failed (exit {done.returncode})")


def _check_main() -> None:
    from dtmf_service import config as cfg

    probe: dict[str, Any] = {}
    try:
        cfg.load_sources(probe)
        cfg.finalise(probe)
        check_plugins(probe)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(4) from None


def check_plugins(config: Mapping[str, Any]) -> None:
    """Resolve every configured sink and exporter once, then close them: fail before forking workers."""
    pm = build_plugin_manager(config)
    reject_unknown(config, plugin_config_keys(pm))
    sinks = resolve_sinks(pm, list(config.get("AUDIT_SINKS") or []), config)
    exporters = resolve_exporters(pm, list(config.get("METRICS_EXPORTERS") or []), config)
    for instance in [*sinks.values(), *exporters.values()]:
        if isinstance(instance, Closeable):
            instance.close()

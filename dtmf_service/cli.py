"""Operator commands (CONTRACT.md section 11): ``flask --app app dtmf ...`` or ``dtmf-gateway ...``.

They load the configuration exactly as start-up does and work on the same audit outbox as the
running service, while it runs. Audit events are shown as they are stored, that is with digits
already redacted as AUDIT_DIGITS and AUDIT_SENSITIVE_KEYS say; secrets are masked.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup, FlaskGroup

from dtmf_service import config as cfg

dtmf = AppGroup("dtmf", help="DTMF gateway operator commands.")
audit = AppGroup("audit", help="The audit outbox: backlog, dead letters, re-delivery.")
dtmf.add_command(audit)


def _components() -> Any:
    return current_app.extensions["dtmf"]


def _outbox() -> Any:
    components = _components()
    if components.outbox is None:
        raise click.ClickException("no audit sink is configured (AUDIT_SINKS): there is no outbox")
    return components.outbox


@dtmf.command("check-config")
@click.option("--json", "as_json", is_flag=True, help="Print the effective values as JSON.")
def check_config(as_json: bool) -> None:
    """Load the configuration as start-up does; print the effective values, secrets masked.

    A bad value or an unknown key stops the app from loading: the command then exits non-zero with
    one line naming the key (as start-up would).
    """
    from dtmf_service.pluginmanager import build_plugin_manager, plugin_config_keys

    config = current_app.config
    kinds = {name: key.kind for name, key in cfg.KEYS.items()}
    # The keys plugins declare, masked by their declared kind (CONTRACT.md section 7, *rev 3*).
    kinds.update({k: v for k, v in plugin_config_keys(build_plugin_manager(config)).items() if k not in kinds})
    values = {}
    for name, kind in sorted(kinds.items()):
        values[name] = cfg.shown_value(name, config.get(name), kind)  # secrets and URL passwords masked
    if as_json:
        click.echo(json.dumps(values, indent=2, default=str))
    else:
        width = max(len(name) for name in values)
        for name, value in values.items():
            shown = ",".join(map(str, value)) if isinstance(value, list) else ("" if value is None else value)
            click.echo(f"{name:<{width}}  {shown}")
        click.echo(f"configuration OK ({_components().mode} mode)", err=True)


@audit.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def audit_status(as_json: bool) -> None:
    """Per sink: pending events, age of the oldest, dead letters, dropped."""
    backlog = _outbox().backlog()
    rows = {
        sink: {
            "pending": b.pending,
            "oldest_pending_s": b.oldest_pending_s,
            "dead_letters": b.dead_letters,
            "dropped": b.dropped,
        }
        for sink, b in backlog.items()
    }
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'sink':<12} {'pending':>8} {'oldest':>10} {'dead letters':>13} {'dropped':>8}")
    for sink, row in rows.items():
        oldest = f"{row['oldest_pending_s']:.1f} s" if row["oldest_pending_s"] is not None else "-"
        click.echo(f"{sink:<12} {row['pending']:>8} {oldest:>10} {row['dead_letters']:>13} {row['dropped']:>8}")


@audit.command("dead-letters")
@click.option("--sink", help="Only this sink's.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, the whole event included.")
def audit_dead_letters(sink: str | None, as_json: bool) -> None:
    """List the events receivers refused for good."""
    letters = _outbox().dead_letters(sink)
    if as_json:
        for letter in letters:
            click.echo(json.dumps(letter, separators=(",", ":")))
        return
    if not letters:
        click.echo("no dead letters")
        return
    for letter in letters:
        failed = dt.datetime.fromtimestamp(letter["failed"], dt.UTC).isoformat(timespec="seconds")
        event = letter["event"]
        click.echo(
            f"{letter['sink']:<10} {letter['event_id']}  {failed}  {event.get('outcome')}  "
            f"interaction {event.get('interaction_id')}  {letter['reason']}"
        )


@audit.command("redeliver")
@click.option("--sink", help="Only this sink's dead letters.")
@click.option("--event-id", help="Only this event.")
@click.option("--all", "everything", is_flag=True, help="Every dead letter (of --sink, if given).")
def audit_redeliver(sink: str | None, event_id: str | None, everything: bool) -> None:
    """Put dead letters back in line for their own sink."""
    if not event_id and not everything:
        raise click.UsageError("say which: --event-id ID, or --all")
    moved = _outbox().redeliver(sink, event_id)
    click.echo(f"{moved} dead letter(s) back in line")
    if event_id and not moved:
        sys.exit(1)


def register(app: Any) -> None:
    """Make ``flask --app app dtmf ...`` available."""
    app.cli.add_command(dtmf)


def _create_app() -> Any:
    from dtmf_service import create_app

    try:
        return create_app()
    except cfg.ConfigError as exc:
        # One line naming the key, exit 4: what start-up does (app.py).
        click.echo(f"dtmf-gateway: configuration error: {exc}", err=True)
        sys.exit(4)


@click.group(cls=FlaskGroup, create_app=_create_app, add_default_commands=False, add_version_option=False)
def main() -> None:
    """dtmf-gateway: the operator commands of the DTMF gateway (the same as ``flask --app app dtmf``)."""


for _command in dtmf.commands.values():
    main.add_command(_command)

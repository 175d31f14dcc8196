"""Operator commands (CONTRACT.md section 11): ``flask --app app dtmf ...`` or ``dtmf-gateway ...``.

They load the configuration exactly as start-up does and work on the same audit outbox as the
running service, while it runs. Audit events are shown as they are stored, that is with digits
already redacted as AUDIT_DIGITS and AUDIT_SENSITIVE_KEYS say; secrets are masked.

They read and never re-route (CONTRACT.md section 11 rev 3): the app is built for an operator
(wiring.build_operator: no outbox, spool, journal, metrics directory or store is created), the
outbox is opened only if it exists, and where an event goes stays what the service that answered
decided. ``redeliver`` queues a letter only for a sink this configuration has; ``purge`` drops a
sink's events on purpose. Times in JSON output are RFC 3339, as in the tables.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup, FlaskGroup

from dtmf_service import config as cfg
from dtmf_service.audit.outbox import Outbox, OutboxMissing, open_outbox

log = logging.getLogger("dtmf_service.audit")

dtmf = AppGroup("dtmf", help="DTMF gateway operator commands.")


class _AuditGroup(AppGroup):
    """The audit commands; a store that cannot be reached (Redis down, a file SQLite cannot read)
    is one line and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import sqlite3

        import redis

        try:
            return super().invoke(ctx)
        except (OSError, sqlite3.Error, redis.RedisError) as exc:
            from dtmf_service.audit.reasons import FailureReasons

            reason = FailureReasons().describe(exc)  # URL credentials, tokens and digits scrubbed
            raise click.ClickException(f"the audit outbox cannot be reached: {reason}") from None


audit = _AuditGroup("audit", help="The audit outbox: backlog, dead letters, re-delivery.")
dtmf.add_command(audit)


def _components() -> Any:
    return current_app.extensions["dtmf"]


def _sinks() -> tuple[str, ...]:
    """The sinks of this configuration (the service's, when run with its environment)."""
    return tuple(dict.fromkeys(current_app.config["AUDIT_SINKS"]))


def _outbox() -> Outbox:
    """The service's existing outbox, opened for an operator (nothing is created); one line naming
    the place looked at, and exit 1, when there is none."""
    try:
        outbox = open_outbox(current_app.config, _sinks(), operator=True)
    except OutboxMissing as exc:
        raise click.ClickException(f"{exc} (is AUDIT_SPOOL_DIR / AUDIT_OUTBOX the service's?)") from None
    click.get_current_context().call_on_close(outbox.close)
    return outbox


def _rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


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
    now = time.time()
    rows = {
        sink: {
            "pending": b.pending,
            "oldest_pending_s": b.oldest_pending_s,  # an age in seconds, as the table shows it
            "oldest_pending_at": _rfc3339(now - b.oldest_pending_s) if b.oldest_pending_s is not None else None,
            "dead_letters": b.dead_letters,
            "dropped": b.dropped,
            "configured": b.configured,
            "last_error": b.last_error,
            "last_error_at": _rfc3339(b.last_error_at),
        }
        for sink, b in backlog.items()
    }
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'sink':<12} {'pending':>8} {'oldest':>10} {'dead letters':>13} {'dropped':>8}")
    for sink, row in rows.items():
        oldest = f"{row['oldest_pending_s']:.1f} s" if row["oldest_pending_s"] is not None else "-"
        note = "" if row["configured"] else "  not configured (kept until it returns or audit purge)"
        click.echo(f"{sink:<12} {row['pending']:>8} {oldest:>10} {row['dead_letters']:>13} {row['dropped']:>8}{note}")
    for sink, row in rows.items():
        if row["last_error"]:
            click.echo(f"last error of {sink} at {row['last_error_at']}: {row['last_error']}")


@audit.command("dead-letters")
@click.option("--sink", help="Only this sink's.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, the whole event included.")
def audit_dead_letters(sink: str | None, as_json: bool) -> None:
    """List the events receivers refused for good."""
    letters = _outbox().dead_letters(sink)
    configured = set(_sinks())
    if as_json:
        for letter in letters:
            shown = {**letter, "failed": _rfc3339(letter["failed"]), "configured": letter["sink"] in configured}
            click.echo(json.dumps(shown, separators=(",", ":")))
        return
    if not letters:
        click.echo("no dead letters")
        return
    for letter in letters:
        failed = _rfc3339(letter["failed"])
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
    """Put dead letters back in line for their own sink.

    Only for a sink this configuration has: a letter of any other sink is kept (exit 1), never
    queued for no sink. Each letter is claimed atomically, so two runs at once (two terminals, two
    hosts) never queue one twice."""
    if not event_id and not everything:
        raise click.UsageError("say which: --event-id ID, or --all")
    configured = _sinks()
    if sink is not None and sink not in configured:
        raise click.ClickException(f"sink {sink!r} is not configured here (AUDIT_SINKS): its dead letters are kept")
    outbox = _outbox()
    asked = [letter for letter in outbox.dead_letters(sink) if event_id is None or letter["event_id"] == event_id]
    if event_id is not None and not asked:
        raise click.ClickException("no dead letter with that id")
    kept = sorted({letter["sink"] for letter in asked if letter["sink"] not in configured})
    moved = outbox.redeliver(sink, event_id)
    click.echo(f"{moved} dead letter(s) back in line")
    if kept:
        raise click.ClickException(
            f"dead letters of sink(s) not configured here kept: {', '.join(kept)} (AUDIT_SINKS; or audit purge)"
        )


@audit.command("purge")
@click.option("--sink", required=True, help="The sink whose events to drop.")
@click.option("--dead-letters-only", is_flag=True, help="Drop its dead letters only, not its pending events.")
def audit_purge(sink: str, dead_letters_only: bool) -> None:
    """Drop a sink's undelivered events and dead letters on purpose (counted as dropped, logged).

    For a sink removed from the configuration: its events wait for it until it returns or this
    drops them. A configured sink's pending events are not purged (remove it first); its dead
    letters may be, with --dead-letters-only."""
    if sink in _sinks() and not dead_letters_only:
        raise click.ClickException(
            f"sink {sink!r} is configured here: the service delivers its events (remove it from AUDIT_SINKS "
            "first, or use --dead-letters-only)"
        )
    events, letters = _outbox().purge(sink, dead_letters_only)
    log.warning("audit purge: dropped %d pending event(s) and %d dead letter(s) of sink %s on purpose",
                events, letters, sink)  # fmt: skip
    click.echo(f"dropped {events} pending event(s) and {letters} dead letter(s) of sink {sink} (counted as dropped)")


def register(app: Any) -> None:
    """Make ``flask --app app dtmf ...`` available."""
    app.cli.add_command(dtmf)


def _create_app() -> Any:
    from dtmf_service import create_app

    try:
        return create_app(operator=True)  # no command of this script serves requests
    except cfg.ConfigError as exc:
        # One line naming the key, exit 4: what start-up does (app.py).
        click.echo(f"dtmf-gateway: configuration error: {exc}", err=True)
        sys.exit(4)


@click.group(cls=FlaskGroup, create_app=_create_app, add_default_commands=False, add_version_option=False)
def main() -> None:
    """dtmf-gateway: the operator commands of the DTMF gateway (the same as ``flask --app app dtmf``)."""


for _command in dtmf.commands.values():
    main.add_command(_command)


@main.command("serve", with_appcontext=False)
def serve_command() -> None:
    """Start the service: DTMF_SERVER (gunicorn, the default, or granian), DTMF_BIND, DTMF_WORKERS,
    DTMF_THREADS."""
    from dtmf_service.wiring.serve import serve

    sys.exit(serve())

"""A PostgreSQL audit sink for the DTMF gateway: ``AUDIT_SINKS=postgres``.

AUDIT_POSTGRES_DSN (a secret: it may carry a password) names the database; the table
(AUDIT_POSTGRES_TABLE, default ``dtmf_audit``) is created when missing. A batch goes in one
transaction; each event under its own savepoint, so an event the database refuses for good (a
constraint it breaks) is reported rejected, becomes a dead letter in the gateway, and never takes
the rest of its batch with it. ``ON CONFLICT (event_id) DO NOTHING`` makes a redelivery harmless:
delivery is at least once. The event is kept whole as ``json`` (not ``jsonb``, which refuses the
``\\u0000`` escape that an event recorded as sent may hold).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Json

from dtmf_service import ConfigError, DeliveryIncomplete, DeliveryRejected, event_json, hookimpl

__version__ = "1.0.0"

_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresSink:
    """One connection per sink, used by one delivery thread at a time (the lock keeps it so)."""

    def __init__(self, dsn: str, table: str) -> None:
        self.dsn = dsn
        self.table = table
        self._insert = sql.SQL(
            "INSERT INTO {} (event_id, outcome, interaction_id, body) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (event_id) DO NOTHING"
        ).format(sql.Identifier(table))
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, connect_timeout=5, autocommit=False)
            create = sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (event_id text PRIMARY KEY,"
                " received timestamptz NOT NULL DEFAULT now(), outcome text NOT NULL,"
                " interaction_id text, body json NOT NULL)"
            )
            with self._conn.transaction():
                self._conn.execute(create.format(sql.Identifier(self.table)))
        return self._conn

    def deliver(self, event: dict[str, Any]) -> None:
        self.deliver_many([event])

    def deliver_many(self, events: list[dict[str, Any]]) -> None:
        refused: list[dict[str, Any]] = []
        first: psycopg.Error | None = None
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    for event in events:
                        try:
                            with conn.transaction():  # a savepoint: one refusal spoils nothing else
                                conn.execute(
                                    self._insert,
                                    (event.get("event_id"), event.get("outcome"), event.get("interaction_id"),
                                     Json(event, dumps=lambda e: event_json(e))),
                                )  # fmt: skip
                        except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
                            refused.append(event)
                            first = exc
            except psycopg.OperationalError:
                self._drop()
                raise  # not delivered: the gateway keeps the batch and tries again
        if refused:
            if len(events) == 1:
                raise DeliveryRejected(f"postgres refused the event ({type(first).__name__})") from first
            raise DeliveryIncomplete(refused, refused) from first

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()


@hookimpl
def dtmf_config_keys() -> list[str]:
    return ["AUDIT_POSTGRES_DSN", "AUDIT_POSTGRES_TABLE"]


@hookimpl
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> PostgresSink | None:
    if name != "postgres":
        return None
    dsn = config.get("AUDIT_POSTGRES_DSN")
    if not dsn:
        raise ConfigError("AUDIT_POSTGRES_DSN: required when AUDIT_SINKS includes postgres")
    table = config.get("AUDIT_POSTGRES_TABLE") or "dtmf_audit"
    if not _TABLE.match(table):
        raise ConfigError("AUDIT_POSTGRES_TABLE: a lower-case SQL identifier, e.g. dtmf_audit")
    return PostgresSink(dsn, table)

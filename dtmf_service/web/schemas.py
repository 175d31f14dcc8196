"""Marshmallow schemas: the request that is validated, and the responses, for OpenAPI too.

marshmallow is lenient by default in ways that matter here: ``Boolean`` takes
"yes" and 1, ``Integer`` takes true and "5", ``Regexp`` uses ``re.match`` (so
``$`` accepts a trailing newline). The strict fields below close each of them.
"""

from __future__ import annotations

import re
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

INTERACTION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# Explicit keypad characters: \d would admit Arabic-Indic and full-width digits.
DIGITS_PATTERN = r"^[0-9*#]{1,16}$"
# No C0/C1 control characters, DEL, nor Unicode line/paragraph separators: the key is written into logs.
SEQUENCE_KEY_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]{1,128}$"


class FullMatch(validate.Regexp):
    """Regexp that must match the whole string (``re.fullmatch``), trailing newline included."""

    def __init__(self, pattern: str, error: str) -> None:
        super().__init__(pattern, error=error)
        self._full = re.compile(pattern.removeprefix("^").removesuffix("$"))

    def __call__(self, value: Any) -> Any:  # marshmallow's overloads take str or bytes; only str passes
        if not isinstance(value, str) or self._full.fullmatch(value) is None:
            raise ValidationError(self.error)
        return value


class StrictString(fields.String):
    """A JSON string and nothing else."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return value


class StrictInteger(fields.Integer):
    """A JSON integer: not a string, not a boolean; 5000.0 counts (JSON Schema), 5000.5 does not."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        if isinstance(value, float):
            if not value.is_integer():
                raise self.make_error("invalid")
            value = int(value)
        return value


class StrictBoolean(fields.Boolean):
    """JSON true or false only: not "true", not 1, not "yes"."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if value is True or value is False:
            return value
        raise self.make_error("invalid")


class DTMFRequestSchema(Schema):
    """The body of POST /api/dtmf/parse."""

    class Meta:
        unknown = RAISE

    interaction_id = StrictString(
        required=True,
        validate=FullMatch(INTERACTION_ID_PATTERN, "must be 1 to 128 of A-Z a-z 0-9 . _ : - not starting with . _ : -"),
        metadata={"description": "CXone interaction id (agent dialect: the agent session id); a URL path segment"},
    )
    digits = StrictString(
        required=True,
        validate=FullMatch(DIGITS_PATTERN, "must be 1 to 16 keypad characters: 0-9, * and #"),
        metadata={"description": "keypad digits to press"},
    )
    timeout_ms = StrictInteger(
        required=True,
        validate=validate.Range(1000, 30000, error="must be an integer from 1000 to 30000"),
        metadata={"description": "digit collection timeout in milliseconds"},
    )
    sequence_matrix_key = StrictString(
        required=True,
        validate=FullMatch(SEQUENCE_KEY_PATTERN, "must be 1 to 128 characters with no control characters"),
        metadata={"description": "IVR routing key; also selects digit masking (AUDIT_SENSITIVE_KEYS)"},
    )
    node_transition_flag = StrictBoolean(
        load_default=False, metadata={"description": "advance the IVR to the next node after collection"}
    )


_REQUIRED = ("interaction_id", "digits", "timeout_ms", "sequence_matrix_key")
_OPTIONAL = "node_transition_flag"


def load_request(schema: DTMFRequestSchema, sent: dict[str, Any]) -> dict[str, Any]:
    """``schema.load(sent)``, with a shortcut for a request that is plainly valid.

    marshmallow's load walks five fields through several layers of calls each (7% of a request's
    CPU). A body whose fields are all present, of their exact JSON types and within their rules is
    checked here with the schema's own patterns and bounds, and gives the dict ``load`` gives (the
    fields in the schema's order, ``node_transition_flag`` defaulted). Anything else, valid or not
    (an unknown or missing field, a wrong type, ``5000.0``), goes through ``schema.load``, which
    says what is wrong in its own words.
    """
    fields = schema.fields
    if len(sent) == 4:
        flag: Any = False
    elif len(sent) == 5:
        flag = sent.get(_OPTIONAL)
        if flag is not True and flag is not False:
            return schema.load(sent)
    else:
        return schema.load(sent)
    values = [sent.get(name) for name in _REQUIRED]
    interaction_id, digits, timeout_ms, sequence_key = values
    if (
        type(interaction_id) is str
        and type(digits) is str
        and type(timeout_ms) is int  # not bool, not float: marshmallow's cases
        and type(sequence_key) is str
        and _passes(fields["interaction_id"], interaction_id)
        and _passes(fields["digits"], digits)
        and _passes(fields["timeout_ms"], timeout_ms)
        and _passes(fields["sequence_matrix_key"], sequence_key)
    ):
        return {
            "interaction_id": interaction_id,
            "digits": digits,
            "timeout_ms": timeout_ms,
            "sequence_matrix_key": sequence_key,
            _OPTIONAL: flag,
        }
    return schema.load(sent)


def _passes(field: fields.Field, value: Any) -> bool:
    """Whether every validator of ``field`` accepts ``value``."""
    try:
        for validator in field.validators:
            validator(value)
    except ValidationError:
        return False
    return True


class SubmittedSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["dtmf_submitted"]})
    interaction_id = fields.String(required=True)
    digits = fields.String(required=True)
    cxone_status = fields.Integer(required=True)
    attempts = fields.Integer(required=True)
    latency_ms = fields.Float(required=True)


class ErrorSchema(Schema):
    status = fields.String(required=True)
    error = fields.String()


class InvalidRequestSchema(Schema):
    """400 for a body that is not a UTF-8 JSON object: no ``errors`` (CONTRACT.md section 2, *rev 2*)."""

    status = fields.String(required=True, metadata={"enum": ["invalid_request"]})
    error = fields.String(required=True)


class ValidationFailedSchema(Schema):
    """400 for a schema violation: ``errors`` names each field."""

    status = fields.String(required=True, metadata={"enum": ["validation_failed"]})
    error = fields.String(required=True)
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()), required=True)


class SubmissionErrorSchema(Schema):
    """404, 502, 503 (submission_failed) and 504 (submission_unknown): what CXone did, if anything."""

    status = fields.String(required=True, metadata={"enum": ["submission_failed", "submission_unknown"]})
    error = fields.String(required=True)
    cxone_status = fields.Integer(required=True, allow_none=True)


class UnauthorizedSchema(Schema):
    """401: missing or wrong API key (sent with ``WWW-Authenticate: Bearer``)."""

    status = fields.String(required=True, metadata={"enum": ["unauthorized"]})
    error = fields.String(required=True)


class IdempotencyInProgressSchema(Schema):
    """409: a request with this Idempotency-Key is still being processed."""

    status = fields.String(required=True, metadata={"enum": ["idempotency_in_progress"]})
    error = fields.String(required=True)


class IdempotencyConflictSchema(Schema):
    """422: this Idempotency-Key was used with a different body."""

    status = fields.String(required=True, metadata={"enum": ["idempotency_conflict"]})
    error = fields.String(required=True)


class InternalErrorSchema(Schema):
    """500: no detail, ever (the log has the exception type)."""

    status = fields.String(required=True, metadata={"enum": ["internal_error"]})


class MetricsSchema(Schema):
    total_submissions = fields.Integer(required=True)
    successful_parses = fields.Integer(required=True)
    validation_failures = fields.Integer(required=True)
    submission_failures = fields.Integer(required=True)
    average_latency_ms = fields.Float(required=True, allow_none=True)
    accuracy_rate = fields.Float(required=True, allow_none=True)
    audit_pending = fields.Integer(
        required=True, allow_none=True, metadata={"description": "events not yet delivered, all sinks (host-wide)"}
    )
    audit_dropped = fields.Integer(required=True, metadata={"description": "events dropped by a full spool"})
    idempotency_store_errors = fields.Integer(
        required=True, metadata={"description": "store writes that failed after CXone answered (retried)"}
    )
    audit_outbox_errors = fields.Integer(
        required=True, metadata={"description": "audit events or placeholders the outbox could not store"}
    )
    auth_failures = fields.Integer(
        required=True, metadata={"description": "requests refused 401 (missing or wrong API key), every caller"}
    )
    audit_sinks = fields.Dict(
        keys=fields.String(),
        values=fields.Dict(keys=fields.String(), values=fields.Raw()),
        required=True,
        metadata={
            "description": "per sink: audit_pending, audit_oldest_pending_s, audit_delivered, "
            "audit_failed_attempts, audit_dead_letters, audit_dropped"
        },
    )


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok"]})
    mode = fields.String(required=True, metadata={"enum": ["cxone", "sandbox"]})
    api = fields.String(required=True, metadata={"enum": ["tutorial", "agent"]})
    api_keys = fields.String(
        metadata={
            "enum": ["ok", "stale"],
            "description": "with API_KEYS_FILE: stale when the last reload kept the previous keys",
        }
    )
    api_keys_error = fields.String(metadata={"description": "why the keys file was not reloaded (no key material)"})


def summarise(errors: dict[str, Any]) -> str:
    """One line naming the fields that failed (never their values: digits are secret)."""
    return "request failed validation: " + ", ".join(sorted(str(name) for name in errors))

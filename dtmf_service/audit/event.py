"""The audit event: built once per counted request, digits redacted before any plugin sees it."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping, Set
from typing import Any

from dtmf_service.jsontext import compact

SENT_TEXT_CHARS = 256


class AuditEvent(dict[str, Any]):
    """An audit event as sinks receive it: a plain dict, plus the compact JSON it was stored as, so
    that a sink writing JSON need not serialise it again (read it with ``event_json``)."""

    __slots__ = ("json",)

    def __init__(self, data: Mapping[str, Any], text: str | None = None) -> None:
        super().__init__(data)
        self.json = text


def event_json(event: Mapping[str, Any]) -> str:
    """The event's compact JSON: the stored text when the core has it, else ``json.dumps``."""
    text = getattr(event, "json", None)
    return text if text is not None else compact(event)


class Redactor:
    """Applies AUDIT_DIGITS and AUDIT_SENSITIVE_KEYS to the digits of an event."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.mode = config.get("AUDIT_DIGITS", "masked")  # the safe default (CONTRACT.md section 8, *rev 3*)
        key = config.get("AUDIT_HASH_KEY") or ""
        self._hash_key = key.encode() if isinstance(key, str) else bytes(key)
        self._sensitive = tuple(config.get("AUDIT_SENSITIVE_KEYS") or ())

    def redact(self, digits: str, sequence_key: Any) -> str:
        if self._is_sensitive(sequence_key) or self.mode == "masked":
            return "*" * len(digits)
        if self.mode == "hashed":
            return "hmac-sha256:" + hmac.new(self._hash_key, digits.encode(), hashlib.sha256).hexdigest()
        return digits

    def scrub(self, text: str | None, digits: Any, sequence_key: Any) -> str | None:
        """CXone's answer with any echo of the digits redacted as the digits themselves are."""
        if not text or not isinstance(digits, str) or not digits:
            return text
        redacted = self.redact(digits, sequence_key)
        return text if redacted == digits else text.replace(digits, redacted)

    def _is_sensitive(self, sequence_key: Any) -> bool:
        if not self._sensitive:
            return False
        text = sequence_key if isinstance(sequence_key, str) else ""
        return any(fnmatch.fnmatchcase(text, pattern) for pattern in self._sensitive)


def _as_sent(value: Any) -> Any:
    """A value that failed validation, recorded as text cut to 256 characters."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text[:SENT_TEXT_CHARS]


def build_event(
    *,
    client_ip: str | None,
    sent: Mapping[str, Any] | None,
    valid: Mapping[str, Any] | None,
    invalid_fields: Set[str],
    latency_ms: float | None,
    cxone_status: int | None,
    cxone_response: str | None,
    outcome: str,
    redactor: Redactor,
    request_id: str | None = None,
    event_id: str | None = None,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """The audit event of CONTRACT.md section 7.

    ``sent`` is the caller's JSON object (None when the body was not one),
    ``valid`` the validated request (None when validation failed).
    """
    source: Mapping[str, Any] = valid if valid is not None else (sent or {})

    def field(name: str) -> Any:
        value = source.get(name)
        if valid is None and (name in invalid_fields or not _native_ok(value)):
            return _as_sent(value)
        return value

    sequence_key = field("sequence_matrix_key")
    raw_digits = source.get("digits")
    digits: Any = None
    if raw_digits is not None:
        text = raw_digits if isinstance(raw_digits, str) else json.dumps(raw_digits, default=str)
        digits = redactor.redact(text[:SENT_TEXT_CHARS], source.get("sequence_matrix_key"))
    event = {
        "event_id": event_id or str(uuid.uuid4()),
        "timestamp": _now(),
        "client_ip": client_ip,
        "interaction_id": field("interaction_id"),
        "digits": digits,
        "timeout_ms": field("timeout_ms"),
        "sequence_matrix": sequence_key,
        "node_transition": field("node_transition_flag"),
        "latency_ms": latency_ms,
        "cxone_status": cxone_status,
        "cxone_response": redactor.scrub(cxone_response, raw_digits, source.get("sequence_matrix_key")),
        "validation_passed": valid is not None,
        "outcome": outcome,
    }
    if request_id is not None:
        event["request_id"] = request_id
    if trace_id is not None:
        event["trace_id"] = trace_id  # W3C trace id: the caller's, or one this request started
    return event


def finish_event(
    placeholder: Mapping[str, Any],
    valid: Mapping[str, Any],
    latency_ms: float | None,
    cxone_status: int | None,
    cxone_response: str | None,
    outcome: str,
    redactor: Redactor,
) -> dict[str, Any]:
    """The final event of a request that left a placeholder: the same fields, with what CXone did."""
    event = dict(placeholder)
    event["timestamp"] = _now()
    event["latency_ms"] = latency_ms
    event["cxone_status"] = cxone_status
    event["cxone_response"] = redactor.scrub(cxone_response, valid.get("digits"), valid.get("sequence_matrix_key"))
    event["outcome"] = outcome
    return event


# The date and time of day of the current second, formatted once per second (threads share it:
# replacing the tuple is atomic). Formatting a datetime per timestamp was 2% of a request.
_second: tuple[int, str] = (-1, "")


def _now() -> str:
    """RFC 3339 UTC to the millisecond (``2026-12-02T16:09:47.123Z``), as datetime's isoformat
    writes it."""
    global _second
    millis = time.time_ns() // 1_000_000
    whole, fraction = divmod(millis, 1000)
    second = _second
    if second[0] != whole:
        second = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{second[1]}.{fraction:03d}Z"


def _native_ok(value: Any) -> bool:
    """Values of a type the field may hold are kept as they are; anything else becomes text."""
    return value is None or isinstance(value, (str, int, float, bool))

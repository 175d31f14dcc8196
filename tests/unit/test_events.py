"""CONTRACT.md sections 7 and 8: the audit event and digit redaction."""

import hashlib
import hmac
import re
import uuid

import pytest

from dtmf_service.audit.event import Redactor, build_event

FIELDS = {
    "event_id",
    "timestamp",
    "client_ip",
    "interaction_id",
    "digits",
    "timeout_ms",
    "sequence_matrix",
    "node_transition",
    "latency_ms",
    "cxone_status",
    "cxone_response",
    "validation_passed",
    "outcome",
}


def event(redactor=None, **kw):
    args = dict(
        client_ip="127.0.0.1",
        sent=None,
        valid=None,
        invalid_fields=set(),
        latency_ms=1.5,
        cxone_status=None,
        cxone_response=None,
        outcome="invalid_request",
        redactor=redactor or Redactor({}),
    )
    args.update(kw)
    return build_event(**args)


VALID = {
    "interaction_id": "c1",
    "digits": "1234",
    "timeout_ms": 5000,
    "sequence_matrix_key": "menu",
    "node_transition_flag": False,
}


def test_event_has_every_field():
    e = event(
        Redactor({"AUDIT_DIGITS": "full"}),
        sent=VALID,
        valid=VALID,
        cxone_status=200,
        cxone_response="{}",
        outcome="dtmf_submitted",
    )
    assert FIELDS <= set(e)
    uuid.UUID(e["event_id"], version=4)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["timestamp"])
    assert (e["digits"], e["sequence_matrix"], e["node_transition"], e["validation_passed"]) == (
        "1234",
        "menu",
        False,
        True,
    )


def test_fields_not_sent_are_null():
    e = event()
    assert all(
        e[k] is None
        for k in (
            "interaction_id",
            "digits",
            "timeout_ms",
            "sequence_matrix",
            "node_transition",
            "cxone_status",
            "cxone_response",
        )
    )
    assert e["validation_passed"] is False


def test_invalid_values_recorded_as_sent_text_cut_to_256():
    sent = {"interaction_id": "x" * 300, "timeout_ms": 5000.5, "node_transition_flag": "yes", "digits": "12A"}
    e = event(
        Redactor({"AUDIT_DIGITS": "full"}),
        sent=sent,
        invalid_fields={"interaction_id", "timeout_ms", "node_transition_flag", "digits"},
        outcome="validation_failed",
    )
    assert e["interaction_id"] == "x" * 256
    assert e["timeout_ms"] == "5000.5"
    assert e["node_transition"] == "yes"
    assert e["digits"] == "12A"


def test_masked_mode_keeps_length():
    e = event(Redactor({"AUDIT_DIGITS": "masked"}), sent=VALID, valid=VALID)
    assert e["digits"] == "****"


def test_hashed_mode_is_keyed_hmac():
    e = event(Redactor({"AUDIT_DIGITS": "hashed", "AUDIT_HASH_KEY": "k"}), sent=VALID, valid=VALID)
    expected = hmac.new(b"k", b"1234", hashlib.sha256).hexdigest()
    assert e["digits"] == f"hmac-sha256:{expected}"
    assert e["digits"] != "hmac-sha256:" + hashlib.sha256(b"1234").hexdigest()


@pytest.mark.parametrize("mode", ["full", "hashed"])
def test_sensitive_keys_are_always_masked(mode):
    redactor = Redactor({"AUDIT_DIGITS": mode, "AUDIT_HASH_KEY": "k", "AUDIT_SENSITIVE_KEYS": ["payment.*", "*pin*"]})
    for key in ("payment.card", "account.pin.entry"):
        e = event(redactor, sent={**VALID, "sequence_matrix_key": key}, valid={**VALID, "sequence_matrix_key": key})
        assert e["digits"] == "****"
    other = event(redactor, sent=VALID, valid=VALID)
    assert other["digits"] != "****"


def test_invalid_digits_are_redacted_too():
    e = event(Redactor({"AUDIT_DIGITS": "masked"}), sent={"digits": "4111 1111"}, invalid_fields={"digits"})
    assert e["digits"] == "*********"


def test_cxone_echo_of_the_digits_is_redacted_too():
    e = event(Redactor({"AUDIT_DIGITS": "masked"}), sent=VALID, valid=VALID, cxone_response='{"played":"1234"}')
    assert e["cxone_response"] == '{"played":"****"}'
    full = event(Redactor({"AUDIT_DIGITS": "full"}), sent=VALID, valid=VALID, cxone_response='{"played":"1234"}')
    assert full["cxone_response"] == '{"played":"1234"}'

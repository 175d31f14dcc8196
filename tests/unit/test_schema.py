"""CONTRACT.md section 1: every rule of the request schema, with its traps closed."""

import pytest
from marshmallow import ValidationError

from dtmf_service.web.schemas import DTMFRequestSchema
from tests.conftest import VALID

schema = DTMFRequestSchema()


def errors_for(**changes):
    body = {**VALID, **changes}
    body = {k: v for k, v in body.items() if v is not _DROP}
    try:
        schema.load(body)
    except ValidationError as exc:
        return exc.messages
    return {}


_DROP = object()


def test_valid_request_loads_with_default_flag():
    assert schema.load(VALID) == {**VALID, "node_transition_flag": False}


@pytest.mark.parametrize("field", ["interaction_id", "digits", "timeout_ms", "sequence_matrix_key"])
def test_required_fields(field):
    assert field in errors_for(**{field: _DROP})


def test_unknown_fields_are_rejected():
    assert errors_for(extra=1) == {"extra": ["Unknown field."]}


@pytest.mark.parametrize("value", ["a", "A1", "call-1", "x" * 128, "a.b_c:d-e", "9"])
def test_interaction_id_accepts(value):
    assert errors_for(interaction_id=value) == {}


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".hidden",
        "-x",
        "_x",
        ":x",
        "x" * 129,
        "a/b",
        "a?b",
        "a#b",
        "a%2F",
        "a b",
        "abc\n",
        "\nabc",
        "é",
        "a\u0000",
        "١٢",
        5,
        None,
        ["a"],
    ],
)
def test_interaction_id_rejects(value):
    assert "interaction_id" in errors_for(interaction_id=value)


@pytest.mark.parametrize("value", ["0", "9", "*", "#", "0123456789*#", "1" * 16])
def test_digits_accepts(value):
    assert errors_for(digits=value) == {}


@pytest.mark.parametrize(
    "value",
    ["", "1" * 17, "12\n", "12 ", " 12", "1 2", "١٢٣", "１２", "A", "D", "1w2", "1,2", "p", "12\t", 12, None, True],
)
def test_digits_rejects(value):
    assert "digits" in errors_for(digits=value)


@pytest.mark.parametrize("value", [1000, 30000, 5000, 5000.0, 1000.0])
def test_timeout_accepts(value):
    assert errors_for(timeout_ms=value) == {}


def test_timeout_zero_fraction_becomes_integer():
    assert schema.load({**VALID, "timeout_ms": 5000.0})["timeout_ms"] == 5000
    assert isinstance(schema.load({**VALID, "timeout_ms": 5000.0})["timeout_ms"], int)


@pytest.mark.parametrize("value", [999, 30001, 0, -1, 5000.5, "5000", True, False, None, [5000], 1e400])
def test_timeout_rejects(value):
    assert "timeout_ms" in errors_for(timeout_ms=value)


@pytest.mark.parametrize("value", ["k", "x" * 128, "menu main", "pago/tarjeta", "ключ"])
def test_sequence_key_accepts(value):
    assert errors_for(sequence_matrix_key=value) == {}


@pytest.mark.parametrize(
    "value", ["", "x" * 129, "a\nb", "a\rb", "a\tb", "a\x00", "a\x1b[31m", "a\x7f", "a\x85", "a\u2028b", 7, None]
)
def test_sequence_key_rejects(value):
    assert "sequence_matrix_key" in errors_for(sequence_matrix_key=value)


@pytest.mark.parametrize("value", [True, False])
def test_flag_accepts_json_booleans(value):
    assert schema.load({**VALID, "node_transition_flag": value})["node_transition_flag"] is value


@pytest.mark.parametrize("value", ["true", "false", 1, 0, "yes", "no", "on", None, "1"])
def test_flag_rejects_everything_else(value):
    assert "node_transition_flag" in errors_for(node_transition_flag=value)


def test_error_messages_never_echo_the_digits():
    messages = errors_for(digits="4111111111111111999")
    assert "4111" not in str(messages)

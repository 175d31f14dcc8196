"""The plainly-valid shortcut of request validation (web/schemas.py ``load_request``) decides exactly
as the marshmallow schema does (CONTRACT.md section 1): the same dict for every valid body, the same
messages for every invalid one."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from dtmf_service.web.schemas import DTMFRequestSchema, load_request

SCHEMA = DTMFRequestSchema()

_text = st.one_of(
    st.sampled_from(["bench-1", "a", ".x", "a b", "call/1", "x" * 128, "x" * 129, "12#", "*", "0" * 16, "0" * 17,
                     "12#\n", "١٢", "１", "ABCD", "menu.main", "", "\x00", "a\u2028b", "é", "k" * 129]),
    st.text(max_size=20),
)  # fmt: skip
_value = st.one_of(
    _text,
    st.integers(min_value=-5, max_value=40000),
    st.sampled_from([999, 1000, 5000, 30000, 30001, 5000.0, 5000.5, True, False, None, [], {}]),
    st.floats(allow_nan=False, allow_infinity=False),
)
_names = st.sampled_from(
    ["interaction_id", "digits", "timeout_ms", "sequence_matrix_key", "node_transition_flag", "extra"]
)


def _decide(load, body):
    try:
        return "valid", load(body)
    except ValidationError as exc:
        return "invalid", exc.messages


def _same(body):
    expected = _decide(SCHEMA.load, body)
    got = _decide(lambda b: load_request(SCHEMA, b), body)
    assert got == expected
    if expected[0] == "valid":
        assert list(got[1]) == list(expected[1])  # the fields in the schema's order too


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(_names, _value, max_size=6))
def test_any_body_is_decided_as_marshmallow_decides(body):
    _same(body)


@settings(max_examples=300, deadline=None)
@given(
    interaction_id=_text,
    digits=_text,
    timeout_ms=st.one_of(st.integers(min_value=900, max_value=31000), st.sampled_from([5000.0, True])),
    key=_text,
    flag=st.sampled_from([None, True, False, "true", 1]),
)
def test_nearly_valid_bodies_are_decided_as_marshmallow_decides(interaction_id, digits, timeout_ms, key, flag):
    body = {"interaction_id": interaction_id, "digits": digits, "timeout_ms": timeout_ms, "sequence_matrix_key": key}
    if flag is not None:
        body["node_transition_flag"] = flag
    _same(body)


@pytest.mark.parametrize("timeout_ms", [1000, 30000, 5000.0])
def test_valid_bodies(timeout_ms):
    _same({"interaction_id": "call-1", "digits": "12#", "timeout_ms": timeout_ms, "sequence_matrix_key": "m"})


def test_the_schema_has_no_hooks_the_shortcut_would_skip():
    # A pre_load/post_load/validates_schema hook would run in load() but not in the shortcut.
    assert not any(DTMFRequestSchema._hooks.values())

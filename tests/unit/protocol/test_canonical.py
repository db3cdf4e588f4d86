import hashlib

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from execguard.protocol.canonical import canonical_json, canonical_sha256
from execguard.protocol.errors import CanonicalizationError

# Known answers: RFC 8785 sorts keys by UTF-16 code units and prints numbers the ECMAScript way.
KNOWN = [
    ({"b": 1, "a": [True, None, "x"]}, b'{"a":[true,null,"x"],"b":1}'),
    ({"n": 1.0, "m": 1e21, "s": 1e-7}, b'{"m":1e+21,"n":1,"s":1e-7}'),
    ({"\u20ac": 1, "\U0001f600": 2, "z": 3}, '{"z":3,"\u20ac":1,"\U0001f600":2}'.encode()),
    ({"t": "é\n\u2028"}, '{"t":"é\\n\u2028"}'.encode()),
]


@pytest.mark.parametrize(("value", "expected"), KNOWN)
def test_known_answers(value: object, expected: bytes) -> None:
    assert canonical_json(value) == expected
    assert canonical_sha256(value) == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2**53, -(2**53),
                                 10**400, {1: "x"}, "\ud800", object()])
def test_refuses_values_without_exact_form(bad: object) -> None:
    with pytest.raises(CanonicalizationError):
        canonical_json({"v": bad})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_key_order_never_matters(value: object) -> None:
    if isinstance(value, dict):
        reversed_value = dict(reversed(list(value.items())))
        assert canonical_json(value) == canonical_json(reversed_value)
    else:
        assert canonical_json(value) == canonical_json(value)


any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=25,
)


@given(any_json)
def test_fast_path_is_byte_identical_to_rfc8785(value: object) -> None:
    """The orjson fast path must never change a single byte of what is hashed."""
    try:
        expected = rfc8785.dumps(value)
    except rfc8785.CanonicalizationError:
        with pytest.raises(CanonicalizationError):
            canonical_json(value)
        return
    assert canonical_json(value) == expected


@given(st.floats(allow_nan=False, allow_infinity=False)
       | st.floats(min_value=1e-4, max_value=1e15)
       | st.decimals(places=4, min_value=-10**9, max_value=10**9).map(float))
def test_fast_path_floats_are_byte_identical_to_rfc8785(value: float) -> None:
    """Floats, alone and inside a document, above all near the fast path's bounds."""
    assert canonical_json(value) == rfc8785.dumps(value)
    assert canonical_json({"amount": value, "n": [value, 1]}) == \
        rfc8785.dumps({"amount": value, "n": [value, 1]})


@pytest.mark.parametrize("value", [
    {"\U0001f600": 1, "\ue000": 2},           # UTF-16 order differs from code-point order
    {"f": 1.0, "g": -0.0, "h": 1e-07, "i": 1e21},  # ECMAScript number formatting
    {"a": 0.01, "b": 1e-4, "c": 9.999e-5, "d": 1e15 - 0.5, "e": 1e15, "f": 123456.789},
    [0.1, 0.2, 0.30000000000000004, -2.5, 1e14 + 0.5, 5e-324, 1.7976931348623157e308],
    {"big": 2**53 - 1, "neg": -(2**53 - 1)},
    {"s": "\x00\x1f\u2028\U0001f600\"\\"},
])
def test_fast_path_edge_cases(value: object) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)

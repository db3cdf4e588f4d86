import json

import pytest

from execguard.protocol.errors import MalformedRequest
from execguard.protocol.request import (
    ExecutionRequest,
    normalized_request,
    parse_execution_request,
    parse_json_object,
    request_hash,
)


def parse(body: str | bytes, header: str | None = None) -> ExecutionRequest:
    raw = body.encode() if isinstance(body, str) else body
    return parse_execution_request(raw, idempotency_header=header)


def refused(body: str | bytes, header: str | None = None) -> MalformedRequest:
    with pytest.raises(MalformedRequest) as info:
        parse(body, header)
    return info.value


def test_full_body_is_read() -> None:
    req = parse(json.dumps({
        "surface": "payment.execute", "action": "pay", "actorId": "agent-7",
        "context": {"amount": 12.5}, "signals": {"risk": 3}, "idempotencyKey": "k1",
        "sessionId": "s", "subjectDigest": "sha256:ab", "executionMode": "observe",
        "somethingElse": {"ignored": True}}))
    assert req == ExecutionRequest(
        surface="payment.execute", action="pay", actor_id="agent-7",
        context={"amount": 12.5}, signals={"risk": 3}, subject_digest="sha256:ab",
        session_id="s", idempotency_key="k1", execution_mode="observe")


def test_context_and_signals_are_optional() -> None:
    req = parse('{"surface": "memory.read"}')
    assert req.context == {} and req.signals == {} and req.execution_mode == "enforce"


@pytest.mark.parametrize(("body", "field", "fragment"), [
    ("{}", "surface", "nothing"),
    ('{"surface": 5}', "surface", "integer 5"),
    ('{"surface": ""}', "surface", "string ''"),
    ('{"surface": "a b"}', "surface", "string 'a b'"),
    ('{"surface": "payment.execute\\n"}', "surface", "string 'payment.execute\\n'"),
    ('{"surface": "x", "context": []}', "context", "array"),
    ('{"surface": "x", "context": "amount=5"}', "context", "string"),
    ('{"surface": "x", "signals": 1}', "signals", "integer 1"),
    ('{"surface": "x", "actorId": 7}', "actorId", "integer 7"),
    ('{"surface": "x", "executionMode": "yolo"}', "executionMode", "'yolo'"),
    ('{"surface": "x", "context": {"facts": {"amount_sum_24h": 0}}}', "context.facts", "object"),
    ('{"surface": "x", "context": {"now": "2020-01-01T00:00:00Z"}}', "context.now", "string"),
    ('{"surface": "x", "context": {"amount": 1' + "0" * 399 + '}}', "body.context.amount",
     "400-digit integer"),
    ('{"surface": "x", "context": {"amount": 1e400}}', "body.context.amount", "float range"),
    ('{"surface": "x", "context": {"amount": 9007199254740992}}', "body.context.amount",
     "integer 9007199254740992"),
    ('{"surface": "x", "context": {"t": "\\ud800"}}', "body.context.t", "surrogate"),
    ('{"surface": "x", "context": {"a": [1, [2, {"b": "é\\udc00"}]]}}', "body.context.a[1][1].b",
     "surrogate"),
    ('{"surface": "x", "signals": {"s": [{"n": 1e999}]}}', "body.signals.s[0].n", "float range"),
    ('{"surface": "x", "actorId": "a\\u0000b"}', "body.actorId", "'a\\x00b'"),
    ('{"surface": "x", "context": {"memo": ["ok", "\\u0000"]}}', "body.context.memo[1]",
     "'\\x00'"),
    ('{"surface": "x", "context": {"k\\u0000": 1}}', "body.context", "'k\\x00'"),
    ('\ufeff{"surface": "x"}', "body", "Unexpected UTF-8 BOM"),
    ("[1]", "body", "array"),
    ("nope", "body", "invalid JSON"),
])
def test_malformed_bodies_name_the_field(body: str, field: str, fragment: str) -> None:
    error = refused(body)
    assert error.field == field
    assert fragment in error.got
    assert field in str(error)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_number_literals_are_refused(literal: str) -> None:
    error = refused('{"surface": "payment.execute", "context": {"amount": ' + literal + "}}")
    assert literal in error.got


@pytest.mark.parametrize(("number", "held_as"), [
    ("10000.0000000000001", "10000.0"), ("1e-400", "0.0"),
    ("3.14159265358979323846", "3.141592653589793")])
def test_a_number_more_precise_than_a_float_is_refused_not_rounded(number: str,
                                                                   held_as: str) -> None:
    error = refused('{"surface": "payment.execute", "context": {"amount": ' + number + "}}")
    assert error.got == f"the number {number}, which a float holds only as {held_as}"


@pytest.mark.parametrize(("number", "value"), [
    ("0.1", 0.1), ("0.30000000000000004", 0.30000000000000004), ("1E5", 1e5), ("1.50", 1.5),
    ("-0.0", -0.0), ("5e-324", 5e-324), ("1.0000000000000000000", 1.0)])
def test_a_number_a_float_holds_as_written_is_read(number: str, value: float) -> None:
    body = '{"surface": "payment.execute", "context": {"amount": ' + number + "}}"
    assert parse(body).context["amount"] == value


def test_duplicate_keys_are_refused_not_resolved() -> None:
    error = refused('{"surface": "payment.execute", "context": {"amount": 1, "amount": 99999}}')
    assert "duplicate key 'amount'" in error.got
    error = refused('{"surface": "a", "surface": "payment.execute"}')
    assert "duplicate key 'surface'" in error.got


def test_non_utf8_and_deep_nesting_are_refused() -> None:
    assert "UTF-8" in refused(b'{"surface": "\xff"}').got
    deep = '{"surface": "x", "context": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"
    assert "nesting" in refused(deep).expected
    # So deep that the decoder itself gives up: still said as nesting, not as bad JSON.
    deeper = '{"surface": "x", "context": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert refused(deeper).expected == "at most 32 levels of nesting"


def test_nul_is_refused_in_requests_but_read_in_stored_documents() -> None:
    # A stored document (evidence) is read as it was written, NUL and all.
    assert parse_json_object(b'{"a": ["\\u0000"]}', nul=True) == {"a": ["\x00"]}
    with pytest.raises(MalformedRequest, match=r"body\.a\[0\]: expected text without NUL"):
        parse_json_object(b'{"a": ["\\u0000"]}')


def test_idempotency_key_from_header_or_body_and_they_must_agree() -> None:
    assert parse('{"surface": "x"}', header="h1").idempotency_key == "h1"
    assert parse('{"surface": "x", "idempotencyKey": "h1"}', header="h1").idempotency_key == "h1"
    assert refused('{"surface": "x", "idempotencyKey": "b"}', header="h").field == \
        "idempotencyKey"
    assert refused('{"surface": "x"}', header=" ").field == "Idempotency-Key"


def test_an_idempotency_key_in_the_body_has_no_surrounding_white_space() -> None:
    # The header's is stripped by HTTP: " k" in the body could never equal it.
    for key in (" k", "k ", "\tk", "   "):
        assert refused(json.dumps({"surface": "x", "idempotencyKey": key})).field == \
            "idempotencyKey"
    assert refused('{"surface": "x", "idempotencyKey": " k"}', header="k").field == \
        "idempotencyKey"
    assert parse('{"surface": "x", "idempotencyKey": "a b"}').idempotency_key == "a b"


def test_an_idempotency_key_header_is_printable_ascii() -> None:
    # "café" sent as UTF-8 reads as "cafÃ©" (Latin-1): another key than the body's "café".
    for header in ("caf\u00c3\u00a9", "k\x7fk", "k\x01"):
        assert refused('{"surface": "x"}', header=header).field == "Idempotency-Key"
    assert parse('{"surface": "x", "idempotencyKey": "caf\u00e9"}').idempotency_key == \
        "caf\u00e9"
    assert parse('{"surface": "x"}', header="a b-c_d:e/f=").idempotency_key == "a b-c_d:e/f="


def test_request_hash_binds_every_normalized_field_and_digests_sensitive_ones() -> None:
    base = ExecutionRequest(surface="payment.execute", action="pay", actor_id="a",
                            context={"amount": 5, "iban": "DE001"}, signals={"s": 1},
                            subject_digest="d")
    normal = normalized_request("demo", base, frozenset({"iban"}))
    assert normal["context"]["iban"].startswith("sha256:")
    assert "DE001" not in json.dumps(normal)
    digest = request_hash(normal)
    variants = [
        normalized_request("other", base, frozenset({"iban"})),
        normalized_request("demo", ExecutionRequest(**{**base.__dict__, "action": "b"}),
                           frozenset({"iban"})),
        normalized_request("demo", ExecutionRequest(**{**base.__dict__, "actor_id": "b"}),
                           frozenset({"iban"})),
        normalized_request("demo", ExecutionRequest(
            **{**base.__dict__, "context": {"amount": 5, "iban": "DE002"}}), frozenset({"iban"})),
        normalized_request("demo", ExecutionRequest(**{**base.__dict__, "signals": {}}),
                           frozenset({"iban"})),
        normalized_request("demo", ExecutionRequest(**{**base.__dict__, "subject_digest": None}),
                           frozenset({"iban"})),
    ]
    assert len({digest, *(request_hash(v) for v in variants)}) == len(variants) + 1
    # Idempotency key, session and mode are not part of what is decided on.
    same = ExecutionRequest(**{**base.__dict__, "idempotency_key": "k", "session_id": "s"})
    assert request_hash(normalized_request("demo", same, frozenset({"iban"}))) == digest

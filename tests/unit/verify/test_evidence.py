"""classify_evidence: a file's text is a token, a bundle, a receipt, or refused."""

from __future__ import annotations

import json

import pytest

from execguard.protocol.errors import VerificationError
from execguard.verify import (
    KeySet,
    classify_evidence,
    verify_bundle,
    verify_execution_token,
    verify_receipt,
)
from tests.unit.verify.kit import (
    ISSUED_AT,
    NEW,
    decision_receipt,
    filled_log,
    rotated_document,
    token,
)

KEYS = KeySet.from_document(rotated_document())


@pytest.mark.parametrize("text", [token(), f"\n  {token()}\n", json.dumps(token()),
                                  json.dumps(f" {token()}\n") + "\n"])
def test_tokens(text: str) -> None:
    kind, value = classify_evidence(text)
    assert (kind, value) == ("token", token())
    verify_execution_token(value, KEYS, now=ISSUED_AT)


def test_bundle() -> None:
    bundle = filled_log().bundle(2)
    kind, value = classify_evidence(json.dumps(bundle, indent=2))
    assert (kind, value) == ("bundle", bundle)
    verify_bundle(value, KEYS)


def test_bare_receipt() -> None:
    receipt = decision_receipt(0, NEW)
    assert classify_evidence(json.dumps(receipt)) == ("receipt", receipt)


def test_a_receipt_with_nul_text_is_read_as_stored() -> None:
    # Requests holding U+0000 are refused now; a receipt signed before that still verifies.
    receipt = decision_receipt(0, NEW, actorId="agent\x007")
    assert classify_evidence(json.dumps(receipt)) == ("receipt", receipt)
    verify_receipt(receipt, KEYS)


def test_an_execute_response_yields_its_receipt() -> None:
    receipt = decision_receipt(0, NEW)
    response = {"decision": "PERMIT", "execution_token": token(), "receipt": receipt}
    kind, value = classify_evidence(json.dumps(response))
    assert (kind, value) == ("receipt", receipt)
    verify_receipt(value, KEYS)


@pytest.mark.parametrize("text", [
    "", "   ", "hello", "42", "[]", "{}", "null", '"just text"', '"a.b.c"',
    '{"format": "execguard-bundle/2", "receipt": {}}',
    '{"receiptHash": "a", "receiptHash": "b"}',
    '{"receipt": {"receiptHash": "a"}, "receipt": {}}',
    '{"receiptHash": NaN}', '{"receiptHash": 1} trailing', '"unterminated',
    "eyJhbGciOiJFZERTQSJ9.e30", "\ud800",
], ids=repr)
def test_junk_is_refused(text: str) -> None:
    with pytest.raises(VerificationError, match="not a receipt, token or bundle"):
        classify_evidence(text)

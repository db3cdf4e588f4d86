"""Execution tokens: the permit an enforcement point checks before it executes anything."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
from typing import Any

import pytest

from execguard.protocol.errors import UnknownKey, VerificationError
from execguard.protocol.signing import Signer
from execguard.protocol.token import TOKEN_TYPE
from execguard.verify import (
    BundleMalformed,
    KeySet,
    TokenExpired,
    TokenInvalid,
    TokenMismatch,
    TokenNotYetValid,
    TokenSignatureInvalid,
    verify_execution_token,
)
from tests.unit.verify.kit import (
    EXECUTION_ID,
    ISSUED_AT,
    NEW,
    OLD,
    REQUEST_HASH,
    STRANGER,
    SURFACE,
    TENANT,
    TTL,
    keys_document,
    rotated_document,
    token,
    token_claims,
)

KEYS = KeySet.from_document(rotated_document())
NOW = ISSUED_AT + 10
EXPIRES = ISSUED_AT + TTL


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def segment(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return b64url(text.encode("utf-8"))


def header(**changes: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": NEW.key_id, **changes}


def signed(head: Any, payload: Any, signer: Signer = NEW) -> str:
    """A compact JWS signed by hand, for headers and payloads PyJWT would not write."""
    signing_input = f"{segment(head)}.{segment(payload)}"
    return f"{signing_input}.{b64url(signer.sign(signing_input.encode('ascii')))}"


def verify(text: str, **kwargs: Any) -> Any:
    return verify_execution_token(text, KEYS, **{"now": NOW, **kwargs})


# --- what must verify ------------------------------------------------------------------------


def test_a_gateway_permit_verifies_with_every_binding() -> None:
    verified = verify(token(), surface=SURFACE, request_hash=REQUEST_HASH, tenant=TENANT)
    assert verified.key_id == NEW.key_id
    assert verified.key_status == "active"
    assert verified.execution_id == EXECUTION_ID
    assert verified.expires_at == EXPIRES
    assert verified.claims["request_hash"] == REQUEST_HASH
    with pytest.raises(TypeError):
        verified.claims["tenant"] = "other"  # type: ignore[index]


def test_a_permit_of_a_retired_key_verifies_and_says_so() -> None:
    assert verify(token(OLD)).key_status == "retired"


def test_null_subject_and_policy_version_are_allowed() -> None:
    assert verify(token(sub=None, policy_version=None)).claims["sub"] is None


@pytest.mark.parametrize("now", [ISSUED_AT - 5, ISSUED_AT, EXPIRES - 1, EXPIRES + 4.999])
def test_inside_the_window_with_leeway(now: float) -> None:
    verify(token(), now=now)


# --- time --------------------------------------------------------------------------------------


@pytest.mark.parametrize("now", [EXPIRES + 5, EXPIRES + 3600])
def test_expired(now: float) -> None:
    with pytest.raises(TokenExpired, match=f"expired at {EXPIRES}"):
        verify(token(), now=now)


def test_expired_without_leeway() -> None:
    with pytest.raises(TokenExpired):
        verify(token(), now=EXPIRES, leeway_seconds=0)


@pytest.mark.parametrize("now", [ISSUED_AT - 5.001, ISSUED_AT - 600])
def test_not_yet_valid(now: float) -> None:
    with pytest.raises(TokenNotYetValid, match=f"not valid before {ISSUED_AT}"):
        verify(token(), now=now)


def test_the_clock_is_the_callers_not_pyjwts() -> None:
    # exp lies in 2026: if PyJWT read the host clock, this would depend on the day it runs.
    verify(token(), now=NOW)
    with pytest.raises(TokenExpired):
        verify(token(), now=EXPIRES + 60)


@pytest.mark.parametrize("bad", [
    {"now": float("nan")}, {"leeway_seconds": -1},
    # A NaN or infinite leeway would keep an expired permit valid for ever.
    {"now": EXPIRES + 10**6, "leeway_seconds": float("nan")},
    {"now": EXPIRES + 10**6, "leeway_seconds": float("inf")},
])
def test_caller_bugs_are_not_verification_results(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as caught:
        verify(token(), **bad)
    assert not isinstance(caught.value, VerificationError)


# --- bindings --------------------------------------------------------------------------------


@pytest.mark.parametrize(("binding", "value"), [
    ("surface", "payment.refund"),
    ("request_hash", "0" * 64),
    ("tenant", "other"),
])
def test_a_permit_for_something_else_is_refused(binding: str, value: str) -> None:
    with pytest.raises(TokenMismatch, match=repr(binding)) as caught:
        verify(token(), **{binding: value})
    assert caught.value.claim == binding


def test_issuer_must_be_the_documents_authority() -> None:
    with pytest.raises(TokenMismatch, match="'iss'"):
        verify(token(iss="another-gateway"))
    unnamed = KeySet.from_document(keys_document(authority=None))
    verify_execution_token(token(iss="another-gateway"), unnamed, now=NOW)


# --- forgeries -------------------------------------------------------------------------------


def test_another_key_using_a_pinned_kid() -> None:
    forged = signed(header(), token_claims(), STRANGER)
    with pytest.raises(TokenSignatureInvalid, match=NEW.key_id):
        verify(forged)


def test_a_pinned_kid_on_the_wrong_pinned_key() -> None:
    with pytest.raises(TokenSignatureInvalid):
        verify(signed(header(kid=NEW.key_id), token_claims(), OLD))


def test_unknown_kid() -> None:
    with pytest.raises(UnknownKey, match=STRANGER.key_id):
        verify(token(STRANGER))


def test_alg_none_is_refused() -> None:
    unsigned = f"{segment(header(alg='none'))}.{segment(token_claims())}."
    with pytest.raises(TokenInvalid):
        verify(unsigned)
    # the same with a dummy signature, so the header check itself is exercised
    with pytest.raises(TokenInvalid, match="alg is 'none'"):
        verify(unsigned + b64url(bytes(64)))


def test_hs256_keyed_with_the_public_pem_is_refused() -> None:
    # The classic confusion: a verifier that lets the header pick the algorithm would use
    # the public key's PEM, which everybody has, as an HMAC secret.
    signing_input = f"{segment(header(alg='HS256'))}.{segment(token_claims(tenant='evil'))}"
    mac = hmac.new(NEW.public_pem.encode("ascii"), signing_input.encode("ascii"),
                   hashlib.sha256).digest()
    with pytest.raises(TokenInvalid, match="alg is 'HS256'"):
        verify(f"{signing_input}.{b64url(mac)}")


@pytest.mark.parametrize("changes", [
    {"typ": "JWT"}, {"typ": None}, {"kid": None}, {"kid": ""}, {"crit": ["exp"]},
    {"alg": "ES256"}, {"alg": "eddsa"},
], ids=str)
def test_bad_headers(changes: dict[str, Any]) -> None:
    head = {k: v for k, v in header(**changes).items() if v is not None}
    with pytest.raises(TokenInvalid):
        verify(signed(head, token_claims()))


def test_every_character_change_fails() -> None:
    # Each character replaced by its neighbours in the base64url alphabet: this includes
    # the spellings that differ only in unused low bits of a segment's last character.
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    original = token()
    for position, char in enumerate(original):
        if char == ".":
            continue
        at = alphabet.index(char)
        for other in {alphabet[at - 1], alphabet[(at + 1) % 64]}:
            changed = original[:position] + other + original[position + 1:]
            with pytest.raises(VerificationError):
                verify(changed)


# --- malformed tokens and claims -----------------------------------------------------------


@pytest.mark.parametrize("claim", ["iss", "aud", "jti", "iat", "nbf", "exp", "tenant",
                                   "surface", "request_hash", "policy_version", "sub"])
def test_missing_claims(claim: str) -> None:
    claims = token_claims()
    del claims[claim]
    with pytest.raises(TokenInvalid, match=repr(claim)):
        verify(signed(header(), claims))


@pytest.mark.parametrize("changes", [
    {"exp": str(EXPIRES)}, {"exp": True}, {"nbf": 1.5}, {"iat": None},
    {"request_hash": REQUEST_HASH.upper()}, {"request_hash": "abc"}, {"jti": ""},
    {"tenant": 7}, {"sub": 7}, {"aud": "payment.refund"},
], ids=str)
def test_mistyped_claims(changes: dict[str, Any]) -> None:
    with pytest.raises(TokenInvalid):
        verify(signed(header(), token_claims(**changes)))


def test_duplicate_claims_are_refused() -> None:
    # Parsers differ on which duplicate wins; a signed token must mean one thing.
    body = json.dumps(token_claims())[:-1] + ', "tenant": "evil"}'
    with pytest.raises(TokenInvalid, match="unique keys"):
        verify(signed(header(), body))


@pytest.mark.parametrize("text", [
    "", "garbage", "a.b.c", "a.b", token() + ".x", " " + token(), token() + "=",
    token().replace(".", ". ", 1), "x" * 9000, f"{segment([1])}.{segment({})}.{b64url(bytes(64))}",
    f"{segment(header())}.{segment('null')}.{b64url(bytes(64))}",
    f"{segment(header())}.{segment(token_claims())}.{b64url(bytes(63))}",
], ids=lambda t: t[:20])
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(TokenInvalid):
        verify(text)


def test_error_hierarchy() -> None:
    for error in (TokenExpired, TokenNotYetValid, TokenMismatch, TokenSignatureInvalid):
        assert issubclass(error, TokenInvalid)
    assert issubclass(TokenInvalid, VerificationError)
    assert not issubclass(TokenExpired, TokenMismatch)
    assert issubclass(BundleMalformed, VerificationError)
    assert not issubclass(BundleMalformed, TokenInvalid)

"""The execution token is issued without PyJWT: it must be what PyJWT makes and reads."""

from __future__ import annotations

import jwt
from hypothesis import given
from hypothesis import strategies as st

from execguard.protocol.signing import Signer
from execguard.protocol.token import TOKEN_TYPE, execution_token_claims, issue_execution_token

SIGNER = Signer.generate()


def _claims(actor: str | None) -> dict[str, object]:
    return execution_token_claims(
        issuer="execguard", tenant="demo", surface="payment.execute", request_hash="ab" * 32,
        execution_id="3f2b8c1e-0000-4000-8000-000000000000", actor_id=actor,
        policy_version="cd" * 32, issued_at=1_790_000_000, ttl_seconds=60)


def _decoded(token: str) -> dict[str, object]:
    return jwt.decode(token, SIGNER.public_key, algorithms=["EdDSA"],
                      audience="payment.execute",
                      options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                               "verify_sub": False})


def test_ascii_claims_give_the_bytes_pyjwt_gives() -> None:
    claims = _claims("agent-7")
    expected = jwt.encode(claims, SIGNER.private_key, algorithm="EdDSA",
                          headers={"kid": SIGNER.key_id, "typ": TOKEN_TYPE})
    assert issue_execution_token(claims, SIGNER) == expected


def test_header_names_the_key_and_the_type() -> None:
    header = jwt.get_unverified_header(issue_execution_token(_claims(None), SIGNER))
    assert header == {"alg": "EdDSA", "kid": SIGNER.key_id, "typ": TOKEN_TYPE}


@given(st.one_of(st.none(), st.text(min_size=1, max_size=40)))
def test_any_actor_round_trips_through_pyjwt(actor: str | None) -> None:
    claims = _claims(actor)
    assert _decoded(issue_execution_token(claims, SIGNER)) == claims


def test_libsodium_and_cryptography_sign_alike() -> None:
    for message in (b"", b"x", bytes(range(256))):
        assert SIGNER.sign(message) == SIGNER.private_key.sign(message)

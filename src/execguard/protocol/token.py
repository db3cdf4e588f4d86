"""Execution tokens: the signed, short-lived permit that comes with a PERMIT.

A JWT (RFC 7519) signed with EdDSA (Ed25519), ``kid`` naming the key in the
keys document. Its claims are listed in docs/PROTOCOL.md, "Execution token".

Issued here without PyJWT, which spends more on key preparation, header
validation and JSON than on the signature itself, on every PERMIT. The bytes
are what PyJWT would make for ASCII claims (sorted compact header, compact
payload in claim order); non-ASCII text is sent as UTF-8 rather than ``\\u``
escapes, which every JWT library reads the same. Tests check both.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

import orjson

from execguard.protocol.signing import Signer

__all__ = ["TOKEN_TYPE", "execution_token_claims", "issue_execution_token"]

TOKEN_TYPE = "execguard-permit+jwt"


def execution_token_claims(
    *,
    issuer: str,
    tenant: str,
    surface: str,
    request_hash: str,
    execution_id: str,
    actor_id: str | None,
    policy_version: str | None,
    issued_at: int,
    ttl_seconds: int,
) -> dict[str, Any]:
    """The claims of an execution token (times in whole seconds since the epoch)."""
    return {
        "iss": issuer,
        "sub": actor_id,
        "aud": surface,
        "jti": execution_id,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl_seconds,
        "tenant": tenant,
        "surface": surface,
        "request_hash": request_hash,
        "policy_version": policy_version,
    }


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@functools.lru_cache(maxsize=64)
def _header_segment(key_id: str) -> bytes:
    # Keys sorted, as PyJWT writes them; the same for every token of one key.
    return _b64url(orjson.dumps({"alg": "EdDSA", "kid": key_id, "typ": TOKEN_TYPE},
                                option=orjson.OPT_SORT_KEYS))


def issue_execution_token(claims: dict[str, Any], signer: Signer) -> str:
    """Sign the claims as a compact JWS (JWT) with EdDSA: ``header.payload.signature``."""
    signing_input = _header_segment(signer.key_id) + b"." + _b64url(orjson.dumps(claims))
    return (signing_input + b"." + _b64url(signer.sign(signing_input))).decode("ascii")

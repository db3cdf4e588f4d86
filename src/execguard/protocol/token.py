"""Execution tokens: the signed, short-lived permit that comes with a PERMIT.

A JWT (RFC 7519) signed with EdDSA (Ed25519), ``kid`` naming the key in the
keys document. Its claims are listed in docs/PROTOCOL.md, "Execution token".
"""

from __future__ import annotations

from typing import Any

import jwt

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


def issue_execution_token(claims: dict[str, Any], signer: Signer) -> str:
    """Sign the claims as a compact JWT with EdDSA."""
    return jwt.encode(
        claims, signer.private_key, algorithm="EdDSA",
        headers={"kid": signer.key_id, "typ": TOKEN_TYPE},
    )

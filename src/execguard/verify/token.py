"""Offline verification of execution tokens (docs/PROTOCOL.md §5), for enforcement points.

An enforcement point calls :func:`verify_execution_token` right before it
executes an action. It reads the clock only through ``now``, trusts only the
pinned :class:`KeySet`, and accepts exactly one algorithm (EdDSA), chosen here,
never by the token.

    VerificationError
    └── TokenInvalid                  the token is not a valid permit
        ├── TokenSignatureInvalid     the signature does not verify under ``kid``
        ├── TokenExpired              now is past exp (plus leeway)
        ├── TokenNotYetValid          now is before nbf (minus leeway)
        └── TokenMismatch             a claim differs from what the caller is about to do
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt

from execguard.protocol.errors import VerificationError
from execguard.protocol.token import TOKEN_TYPE
from execguard.verify.keys import KeySet

__all__ = [
    "TokenExpired",
    "TokenInvalid",
    "TokenMismatch",
    "TokenNotYetValid",
    "TokenSignatureInvalid",
    "VerifiedToken",
    "verify_execution_token",
]

#: The only JWS algorithm a permit may use; the token's header is checked against it.
ALGORITHM = "EdDSA"

# Compact JWS (RFC 7515 §7.1): three base64url segments without padding.
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Real permits are a few hundred characters; refuse anything absurd before decoding it.
_MAX_TOKEN_LENGTH = 8192
_SIGNATURE_SIZE = 64
_STRING_CLAIMS = ("iss", "aud", "jti", "tenant", "surface")
_TIME_CLAIMS = ("iat", "nbf", "exp")


class TokenInvalid(VerificationError):
    """The execution token is not a well-formed, correctly signed permit."""

    code = "token_invalid"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"execution token rejected: {reason}")


class TokenSignatureInvalid(TokenInvalid):
    """The token's signature does not verify under the pinned key its ``kid`` names."""

    code = "token_signature_invalid"

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"the signature does not verify under key {key_id!r}")


class TokenExpired(TokenInvalid):
    """The token's ``exp`` (plus the leeway) has passed."""

    code = "token_expired"

    def __init__(self, expires_at: int, now: float, leeway_seconds: int) -> None:
        self.expires_at, self.now = expires_at, now
        super().__init__(f"it expired at {expires_at} (now {now:.0f}, "
                         f"leeway {leeway_seconds} s)")


class TokenNotYetValid(TokenInvalid):
    """The token's ``nbf`` (minus the leeway) is still in the future."""

    code = "token_not_yet_valid"

    def __init__(self, not_before: int, now: float, leeway_seconds: int) -> None:
        self.not_before, self.now = not_before, now
        super().__init__(f"it is not valid before {not_before} (now {now:.0f}, "
                         f"leeway {leeway_seconds} s)")


class TokenMismatch(TokenInvalid):
    """A claim differs from the surface, request or tenant the caller is about to act on."""

    code = "token_mismatch"

    def __init__(self, claim: str, expected: str, got: Any) -> None:
        self.claim, self.expected, self.got = claim, expected, got
        super().__init__(f"claim {claim!r} is {got!r}, expected {expected!r}")


@dataclass(frozen=True)
class VerifiedToken:
    """A permit whose header, signature, claims and validity window all checked out."""

    claims: Mapping[str, Any]
    key_id: str
    key_status: str
    execution_id: str
    expires_at: int


def _b64url(segment: str, what: str) -> bytes:
    """Decode unpadded base64url, accepting only its canonical spelling.

    The last character may carry unused bits; refusing other spellings means no
    two token texts carry the same bytes.
    """
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise TokenInvalid(f"the {what} is not base64url") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        raise TokenInvalid(f"the {what} is not canonical base64url")
    return raw


def _b64url_json(segment: str, what: str) -> dict[str, Any]:
    """Decode one segment as a JSON object; duplicate keys are refused, so no other
    JWT parser can read a different claim than the one checked here."""
    raw = _b64url(segment, what)
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys,
                           parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenInvalid(f"the {what} is not a JSON object with unique keys") from None
    if not isinstance(value, dict):
        raise TokenInvalid(f"the {what} is not a JSON object")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_header(header: Mapping[str, Any]) -> str:
    """Step 1's header rules; return ``kid``."""
    alg = header.get("alg")
    # Exactly EdDSA: "none", HS256 keyed with the public PEM and every other choice are
    # refused here, before any key is looked at (no algorithm confusion).
    if alg != ALGORITHM:
        raise TokenInvalid(f"header alg is {alg!r}, only {ALGORITHM!r} is accepted")
    if header.get("typ") != TOKEN_TYPE:
        raise TokenInvalid(f"header typ is {header.get('typ')!r}, expected {TOKEN_TYPE!r}")
    # RFC 7515 §4.1.11: extensions marked critical must be understood; we understand none.
    if "crit" in header:
        raise TokenInvalid("header has critical extensions ('crit'), none are supported")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenInvalid("header has no kid")
    return kid


def _check_claims(claims: Mapping[str, Any], authority: str | None) -> None:
    """Step 4: every claim of PROTOCOL.md §5, with its type."""
    for name in _STRING_CLAIMS:
        if not isinstance(claims.get(name), str) or not claims[name]:
            raise TokenInvalid(f"claim {name!r} is missing or not a non-empty string")
    for name in _TIME_CLAIMS:
        value = claims.get(name)
        # bool is an int in Python; a permit's times are whole seconds, nothing else.
        if not isinstance(value, int) or isinstance(value, bool):
            raise TokenInvalid(f"claim {name!r} is missing or not whole seconds")
    request_hash = claims.get("request_hash")
    if not isinstance(request_hash, str) or not _HEX64.fullmatch(request_hash):
        raise TokenInvalid("claim 'request_hash' is missing or not 64 lowercase hex digits")
    for name in ("sub", "policy_version"):
        if name not in claims:
            raise TokenInvalid(f"claim {name!r} is missing")
        if claims[name] is not None and not isinstance(claims[name], str):
            raise TokenInvalid(f"claim {name!r} is neither a string nor null")
    if claims["aud"] != claims["surface"]:
        raise TokenInvalid(f"claim 'aud' ({claims['aud']!r}) is not the surface "
                           f"({claims['surface']!r})")
    # The pinned document names its authority; a permit claiming another issuer is not its.
    if authority is not None and claims["iss"] != authority:
        raise TokenMismatch("iss", authority, claims["iss"])


def verify_execution_token(
    token: str,
    keys: KeySet,
    *,
    now: float,
    leeway_seconds: int = 5,
    surface: str | None = None,
    request_hash: str | None = None,
    tenant: str | None = None,
) -> VerifiedToken:
    """Verify a permit offline before executing; return it or raise :class:`VerificationError`.

    1. compact JWS shape; header ``alg`` exactly ``EdDSA``, ``typ``
       ``execguard-permit+jwt``, ``kid`` present;
    2. ``kid`` names a key of the pinned document (:class:`UnknownKey`);
    3. the signature verifies under that key (:class:`TokenSignatureInvalid`);
    4. every claim is present with its type, ``aud`` equals ``surface``, and
       ``iss`` equals the document's authority when it names one;
    5. ``nbf - leeway <= now < exp + leeway`` (:class:`TokenNotYetValid`,
       :class:`TokenExpired`);
    6. the ``surface``, ``request_hash`` and ``tenant`` given by the caller equal
       the claims (:class:`TokenMismatch`).

    A retired key still verifies (permits issued just before a rotation stay
    usable for their short lifetime); ``key_status`` says which kind signed.
    """
    # Caller bugs, not bad tokens: a NaN clock would make every window check pass.
    if not math.isfinite(now):
        raise ValueError("now must be a finite number of seconds since the epoch")
    # Likewise a NaN or infinite leeway would keep an expired permit valid for ever.
    if not math.isfinite(leeway_seconds) or leeway_seconds < 0:
        raise ValueError("leeway_seconds must be a finite, non-negative number of seconds")
    # 1. shape and header
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH:
        raise TokenInvalid("not a token string of reasonable length")
    if not _COMPACT.fullmatch(token):
        raise TokenInvalid("not a compact JWS (three base64url segments)")
    header_b64, payload_b64, signature_b64 = token.split(".")
    kid = _check_header(_b64url_json(header_b64, "header"))
    claims = _b64url_json(payload_b64, "payload")
    if len(_b64url(signature_b64, "signature")) != _SIGNATURE_SIZE:
        raise TokenInvalid(f"the signature is not {_SIGNATURE_SIZE} bytes (Ed25519)")
    # 2. the key: only the pinned document decides which keys exist
    key = keys.get(kid)
    # 3. the signature. PyJWT checks only the signature here: the clock and the claims are
    # checked below against the caller's ``now``, so a verifier never depends on its host's time.
    try:
        jwt.decode(token, key.public_key, algorithms=[ALGORITHM],
                   options={"verify_signature": True, "verify_exp": False,
                            "verify_nbf": False, "verify_iat": False, "verify_aud": False,
                            "verify_iss": False, "verify_sub": False, "verify_jti": False,
                            "require": []})
    except jwt.InvalidSignatureError:
        raise TokenSignatureInvalid(kid) from None
    except jwt.PyJWTError as exc:
        raise TokenInvalid(f"PyJWT refused it: {exc}") from None
    # 4. the claims (read from the strictly parsed payload, the same bytes that were signed)
    _check_claims(claims, keys.authority)
    # 5. the validity window
    if now >= claims["exp"] + leeway_seconds:
        raise TokenExpired(claims["exp"], now, leeway_seconds)
    if now < claims["nbf"] - leeway_seconds:
        raise TokenNotYetValid(claims["nbf"], now, leeway_seconds)
    # 6. bindings to what the caller is about to execute
    for claim, expected in (("surface", surface), ("request_hash", request_hash),
                            ("tenant", tenant)):
        if expected is not None and claims[claim] != expected:
            raise TokenMismatch(claim, expected, claims[claim])
    return VerifiedToken(MappingProxyType(claims), kid, key.status, claims["jti"],
                         claims["exp"])

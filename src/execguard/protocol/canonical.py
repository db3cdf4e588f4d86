"""RFC 8785 (JCS) canonical JSON, failing closed.

Every hash ExecGuard computes is over these bytes. Values with no exact
canonical form (NaN, infinities, integers beyond ±(2**53 - 1), non-string
keys, lone surrogates) raise :class:`CanonicalizationError` instead of being
coerced.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from execguard.protocol.errors import CanonicalizationError

__all__ = ["canonical_json", "canonical_sha256", "sha256_hex"]


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON-compatible value."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise CanonicalizationError(str(exc)) from exc
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise CanonicalizationError(f"value has no canonical JSON form: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def canonical_sha256(value: Any) -> str:
    """Lowercase hex SHA-256 of the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))

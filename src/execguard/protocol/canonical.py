"""RFC 8785 (JCS) canonical JSON, failing closed.

Every hash ExecGuard computes is over these bytes. Values with no exact
canonical form (NaN, infinities, integers beyond ±(2**53 - 1), non-string
keys, lone surrogates) raise :class:`CanonicalizationError` instead of being
coerced.

Speed: receipts, leaves and requests are hashed on every decision and on
every audited entry, and ``rfc8785`` costs ~38 µs for a receipt. ``orjson``
with sorted keys produces the same bytes, ~20x faster, for documents made
only of strings, safe integers, booleans, null, lists and objects whose keys
are in the Basic Multilingual Plane (RFC 8785 §3.2.3 sorts keys by UTF-16 code
units, orjson by code points: they differ only beyond U+FFFF), and of the
floats whose two spellings agree: not integral (ECMAScript writes ``1.0`` as
``1``) and of magnitude in [1e-4, 1e15) (outside it the exponent notations
differ). Both print a float's shortest round-trip digits, so inside that range
the bytes are the same; amounts like ``0.01`` are the common case. Such
documents take the fast path; anything else goes through ``rfc8785``.
Property tests compare the two on random documents and random floats.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import rfc8785

from execguard.protocol.errors import CanonicalizationError

__all__ = ["canonical_json", "canonical_sha256", "sha256_hex"]

_MAX_SAFE = 2**53 - 1
_MAX_DEPTH = 64


_SCALARS = frozenset({str, bool, type(None)})
_ALLOWED = frozenset({str, bool, type(None), int, float, dict, list})
#: Floats whose orjson spelling is their RFC 8785 spelling (see the module doc).
_FLOAT_LOW, _FLOAT_HIGH = 1e-4, 1e15


def _same_float(value: float) -> bool:
    return _FLOAT_LOW <= abs(value) < _FLOAT_HIGH and not value.is_integer()


def _fast_path_ok(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is in the domain where orjson's bytes equal RFC 8785's.

    Written as whole-collection passes (``set(map(type, ...))``, one ``join`` of
    the keys) rather than a call per value: it runs for every hash on the
    decision and audit paths.
    """
    kind = type(value)
    if kind is dict:
        try:
            keys = "".join(value)
        except TypeError:
            return False  # a non-string key
        if not keys.isascii() and max(map(ord, keys)) > 0xFFFF:
            return False
        values: Any = value.values()
    elif kind is list:
        values = value
    else:
        return kind in _SCALARS or (kind is int and -_MAX_SAFE <= value <= _MAX_SAFE) \
            or (kind is float and _same_float(value))
    types = set(map(type, values))
    if types <= _SCALARS:
        return True
    if not types <= _ALLOWED or depth > _MAX_DEPTH:
        return False
    if int in types and not all(-_MAX_SAFE <= v <= _MAX_SAFE for v in values if type(v) is int):
        return False
    if float in types and not all(_same_float(v) for v in values if type(v) is float):
        return False
    if dict in types or list in types:
        return all(_fast_path_ok(v, depth + 1) for v in values if type(v) in (dict, list))
    return True


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON-compatible value."""
    if _fast_path_ok(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # e.g. a lone surrogate: let rfc8785 give the precise refusal
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

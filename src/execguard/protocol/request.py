"""The execution request: parsing the wire body and hashing the normalized request.

The body is TrigGuard-compatible camelCase JSON. Parsing is strict where it
matters for safety (types, duplicate keys, numbers with no exact form,
reserved context keys) and lenient where clients differ (unknown extra fields
are ignored; ``context`` and ``signals`` may be omitted).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from execguard.protocol.canonical import canonical_sha256
from execguard.protocol.errors import MalformedRequest

__all__ = [
    "EXECUTION_MODES",
    "MAX_SAFE_INTEGER",
    "RESERVED_CONTEXT_KEYS",
    "ExecutionRequest",
    "describe",
    "digest_value",
    "normalized_request",
    "parse_execution_request",
    "parse_json_object",
    "request_hash",
]

#: RFC 8785 / I-JSON: integers beyond this have no exact JSON number form.
MAX_SAFE_INTEGER = 2**53 - 1
#: Context keys that ExecGuard computes itself; a caller may not send them.
RESERVED_CONTEXT_KEYS = frozenset({"facts", "now"})
EXECUTION_MODES = ("enforce", "observe")
MAX_DEPTH = 32

_SURFACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}\Z")


@dataclass(frozen=True)
class ExecutionRequest:
    """A validated ``POST /execute`` body."""

    surface: str
    action: str | None = None
    actor_id: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)
    signals: Mapping[str, Any] = field(default_factory=dict)
    subject_digest: str | None = None
    session_id: str | None = None
    idempotency_key: str | None = None
    execution_mode: str = "enforce"


def describe(value: Any) -> str:
    """A short description of a JSON value, for error messages ("got ...")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        text = str(value)
        return f"a {len(text.lstrip('-'))}-digit integer" if len(text) > 20 else f"integer {text}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _reject_constant(name: str) -> Any:
    raise MalformedRequest("body", "standard JSON numbers", f"the non-standard literal {name}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise MalformedRequest("body", "unique keys in every JSON object",
                                   f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _float_as_written(text: str) -> float:
    """A JSON number with a fraction or an exponent, as a float, if the float is the number
    written: one more precise than a float was read as another, so a policy decided on
    an amount other than the one sent (and forwarded) on."""
    value = float(text)
    shortest = repr(value)
    if shortest != text and math.isfinite(value) and Decimal(text) != Decimal(shortest):
        written = text if len(text) <= 40 else text[:37] + "..."
        raise MalformedRequest("body", "numbers no more precise than a 64-bit float (about 17 "
                               "significant digits)", f"the number {written}, which a float "
                               f"holds only as {shortest}")
    return value  # out of range (inf): refused where its field is known, by _check_values


#: One strict decoder for every body: ``json.loads`` with these arguments builds one per call.
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_object,
                                parse_constant=_reject_constant,
                                parse_float=_float_as_written)


#: Where a value is: a field name, or (where its container is, its key or index). Spelt
#: out (``context.items[2]``) only for an error: every value of every body is checked.
_Path = str | tuple["_Path", str | int]


def _spelt(path: _Path) -> str:
    if isinstance(path, str):
        return path
    parent, step = path
    return f"{_spelt(parent)}[{step}]" if isinstance(step, int) else f"{_spelt(parent)}.{step}"


def _too_deep(path: _Path) -> MalformedRequest:
    return MalformedRequest(_spelt(path), f"at most {MAX_DEPTH} levels of nesting",
                            "deeper nesting")


def _check_values(value: Any, path: _Path, depth: int = 0, refuse_nul: bool = True) -> None:
    """Refuse values with no exact canonical form, and (if ``refuse_nul``) text holding
    U+0000, naming where they are.

    Why NUL: PostgreSQL cannot store it in a text column, so a request that SQLite
    would take would fail there, at the append, together with every request of its
    transaction. Refused here, the same request gets the same answer on every backend.
    """
    if depth > MAX_DEPTH:
        raise _too_deep(path)
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise MalformedRequest(
                _spelt(path), f"an integer within ±{MAX_SAFE_INTEGER}", describe(value)
            )
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedRequest(_spelt(path), "a finite number",
                                   "a number out of the float range")
    elif isinstance(value, str):
        if refuse_nul and "\x00" in value:
            raise MalformedRequest(_spelt(path), "text without NUL (U+0000) characters",
                                   describe(value))
        if value.isascii():
            return  # no surrogate is ASCII
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedRequest(_spelt(path), "valid Unicode text",
                                   "a lone surrogate") from None
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, (path, index), depth + 1, refuse_nul)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, path, depth + 1, refuse_nul)
            _check_values(item, (path, key), depth + 1, refuse_nul)


def parse_json_object(body: bytes, what: str = "body", *, nul: bool = False) -> dict[str, Any]:
    """Parse bytes as one JSON object, strictly: UTF-8, no duplicate keys, no NaN, at most
    ``MAX_DEPTH`` levels, and no text holding U+0000 unless ``nul`` (for documents that
    were stored before it was refused, such as evidence)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest(what, "UTF-8 encoded JSON", "bytes that are not UTF-8") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _STRICT_JSON.decode(text)
    except json.JSONDecodeError as exc:
        raise MalformedRequest(
            what, "a JSON object",
            f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:  # nested far deeper than MAX_DEPTH: the decoder gave up first
        raise _too_deep(what) from None
    except ValueError:
        raise MalformedRequest(what, "a JSON object", "JSON that cannot be read exactly") from None
    if not isinstance(value, dict):
        raise MalformedRequest(what, "a JSON object", describe(value))
    # JSON text can hold U+0000 only as the escape \u0000: without one, no string has it.
    _check_values(value, what, 0, not nul and "\\u0000" in text)
    return value


def _optional_str(body: Mapping[str, Any], key: str, max_len: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedRequest(key, "a string", describe(value))
    if not value or len(value) > max_len:
        raise MalformedRequest(key, f"a string of 1 to {max_len} characters", describe(value))
    return value


def _optional_object(body: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedRequest(key, "a JSON object", describe(value))
    return value


def parse_execution_request(
    body: bytes, *, idempotency_header: str | None = None
) -> ExecutionRequest:
    """Validate a ``POST /execute`` body; raise :class:`MalformedRequest` naming the field."""
    data = parse_json_object(body)
    surface = data.get("surface")
    if surface is None:
        raise MalformedRequest("surface", "a surface name such as 'payment.execute'", "nothing")
    if not isinstance(surface, str):
        raise MalformedRequest("surface", "a string", describe(surface))
    if not _SURFACE_RE.match(surface):
        raise MalformedRequest(
            "surface", "1 to 200 letters, digits or . _ : - (starting with a letter or digit)",
            describe(surface),
        )
    context = _optional_object(data, "context")
    for reserved in sorted(RESERVED_CONTEXT_KEYS & context.keys()):
        raise MalformedRequest(
            f"context.{reserved}",
            f"no caller-supplied {reserved!r} (ExecGuard computes it)",
            describe(context[reserved]),
        )
    mode = data.get("executionMode", "enforce")
    if mode is None:
        mode = "enforce"
    if mode not in EXECUTION_MODES:
        raise MalformedRequest("executionMode", "'enforce' or 'observe'", describe(mode))
    key = _optional_str(data, "idempotencyKey", 255)
    if key is not None and key != key.strip():
        # HTTP strips a header's surrounding white space, so the header cannot carry it:
        # kept in the body, " k" and the header "k" were two keys, and sending both failed.
        raise MalformedRequest("idempotencyKey", "a key without leading or trailing white "
                               "space", describe(key))
    if idempotency_header is not None:
        header = idempotency_header.strip()
        if not header or len(header) > 255:
            raise MalformedRequest(
                "Idempotency-Key", "a header of 1 to 255 characters", describe(header)
            )
        if not (header.isascii() and header.isprintable()):
            # Clients encode header text differently (UTF-8, Latin-1) and servers read it
            # as Latin-1: one key typed twice could be two keys, or match another's.
            raise MalformedRequest(
                "Idempotency-Key", "printable ASCII (send other text in the body's "
                "idempotencyKey)", describe(header))
        if key is not None and key != header:
            raise MalformedRequest(
                "idempotencyKey", "the same value as the Idempotency-Key header", describe(key)
            )
        key = header
    return ExecutionRequest(
        surface=surface,
        action=_optional_str(data, "action", 200),
        actor_id=_optional_str(data, "actorId", 256),
        context=context,
        signals=_optional_object(data, "signals"),
        subject_digest=_optional_str(data, "subjectDigest", 256),
        session_id=_optional_str(data, "sessionId", 256),
        idempotency_key=key,
        execution_mode=mode,
    )


def digest_value(value: Any) -> str:
    """The stored stand-in for a sensitive value: ``sha256:`` + hex of its canonical JSON."""
    return "sha256:" + canonical_sha256(value)


def normalized_request(
    tenant: str, request: ExecutionRequest, sensitive: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The object the request hash covers (docs/PROTOCOL.md, "Request hash").

    Sensitive context fields are replaced by their digest, so the stored
    request never holds them in clear while the hash still binds to them.
    """
    context = {
        key: digest_value(value) if key in sensitive else value
        for key, value in request.context.items()
    }
    return {
        "tenant": tenant,
        "surface": request.surface,
        "action": request.action,
        "actorId": request.actor_id,
        "context": context,
        "signals": dict(request.signals),
        "subjectDigest": request.subject_digest,
    }


def request_hash(normalized: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of the RFC 8785 form of a normalized request."""
    return canonical_sha256(dict(normalized))

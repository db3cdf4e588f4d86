"""Tell what a piece of evidence is before verifying it: token, bundle or receipt.

Only the shape is looked at here; nothing is trusted until the matching
verifier (:func:`verify_execution_token`, :func:`verify_bundle`,
:func:`verify_receipt`) has checked it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from execguard.protocol.errors import MalformedRequest, VerificationError
from execguard.protocol.request import parse_json_object
from execguard.verify.bundle import BUNDLE_FORMAT
from execguard.verify.receipt import extract_receipt

__all__ = ["classify_evidence", "read_evidence_json"]

# A compact JWS: three base64url segments (the header always starts with "eyJ", i.e. '{"').
_COMPACT_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _not_evidence(why: str) -> VerificationError:
    return VerificationError(f"the evidence is not a receipt, token or bundle: {why}")


def read_evidence_json(data: bytes | str, what: str = "the evidence") -> dict[str, Any]:
    """Read one JSON object of evidence the one strict way, or raise VerificationError.

    As the gateway reads requests: duplicate keys, NaN and unsafe integers are
    refused, so no two readers can disagree about what the evidence says. Text
    holding U+0000 is read as it was stored (requests refuse it; old evidence may
    hold it).
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    try:
        return parse_json_object(raw, what, nul=True)
    except MalformedRequest as exc:
        raise VerificationError(f"{what} is not strict JSON: expected {exc.expected}, "
                                f"got {exc.got}") from None


def classify_evidence(text: str) -> tuple[str, Any]:
    """Return ``("token", str)``, ``("bundle", dict)`` or ``("receipt", dict)``.

    A token may stand alone (surrounding white space is ignored) or be a JSON
    string. A receipt may be bare or held under ``receipt`` (an ``/execute``
    response, a stored record); the receipt itself is returned. JSON is read
    as the gateway reads requests: duplicate keys, NaN and unsafe integers are
    refused, so no two readers can disagree about what the evidence says.
    """
    stripped = text.strip() if isinstance(text, str) else ""
    if _COMPACT_JWT.fullmatch(stripped):
        return "token", stripped
    if stripped.startswith('"'):
        try:
            inner = json.loads(stripped)
        except ValueError:
            raise _not_evidence("invalid JSON string") from None
        if isinstance(inner, str) and _COMPACT_JWT.fullmatch(inner.strip()):
            return "token", inner.strip()
        raise _not_evidence("a JSON string that is not a compact JWT")
    try:
        document = read_evidence_json(stripped)
    except VerificationError as exc:
        raise _not_evidence(str(exc)) from None
    if "format" in document:
        if document["format"] == BUNDLE_FORMAT:
            return "bundle", document
        raise _not_evidence(f"unsupported format {document['format']!r}")
    try:
        return "receipt", dict(extract_receipt(document))
    except VerificationError:
        raise _not_evidence("a JSON object without 'receiptHash' or 'receipt'") from None

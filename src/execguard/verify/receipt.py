"""Offline receipt verification against a pinned keys document.

Needs only ``protocol``: no server, no database, no network.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from execguard.protocol.errors import CanonicalizationError, VerificationError
from execguard.protocol.receipt import check_receipt
from execguard.verify.keys import KeySet

__all__ = ["KeySet", "VerifiedReceipt", "extract_receipt", "verify_receipt"]


@dataclass(frozen=True)
class VerifiedReceipt:
    """A receipt whose hash recipe and signature both verified."""

    receipt: Mapping[str, Any]
    receipt_hash: str
    key_id: str
    key_status: str


def extract_receipt(document: Any) -> Mapping[str, Any]:
    """Accept a bare receipt, or a response or record that carries one under ``receipt``."""
    if isinstance(document, Mapping) and isinstance(document.get("receipt"), Mapping):
        return document["receipt"]
    if isinstance(document, Mapping) and "receiptHash" in document:
        return document
    raise VerificationError("no receipt found: expected an object with 'receiptHash', "
                            "or one with a 'receipt' object")


def _signature_is_canonical(text: Any) -> bool:
    """Strict base64 *and* its one canonical spelling.

    Base64 of 64 bytes leaves 4 unused bits in its last character; without this
    check several texts carry the same signature, so a sealed receipt could be
    edited without the edit being detected.
    """
    if not isinstance(text, str):
        return False
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return base64.b64encode(raw).decode("ascii") == text


def verify_receipt(receipt: Mapping[str, Any], keys: KeySet) -> VerifiedReceipt:
    """Verify a receipt offline, or raise :class:`VerificationError` saying why.

    1. ``authorityKeyId`` names a key of the pinned document;
    2. ``authoritySignature`` is spelled as canonical standard base64;
    3. ``receiptHash`` equals the hash recomputed from every other field
       (so editing any field, not only the signature, fails);
    4. ``authoritySignature`` verifies over the raw hash bytes under that key.
    """
    if not isinstance(receipt, Mapping):
        raise VerificationError("a receipt is a JSON object")
    # 1. the key
    key_id = receipt.get("authorityKeyId")
    if not isinstance(key_id, str) or not key_id:
        raise VerificationError("the receipt has no authorityKeyId")
    key = keys.get(key_id)
    # 2. one spelling per signature
    if not _signature_is_canonical(receipt.get("authoritySignature")):
        raise VerificationError("authoritySignature is missing or not canonical standard base64")
    # 3 and 4. the recipe, then the signature
    try:
        digest = check_receipt(receipt, key.public_key)
    except CanonicalizationError as exc:
        # A field with no canonical form cannot have been hashed by a gateway.
        raise VerificationError(f"the receipt cannot be hashed: {exc}") from None
    return VerifiedReceipt(receipt, digest, key_id, key.status)

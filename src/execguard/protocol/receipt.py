"""Receipts: the hash recipe, sealing (hash + signature) and checking.

The recipe (docs/PROTOCOL.md, "Receipt hash"): take every field of the
receipt except ``receiptHash``, ``authoritySignature`` and ``authorityKeyId``;
serialize that object with RFC 8785; ``receiptHash`` is the lowercase hex
SHA-256 of those bytes. ``authoritySignature`` is the standard base64 (with
padding) Ed25519 signature over the 32 raw bytes of the hash, not its hex text.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from execguard.protocol.canonical import canonical_sha256
from execguard.protocol.errors import ReceiptHashMismatch, VerificationError
from execguard.protocol.signing import Signer, b64decode_strict, verify_ed25519

__all__ = [
    "DECISION_RECEIPT_FIELDS",
    "SEAL_FIELDS",
    "check_receipt",
    "receipt_hash",
    "seal_receipt",
]

#: Fields added by sealing; everything else is covered by ``receiptHash``.
SEAL_FIELDS = ("receiptHash", "authoritySignature", "authorityKeyId")

#: The fields every decision receipt carries (values may be null).
DECISION_RECEIPT_FIELDS = (
    "receiptType",
    "executionId",
    "decision",
    "surface",
    "actorId",
    "timestamp",
    "requestHash",
    "policyVersion",
    "reasonCode",
    "determiningPolicies",
    "executionMode",
    "wouldDecision",
    "resolves",
    "factsDigest",
    "protocolVersion",
    "authorityId",
    "subjectDigest",
    "logIndex",
)

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


def receipt_hash(receipt: Mapping[str, Any]) -> str:
    """Recompute ``receiptHash`` from a receipt's fields (sealed or not)."""
    return canonical_sha256({k: v for k, v in receipt.items() if k not in SEAL_FIELDS})


def seal_receipt(fields: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """Return the receipt with ``receiptHash``, ``authoritySignature``, ``authorityKeyId``."""
    unsealed = {k: v for k, v in fields.items() if k not in SEAL_FIELDS}
    digest = receipt_hash(unsealed)
    signature = signer.sign(bytes.fromhex(digest))
    return {
        **unsealed,
        "receiptHash": digest,
        "authoritySignature": base64.b64encode(signature).decode("ascii"),
        "authorityKeyId": signer.key_id,
    }


def check_receipt(receipt: Mapping[str, Any], public_key: Ed25519PublicKey) -> str:
    """Check the hash recipe, then the signature; return the verified receipt hash.

    Steps: (1) ``receiptHash`` is 64 lowercase hex digits; (2) it equals the hash
    recomputed from the other fields; (3) ``authoritySignature`` is strict
    base64 of 64 bytes; (4) it verifies over the raw hash bytes.
    """
    stated = receipt.get("receiptHash")
    # 1. shape of the hash
    if not isinstance(stated, str) or not _HEX64.match(stated):
        raise VerificationError("receiptHash is missing or not 64 lowercase hex digits")
    # 2. the recipe
    computed = receipt_hash(receipt)
    if computed != stated:
        raise ReceiptHashMismatch(stated, computed)
    # 3. the signature's encoding
    signature_text = receipt.get("authoritySignature")
    if not isinstance(signature_text, str):
        raise VerificationError("authoritySignature is missing")
    signature = b64decode_strict(signature_text)
    # 4. the signature itself
    key_id = str(receipt.get("authorityKeyId"))
    verify_ed25519(public_key, signature, bytes.fromhex(stated), key_id=key_id)
    return stated

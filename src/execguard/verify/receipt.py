"""Offline receipt verification against a pinned keys document.

Needs only ``protocol``: no server, no database, no network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from execguard.protocol.errors import UnknownKey, VerificationError
from execguard.protocol.receipt import check_receipt
from execguard.protocol.signing import load_public_key_pem

__all__ = ["KeySet", "VerifiedReceipt", "extract_receipt", "verify_receipt"]


@dataclass(frozen=True)
class PublishedKey:
    """One key of a keys document."""

    key_id: str
    public_key: Ed25519PublicKey
    status: str


class KeySet:
    """The keys of a keys document (``{keys: [{keyId, algorithm, publicKeyPem, status}]}``)."""

    def __init__(self, keys: Mapping[str, PublishedKey]) -> None:
        self.keys = dict(keys)

    @classmethod
    def from_document(cls, document: Any) -> KeySet:
        """Parse a keys document; refuse non-Ed25519 or malformed entries."""
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            raise VerificationError("the keys document has no 'keys' list")
        keys: dict[str, PublishedKey] = {}
        for position, item in enumerate(document["keys"]):
            if not isinstance(item, Mapping):
                raise VerificationError(f"keys[{position}] is not an object")
            key_id, pem = item.get("keyId"), item.get("publicKeyPem")
            if not isinstance(key_id, str) or not isinstance(pem, str):
                raise VerificationError(f"keys[{position}] lacks keyId or publicKeyPem")
            if item.get("algorithm", "Ed25519") != "Ed25519":
                raise VerificationError(f"key {key_id!r} is not an Ed25519 key")
            keys[key_id] = PublishedKey(key_id, load_public_key_pem(pem),
                                        str(item.get("status", "active")))
        if not keys:
            raise VerificationError("the keys document lists no keys")
        return cls(keys)

    def get(self, key_id: str) -> PublishedKey:
        """The key with this id; :class:`UnknownKey` if it is not pinned."""
        try:
            return self.keys[key_id]
        except KeyError:
            raise UnknownKey(key_id) from None


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


def verify_receipt(receipt: Mapping[str, Any], keys: KeySet) -> VerifiedReceipt:
    """Verify a receipt offline, or raise :class:`VerificationError` saying why.

    1. ``authorityKeyId`` names a key of the pinned document;
    2. ``receiptHash`` equals the hash recomputed from every other field
       (so editing any field, not only the signature, fails);
    3. ``authoritySignature`` verifies over the raw hash bytes under that key.
    """
    # 1. the key
    key_id = receipt.get("authorityKeyId")
    if not isinstance(key_id, str) or not key_id:
        raise VerificationError("the receipt has no authorityKeyId")
    key = keys.get(key_id)
    # 2 and 3. the recipe, then the signature
    digest = check_receipt(receipt, key.public_key)
    return VerifiedReceipt(receipt, digest, key_id, key.status)

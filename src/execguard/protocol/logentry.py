"""What the Merkle log commits to for each receipt (docs/PROTOCOL.md, "The log").

A log leaf is the RFC 8785 form of a small record about one receipt; its
Merkle leaf hash is SHA-256(0x00 || those bytes). The receipt body itself is
not in the leaf, only its hash, so bodies can later be pruned (retention)
without breaking the tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from execguard.protocol.canonical import canonical_json
from execguard.protocol.merkle import leaf_hash

__all__ = ["leaf_data", "leaf_record", "receipt_leaf_hash"]

#: The field holding each receipt type's verdict, named ``decision`` in the leaf.
_VERDICT_FIELD = {"decision": "decision", "outcome": "outcome", "consume": "consumeResult"}


def leaf_record(tenant: str, receipt: Mapping[str, Any]) -> dict[str, Any]:
    """The record a log leaf commits to, for a sealed receipt."""
    kind = receipt.get("receiptType", "decision")
    verdict = _VERDICT_FIELD.get(str(kind))
    return {
        "index": receipt["logIndex"],
        "type": kind,
        "receiptHash": receipt["receiptHash"],
        "decision": receipt.get(verdict) if verdict else None,
        "surface": receipt.get("surface"),
        "tenant": tenant,
        "timestamp": receipt.get("timestamp"),
    }


def leaf_data(tenant: str, receipt: Mapping[str, Any]) -> bytes:
    """The leaf's bytes: the canonical JSON of :func:`leaf_record`."""
    return canonical_json(leaf_record(tenant, receipt))


def receipt_leaf_hash(tenant: str, receipt: Mapping[str, Any]) -> bytes:
    """The Merkle leaf hash of a receipt's log entry."""
    return leaf_hash(leaf_data(tenant, receipt))

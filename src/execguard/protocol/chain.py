"""The hash chain that links each log entry to the one before it.

``entryHash`` = lowercase hex SHA-256 of the RFC 8785 form of
``{"index": <log index>, "prev": <previous entryHash, or null for index 0>,
"receiptHash": <the entry's receiptHash>}``. Changing, removing or reordering
any entry changes every entry hash after it.
"""

from __future__ import annotations

from execguard.protocol.canonical import canonical_sha256

__all__ = ["entry_hash"]


def entry_hash(index: int, prev: str | None, receipt_hash: str) -> str:
    """The chained hash of log entry ``index``."""
    return canonical_sha256({"index": index, "prev": prev, "receiptHash": receipt_hash})

"""Storage: the append-only decision log, tenants, keys, policy bundles, idempotency.

    store = SQLiteStore("data/execguard.db")
    committer = GroupCommitter(store); committer.start()
    result = await committer.submit(pending_entry)   # durable when it returns
"""

from execguard.ledger.group_commit import GroupCommitter
from execguard.ledger.records import (
    ApiKeyRecord,
    ApprovalRecord,
    ApprovalRequest,
    BundleRecord,
    CheckpointRecord,
    CommitResult,
    Committed,
    Conflicted,
    ExecutionRecord,
    FactReader,
    IdempotencyClaim,
    LogEntry,
    PendingEntry,
    PreparedDecision,
    Replayed,
    Reservation,
    SigningKeyRecord,
    Vote,
    VoteRecord,
    WebhookRecord,
)
from execguard.ledger.sqlite import SQLiteStore
from execguard.ledger.store import LedgerStore

__all__ = [
    "ApiKeyRecord",
    "ApprovalRecord",
    "ApprovalRequest",
    "BundleRecord",
    "CheckpointRecord",
    "CommitResult",
    "Committed",
    "Conflicted",
    "ExecutionRecord",
    "FactReader",
    "GroupCommitter",
    "IdempotencyClaim",
    "LedgerStore",
    "LogEntry",
    "PendingEntry",
    "PreparedDecision",
    "Replayed",
    "Reservation",
    "SQLiteStore",
    "SigningKeyRecord",
    "Vote",
    "VoteRecord",
    "WebhookRecord",
]

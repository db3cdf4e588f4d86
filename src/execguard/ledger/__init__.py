"""Storage: the append-only decision log, tenants, keys, policy bundles, idempotency.

    store = open_ledger("data/execguard.db")       # or "postgresql://host/db"
    committer = GroupCommitter(store); committer.start()
    result = await committer.submit(pending_entry)   # durable when it returns
"""

from execguard.ledger._urls import is_postgres_url, redact_url
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
    FactQuery,
    FactRead,
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
from execguard.ledger.sql import SQLStore
from execguard.ledger.sqlite import SQLiteStore
from execguard.ledger.store import LedgerStore


def open_ledger(location: str, *, readonly: bool = False, migrate: bool = False) -> SQLStore:
    """A PostgreSQL ledger for a ``postgresql://`` URL, else the SQLite file at ``location``.

    SQLite files are created and upgraded at open; a PostgreSQL database must
    have been migrated (``migrate=True`` here, or ``execguard db migrate``).
    """
    if is_postgres_url(location):
        # Imported here: the PostgreSQL driver costs ~150 ms to import, and most
        # commands (verify, audit of a file, the SQLite default) never need it.
        from execguard.ledger.postgres import PostgresStore
        return PostgresStore(location, readonly=readonly, migrate=migrate)
    return SQLiteStore(location, readonly=readonly)


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
    "FactQuery",
    "FactRead",
    "FactReader",
    "GroupCommitter",
    "IdempotencyClaim",
    "LedgerStore",
    "LogEntry",
    "PendingEntry",
    "PreparedDecision",
    "Replayed",
    "Reservation",
    "SQLStore",
    "SQLiteStore",
    "SigningKeyRecord",
    "Vote",
    "VoteRecord",
    "WebhookRecord",
    "is_postgres_url",
    "open_ledger",
    "redact_url",
]

"""The storage contract every backend implements (SQLite and PostgreSQL).

Contract, for every method: a storage failure raises
:class:`~execguard.protocol.errors.StorageUnavailable` and leaves what was
stored before untouched. Nothing is ever updated in place in the log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from execguard.ledger.records import (
    ApiKeyRecord,
    ApprovalRecord,
    BundleRecord,
    CheckpointRecord,
    CommitResult,
    ExecutionRecord,
    LogEntry,
    PendingEntry,
    SigningKeyRecord,
)

__all__ = ["LedgerStore"]


class LedgerStore(Protocol):
    """Tenants, keys, policy bundles and the append-only decision log."""

    def create_tenant(self, name: str, now: str) -> bool:
        """Create a tenant; return False (and change nothing) if it exists."""

    def tenant_exists(self, name: str) -> bool:
        """Whether the tenant exists."""

    def add_api_key(self, record: ApiKeyRecord) -> None:
        """Store an API key by its hash. The tenant must exist (else ``NotFound``)."""

    def lookup_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, or None (also if it was revoked)."""

    def api_keys(self, tenant: str) -> list[ApiKeyRecord]:
        """The tenant's keys, revoked ones included, oldest first."""

    def revoke_api_key(self, key_hash: str, now: str) -> bool:
        """Revoke a key for good; False if there is none or it was revoked before."""

    def add_signing_key(self, record: SigningKeyRecord) -> None:
        """Publish a public key. Keys are never deleted."""

    def rotate_signing_key(self, record: SigningKeyRecord) -> list[str]:
        """Atomically retire every active key and publish ``record`` as the active one."""

    def signing_keys(self) -> list[SigningKeyRecord]:
        """Every published key, oldest first."""

    def put_bundle(self, tenant: str, version: str, files: Mapping[str, bytes],
                   now: str) -> bool:
        """Store an immutable bundle; return False if this version is already stored."""

    def get_bundle(self, tenant: str, version: str) -> BundleRecord | None:
        """The bundle with its files, or None."""

    def list_bundles(self, tenant: str) -> list[BundleRecord]:
        """The tenant's bundles, oldest first, without files."""

    def activate_bundle(self, tenant: str, version: str, now: str) -> None:
        """Make a stored version the tenant's only active one (else ``NotFound``)."""

    def active_bundle_version(self, tenant: str) -> str | None:
        """The tenant's active version, or None."""

    def commit_batch(self, entries: Sequence[PendingEntry],
                     now_epoch: float) -> list[CommitResult]:
        """Append entries in one durable transaction, in order; one result per entry.

        Log indexes are gapless per tenant. When this returns, every
        ``Committed`` entry is on stable storage. An idempotency claim whose key
        is live with the same request hash and mode gives ``Replayed``; with
        another, ``Conflicted("idempotency_key_reuse")``. A second outcome for one
        execution gives ``Conflicted("outcome_exists")``. A ``consume`` entry for an
        execution that already has one, or already has an outcome, is appended as
        ``consume-refused``, sealed by ``refuse`` with the reason: single use is decided
        from the log, and an execution that has ended cannot start. If the transaction
        fails, nothing of the batch is stored and ``StorageUnavailable`` is raised.
        """

    def find_idempotent(self, tenant: str, key: str,
                        now_epoch: float) -> tuple[str, str, ExecutionRecord] | None:
        """For a live key: (its request hash, its execution mode, its execution), else None."""

    def approvals(self, tenant: str, status: str | None = None,
                  limit: int = 100) -> list[ApprovalRecord]:
        """The tenant's approval requests, newest first."""

    def approval(self, tenant: str, execution_id: str) -> ApprovalRecord | None:
        """One approval request with its votes, or None."""

    def due_approvals(self, now_epoch: float) -> list[tuple[str, str]]:
        """(tenant, execution id) of pending approvals past their expiry."""

    def purge_idempotency(self, now_epoch: float) -> int:
        """Forget idempotency keys that expired at or before ``now_epoch``; return how many."""

    def get_execution(self, tenant: str, execution_id: str) -> ExecutionRecord | None:
        """The tenant's execution with this id (and its outcome receipt), or None."""

    def query_executions(self, tenant: str, *, execution_id: str | None = None,
                         surface: str | None = None, actor_id: str | None = None,
                         since: str | None = None, limit: int = 100) -> list[ExecutionRecord]:
        """The tenant's executions matching every given filter, newest first."""

    def log_entries(self, tenant: str, start: int, end: int) -> list[LogEntry]:
        """Log entries with ``start <= index < end``, in index order."""

    def log_size(self, tenant: str) -> int:
        """Number of entries in the tenant's log."""

    def execution_log(self, tenant: str, execution_id: str) -> list[LogEntry]:
        """Every log entry of one execution, in index order."""

    def tenants(self) -> list[str]:
        """Every tenant, by name."""

    def tree_root(self, tenant: str, size: int) -> bytes:
        """Merkle root of the first ``size`` entries, from stored hashes (``size <= log_size``)."""

    def inclusion_proof(self, tenant: str, index: int, size: int) -> list[bytes]:
        """RFC 9162 inclusion proof, from stored hashes, O(log n) reads."""

    def consistency_proof(self, tenant: str, size1: int, size2: int) -> list[bytes]:
        """RFC 9162 consistency proof, from stored hashes, O(log n) reads."""

    def add_checkpoint(self, record: CheckpointRecord) -> CheckpointRecord:
        """Store a checkpoint, or return the stored one of that size if its root is the same.

        A different root at a stored size is a fork: raise ``StorageUnavailable``
        and write nothing. Checkpoints are never changed or removed.
        """

    def checkpoints(self, tenant: str, *, min_size: int = 0,
                    limit: int | None = None) -> list[CheckpointRecord]:
        """The tenant's checkpoints of at least ``min_size`` entries, smallest first."""

    def latest_checkpoint(self, tenant: str) -> CheckpointRecord | None:
        """The tenant's largest checkpoint, or None."""

    def check_writable(self) -> None:
        """Prove a durable write goes through now (for ``/readyz``), else ``StorageUnavailable``."""

    def close(self) -> None:
        """Release connections."""

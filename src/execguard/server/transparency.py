"""The log's public face: signed checkpoints, proofs, entries and offline bundles.

Checkpoints are signed only for sizes whose entries are already committed
(they are read back from the store), and the store refuses a second root for
a stored size, so the service never signs a fork, also not after a crash.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from execguard.ledger import CheckpointRecord, GroupCommitter, SQLStore
from execguard.protocol.checkpoint import Checkpoint, sign_checkpoint
from execguard.protocol.errors import MalformedRequest, NotFound, ServiceUnavailable
from execguard.protocol.logentry import leaf_record
from execguard.protocol.outcome import format_timestamp
from execguard.server.gateway import SigningKeys
from execguard.server.logs import log_background_failure
from execguard.server.settings import Settings

__all__ = ["BUNDLE_FORMAT", "MAX_ENTRIES_PER_PAGE", "Transparency"]

log = logging.getLogger("execguard.server")

BUNDLE_FORMAT = "execguard-bundle/1"
MAX_ENTRIES_PER_PAGE = 1000


def b64(raw: bytes) -> str:
    """Standard base64 with padding, as every hash in the log API."""
    return base64.b64encode(raw).decode("ascii")


def checkpoint_json(record: CheckpointRecord, origin: str) -> dict[str, Any]:
    """A checkpoint as the API shows it: the signed note plus what it states."""
    return {"origin": origin, "size": record.size, "root": b64(record.root),
            "keyId": record.key_id, "timestamp": record.created_at, "note": record.note}


class Transparency:
    """Checkpoints, proofs and bundles for each tenant's log."""

    def __init__(self, settings: Settings, store: SQLStore, signers: SigningKeys) -> None:
        self.settings = settings
        self.store = store
        self.signers = signers

    def origin(self, tenant: str) -> str:
        """The log's C2SP origin line: unique per authority and tenant."""
        return f"{self.settings.authority_id}/{tenant}"

    # -- checkpoints -------------------------------------------------------------------

    def issue_checkpoint(self, tenant: str) -> CheckpointRecord | None:
        """A checkpoint covering every committed entry; signs a new one only if the log grew."""
        size = self.store.log_size(tenant)
        latest = self.store.latest_checkpoint(tenant)
        if size == 0 or (latest is not None and latest.size >= size):
            return latest
        signer = self.signers.current()
        root = self.store.tree_root(tenant, size)
        note = sign_checkpoint(Checkpoint(self.origin(tenant), size, root),
                               self.settings.authority_id, signer)
        return self.store.add_checkpoint(CheckpointRecord(
            tenant, size, root, note, signer.key_id, format_timestamp(datetime.now(UTC))))

    def checkpoint_tenants(self, tenants: Iterable[str]) -> set[str]:
        """Checkpoint each tenant's log; the tenants whose checkpoint failed (logged)."""
        failed = set()
        for tenant in tenants:
            try:
                self.issue_checkpoint(tenant)
            except Exception as exc:
                log_background_failure(log, f"no checkpoint for tenant {tenant} this time", exc)
                failed.add(tenant)
        return failed

    def checkpoint_grown(self, committer: GroupCommitter) -> None:
        """Checkpoint each log that grew through ``committer`` since the last call."""
        for tenant in self.checkpoint_tenants(committer.take_grown_tenants()):
            # Retried at the next tick: otherwise a log that stops growing during a
            # fault would keep its last entries out of any checkpoint.
            committer.note_grown(tenant)

    async def checkpoint_on_schedule(self, committer: GroupCommitter) -> None:
        """Every ``checkpoint_interval_seconds``, checkpoint what ``committer`` appended.

        Entries are durable before they are checkpointed: this runs after their commit,
        on SQLite on the ledger's writer thread between two batches (group_commit.py).
        """
        while True:
            await asyncio.sleep(self.settings.checkpoint_interval_seconds)
            if not self.store.maintenance_on_writer:
                await asyncio.to_thread(self.checkpoint_grown, committer)
                continue
            try:
                await committer.run_between_batches(partial(self.checkpoint_grown, committer))
            except ServiceUnavailable:  # the writer has stopped: shutting down
                return

    def checkpoint(self, tenant: str) -> dict[str, Any]:
        """The latest checkpoint (issued now if the log grew since the last one)."""
        record = self.issue_checkpoint(tenant)
        if record is None:
            raise NotFound("the log is empty: there is no checkpoint yet")
        return checkpoint_json(record, self.origin(tenant))

    def checkpoints(self, tenant: str, min_size: int, limit: int) -> dict[str, Any]:
        """Stored checkpoints from ``min_size`` on, smallest first."""
        records = self.store.checkpoints(tenant, min_size=min_size, limit=limit)
        return {"origin": self.origin(tenant),
                "checkpoints": [checkpoint_json(r, self.origin(tenant)) for r in records]}

    # -- proofs and entries ------------------------------------------------------------

    def _size(self, tenant: str, size: int | None, name: str) -> int:
        log_size = self.store.log_size(tenant)
        if size is None:
            record = self.issue_checkpoint(tenant)
            return record.size if record else 0
        if size < 0 or size > log_size:
            raise MalformedRequest(name, f"a tree size from 0 to {log_size}", str(size))
        return size

    def inclusion(self, tenant: str, index: int, size: int | None) -> dict[str, Any]:
        """Proof that entry ``index`` is in the tree of ``size`` entries (default: latest)."""
        tree_size = self._size(tenant, size, "size")
        if not 0 <= index < tree_size:
            raise MalformedRequest("index", f"an entry index below the tree size {tree_size}",
                                   str(index))
        proof = self.store.inclusion_proof(tenant, index, tree_size)
        leaf = self.store.log_entries(tenant, index, index + 1)[0].leaf_hash
        return {"index": index, "treeSize": tree_size, "leafHash": b64(leaf),
                "rootHash": b64(self.store.tree_root(tenant, tree_size)),
                "hashes": [b64(h) for h in proof]}

    def consistency(self, tenant: str, first: int, second: int | None) -> dict[str, Any]:
        """Proof that the tree of ``second`` entries extends the tree of ``first``."""
        size2 = self._size(tenant, second, "to")
        if not 0 < first <= size2:
            raise MalformedRequest("from", f"a tree size from 1 to {size2}", str(first))
        proof = self.store.consistency_proof(tenant, first, size2)
        return {"from": first, "to": size2,
                "fromRoot": b64(self.store.tree_root(tenant, first)),
                "toRoot": b64(self.store.tree_root(tenant, size2)),
                "hashes": [b64(h) for h in proof]}

    def entries(self, tenant: str, start: int, end: int) -> dict[str, Any]:
        """Log entries ``start <= index < end`` (at most a page), with their receipts."""
        if start < 0:
            raise MalformedRequest("start", "an index >= 0", str(start))
        if end <= start or end - start > MAX_ENTRIES_PER_PAGE:
            raise MalformedRequest("end", f"an index above start and at most "
                                   f"{MAX_ENTRIES_PER_PAGE} past it", str(end))
        rows = self.store.log_entries(tenant, start, end)
        return {"entries": [{"index": e.index, "kind": e.kind, "executionId": e.execution_id,
                             "leafHash": b64(e.leaf_hash), "receipt": e.receipt,
                             "prevEntryHash": e.prev_hash, "entryHash": e.entry_hash}
                            for e in rows]}

    # -- offline bundles ---------------------------------------------------------------

    def bundle(self, tenant: str, execution_id: str) -> dict[str, Any]:
        """A decision's receipt, its inclusion proof and a checkpoint covering it."""
        record = self.store.get_execution(tenant, execution_id)
        if record is None:
            raise NotFound(f"no execution {execution_id!r} for this tenant")
        checkpoint = self.issue_checkpoint(tenant)
        if checkpoint is None or checkpoint.size <= record.log_index:
            raise ServiceUnavailable("no checkpoint covers this receipt yet; retry shortly")
        return build_bundle(tenant, record.receipt, checkpoint,
                            self.store.inclusion_proof(tenant, record.log_index,
                                                       checkpoint.size))


def build_bundle(tenant: str, receipt: Any, checkpoint: CheckpointRecord,
                 proof: list[bytes]) -> dict[str, Any]:
    """The offline bundle format (docs/PROTOCOL.md, "Bundles")."""
    return {
        "format": BUNDLE_FORMAT,
        "tenant": tenant,
        "receipt": receipt,
        "leaf": leaf_record(tenant, receipt),
        "inclusionProof": {"index": receipt["logIndex"], "treeSize": checkpoint.size,
                           "hashes": [b64(h) for h in proof]},
        "checkpoint": checkpoint.note,
    }

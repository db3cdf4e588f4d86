"""The ledger's logic in SQL, shared by the SQLite and PostgreSQL backends.

Appends are atomic and sequential: :meth:`SQLStore.commit_batch` runs in one
write transaction that holds the backend's single write lock (SQLite's
``BEGIN IMMEDIATE``, a PostgreSQL advisory lock) before it reads the last log
index, so two writers (threads, processes or replicas) can never assign the
same index, pass a limit together, or consume one permit twice. Nothing is
ever updated in place in the log; the backends' triggers refuse it.

A backend supplies connections (:meth:`SQLStore._read`, :meth:`SQLStore._write`)
that accept ``?`` parameter markers and turn its driver's errors into
:class:`~execguard.protocol.errors.StorageUnavailable`; everything else is here.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from execguard.ledger._sql_admin import AdminMixin, Connection
from execguard.ledger._sql_approvals import (
    approval_row,
    close_approval,
    count_votes,
    has_voted,
    list_approvals,
    open_approval,
    record_vote,
    resolve_execution,
)
from execguard.ledger._sql_batch import BatchRows
from execguard.ledger._sql_facts import TxnFacts, read_facts_ahead
from execguard.ledger._sql_util import dumps, node_key, node_row
from execguard.ledger.records import (
    ApprovalRecord,
    CheckpointRecord,
    CommitResult,
    Committed,
    Conflicted,
    ExecutionRecord,
    FactQuery,
    FactReader,
    LogEntry,
    PendingEntry,
    Replayed,
)
from execguard.protocol.chain import entry_hash
from execguard.protocol.errors import StorageUnavailable
from execguard.protocol.logentry import receipt_leaf_hash
from execguard.protocol.merkle import (
    CompactRange,
    NodeReader,
    consistency_proof,
    inclusion_proof,
    root_hash,
)

__all__ = ["Connection", "SQLStore"]


@dataclass
class _Head:
    """The end of one tenant's log during a batch: last entry hash and the tree's right edge."""

    prev: str | None
    tree: CompactRange


class SQLStore(AdminMixin, ABC):
    """The ledger over a SQL connection; subclasses supply connections and the schema."""

    #: Where the data lives, for messages (a file path or a redacted URL).
    location: str
    #: Whether other writes (checkpoints) go through the group commit's writer thread,
    #: between two batches, rather than a thread of their own. Yes where a second writer
    #: would only wait for the batch's lock and trade the GIL with it (SQLite); no where
    #: the writer thread must never wait on anything but appends (PostgreSQL: a pooled
    #: connection that stops answering would stall every append behind a checkpoint).
    maintenance_on_writer: bool = False
    #: Whether a batch makes its decisions' fact reads (``PendingEntry.reads``) ahead, in
    #: one statement: yes where each statement inside the write lock is a round trip
    #: (PostgreSQL); no where it is a function call (SQLite: it costs more than it saves).
    reads_facts_ahead: bool = False

    def __init__(self) -> None:
        # Each tenant's tree edge after the last batch this store committed, keyed by
        # the log's last entry hash: the next batch reuses it instead of reading a node
        # per set bit of the size, unless another writer (a replica) appended meanwhile.
        self._edges: dict[str, tuple[str | None, CompactRange]] = {}

    @abstractmethod
    def _read(self, what: str) -> AbstractContextManager[Connection]:
        """A connection for reads; driver errors become ``StorageUnavailable(what ...)``."""

    @abstractmethod
    def _write(self, what: str) -> AbstractContextManager[Connection]:
        """One write transaction under the store's single write lock, committed whole."""

    def _append_transaction(self) -> AbstractContextManager[Connection]:
        """The write transaction of :meth:`commit_batch` (a backend may stream it)."""
        return self._write("appending to the log")

    def check_writable(self) -> None:
        """One small durable write: fails when the disk is full or the database read-only."""
        with self._write("checking that the database is writable") as conn:
            conn.execute("INSERT INTO meta VALUES ('writable_check', ?) ON CONFLICT (key)"
                         " DO UPDATE SET value = excluded.value", (repr(time.time()),))

    @abstractmethod
    def close(self) -> None:
        """Release every connection."""

    # -- the log -----------------------------------------------------------------------

    def commit_batch(self, entries: Sequence[PendingEntry],
                     now_epoch: float) -> list[CommitResult]:
        """Append the entries in one fsync'd transaction (see LedgerStore)."""
        results: list[CommitResult] = []
        heads: dict[str, _Head] = {}
        rows = BatchRows()
        with self._append_transaction() as conn:
            claims = self._live_claims(conn, entries, now_epoch)
            if self.reads_facts_ahead:
                rows.facts_ahead.update(read_facts_ahead(conn, entries))
            for entry in entries:
                results.append(self._append_one(conn, entry, heads, claims, rows, now_epoch))
            rows.flush(conn)  # inside the transaction: committed with it, or not at all
        for tenant, head in heads.items():  # committed: the next batch starts from here
            self._edges[tenant] = (head.prev, head.tree.copy())
        return results

    def _head(self, conn: Connection, tenant: str, heads: dict[str, _Head]) -> _Head:
        # Read inside the write transaction: no other writer can move the head meanwhile.
        if tenant not in heads:
            row = conn.execute("SELECT idx, entry_hash FROM log WHERE tenant = ?"
                               " ORDER BY idx DESC LIMIT 1", (tenant,)).fetchone()
            size, prev = (row[0] + 1, row[1]) if row else (0, None)
            cached = self._edges.get(tenant)
            if cached is not None and cached[0] == prev and cached[1].size == size:
                # The chained entry hash commits to the whole log up to here: same tree.
                tree = cached[1].copy()
            else:
                tree = CompactRange.from_reader(size, self._reader(conn, tenant))
            heads[tenant] = _Head(prev, tree)
        return heads[tenant]

    def _reader(self, conn: Connection, tenant: str) -> NodeReader:
        def read(level: int, index: int) -> bytes:
            row = conn.execute("SELECT hash FROM merkle_nodes WHERE tenant = ?"
                               " AND last_leaf = ? AND level = ?",
                               (tenant, node_key(level, index), level)).fetchone()
            if row is None:
                raise StorageUnavailable(f"Merkle node ({level}, {index}) of tenant "
                                         f"{tenant!r} is missing: the log store is damaged")
            return bytes(row[0])
        return read

    @staticmethod
    def _live_claims(conn: Connection, entries: Sequence[PendingEntry],
                     now_epoch: float) -> dict[tuple[str, str], tuple[str, str, str]]:
        """The batch's live idempotency keys: (tenant, key) -> (hash, mode, execution id).

        One query per tenant instead of one per entry (on PostgreSQL each is a round
        trip inside the write lock). Read inside the write transaction, so no other
        writer can add a key meanwhile; the batch's own claims are added as it goes.
        """
        wanted: dict[str, dict[str, None]] = {}
        for entry in entries:
            if entry.idempotency is not None:
                wanted.setdefault(entry.tenant, {})[entry.idempotency.key] = None
        claims: dict[tuple[str, str], tuple[str, str, str]] = {}
        for tenant, keys in wanted.items():
            marks = ", ".join("?" * len(keys))
            for key, request_hash, mode, execution_id in conn.execute(
                    "SELECT key, request_hash, mode, execution_id FROM idempotency"
                    f" WHERE tenant = ? AND expires_at > ? AND key IN ({marks})",
                    (tenant, now_epoch, *keys)).fetchall():
                claims[(tenant, key)] = (request_hash, mode, execution_id)
        return claims

    def _append_one(self, conn: Connection, entry: PendingEntry, heads: dict[str, _Head],
                    claims: dict[tuple[str, str], tuple[str, str, str]], rows: BatchRows,
                    now_epoch: float) -> CommitResult:
        claim = entry.idempotency
        if claim is not None:
            row = claims.get((entry.tenant, claim.key))
            if row is not None:
                if (row[0], row[1]) != (claim.request_hash, claim.mode):
                    return Conflicted("idempotency_key_reuse")
                rows.flush(conn)  # the execution may be one of this batch's
                record = self._execution(conn, entry.tenant, row[2])
                if record is None:  # pragma: no cover - the rows are written together
                    raise StorageUnavailable("idempotency key points at a missing execution")
                return Replayed(record)
        kind, seal = entry.kind, entry.seal
        if kind != "decision":
            rows.flush(conn)  # rare kinds read and update what the batch may have written
        if kind == "outcome":
            ended, consumed = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM outcomes WHERE execution_id = ?),"
                " (SELECT receipt_hash FROM log WHERE tenant = ? AND execution_id = ?"
                " AND kind = 'consume')", (entry.execution_id, entry.tenant,
                                           entry.execution_id)).fetchone()
            if ended:
                return Conflicted("outcome_exists")
            if entry.seal_outcome is not None:
                seal = entry.seal_outcome(consumed)
        if kind == "consume":
            # Decided from what is stored, inside the write lock: a second attempt is
            # recorded as refused, never as a second consumption; a permit whose
            # execution has an outcome already (a FAILURE freed its share of the limits)
            # cannot start it after all; nor can one whose share expired (the limits
            # stopped counting it then, and another decision may have taken it since).
            consumed, ended, expired = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM log WHERE tenant = ? AND execution_id = ?"
                " AND kind = 'consume'), EXISTS (SELECT 1 FROM outcomes"
                " WHERE execution_id = ?), EXISTS (SELECT 1 FROM reservations"
                " WHERE execution_id = ? AND expires_at <= ?)",  # one round trip
                (entry.tenant, entry.execution_id, entry.execution_id, entry.execution_id,
                 now_epoch)).fetchone()
            reason = "ALREADY_CONSUMED" if consumed else "OUTCOME_RECORDED" if ended else \
                "EXPIRED" if expired else None
            if reason is not None:
                if entry.refuse is None:  # pragma: no cover - the gateway always sets it
                    return Conflicted(reason.lower())
                kind, seal = "consume-refused", entry.refuse(reason)

        if kind in ("approval-vote", "approval-expire"):
            return self._approval_step(conn, entry, heads, rows, now_epoch)

        execution, response, reservation = entry.execution, entry.response, entry.reservation
        approval = entry.approval
        if entry.decide is not None:
            # A stateful decision: taken now, under the write lock, against the live
            # reservations, so concurrent requests can never together pass a limit.
            prepared = entry.decide(TxnFacts(conn, entry.tenant, rows.reservations,
                                             rows.facts_ahead))
            seal, execution, response = prepared.seal, prepared.execution, prepared.response
            reservation, approval = prepared.reservation, prepared.approval

        index, receipt = self._append_log(conn, heads, rows, entry.tenant, kind,
                                          entry.execution_id, seal)

        if entry.kind == "decision":
            row = execution or {}
            response = {**(response or {}), "receipt": receipt}
            rows.add("executions", (
                entry.execution_id, entry.tenant, index, row["surface"], row["actor_id"],
                row["decision"], row["reason_code"], row["policy_version"],
                receipt["timestamp"], row["request_hash"], dumps(row["request"]),
                dumps(response)))
            if reservation is not None:
                rows.reserve(entry.tenant, entry.execution_id, reservation)
            if approval is not None:
                open_approval(conn, entry.tenant, entry.execution_id, row, approval,
                              receipt["timestamp"])
            shadow = row.get("shadow")
            if shadow and (shadow["decision"], shadow["reason"]) != \
                    (shadow["activeDecision"], row["reason_code"]):
                conn.execute("INSERT INTO shadow_disagreements VALUES"
                             " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (entry.execution_id, entry.tenant, row["surface"],
                              row["policy_version"], shadow["version"],
                              shadow["activeDecision"], row["reason_code"],
                              shadow["decision"], shadow["reason"], receipt["timestamp"]))
            if claim is not None:
                # At most once per key and batch: a second use of the key is answered
                # from ``claims`` above (one row per key, as PostgreSQL's upsert needs).
                rows.add("idempotency", (entry.tenant, claim.key, claim.request_hash,
                                         claim.mode, entry.execution_id, claim.expires_at))
                claims[(entry.tenant, claim.key)] = (claim.request_hash, claim.mode,
                                                     entry.execution_id)
        elif entry.kind == "outcome":
            conn.execute("INSERT INTO outcomes VALUES (?, ?, ?, ?)",
                         (entry.execution_id, entry.tenant, index, dumps(receipt)))
            if receipt.get("outcome") == "FAILURE":  # a failed execution frees its share
                conn.execute("UPDATE reservations SET released = 1 WHERE execution_id = ?",
                             (entry.execution_id,))
        elif kind == "consume":
            conn.execute("UPDATE reservations SET consumed = 1 WHERE execution_id = ?",
                         (entry.execution_id,))
        return Committed(index, receipt, response if entry.kind == "decision" else None)

    def _append_log(self, conn: Connection, heads: dict[str, _Head], rows: BatchRows,
                    tenant: str, kind: str, execution_id: str,
                    seal: Callable[[int], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """Seal a receipt at the next index and append it, its leaf and its tree nodes."""
        head = self._head(conn, tenant, heads)
        index = head.tree.size
        receipt = seal(index)
        digest = receipt["receiptHash"]
        chained = entry_hash(index, head.prev, digest)
        leaf = receipt_leaf_hash(tenant, receipt)
        rows.add("log", (tenant, index, kind, execution_id, dumps(receipt), digest, head.prev,
                         chained, leaf))
        for node in head.tree.append(leaf):
            rows.add("merkle_nodes", node_row(tenant, node))
        head.prev = chained
        return index, receipt

    def _approval_step(self, conn: Connection, entry: PendingEntry, heads: dict[str, _Head],
                       rows: BatchRows, now_epoch: float) -> CommitResult:
        """A vote or an expiry check, and the resolution it may bring (one transaction)."""
        approval = approval_row(conn, entry.tenant, entry.execution_id)
        if approval is None:
            return Conflicted("no_approval")
        status, quorum, expires_at = approval
        assert entry.resolve is not None
        resolution: str | None = None
        committed: Committed | None = None
        if status != "pending":
            return Conflicted(f"approval_{status}")
        if now_epoch >= expires_at:
            resolution = "expired"
        elif entry.kind == "approval-expire":
            return Conflicted("approval_pending")
        else:
            vote = entry.vote
            assert vote is not None
            if has_voted(conn, entry.execution_id, vote):
                return Conflicted("already_voted")
            index, receipt = self._append_log(conn, heads, rows, entry.tenant,
                                              "approval-vote", entry.execution_id, vote.seal)
            record_vote(conn, entry.execution_id, vote, receipt["timestamp"], index)
            committed = Committed(index, receipt)
            approvals, denials = count_votes(conn, entry.execution_id)
            if denials:
                resolution = "denied"
            elif approvals >= quorum:
                resolution = "approved"
        if resolution is not None:
            prepared = entry.resolve(TxnFacts(conn, entry.tenant, rows.reservations),
                                     resolution)
            index, receipt = self._append_log(conn, heads, rows, entry.tenant, "decision",
                                              entry.execution_id, prepared.seal)
            response = {**prepared.response, "receipt": receipt}
            resolve_execution(conn, entry.execution_id, prepared.execution, response)
            if prepared.reservation is not None:
                rows.reserve(entry.tenant, entry.execution_id, prepared.reservation)
            final = "approved" if resolution == "approved" and \
                prepared.execution["decision"] == "PERMIT" else (
                    "expired" if resolution == "expired" else "denied")
            close_approval(conn, entry.execution_id, final, receipt["timestamp"])
            if entry.kind == "approval-expire":
                return Committed(index, receipt, response)
            if committed is None:  # a vote that came too late
                return Conflicted("approval_expired", response)
            return Committed(committed.log_index, committed.receipt, response)
        assert committed is not None
        return committed

    def approvals(self, tenant: str, status: str | None = None,
                  limit: int = 100) -> list[ApprovalRecord]:
        """The tenant's approval requests (newest first), optionally of one status."""
        with self._read("reading approvals") as conn:
            return list_approvals(conn, tenant, status, limit)

    def approval(self, tenant: str, execution_id: str) -> ApprovalRecord | None:
        """One approval request with its votes, or None."""
        with self._read("reading an approval") as conn:
            found = list_approvals(conn, tenant, None, 1, execution_id)
        return found[0] if found else None

    def due_approvals(self, now_epoch: float) -> list[tuple[str, str]]:
        """(tenant, execution id) of pending approvals past their expiry."""
        with self._read("reading approvals") as conn:
            return [(r[0], r[1]) for r in conn.execute(
                "SELECT tenant, execution_id FROM approvals WHERE status = 'pending'"
                " AND expires_at <= ?", (now_epoch,))]

    def purge_idempotency(self, now_epoch: float) -> int:
        """Forget expired idempotency keys; return how many."""
        with self._write("purging idempotency keys") as conn:
            return conn.execute("DELETE FROM idempotency WHERE expires_at <= ?",
                                (now_epoch,)).rowcount

    def find_idempotent(self, tenant: str, key: str,
                        now_epoch: float) -> tuple[str, str, ExecutionRecord] | None:
        """(request hash, mode, execution) for a live key, else None."""
        with self._read("reading idempotency keys") as conn:
            row = conn.execute(
                "SELECT request_hash, mode, execution_id FROM idempotency"
                " WHERE tenant = ? AND key = ? AND expires_at > ?",
                (tenant, key, now_epoch)).fetchone()
            if row is None:
                return None
            record = self._execution(conn, tenant, row[2])
        return (row[0], row[1], record) if record else None

    _EXECUTION_COLUMNS = (
        "e.execution_id, e.tenant, e.log_index, e.surface, e.actor_id, e.decision,"
        " e.reason_code, e.policy_version, e.created_at, e.request_hash, e.request,"
        " e.response, o.receipt")

    @staticmethod
    def _record(row: tuple[Any, ...]) -> ExecutionRecord:
        return ExecutionRecord(
            *row[:10], request=json.loads(row[10]), response=json.loads(row[11]),
            outcome_receipt=json.loads(row[12]) if row[12] else None)

    def _execution(self, conn: Connection, tenant: str,
                   execution_id: str) -> ExecutionRecord | None:
        row = conn.execute(
            f"SELECT {self._EXECUTION_COLUMNS} FROM executions e LEFT JOIN outcomes o"
            " ON o.execution_id = e.execution_id"
            " WHERE e.tenant = ? AND e.execution_id = ?", (tenant, execution_id)).fetchone()
        return self._record(row) if row else None

    def get_execution(self, tenant: str, execution_id: str) -> ExecutionRecord | None:
        """The tenant's execution, or None (also for another tenant's id)."""
        with self._read("reading an execution") as conn:
            return self._execution(conn, tenant, execution_id)

    def query_executions(self, tenant: str, *, execution_id: str | None = None,
                         surface: str | None = None, actor_id: str | None = None,
                         since: str | None = None, limit: int = 100) -> list[ExecutionRecord]:
        """The tenant's executions matching every given filter, newest first."""
        where, params = ["e.tenant = ?"], [tenant]
        for column, value in (("e.execution_id", execution_id), ("e.surface", surface),
                              ("e.actor_id", actor_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("e.created_at >= ?")
            params.append(since)
        sql = (f"SELECT {self._EXECUTION_COLUMNS} FROM executions e LEFT JOIN outcomes o"
               f" ON o.execution_id = e.execution_id WHERE {' AND '.join(where)}"
               " ORDER BY e.log_index DESC LIMIT ?")
        with self._read("querying executions") as conn:
            rows = conn.execute(sql, (*params, limit)).fetchall()
        return [self._record(row) for row in rows]

    def log_entries(self, tenant: str, start: int, end: int) -> list[LogEntry]:
        """Entries ``start <= index < end`` in order."""
        with self._read("reading the log") as conn:
            rows = conn.execute(
                "SELECT tenant, idx, kind, execution_id, receipt, receipt_hash, prev_hash,"
                " entry_hash, leaf_hash FROM log WHERE tenant = ? AND idx >= ? AND idx < ?"
                " ORDER BY idx", (tenant, start, end)).fetchall()
        return [LogEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], bytes(r[8]))
                for r in rows]

    def iter_log(self, tenant: str, batch: int = 5000) -> Iterator[tuple[Any, ...]]:
        """Every stored row of the tenant's log in index order, as stored (for audits).

        Rows are ``(index, receipt text, leaf hash, prev hash, entry hash, kind,
        execution id, receipt hash)``; nothing is parsed or converted, so an auditor
        sees damaged rows as they are, at whatever index they claim (negative ones too:
        the gateway reads those as well).
        """
        columns = ("SELECT idx, receipt, leaf_hash, prev_hash, entry_hash, kind, execution_id,"
                   " receipt_hash FROM log WHERE tenant = ?")
        after: tuple[Any, ...] = ()
        while True:
            with self._read("reading the log") as conn:
                rows = conn.execute(columns + (" AND idx > ?" if after else "")
                                    + " ORDER BY idx LIMIT ?",
                                    (tenant, *after, batch)).fetchall()
            if not rows:
                return
            yield from rows
            after = (rows[-1][0],)

    def iter_merkle_nodes(self, tenant: str,
                          batch: int = 10000) -> Iterator[tuple[Any, ...]]:
        """Every stored Merkle node of the tenant, as stored (for audits).

        Rows are ``(level, index, hash, last leaf)`` in the order of their key (last
        leaf, then level): the order in which appends create them.
        """
        columns = "SELECT level, idx, hash, last_leaf FROM merkle_nodes WHERE tenant = ?"
        after: tuple[Any, ...] = ()
        while True:
            with self._read("reading the Merkle tree") as conn:
                rows = conn.execute(columns + (" AND (last_leaf, level) > (?, ?)" if after
                                               else "") + " ORDER BY last_leaf, level LIMIT ?",
                                    (tenant, *after, batch)).fetchall()
            if not rows:
                return
            yield from rows
            after = (rows[-1][3], rows[-1][0])

    def checkpoint_rows(self, tenant: str) -> list[tuple[Any, Any, Any]]:
        """The tenant's checkpoints as stored, ``(size, root, note)`` (for audits).

        Unlike :meth:`checkpoints`, nothing is converted: the audit compares the
        size and root columns the gateway serves with the signed note.
        """
        with self._read("reading checkpoints") as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(
                "SELECT size, root, note FROM checkpoints WHERE tenant = ? ORDER BY size",
                (tenant,)).fetchall()]

    def fact_reader(self, tenant: str) -> FactReader:
        """Live reservations read outside a write (for dry runs; decisions read them inside)."""
        return _ReadFacts(self, tenant)

    def tenants(self) -> list[str]:
        """Every tenant, by name."""
        with self._read("reading tenants") as conn:
            return [r[0] for r in conn.execute("SELECT name FROM tenants ORDER BY name")]

    # -- the Merkle tree and checkpoints -----------------------------------------------

    def tree_root(self, tenant: str, size: int) -> bytes:
        """The Merkle root of the tenant's first ``size`` entries, from stored hashes."""
        with self._read("reading the Merkle tree") as conn:
            return root_hash(size, self._reader(conn, tenant))

    def inclusion_proof(self, tenant: str, index: int, size: int) -> list[bytes]:
        """RFC 9162 inclusion proof of entry ``index`` in the tree of ``size`` entries."""
        with self._read("reading the Merkle tree") as conn:
            return inclusion_proof(index, size, self._reader(conn, tenant))

    def consistency_proof(self, tenant: str, size1: int, size2: int) -> list[bytes]:
        """RFC 9162 consistency proof between two tree sizes."""
        with self._read("reading the Merkle tree") as conn:
            return consistency_proof(size1, size2, self._reader(conn, tenant))

    def add_checkpoint(self, record: CheckpointRecord) -> CheckpointRecord:
        """Store a checkpoint, unless one of at least its size is stored: then return the
        largest stored (never a fork; and the checkpoints' times never go backwards as
        their sizes grow: a replica that read the log's size a moment before another
        stored a larger checkpoint does not store its smaller one).

        Raises :class:`StorageUnavailable` if a stored checkpoint of the same size
        has a different root: that would be a fork, and nothing is written.
        """
        with self._write("storing a checkpoint") as conn:
            rows = conn.execute(
                "SELECT tenant, size, root, note, key_id, created_at FROM checkpoints"
                " WHERE tenant = ? AND (size = ? OR size = (SELECT MAX(size) FROM"
                " checkpoints WHERE tenant = ?)) AND size >= ? ORDER BY size",
                (record.tenant, record.size, record.tenant, record.size)).fetchall()
            stored = [CheckpointRecord(r[0], r[1], bytes(r[2]), *r[3:]) for r in rows]
            if stored and stored[0].size == record.size and stored[0].root != record.root:
                raise StorageUnavailable(
                    f"refusing to sign a fork: checkpoint {record.size} of tenant "
                    f"{record.tenant!r} already has another root")
            if stored:
                return stored[-1]
            conn.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                         (record.tenant, record.size, record.root, record.note, record.key_id,
                          record.created_at))
        return record

    def checkpoints(self, tenant: str, *, min_size: int = 0,
                    limit: int | None = None) -> list[CheckpointRecord]:
        """The tenant's checkpoints of at least ``min_size``, smallest first."""
        sql = ("SELECT tenant, size, root, note, key_id, created_at FROM checkpoints"
               " WHERE tenant = ? AND size >= ? ORDER BY size")
        params: tuple[Any, ...] = (tenant, min_size)
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        with self._read("reading checkpoints") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [CheckpointRecord(r[0], r[1], bytes(r[2]), *r[3:]) for r in rows]

    def latest_checkpoint(self, tenant: str) -> CheckpointRecord | None:
        """The tenant's largest checkpoint, or None."""
        with self._read("reading checkpoints") as conn:
            row = conn.execute(
                "SELECT tenant, size, root, note, key_id, created_at FROM checkpoints"
                " WHERE tenant = ? ORDER BY size DESC LIMIT 1", (tenant,)).fetchone()
        return CheckpointRecord(row[0], row[1], bytes(row[2]), *row[3:]) if row else None

    def execution_log(self, tenant: str, execution_id: str) -> list[LogEntry]:
        """Every log entry of one execution (decision, consumes, refusals, outcome), in order."""
        with self._read("reading the log") as conn:
            rows = conn.execute(
                "SELECT tenant, idx, kind, execution_id, receipt, receipt_hash, prev_hash,"
                " entry_hash, leaf_hash FROM log WHERE tenant = ? AND execution_id = ?"
                " ORDER BY idx", (tenant, execution_id)).fetchall()
        return [LogEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], bytes(r[8]))
                for r in rows]

    def log_size(self, tenant: str) -> int:
        """Number of entries in the tenant's log."""
        with self._read("reading the log") as conn:
            row = conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM log"
                               " WHERE tenant = ?", (tenant,)).fetchone()
        return int(row[0])


class _ReadFacts:
    """A FactReader outside any write: each question reads on a connection of its own."""

    def __init__(self, store: SQLStore, tenant: str) -> None:
        self._store = store
        self._tenant = tenant

    def measure(self, surface: str, actor: str | None, queries: Sequence[FactQuery],
                now: float) -> list[int]:
        with self._store._read("reading limits") as conn:
            return TxnFacts(conn, self._tenant).measure(surface, actor, queries, now)

"""Whole-log audit: re-derive a tenant's log from its receipts and compare with what was signed.

The auditor is fed the log's entries in order (from a database file, a
gateway or an export; it does no I/O itself) and the log's signed
checkpoints. For every entry it checks, in order:

1. the entry sits at the next index (a gap is a deletion, a repeat an insertion; an
   index that is not an integer of 0 or more is a row outside the log);
2. the receipt verifies under the pinned keys (hash recipe, then signature);
3. the receipt names the index it sits at (else entries were reordered);
4. the stored leaf hash equals the leaf recomputed from the receipt;
5. the hash chain links it to the entry before it;
6. the columns the gateway acts on (kind, execution id, receipt hash) say what the
   signed receipt says: single use is decided from them (PROTOCOL.md §6);
7. an execution is consumed (a ``CONSUMED`` consume receipt) at most once;
8. the recomputed Merkle root, at every checkpoint's size, equals the signed root
   (else the checkpoint forks from the log: history was rewritten), and, when the
   source gives them, the stored tree nodes the gateway serves proofs from are the
   recomputed ones (streamed beside the entries, in the order appends create them).

Each checkpoint's note must verify, and the size and root a source keeps beside it
(which the gateway answers from) must be the note's. At the end, a checkpoint
larger than the log means entries were removed (a rollback), and each pair of
consecutive verified checkpoints must be linked by a consistency proof from the
source (RFC 9162 §2.1.4). A *trusted head*, the last checkpoint a previous audit
verified, is checked like a checkpoint, so a rewritten or rolled-back history is
found across runs even when every signature in it is valid.

Memory stays bounded by the tree's right edge, the checkpoints, the findings kept,
and one execution id per consumption (for rule 7).
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from execguard.protocol.chain import entry_hash
from execguard.protocol.checkpoint import Checkpoint, open_checkpoint
from execguard.protocol.errors import (
    CanonicalizationError,
    ReceiptHashMismatch,
    SignatureInvalid,
    UnknownKey,
    VerificationError,
)
from execguard.protocol.logentry import receipt_leaf_hash
from execguard.protocol.merkle import CompactRange, verify_consistency
from execguard.verify.keys import KeySet
from execguard.verify.receipt import verify_receipt

__all__ = [
    "AuditEntry",
    "ConsistencySource",
    "Finding",
    "LogAuditReport",
    "LogAuditor",
    "StoredCheckpoint",
    "StoredNodes",
    "TrustedHead",
    "stored_kind",
]

#: ``proof(size1, size2)``: a consistency proof as the audited source serves it.
ConsistencySource = Callable[[int, int], list[bytes]]

#: The stored Merkle nodes ``(level, index, hash)`` as a source serves them, in the order
#: appends create them (a leaf, then the nodes it completes, lowest first).
StoredNodes = Iterator[tuple[Any, Any, Any]]

#: Said with what a trusted head finds: heads are remembered by the log's origin, which
#: two installations with the same authority id and tenant share.
_SAME_ORIGIN = (" (or this is another log of the same origin, e.g. another installation: "
                "audit it with a state file of its own, --state FILE, or --no-state)")

#: Findings kept per log; the count of all of them is still reported.
MAX_FINDINGS = 200


@dataclass(frozen=True)
class AuditEntry:
    """One stored log entry as a source gives it, each column as stored.

    A damaged row may hold anything in any column, so none is trusted to have its
    type. ``receipt`` is None if unreadable (``problem`` says why); a column the
    source does not give is None and is not compared.
    """

    index: Any
    receipt: Mapping[str, Any] | None
    leaf_hash: Any = None
    prev_hash: Any = None
    entry_hash: Any = None
    problem: str | None = None
    kind: Any = None
    execution_id: Any = None
    receipt_hash: Any = None


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint as a source holds it: the signed note, and the size and root it keeps
    (or serves) beside the note, which must be the note's; None where it keeps none."""

    note: Any
    size: Any = None
    root: Any = None


@dataclass(frozen=True)
class TrustedHead:
    """A tree head verified by an earlier audit: the log must still extend it."""

    size: int
    root: bytes
    verified_at: str | None = None


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the log. ``kind`` is one of the names in :data:`KINDS`."""

    kind: str
    index: int | None
    message: str


KINDS = ("modified", "deleted", "inserted", "reordered", "chain", "unknown-key", "checkpoint",
         "fork", "rollback", "rewritten", "consumed-twice", "tree")

#: The log's ``kind`` column for each receipt type, as the ledger writes it.
_STORED_KINDS = {"decision": "decision", "outcome": "outcome", "approval": "approval-vote"}


def stored_kind(receipt: Mapping[str, Any]) -> str | None:
    """The ``kind`` the ledger stores beside a receipt; None for a type it never writes.

    A consume receipt is ``consume`` when it consumed the permit and
    ``consume-refused`` otherwise: the gateway decides single use from that column.
    """
    kind = receipt.get("receiptType", "decision")
    if kind == "consume":
        return "consume" if receipt.get("consumeResult") == "CONSUMED" else "consume-refused"
    return _STORED_KINDS.get(kind) if isinstance(kind, str) else None


@dataclass
class LogAuditReport:
    """What an audit of one log found."""

    tenant: str
    origin: str
    entries: int
    root: bytes
    checkpoints_verified: int
    findings: list[Finding] = field(default_factory=list)
    finding_count: int = 0
    latest: Checkpoint | None = None

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return self.finding_count == 0

    @property
    def first_bad_index(self) -> int | None:
        """The smallest entry index named by a finding."""
        indexes = [f.index for f in self.findings if f.index is not None]
        return min(indexes) if indexes else None


class LogAuditor:
    """Streams one tenant's log through the checks in the module docstring."""

    def __init__(self, *, tenant: str, keys: KeySet,
                 checkpoints: Sequence[str | StoredCheckpoint],
                 trusted: TrustedHead | None = None,
                 consistency: ConsistencySource | None = None,
                 nodes: StoredNodes | None = None) -> None:
        self.tenant = tenant
        self.keys = keys
        self.origin = f"{keys.authority}/{tenant}" if keys.authority else f"?/{tenant}"
        self._findings: list[Finding] = []
        self._count_findings = 0
        self._tree = CompactRange()
        self._prev: str | None = None
        self._expected = 0
        self._trusted = trusted
        self._consistency = consistency
        self._nodes = nodes  # None once a difference is found: the first one is reported
        # execution id -> the index of its CONSUMED consume receipt
        self._consumed: dict[str, int] = {}
        # size -> signed roots at that size (more than one root is a fork by itself)
        self._signed: dict[int, list[Checkpoint]] = {}
        self._verified: list[Checkpoint] = []
        for checkpoint in checkpoints:
            self._add_checkpoint(checkpoint if isinstance(checkpoint, StoredCheckpoint)
                                 else StoredCheckpoint(checkpoint))

    # -- findings ----------------------------------------------------------------------

    def _find(self, kind: str, index: int | None, message: str) -> None:
        self._count_findings += 1
        if len(self._findings) < MAX_FINDINGS:
            self._findings.append(Finding(kind, index, message))

    def _add_checkpoint(self, stored: StoredCheckpoint) -> None:
        where = "a checkpoint" if stored.size is None else f"the checkpoint stored at size " \
            f"{stored.size!r}"
        if not isinstance(stored.note, str):
            self._find("checkpoint", None, f"{where} holds no signed note (text)")
            return
        try:
            checkpoint = open_checkpoint(stored.note, self.keys.note_verifiers(),
                                         origin=self.origin if self.keys.authority else None)
        except VerificationError as exc:
            self._find("checkpoint", None, f"{where} does not verify: {exc}")
            return
        if not checkpoint.origin.endswith(f"/{self.tenant}"):
            self._find("checkpoint", None, f"checkpoint of another log: {checkpoint.origin}")
            return
        # The gateway answers sizes and roots from these columns, not from the note.
        if stored.size is not None and (type(stored.size) is not int
                                        or stored.size != checkpoint.size):
            self._find("checkpoint", None, f"{where} holds a note signed for size "
                       f"{checkpoint.size}: the size the gateway serves is not the signed one")
        if stored.root is not None and (not isinstance(stored.root, bytes)
                                        or not hmac.compare_digest(stored.root,
                                                                   checkpoint.root)):
            self._find("checkpoint", None, f"{where}: the stored root is not the root its "
                       f"note signs for size {checkpoint.size}")
        self.origin = checkpoint.origin
        same_size = self._signed.setdefault(checkpoint.size, [])
        if any(c.root != checkpoint.root for c in same_size):
            self._find("fork", None, f"two checkpoints of size {checkpoint.size} sign "
                       "different roots: the log forked")
        same_size.append(checkpoint)

    # -- entries -----------------------------------------------------------------------

    def add(self, entry: AuditEntry) -> None:
        """Check the next stored entry (entries must be given in stored order)."""
        index = entry.index
        # 1. position
        if type(index) is not int:
            self._find("inserted", None, f"a row at index {index!r}, which is not an "
                       "integer: it is outside the log (inserted or damaged)")
            return
        if index < 0:
            self._find("inserted", index, f"a row at index {index}, outside the log (its "
                       "indexes start at 0): inserted, and the gateway still reads it")
            return
        if index > self._expected:
            self._find("deleted", self._expected,
                       f"entries {self._expected} to {index - 1} are missing (deleted)")
        elif index < self._expected:
            self._find("inserted", index, f"a second entry claims index {index} (inserted)")
            return
        self._expected = index + 1
        receipt = entry.receipt
        if receipt is None:
            self._find("modified", index, f"entry {index} is unreadable: {entry.problem}")
            self._prev = entry.entry_hash if isinstance(entry.entry_hash, str) else None
            return
        # 2. the receipt itself
        verified = False
        try:
            verify_receipt(receipt, self.keys)
            verified = True
        except UnknownKey as exc:
            self._find("unknown-key", index, f"entry {index}: {exc} (not a pinned key)")
        except (ReceiptHashMismatch, SignatureInvalid) as exc:
            self._find("modified", index, f"entry {index} was modified: {exc}")
        except VerificationError as exc:
            self._find("modified", index, f"entry {index} does not verify: {exc}")
        # 3. its place
        if receipt.get("logIndex") != index:
            self._find("reordered", index, f"entry {index} holds the receipt of entry "
                       f"{receipt.get('logIndex')} (reordered)")
        # 4. its leaf: always the one recomputed from the receipt, never the stored one
        try:
            leaf = receipt_leaf_hash(self.tenant, receipt)
        except (KeyError, TypeError, ValueError) as exc:
            self._find("modified", index, f"entry {index} has no valid leaf: {exc}")
            return
        if entry.leaf_hash is not None and not (
                isinstance(entry.leaf_hash, bytes) and hmac.compare_digest(entry.leaf_hash, leaf)):
            self._find("modified", index, f"entry {index}: the stored leaf hash does not "
                       "match its receipt")
        # 5. the chain
        if entry.entry_hash is not None:
            self._check_chain(index, entry, receipt)
        # 6 and 7. what the gateway acts on
        self._check_columns(index, entry, receipt)
        if verified:
            self._check_consumption(index, receipt)
        # 8. the tree, at every signed size, and the nodes stored for it
        created = self._tree.append(leaf)
        if self._nodes is not None:
            self._compare_nodes(created)
        self._check_size(self._tree.size)

    def _check_chain(self, index: int, entry: AuditEntry, receipt: Mapping[str, Any]) -> None:
        try:
            expected = entry_hash(index, self._prev, str(receipt.get("receiptHash")))
        except CanonicalizationError as exc:  # an index beyond 2**53 - 1, say
            self._find("chain", index, f"entry {index} cannot be chained: {exc}")
            expected = None
        if expected is not None and (entry.prev_hash != self._prev
                                     or entry.entry_hash != expected):
            self._find("chain", index, f"entry {index} is not chained to entry {index - 1}")
        # Chain on from the stored hash, so one changed entry is one finding; a stored
        # value that is not even text continues from the recomputed one instead.
        self._prev = entry.entry_hash if isinstance(entry.entry_hash, str) else expected

    def _check_columns(self, index: int, entry: AuditEntry,
                       receipt: Mapping[str, Any]) -> None:
        kind = stored_kind(receipt)
        if kind is None:
            self._find("modified", index, f"entry {index}: receipt type "
                       f"{receipt.get('receiptType')!r} is not one the log holds")
        for name, stored, signed in (("kind", entry.kind, kind),
                                     ("execution id", entry.execution_id,
                                      receipt.get("executionId")),
                                     ("receipt hash", entry.receipt_hash,
                                      receipt.get("receiptHash"))):
            if stored is not None and signed is not None and stored != signed:
                self._find("modified", index, f"entry {index}: the stored {name} {stored!r} "
                           f"is not its signed receipt's ({signed!r})")

    def _check_consumption(self, index: int, receipt: Mapping[str, Any]) -> None:
        if stored_kind(receipt) != "consume":
            return
        execution = str(receipt.get("executionId"))
        first = self._consumed.setdefault(execution, index)
        if first != index:
            self._find("consumed-twice", index, f"entry {index} consumes execution "
                       f"{execution} again: entry {first} consumed it already (a permit "
                       "used twice)")

    def _compare_nodes(self, created: list[tuple[int, int, bytes]]) -> None:
        assert self._nodes is not None
        for level, index, digest in created:
            stored = next(self._nodes, None)
            if stored is not None and tuple(stored) == (level, index, digest):
                continue
            if stored is None:
                what = "is missing"
            elif tuple(stored[:2]) == (level, index):
                what = "differs from the one recomputed from the receipts"
            else:
                what = f"is not stored where it belongs (the store has ({stored[0]!r}, " \
                       f"{stored[1]!r}) there)"
            self._find("tree", index << level, f"the stored Merkle node (level {level}, index "
                       f"{index}) {what}: proofs the gateway serves from it are wrong")
            self._nodes = None
            return

    def _check_size(self, size: int) -> None:
        trusted_here = self._trusted is not None and self._trusted.size == size
        if size not in self._signed and not trusted_here:
            return  # the root is only needed where something signed one
        root = self._tree.root()
        for checkpoint in self._signed.get(size, ()):
            if hmac.compare_digest(checkpoint.root, root):
                self._verified.append(checkpoint)
            else:
                self._find("fork", size - 1, f"checkpoint {size} signs a root that the log "
                           "does not have: history up to entry "
                           f"{size - 1} was rewritten")
        if self._trusted is not None and self._trusted.size == size \
                and not hmac.compare_digest(self._trusted.root, root):
            when = f" on {self._trusted.verified_at}" if self._trusted.verified_at else ""
            self._find("rewritten", size - 1, f"the log no longer has the tree head of size "
                       f"{size} verified{when}: history was rewritten{_SAME_ORIGIN}")

    def _check_consecutive(self) -> None:
        if self._consistency is None:
            return
        heads = sorted({c.size: c for c in self._verified}.values(), key=lambda c: c.size)
        for older, newer in itertools.pairwise(heads):
            try:
                proof = self._consistency(older.size, newer.size)
                verify_consistency(older.size, newer.size, proof, older.root, newer.root)
            except VerificationError as exc:
                self._find("fork", older.size, f"checkpoints {older.size} and {newer.size} "
                           f"are not consistent: {exc}")
            except Exception as exc:  # a source that cannot prove it is as bad as a bad proof
                self._find("fork", older.size, f"no consistency proof from {older.size} to "
                           f"{newer.size}: {exc}")

    def finish(self) -> LogAuditReport:
        """Close the audit: signed sizes beyond the log are rollbacks."""
        size = self._tree.size
        extra = next(self._nodes, None) if self._nodes is not None else None
        if extra is not None:
            self._find("tree", size, f"the store holds a Merkle node ({extra[0]!r}, "
                       f"{extra[1]!r}) beyond the log's {size} entries")
        for signed_size in sorted(s for s in self._signed if s > size):
            self._find("rollback", size, f"checkpoint {signed_size} was signed but the log "
                       f"has {size} entries: entries were removed (rollback)")
        if self._trusted is not None and self._trusted.size > size:
            self._find("rollback", size, f"an earlier audit verified {self._trusted.size} "
                       f"entries; the log now has {size} (rollback){_SAME_ORIGIN}")
        self._check_consecutive()
        latest = max(self._verified, key=lambda c: c.size, default=None)
        return LogAuditReport(self.tenant, self.origin, size, self._tree.root(),
                              len(self._verified), list(self._findings), self._count_findings,
                              latest)

"""The records the ledger stores and returns. Plain frozen data, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

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
    "FactReader",
    "IdempotencyClaim",
    "LogEntry",
    "PendingEntry",
    "PreparedDecision",
    "Replayed",
    "Reservation",
    "SigningKeyRecord",
    "Vote",
    "VoteRecord",
    "WebhookRecord",
]

#: Builds the sealed receipt once the ledger knows the entry's log index.
Sealer = Callable[[int], dict[str, Any]]


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key, known by the SHA-256 of its text."""

    key_hash: str
    tenant: str
    role: str
    label: str | None
    created_at: str
    #: Approver groups this key votes for (role ``approver``).
    groups: tuple[str, ...] = ()
    #: When it was revoked (``execguard keys revoke``); a revoked key authenticates nobody.
    revoked_at: str | None = None


@dataclass(frozen=True)
class SigningKeyRecord:
    """A published Ed25519 public key; ``status`` is ``active`` or ``retired``."""

    key_id: str
    public_pem: str
    status: str
    created_at: str


@dataclass(frozen=True)
class BundleRecord:
    """A pushed policy bundle (immutable) and whether it is the tenant's active one."""

    tenant: str
    version: str
    created_at: str
    active: bool
    files: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecutionRecord:
    """A decision as stored: the normalized request, the response, the receipt."""

    execution_id: str
    tenant: str
    log_index: int
    surface: str
    actor_id: str | None
    decision: str
    reason_code: str
    policy_version: str | None
    created_at: str
    request_hash: str
    request: Mapping[str, Any]
    response: Mapping[str, Any]
    outcome_receipt: Mapping[str, Any] | None = None

    @property
    def receipt(self) -> Mapping[str, Any]:
        """The decision's sealed receipt."""
        return self.response["receipt"]


@dataclass(frozen=True)
class IdempotencyClaim:
    """A request to remember ``key`` for this request hash until ``expires_at`` (epoch s)."""

    key: str
    request_hash: str
    mode: str
    expires_at: float


@dataclass(frozen=True)
class LogEntry:
    """One entry of a tenant's append-only log."""

    tenant: str
    index: int
    kind: str
    execution_id: str
    receipt: Mapping[str, Any]
    receipt_hash: str
    prev_hash: str | None
    entry_hash: str
    leaf_hash: bytes


@dataclass(frozen=True)
class CheckpointRecord:
    """A signed checkpoint of one tenant's log: the C2SP signed note and what it states."""

    tenant: str
    size: int
    root: bytes
    note: str
    key_id: str
    created_at: str


@dataclass
class PendingEntry:
    """A receipt waiting to be appended, with what must be stored beside it.

    ``seal`` is called inside the committing transaction with the entry's log
    index, because the index is part of what the receipt signs.
    For ``kind == "decision"``: ``execution`` holds the row fields (without
    ``log_index``), ``response`` the reply without its receipt, and
    ``idempotency`` an optional claim. For ``kind == "outcome"``: the outcome
    is recorded at most once per execution. For ``kind == "consume"``: at most
    one ``consume`` entry per execution; a later one is appended as
    ``consume-refused`` with ``seal_refused``. ``consume-refused`` entries are
    appended as they are.
    """

    tenant: str
    kind: str
    execution_id: str
    seal: Sealer
    execution: Mapping[str, Any] | None = None
    response: Mapping[str, Any] | None = None
    idempotency: IdempotencyClaim | None = None
    #: For ``kind == "consume"``: the receipt to record instead, given the reason, if
    #: the store refuses the consumption inside its write lock (``ALREADY_CONSUMED``: the
    #: permit was used; ``OUTCOME_RECORDED``: the execution has already ended).
    refuse: Callable[[str], Sealer] | None = None
    #: For ``kind == "outcome"``: the receipt to record instead of ``seal``, given the
    #: hash of the execution's ``consume`` receipt (None if there is none), read inside
    #: the write lock: a consumption committed a moment before is never missed.
    seal_outcome: Callable[[str | None], Sealer] | None = None
    #: For a PERMIT: what it reserves against stateful limits until it is released.
    reservation: Reservation | None = None
    #: For decisions that depend on the ledger's own state (stateful facts): called
    #: inside the write lock with a reader of that state; its result replaces
    #: ``seal``, ``execution``, ``response`` and ``reservation``.
    decide: Callable[[FactReader], PreparedDecision] | None = None
    #: The reads ``decide`` will make, if known: the store may make them beforehand,
    #: together with the rest of its batch's (it answers any other read as it comes).
    reads: tuple[FactRead, ...] = ()
    #: For an ESCALATE decision: the approval request it opens.
    approval: ApprovalRequest | None = None
    #: For ``kind == "approval-vote"``: the vote.
    vote: Vote | None = None
    #: For votes and ``kind == "approval-expire"``: how the escalation resolves, called
    #: under the write lock with ``"approved"``, ``"denied"`` or ``"expired"``.
    resolve: Callable[[FactReader, str], PreparedDecision] | None = None


@dataclass(frozen=True)
class WebhookRecord:
    """A receiver of a tenant's approval events (``format``: json or slack)."""

    id: str
    tenant: str
    url: str
    secret: str
    format: str
    events: tuple[str, ...]
    created_at: str


@dataclass(frozen=True)
class ApprovalRequest:
    """The approval an ESCALATE opens: bound to its execution (and so its request hash)."""

    requester_key: str
    approvers: str
    quorum: int
    expires_at: float


@dataclass(frozen=True)
class Vote:
    """One approver's vote; ``seal`` signs its receipt once the log index is known."""

    voter_key: str
    voter: str | None
    vote: str  # APPROVE | DENY
    comment: str | None
    seal: Sealer


@dataclass(frozen=True)
class VoteRecord:
    """A stored vote."""

    voter_key: str
    voter: str | None
    vote: str
    comment: str | None
    created_at: str
    log_index: int


@dataclass(frozen=True)
class ApprovalRecord:
    """An approval request and its votes. ``status``: pending, approved, denied or expired."""

    execution_id: str
    tenant: str
    surface: str
    actor_id: str | None
    requester_key: str
    approvers: str
    quorum: int
    status: str
    created_at: str
    expires_at: float
    resolved_at: str | None
    votes: tuple[VoteRecord, ...] = ()


@dataclass(frozen=True)
class Reservation:
    """A PERMIT's claim on stateful limits: its numeric context fields, until released.

    Amounts are integers in units of 10**-4 (Cedar's decimal scale), so sums are exact.
    """

    surface: str
    actor: str
    amounts: Mapping[str, int]
    reserved_at: float
    expires_at: float


@dataclass(frozen=True)
class PreparedDecision:
    """What a decision taken inside the write lock produced."""

    seal: Sealer
    execution: Mapping[str, Any]
    response: Mapping[str, Any]
    reservation: Reservation | None
    approval: ApprovalRequest | None = None


class FactQuery(NamedTuple):
    """One stateful fact's question about the live permits reserved after ``since``: how
    many there are (``field`` None), or their total of ``field`` in units of 10**-4.

    A named tuple, not a frozen dataclass like the records above: one is built per fact
    of every decision, inside the write lock, and readers unpack it as a pair."""

    since: float
    field: str | None = None


class FactRead(NamedTuple):
    """One :meth:`FactReader.measure` call, as its arguments. A decision's reads are known
    before it is decided (``PendingEntry.reads``), so a store can answer a whole batch's
    in one statement: on PostgreSQL, one round trip instead of one per decision."""

    surface: str
    actor: str | None
    queries: tuple[FactQuery, ...]
    now: float


class FactReader(Protocol):
    """The ledger's live state, as stateful facts read it (inside the write lock)."""

    def measure(self, surface: str, actor: str | None, queries: Sequence[FactQuery],
                now: float) -> list[int]:
        """Each query's answer, in order, over the permits on ``surface`` (of ``actor``, or
        of everyone when None) not released: not failed, and used or not yet expired at
        ``now``. All of them at once: on PostgreSQL each read inside the lock is a round
        trip, and a decision's facts are one."""
        ...


@dataclass(frozen=True)
class Committed:
    """The entry is durable at ``log_index`` with this sealed receipt.

    For a decision, ``response`` is the stored answer, receipt included.
    """

    log_index: int
    receipt: Mapping[str, Any]
    response: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Replayed:
    """The idempotency key was already used for this same request; here is its record."""

    record: ExecutionRecord


@dataclass(frozen=True)
class Conflicted:
    """The entry was not written: ``code`` says why (``idempotency_key_reuse``,
    ``outcome_exists``).

    ``resolution``: a vote that came after its approval's expiry is not written, but
    the expiry it found is: the resolution's stored answer (SILENCE), as for a vote
    that resolves. None for every other conflict: then nothing was written.
    """

    code: str
    resolution: Mapping[str, Any] | None = None


CommitResult = Committed | Replayed | Conflicted

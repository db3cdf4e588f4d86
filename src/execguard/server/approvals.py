"""Escalations resolved by people: votes, quorum, and the re-evaluation that follows.

An ESCALATE opens an approval bound to its execution, and so to the exact
request (its hash). Approvers vote with their own API keys (role ``approver``,
member of the policy's ``@approvers`` group); the requester, by key or by
actor, never votes on its own request. Every vote is a signed receipt. When
the quorum approves, the stored request is evaluated again under the policy
active then, with the escalation satisfied: a hard forbid that fires
meanwhile still denies; otherwise it becomes a PERMIT of the same execution,
with a token, consumed once like any other. A DENY vote resolves to DENY; an
expired approval to SILENCE. All of this happens inside the ledger's write
lock, with stateful limits read from live reservations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from execguard.arbiter import CompiledBundle, Evaluation, PolicyBundle, SurfaceSpec
from execguard.arbiter.digested import stored_context
from execguard.ledger import (
    ApprovalRecord,
    Committed,
    Conflicted,
    ExecutionRecord,
    FactReader,
    GroupCommitter,
    PendingEntry,
    PreparedDecision,
    SQLStore,
    Vote,
)
from execguard.protocol.canonical import sha256_hex
from execguard.protocol.errors import (
    Conflict,
    Forbidden,
    MalformedRequest,
    NotFound,
    PolicyUnusable,
)
from execguard.protocol.outcome import PROTOCOL_VERSION, Outcome, format_timestamp
from execguard.protocol.receipt import seal_receipt
from execguard.protocol.request import ExecutionRequest, describe, parse_json_object
from execguard.server.decisions import DecisionInput, build_decision, prepare_decision
from execguard.server.gateway import Caller, Gateway, SigningKeys
from execguard.server.settings import Settings

__all__ = ["Approvals", "approval_json"]

VOTES = {"approve": "APPROVE", "deny": "DENY"}


def _when(epoch: float) -> str:
    return format_timestamp(datetime.fromtimestamp(epoch, UTC))


def approval_json(record: ApprovalRecord) -> dict[str, Any]:
    """An approval as the API shows it (comments included; receipts hold only digests)."""
    return {
        "id": record.execution_id, "executionId": record.execution_id,
        "surface": record.surface, "actorId": record.actor_id, "status": record.status,
        "approvers": record.approvers, "quorum": record.quorum,
        "createdAt": record.created_at, "expiresAt": _when(record.expires_at),
        "resolvedAt": record.resolved_at,
        "votes": [{"voter": v.voter, "vote": v.vote, "comment": v.comment,
                   "at": v.created_at, "logIndex": v.log_index} for v in record.votes],
    }


class Approvals:
    """The approval API's logic; votes and resolutions go through the group commit."""

    def __init__(self, settings: Settings, store: SQLStore, committer: GroupCommitter,
                 signers: SigningKeys, gateway: Gateway, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.committer = committer
        self.signers = signers
        self.gateway = gateway
        self.clock = clock

    def _record(self, tenant: str, execution_id: str) -> tuple[ApprovalRecord, ExecutionRecord]:
        approval = self.store.approval(tenant, execution_id)
        execution = self.store.get_execution(tenant, execution_id)
        if approval is None or execution is None:
            raise NotFound(f"no approval {execution_id!r} for this tenant")
        return approval, execution

    # -- reading -----------------------------------------------------------------------

    async def list(self, caller: Caller, status: str | None, limit: int) -> dict[str, Any]:
        """The tenant's approvals, expiring the overdue ones first."""
        await self.expire_due(caller.tenant)
        records = await asyncio.to_thread(self.store.approvals, caller.tenant, status, limit)
        return {"approvals": [approval_json(r) for r in records]}

    async def show(self, caller: Caller, execution_id: str) -> dict[str, Any]:
        """One approval and where its execution stands now."""
        await self.expire_due(caller.tenant, execution_id)
        approval, execution = await asyncio.to_thread(self._record, caller.tenant, execution_id)
        return {**approval_json(approval), "decision": execution.decision,
                "reasonCode": execution.reason_code}

    # -- voting ------------------------------------------------------------------------
    # What reads the store (the approval, the signing key, the policy) runs in a thread:
    # a slow or unreachable database holds up the request that reads it, not the loop.

    async def vote(self, caller: Caller, execution_id: str, choice: str,
                   body: bytes) -> dict[str, Any]:
        """Record an approver's vote; the quorum or a DENY resolves the escalation."""
        data = parse_json_object(body) if body.strip() else {}
        comment = data.get("comment")
        if comment is not None and (not isinstance(comment, str) or len(comment) > 2000):
            raise MalformedRequest("comment", "a string of at most 2,000 characters",
                                   describe(comment))
        entry = await asyncio.to_thread(self._vote_entry, caller, execution_id, choice, comment)
        result = await self.committer.submit(entry)
        if isinstance(result, Conflicted):
            if result.resolution is not None:  # too late: this vote found the expiry
                await self._announce(caller.tenant, execution_id)
            raise Conflict(_CONFLICTS.get(result.code, result.code).format(id=execution_id))
        assert isinstance(result, Committed)
        approval, execution = await asyncio.to_thread(self._record, caller.tenant, execution_id)
        if result.response:
            self._resolved(caller.tenant, approval, execution)
        return {"approval": approval_json(approval), "receipt": result.receipt,
                "decision": execution.decision,
                "resolution": dict(result.response) if result.response else None}

    def _vote_entry(self, caller: Caller, execution_id: str, choice: str,
                    comment: str | None) -> PendingEntry:
        approval, execution = self._record(caller.tenant, execution_id)
        if caller.role != "approver" or approval.approvers not in caller.groups:
            raise Forbidden(f"this API key is not an approver for group {approval.approvers!r}"
                            " (create one with 'execguard keys create --role approver "
                            f"--group {approval.approvers}')")
        if caller.key_hash == approval.requester_key or \
                (caller.label is not None and caller.label == approval.actor_id):
            raise Forbidden("the requester cannot approve its own request")
        if choice == "approve":
            # It may complete the quorum, and then the request is evaluated again: under a
            # policy that cannot be used (the active one, or the one it was decided under,
            # which says what was stored as digests), refuse the vote (503), not resolve.
            self.gateway.active_bundle(caller.tenant)
            if execution.policy_version:
                self.gateway.compiled(caller.tenant, execution.policy_version)
        signer = self.signers.current()
        fields = {
            "receiptType": "approval", "executionId": execution_id,
            "vote": VOTES[choice], "approvers": approval.approvers,
            "voter": caller.label, "voterKey": caller.key_hash[:16],
            "commentDigest": sha256_hex(comment.encode()) if comment else None,
            "decisionReceiptHash": execution.receipt["receiptHash"],
            "surface": execution.surface, "actorId": execution.actor_id,
            "timestamp": _when(self.clock()), "protocolVersion": PROTOCOL_VERSION,
            "authorityId": self.settings.authority_id,
        }
        vote = Vote(caller.key_hash, caller.label, VOTES[choice], comment,
                    lambda index: seal_receipt({**fields, "logIndex": index}, signer))
        return PendingEntry(tenant=caller.tenant, kind="approval-vote",
                            execution_id=execution_id, seal=_unused, vote=vote,
                            resolve=self._resolver(caller.tenant, execution))

    async def expire_due(self, tenant: str | None = None,
                         execution_id: str | None = None) -> int:
        """Resolve overdue approvals to SILENCE; return how many."""
        count = 0
        for due_tenant, due_id in await asyncio.to_thread(self.store.due_approvals,
                                                          self.clock()):
            if (tenant and due_tenant != tenant) or (execution_id and due_id != execution_id):
                continue
            entry = await asyncio.to_thread(self._expiry_entry, due_tenant, due_id)
            if entry is None:  # pragma: no cover - written together
                continue
            # Committed: this sweep expired it (another one, or a late vote, may have).
            if isinstance(await self.committer.submit(entry), Committed):
                count += 1
                await self._announce(due_tenant, due_id)
        return count

    async def _announce(self, tenant: str, execution_id: str) -> None:
        approval, execution = await asyncio.to_thread(self._record, tenant, execution_id)
        self._resolved(tenant, approval, execution)

    def _expiry_entry(self, tenant: str, execution_id: str) -> PendingEntry | None:
        execution = self.store.get_execution(tenant, execution_id)
        if execution is None:
            return None
        return PendingEntry(tenant=tenant, kind="approval-expire", execution_id=execution_id,
                            seal=_unused, resolve=self._resolver(tenant, execution))

    def _resolved(self, tenant: str, approval: ApprovalRecord,
                  execution: ExecutionRecord) -> None:
        self.gateway.notify(tenant, "approval.resolved", {
            "executionId": execution.execution_id, "decision": execution.decision,
            "reasonCode": execution.reason_code, "approval": approval_json(approval)})

    # -- resolution (runs inside the ledger's write lock) --------------------------------

    def _resolver(self, tenant: str, execution: ExecutionRecord
                  ) -> Callable[[FactReader, str], PreparedDecision]:
        signer = self.signers.current()
        compiled: CompiledBundle | None = None
        spec: SurfaceSpec | None = None
        context: dict[str, Any] | str
        try:
            bundle, compiled = self.gateway.active_bundle(tenant)
            spec = bundle.registry.get(execution.surface)
            context = self._context(tenant, execution, bundle, spec)
        except PolicyUnusable as exc:
            # A policy that does not load (stored before this release's stricter rules):
            # a deny or an expiry evaluates nothing and still resolves; an approval is
            # refused before it gets here (_vote_entry), or else becomes SILENCE. (Storage
            # and key faults are not caught: the vote or expiry fails, and can be retried.)
            context = str(exc)
        version = compiled.version if compiled is not None else execution.policy_version
        stored = execution.request
        request = ExecutionRequest(
            surface=execution.surface, action=stored.get("action"),
            actor_id=stored.get("actorId"),
            context=context if isinstance(context, dict) else stored.get("context") or {},
            signals=stored.get("signals") or {}, subject_digest=stored.get("subjectDigest"))
        normalized = {k: v for k, v in stored.items() if k not in ("executionMode", "facts")}

        def resolve(reader: FactReader, how: str) -> PreparedDecision:
            # spec and compiled are read only to evaluate (an approval, with both known).
            given = DecisionInput(
                tenant, request, spec, compiled, normalized,  # type: ignore[arg-type]
                execution.request_hash, "enforce", execution.execution_id, self.clock(),
                self.settings.authority_id, self.settings.token_ttl_seconds, approved=True,
                resolves=execution.receipt["receiptHash"])
            if how == "approved" and spec is not None and isinstance(context, dict):
                return prepare_decision(given, signer, reader)
            code, outcome, reason = _RESOLUTIONS.get(how) or (
                "EVALUATION_ERROR", Outcome.SILENCE,
                f"The approved request cannot be evaluated again: {context}."
                if isinstance(context, str) else
                "The surface is no longer in the active policy.")
            evaluation = Evaluation(outcome, code, reason, (), version)
            return build_decision(given, evaluation, {}, signer)
        return resolve

    def _context(self, tenant: str, execution: ExecutionRecord, bundle: PolicyBundle,
                 spec: SurfaceSpec | None) -> dict[str, Any] | str:
        """The stored context as the active policy can evaluate it again, or why it cannot
        be: its sensitive fields are stored only as digests (``arbiter/digested.py``)."""
        stored = execution.request.get("context") or {}
        if spec is None:
            return dict(stored)
        recorded = spec
        if execution.policy_version and execution.policy_version != bundle.version:
            recorded_bundle, _ = self.gateway.compiled(tenant, execution.policy_version)
            recorded = recorded_bundle.registry.get(execution.surface) or spec
        return stored_context(bundle, spec, recorded, stored)


#: How a deny or an expiry resolves an escalation: (reason code, outcome, reason).
_RESOLUTIONS = {
    "denied": ("APPROVAL_DENIED", Outcome.DENY, "An approver denied this request."),
    "expired": ("APPROVAL_EXPIRED", Outcome.SILENCE,
                "No approval came before the escalation expired."),
}

_CONFLICTS = {
    "already_voted": "this approver (this API key, or another key of its label) already "
                     "voted on approval {id}",
    "approval_approved": "approval {id} is already resolved (approved)",
    "approval_denied": "approval {id} is already resolved (denied)",
    "approval_expired": "approval {id} expired before this vote; it resolved to SILENCE",
    "no_approval": "execution {id} has no approval request",
}


def _unused(index: int) -> dict[str, Any]:  # pragma: no cover - votes seal their own receipt
    raise AssertionError("an approval step seals its receipts itself")

"""Turning an evaluation into what is signed, stored and answered, and computing facts.

A decision is prepared by :func:`prepare_decision`; for a surface that declares
stateful facts it runs inside the ledger's write lock (see
``PendingEntry.decide``), with the facts read from live reservations, so that
concurrent requests can never together exceed a limit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from execguard.arbiter import CompiledBundle, Evaluation, compute_facts
from execguard.arbiter.facts import FactSpec
from execguard.arbiter.registry import SurfaceSpec
from execguard.ledger import (
    ApprovalRequest,
    FactQuery,
    FactRead,
    FactReader,
    PreparedDecision,
    Reservation,
)
from execguard.protocol.canonical import canonical_sha256
from execguard.protocol.outcome import PROTOCOL_VERSION, Outcome, format_timestamp
from execguard.protocol.receipt import seal_receipt
from execguard.protocol.request import ExecutionRequest
from execguard.protocol.signing import Signer
from execguard.protocol.token import execution_token_claims, issue_execution_token

__all__ = ["DecisionInput", "NoHistory", "build_decision", "fact_reads", "facts_for",
           "jsonable_facts", "prepare_decision", "units_of"]

#: Reservations and sums are kept in units of 10**-4: Cedar decimal's scale, so exact.
UNITS = 10_000


@dataclass(frozen=True)
class DecisionInput:
    """Everything about one request that a decision needs, fixed before it is taken."""

    tenant: str
    request: ExecutionRequest
    spec: SurfaceSpec
    compiled: CompiledBundle
    normalized: Mapping[str, Any]
    request_hash: str
    mode: str
    execution_id: str
    now: float
    authority_id: str
    token_ttl_seconds: int
    #: Who asked (an API key hash): an ESCALATE opens an approval that it cannot vote on.
    requester_key: str = ""
    #: Set when this decision resolves an escalation: its quorum approved.
    approved: bool = False
    #: The receipt hash of the ESCALATE this decision resolves, if it does.
    resolves: str | None = None
    #: A candidate policy evaluated beside the active one; it never changes the outcome.
    shadow: CompiledBundle | None = None


def units_of(value: Any) -> int | None:
    """A JSON number as an exact count of 10**-4 units, or None if it has none."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        scaled = Decimal(repr(value) if isinstance(value, float) else value) * UNITS
    except InvalidOperation:
        return None
    return int(scaled) if scaled == scaled.to_integral_value() else None


def _scopes(spec: SurfaceSpec, request: ExecutionRequest) -> dict[str | None, list[FactSpec]]:
    """The surface's stateful facts by what they count: the actor's permits, or everyone's
    (None)."""
    actor = request.actor_id or ""
    scopes: dict[str | None, list[FactSpec]] = {}
    for fact in spec.facts.values():
        scopes.setdefault(actor if fact.per == "actor" else None, []).append(fact)
    return scopes


def _queries(group: list[FactSpec], now: float) -> tuple[FactQuery, ...]:
    return tuple([FactQuery(now - fact.window_seconds,
                            None if fact.aggregate == "count" else fact.field)
                  for fact in group])


def fact_reads(spec: SurfaceSpec, request: ExecutionRequest, now: float) -> tuple[FactRead, ...]:
    """The reads :func:`facts_for` will make for this request (``PendingEntry.reads``)."""
    return tuple([FactRead(spec.name, scope, _queries(group, now), now)
                  for scope, group in _scopes(spec, request).items()])


def facts_for(spec: SurfaceSpec, request: ExecutionRequest, now: float,
              reader: FactReader | None) -> dict[str, Any]:
    """The facts of one decision: the clock's, plus the surface's stateful facts.

    Stateful facts include the request itself: ``count`` is the number of live
    permits in the window *with this one*, ``sum`` the total *with this amount*,
    so a policy compares the projected total with its limit (Cedar decimals
    compare but do not add).
    """
    facts: dict[str, Any] = compute_facts(datetime.fromtimestamp(now, UTC))
    if not spec.facts:
        return facts
    if reader is None:
        raise RuntimeError("stateful facts need the ledger's reader")
    # One read per scope (the actor's permits, everyone's), every fact of it at once.
    stored: dict[str, int] = {}
    for scope, group in _scopes(spec, request).items():
        answers = reader.measure(spec.name, scope, _queries(group, now), now)
        stored.update(zip((fact.name for fact in group), answers, strict=True))
    for fact in spec.facts.values():
        if fact.aggregate == "count":
            facts[fact.name] = stored[fact.name] + 1
            continue
        assert fact.field is not None
        total = stored[fact.name] + (units_of(request.context.get(fact.field)) or 0)
        facts[fact.name] = Decimal(total) / UNITS if fact.field_type == "decimal" \
            else total // UNITS
    return facts


def jsonable_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """Facts as stored with the decision (decimals as exact strings) for replay."""
    return {k: format(v, "f") if isinstance(v, Decimal) else v for k, v in facts.items()}


def _reservation(spec: SurfaceSpec, request: ExecutionRequest, now: float,
                 expires: float) -> Reservation:
    # Every number, for the sums of this policy and of later ones; but a sensitive one
    # is kept as a digest only (no policy can sum it: registry.py).
    amounts = {name: units for name, field in spec.context.items()
               if field.type in ("decimal", "integer") and name not in spec.sensitive
               and (units := units_of(request.context.get(name))) is not None}
    return Reservation(spec.name, request.actor_id or "", amounts, now, expires)


def prepare_decision(given: DecisionInput, signer: Signer,
                     reader: FactReader | None) -> PreparedDecision:
    """Evaluate, then build the receipt fields, the stored row and the answer."""
    facts = facts_for(given.spec, given.request, given.now, reader)
    evaluation = given.compiled.evaluate(given.request, facts, approved=given.approved)
    prepared = build_decision(given, evaluation, facts, signer)
    if given.shadow is not None:
        prepared.execution["shadow"] = _shadow(given, facts, evaluation)
    return prepared


def _shadow(given: DecisionInput, facts: Mapping[str, Any],
            active: Evaluation) -> dict[str, Any]:
    """What the candidate would decide, beside what the active policy decided (in observe
    mode, what it would have: the answer is always PERMIT); a candidate that cannot
    evaluate says so."""
    assert given.shadow is not None
    try:
        other = given.shadow.evaluate(given.request, facts, approved=given.approved)
        decision, reason = other.outcome.value, other.reason_code
    except Exception as exc:  # the shadow policy must never affect a decision
        decision, reason = Outcome.SILENCE.value, f"SHADOW_ERROR: {type(exc).__name__}"
    return {"version": given.shadow.version, "decision": decision, "reason": reason,
            "activeDecision": active.outcome.value}


def _summary(decision: Outcome, real: Outcome, mode: str, surface: str, reason: str) -> str:
    """The one line a person reads (SDK ``explain``, audit lists). In observe mode the
    reason is the policy's for the real outcome, so the line says what enforcing would
    have decided: "PERMIT ...: Policy ... forbids ..." alone reads as a real permit."""
    if mode == "observe":
        return f"{decision.value} (observe mode, not enforced; enforced it would be " \
               f"{real.value}) for {surface}: {reason}"
    return f"{decision.value} for {surface}: {reason}"


def build_decision(given: DecisionInput, evaluation: Evaluation, facts: Mapping[str, Any],
                   signer: Signer) -> PreparedDecision:
    """The receipt fields, stored row and answer of an evaluation (no evaluating here)."""
    request, moment = given.request, datetime.fromtimestamp(given.now, UTC)
    real = evaluation.outcome
    decision = Outcome.PERMIT if given.mode == "observe" else real
    stored_facts = jsonable_facts(facts)
    fields: dict[str, Any] = {
        "receiptType": "decision",
        "executionId": given.execution_id,
        "decision": decision.value,
        "surface": request.surface,
        "actorId": request.actor_id,
        "timestamp": format_timestamp(moment),
        "requestHash": given.request_hash,
        "policyVersion": evaluation.policy_version,
        "reasonCode": evaluation.reason_code,
        "determiningPolicies": list(evaluation.determining_policies),
        "executionMode": given.mode,
        "wouldDecision": real.value if given.mode == "observe" else None,
        "factsDigest": canonical_sha256(stored_facts),
        "resolves": given.resolves,
        "protocolVersion": PROTOCOL_VERSION,
        "authorityId": given.authority_id,
        "subjectDigest": request.subject_digest,
    }
    response: dict[str, Any] = {
        "decision": decision.value,
        "execution_id": given.execution_id,
        "surface": request.surface,
        "reason": evaluation.reason,
        "reasonCode": evaluation.reason_code,
        "summary": _summary(decision, real, given.mode, request.surface, evaluation.reason),
        "policyVersion": evaluation.policy_version,
        "determiningPolicies": list(evaluation.determining_policies),
        "executionMode": given.mode,
    }
    if given.mode == "observe":
        response["would_decision"] = real.value
    approval = None
    if real is Outcome.ESCALATE and given.mode == "enforce" and evaluation.approval:
        expires = given.now + given.spec.approval_expiry_seconds
        approval = ApprovalRequest(given.requester_key, evaluation.approval.approvers,
                                   evaluation.approval.quorum, expires)
        response["approval"] = {
            "id": given.execution_id, "status": "pending",
            "approvers": approval.approvers, "quorum": approval.quorum,
            "expiresAt": format_timestamp(datetime.fromtimestamp(expires, UTC))}
    if given.resolves is not None:
        response["resolves"] = given.resolves
    reservation = None
    if decision is Outcome.PERMIT and given.mode == "enforce":
        claims = execution_token_claims(
            issuer=given.authority_id, tenant=given.tenant, surface=request.surface,
            request_hash=given.request_hash, execution_id=given.execution_id,
            actor_id=request.actor_id, policy_version=evaluation.policy_version,
            issued_at=int(given.now), ttl_seconds=given.token_ttl_seconds)
        response["execution_token"] = issue_execution_token(claims, signer)
        response["token_expires_at"] = format_timestamp(
            datetime.fromtimestamp(claims["exp"], UTC))
        reservation = _reservation(given.spec, request, given.now, float(claims["exp"]))

    def seal(index: int) -> dict[str, Any]:
        return seal_receipt({**fields, "logIndex": index}, signer)

    execution: dict[str, Any] = {"surface": request.surface, "actor_id": request.actor_id,
                 "decision": decision.value, "reason_code": evaluation.reason_code,
                 "policy_version": evaluation.policy_version,
                 "request_hash": given.request_hash,
                 "request": {**given.normalized, "executionMode": given.mode,
                             "facts": stored_facts}}
    return PreparedDecision(seal, execution, response, reservation, approval)


class NoHistory:
    """A FactReader for an actor with no permits yet (local evaluation, what-if)."""

    def measure(self, surface: str, actor: str | None, queries: Sequence[FactQuery],
                now: float) -> list[int]:
        """No live permits, nothing reserved."""
        return [0] * len(queries)

"""Replaying recorded decisions: determinism checks and the impact of a candidate policy.

A decision stores its normalized request and the facts it used, and its receipt
commits to both (``requestHash``, ``factsDigest``). A replay first checks them
against the receipt, and the receipt against the log, so it never vouches for
edited data; then it evaluates the stored request with the stored facts and
compares the decision (``wouldDecision`` in observe mode) and reason code.

Sensitive context fields are stored only as digests: under policies that read
one a replay cannot be exact (not replayable; ``arbiter/digested.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import lru_cache
from typing import Any

from execguard.arbiter import CompiledBundle, Evaluation, PolicyBundle
from execguard.arbiter.digested import looks_digested, stored_context
from execguard.arbiter.registry import SurfaceSpec
from execguard.ledger import ExecutionRecord, LedgerStore
from execguard.protocol.canonical import canonical_sha256
from execguard.protocol.errors import (
    BundleInvalid,
    CanonicalizationError,
    ConfigError,
    NotFound,
    VerificationError,
)
from execguard.protocol.receipt import receipt_hash
from execguard.protocol.request import ExecutionRequest, request_hash
from execguard.verify import KeySet, verify_receipt

__all__ = ["ImpactGroup", "ImpactReport", "ReplayResult", "ReplayStatus", "UnloadableBundle",
           "impact", "ledger_keys", "log_receipts", "replay_execution", "replay_stored",
           "stored_bundle"]

#: The keys of the normalized request, the object ``requestHash`` covers.
_NORMALIZED_KEYS = ("tenant", "surface", "action", "actorId", "context", "signals",
                    "subjectDigest")
MAX_EXAMPLES = 3
#: What a decision names when it shows no @reason: the reason code of its outcome.
_DEFAULT_REASON_CODES = {"PERMIT": "POLICY_PERMIT", "DENY": "POLICY_FORBID",
                         "ESCALATE": "APPROVAL_REQUIRED"}


class ReplayStatus(StrEnum):
    """How a replay came out."""

    REPRODUCED = "reproduced"  # same decision and reason code
    CHANGED = "changed"  # evaluated, with a different decision or reason code
    TAMPERED = "tampered"  # stored request, facts or receipt no longer match the receipt
    NOT_REPLAYABLE = "not_replayable"  # cannot be evaluated faithfully (says why)


@dataclass(frozen=True)
class ReplayResult:
    """One recorded decision replayed under one policy version."""

    execution_id: str
    surface: str
    mode: str
    recorded_version: str | None
    recorded_decision: str  # for observe mode, the recorded wouldDecision
    recorded_reason: str
    replayed_version: str
    status: ReplayStatus
    evaluation: Evaluation | None = None
    problem: str | None = None  # why TAMPERED or NOT_REPLAYABLE
    note: str | None = None  # e.g. that the escalation was resolved later
    #: CHANGED only in the reason code, by this release's rule for it (not the policies).
    reason_rule_changed: bool = False

    @property
    def reproduced(self) -> bool:
        """The replay gave the recorded decision and reason code."""
        return self.status is ReplayStatus.REPRODUCED

    @property
    def recorded_outcome(self) -> str:
        return f"{self.recorded_decision} {self.recorded_reason}"

    @property
    def replayed_outcome(self) -> str | None:
        ev = self.evaluation
        return None if ev is None else f"{ev.outcome.value} {ev.reason_code}"


@dataclass(frozen=True)
class UnloadableBundle:
    """A stored bundle this release refuses (pushed under an earlier release's rules)."""

    version: str
    problem: str

    def why(self) -> str:
        return f"was stored by an earlier release and does not load in this one ({self.problem})"


def replay_execution(record: ExecutionRecord, bundle: PolicyBundle, *,
                     recorded: PolicyBundle | UnloadableBundle | None = None,
                     log_receipts: Sequence[Mapping[str, Any]] | None = None,
                     keys: KeySet | None = None) -> ReplayResult:
    """Evaluate a stored decision's request and facts under ``bundle`` and compare.

    ``recorded`` is the bundle the decision was taken under, when it differs from
    ``bundle``: its sensitive fields are the ones stored as digests. If it no longer
    loads, only a decision that stored no digest can be replayed.
    ``log_receipts`` are the execution's decision receipts in the log, oldest first:
    the stored receipt must be the last, and an approval's resolution is replayed
    as the escalation it resolved (see :func:`_decision_receipt`). With ``keys``, the
    receipt's signature must verify under them: a receipt rewritten with its hashes
    recomputed is tampered, not a decision that changed. (Keys read from the same
    ledger vouch for no more than it does: ``execguard audit`` pins them.)
    """
    if not isinstance(record.request, Mapping) or not isinstance(record.response, Mapping):
        return ReplayResult(record.execution_id, record.surface, "enforce",
                            record.policy_version, record.decision, record.reason_code,
                            bundle.version, ReplayStatus.TAMPERED, problem="the stored request "
                            "or answer is not a JSON object: the row was altered")
    request: Mapping[str, Any] = record.request
    receipt, note, problem = _decision_receipt(record, log_receipts)
    mode = str(receipt.get("executionMode") or request.get("executionMode") or "enforce")
    base = {
        "execution_id": record.execution_id, "surface": record.surface, "mode": mode,
        "recorded_version": receipt.get("policyVersion", record.policy_version),
        "recorded_decision": str(receipt.get("wouldDecision") if mode == "observe"
                                 else receipt.get("decision", record.decision)),
        "recorded_reason": str(receipt.get("reasonCode", record.reason_code)),
        "replayed_version": bundle.version,
    }

    def stop(status: ReplayStatus, problem: str) -> ReplayResult:
        return ReplayResult(**base, status=status, problem=problem, note=note)

    if problem is not None:
        return stop(*problem)
    altered = _altered(receipt, request)
    if altered is not None:
        return stop(ReplayStatus.TAMPERED, altered)
    if keys is not None:
        try:
            verify_receipt(receipt, keys)
        except VerificationError as exc:
            return stop(ReplayStatus.TAMPERED, f"the stored receipt does not verify under the "
                                               f"ledger's signing keys: {exc}")
    spec = bundle.registry.get(record.surface)
    if spec is None:
        return stop(ReplayStatus.NOT_REPLAYABLE,
                    f"policy version {bundle.version} has no surface {record.surface!r}")
    facts = _facts(request["facts"], spec)
    if isinstance(facts, str):
        return stop(ReplayStatus.NOT_REPLAYABLE, facts)
    stored = request.get("context") or {}
    if isinstance(recorded, UnloadableBundle):
        unknown = _maybe_digested(stored, spec.sensitive)
        if unknown:  # was it a sensitive value's digest, or a string the caller sent?
            return stop(ReplayStatus.NOT_REPLAYABLE,
                        f"the policy version it was decided under, {recorded.version}, "
                        f"{recorded.why()}; so whether context.{unknown[0]} was stored as "
                        "the digest of a sensitive value is not known")
        recorded = None  # it could have digested only fields this version digests too
    recorded_spec = recorded.registry.get(record.surface) if recorded is not None else None
    # Why the decision refused its context, if it did (the receipt keeps only the code).
    invalid = str(record.response.get("reason") or "") \
        if receipt.get("reasonCode") == "INVALID_CONTEXT" else ""
    context = stored_context(bundle, spec, recorded_spec, stored, invalid)
    if isinstance(context, str):
        return stop(ReplayStatus.NOT_REPLAYABLE, context)
    replayed = ExecutionRequest(
        surface=record.surface, action=request.get("action"), actor_id=request.get("actorId"),
        context=context, signals=request.get("signals") or {},
        subject_digest=request.get("subjectDigest"), execution_mode=mode)
    evaluation = _compiled(bundle).evaluate(replayed, facts)
    same = (evaluation.outcome.value == base["recorded_decision"]
            and evaluation.reason_code == base["recorded_reason"])
    rule_changed = not same and _only_the_reason_rule_differs(
        receipt, evaluation, bundle, base["recorded_decision"], base["recorded_reason"])
    if rule_changed:
        note = "; ".join(filter(None, (note, _REASON_RULE_NOTE)))
    return ReplayResult(**base, status=ReplayStatus.REPRODUCED if same else ReplayStatus.CHANGED,
                        evaluation=evaluation, note=note, reason_rule_changed=rule_changed)


_REASON_RULE_LABEL = "same policies; reason code as this release chooses it"
_REASON_RULE_NOTE = (
    "the same policies decided; only the reason code differs, because this release takes it "
    "from the first of them that gives a @reason, where releases before it took the first "
    "by @id (with no @reason, the outcome's default code)")


def _only_the_reason_rule_differs(receipt: Mapping[str, Any], evaluation: Evaluation,
                                  bundle: PolicyBundle, recorded_decision: str,
                                  recorded_reason: str) -> bool:
    """True when the replay differs from the record only in the reason code, and the
    earlier releases' rule applied to the same policies gives the recorded one: what
    changed is this release's choice of the policy that speaks, not the policies."""
    fired = evaluation.determining_policies
    if not fired or evaluation.outcome.value != recorded_decision \
            or list(fired) != receipt.get("determiningPolicies"):
        return False
    reasons = {info.id: info.reason for info in bundle.policies}
    earlier = reasons.get(fired[0]) or _DEFAULT_REASON_CODES.get(evaluation.outcome.value)
    return earlier == recorded_reason


def _maybe_digested(context: Any, sensitive: frozenset[str]) -> list[str]:
    """The stored context fields, not in ``sensitive``, whose values are shaped like the
    digest of a sensitive value."""
    if not isinstance(context, Mapping):
        return []
    return sorted(name for name, value in context.items() if name not in sensitive
                  and looks_digested(value))


def _decision_receipt(record: ExecutionRecord, log: Sequence[Mapping[str, Any]] | None
                      ) -> tuple[Mapping[str, Any], str | None,
                                 tuple[ReplayStatus, str] | None]:
    """The receipt the stored facts belong to, a note, and what stops the replay.

    An approval's resolution replaces the stored receipt but not the stored facts: it
    is decided again when the quorum is reached, on facts the ledger does not keep.
    The stored facts are the escalation's, so the escalation is what is replayed.
    """
    response = record.response if isinstance(record.response, Mapping) else {}
    current: Mapping[str, Any] = response.get("receipt") or {}
    if not isinstance(current, Mapping) or not current:
        return current, None, (ReplayStatus.TAMPERED, "the stored decision has no receipt")
    if log is not None and (not log or log[-1].get("receiptHash") != current.get("receiptHash")):
        return current, None, (ReplayStatus.TAMPERED, "the stored receipt is not the "
                               "decision's latest receipt in the log")
    if current.get("resolves") is None:
        return current, None, None
    note = (f"resolved later as {current.get('decision')} {current.get('reasonCode')}; "
            "this replays the escalation it resolved")
    original = next((r for r in log or () if r.get("receiptHash") == current["resolves"]), None)
    if original is None:
        return current, note, (ReplayStatus.NOT_REPLAYABLE, "only the escalation's facts are "
                               "stored, and its receipt is in the log: replay it from there")
    return original, note, None


def _altered(receipt: Mapping[str, Any], request: Mapping[str, Any]) -> str | None:
    """What no longer matches the signed receipt, or None."""
    try:
        if receipt_hash(receipt) != receipt.get("receiptHash"):
            return "the stored receipt was altered: its fields no longer hash to its receiptHash"
        if any(key not in request for key in _NORMALIZED_KEYS) or request_hash(
                {key: request[key] for key in _NORMALIZED_KEYS}) != receipt.get("requestHash"):
            return ("the stored request was altered: it no longer hashes to the receipt's "
                    "requestHash")
        if "facts" not in request or receipt.get("factsDigest") is None:
            return "the decision was recorded without its facts"
        digest = canonical_sha256(request["facts"])
    except (CanonicalizationError, TypeError, ValueError) as exc:
        return f"the stored decision cannot be read exactly: {exc}"
    if digest != receipt["factsDigest"]:
        return (f"the stored facts were altered: they hash to {digest}, but the receipt's "
                f"factsDigest is {receipt['factsDigest']}")
    return None


def _facts(stored: Any, spec: SurfaceSpec) -> dict[str, Any] | str:
    """The stored facts as the engine takes them (decimals back from exact strings)."""
    if not isinstance(stored, Mapping):
        return "the stored facts are not an object"
    facts = dict(stored)
    for name, fact in spec.facts.items():
        value = stored.get(name)
        try:
            number = Decimal(value) if isinstance(value, str | int) and \
                not isinstance(value, bool) else None
        except InvalidOperation:
            number = None
        if number is None or (fact.cedar_type != "__cedar::decimal"
                              and number != number.to_integral_value()):
            return (f"the decision recorded no usable {fact.aggregate} for the fact {name!r} "
                    f"(got {value!r}), which this policy version declares for {spec.name}")
        facts[name] = number if fact.cedar_type == "__cedar::decimal" else int(number)
    return facts


@lru_cache(maxsize=16)  # bundles hash by identity: one compilation per replayed bundle
def _compiled(bundle: PolicyBundle) -> CompiledBundle:
    return CompiledBundle(bundle)


# -- impact of a candidate bundle ---------------------------------------------------------


@dataclass
class ImpactGroup:
    """Recorded decisions of one surface that a candidate treats alike, with examples."""

    surface: str
    before: str  # the recorded outcome, e.g. "PERMIT WITHIN_LIMIT"
    after: str  # the candidate's outcome, or why the decisions could not be replayed
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class ImpactReport:
    """What a candidate bundle would have decided differently over a period."""

    candidate: str
    decisions: int = 0
    unchanged: int = 0
    changes: dict[tuple[str, str, str], ImpactGroup] = field(default_factory=dict)
    skipped: dict[tuple[str, str, str], ImpactGroup] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(group.count for group in self.changes.values())

    @property
    def not_replayable(self) -> int:
        return sum(group.count for group in self.skipped.values())

    def add(self, result: ReplayResult) -> None:
        """Count one replay."""
        self.decisions += 1
        if result.status is ReplayStatus.REPRODUCED:
            self.unchanged += 1
            return
        changed = result.status is ReplayStatus.CHANGED
        groups = self.changes if changed else self.skipped
        after = (result.replayed_outcome if changed else None) or \
            f"{result.status.value}: {result.problem}"
        if result.reason_rule_changed:  # not the candidate's doing: say so in its row
            after += f" ({_REASON_RULE_LABEL})"
        key = (result.surface, result.recorded_outcome, after)
        group = groups.setdefault(key, ImpactGroup(*key))
        group.count += 1
        if len(group.examples) < MAX_EXAMPLES:
            group.examples.append(result.execution_id)

    @staticmethod
    def ordered(groups: dict[tuple[str, str, str], ImpactGroup]) -> list[ImpactGroup]:
        """By surface, then the most frequent first."""
        return sorted(groups.values(), key=lambda g: (g.surface, -g.count, g.before, g.after))


# -- reading from the ledger --------------------------------------------------------------


def stored_bundle(store: LedgerStore, tenant: str, version: str) -> PolicyBundle:
    """A pushed bundle, validated again; :class:`NotFound` if it is not stored,
    :class:`ConfigError` (saying why and what to do) if this release refuses it."""
    loaded = _load_stored(store, tenant, version)
    if loaded is None:
        raise NotFound(f"policy version {version} is not stored for tenant {tenant!r}")
    if isinstance(loaded, UnloadableBundle):
        raise ConfigError(f"policy version {version} {loaded.why()}: it cannot be "
                          "evaluated; push a corrected bundle and replay under it (replay "
                          "--policy VERSION, policy impact --candidate VERSION)")
    return loaded


def _load_stored(store: LedgerStore, tenant: str,
                 version: str) -> PolicyBundle | UnloadableBundle | None:
    """A pushed bundle validated again, why this release refuses it, or None if not stored."""
    record = store.get_bundle(tenant, version)
    if record is None:
        return None
    try:
        return PolicyBundle.from_files(record.files)
    except BundleInvalid as exc:  # stored under an earlier release's rules
        return UnloadableBundle(version, str(exc))


def log_receipts(store: LedgerStore, tenant: str, execution_id: str) -> list[Mapping[str, Any]]:
    """The execution's decision receipts in the append-only log, oldest first."""
    return [entry.receipt for entry in store.execution_log(tenant, execution_id)
            if entry.kind == "decision"]


def replay_stored(store: LedgerStore, tenant: str, execution_id: str,
                  version: str | None = None) -> ReplayResult:
    """Replay one stored decision under its own policy version, or under ``version``."""
    try:
        record = store.get_execution(tenant, execution_id)
    except ValueError as exc:  # JSON that no longer reads
        raise ConfigError(f"the stored execution {execution_id!r} cannot be read ({exc}): "
                          "its row was altered; run 'execguard audit'") from None
    if record is None:
        raise NotFound(f"no execution {execution_id!r} for tenant {tenant!r}")
    log = log_receipts(store, tenant, execution_id)
    own = str(_decision_receipt(record, log)[0].get("policyVersion", record.policy_version))
    if version in (None, own):
        recorded = target = stored_bundle(store, tenant, own)
    else:
        target = stored_bundle(store, tenant, str(version))
        recorded = _load_stored(store, tenant, own)
        if recorded is None:
            raise NotFound(f"policy version {own} is not stored for tenant {tenant!r}")
    return replay_execution(record, target, recorded=recorded, log_receipts=log,
                            keys=ledger_keys(store))


def ledger_keys(store: LedgerStore) -> KeySet:
    """The signing keys the ledger publishes, for the receipts' signatures."""
    return KeySet.from_document({"protocol": "execguard/1", "keys": [
        {"keyId": k.key_id, "algorithm": "Ed25519", "publicKeyPem": k.public_pem,
         "status": k.status} for k in store.signing_keys()]})


def impact(store: LedgerStore, tenant: str, candidate: str, since: str | None,
           until: str | None) -> ImpactReport:
    """Replay the tenant's decisions of ``[since, until)`` (RFC 3339) under ``candidate``."""
    bundle = stored_bundle(store, tenant, candidate)
    # query_executions has no cursor: ask for at most as many rows as the log has entries.
    records = [r for r in store.query_executions(tenant, since=since,
                                                 limit=store.log_size(tenant) + 1)
               if until is None or r.created_at < until]
    recorded: dict[str, PolicyBundle | UnloadableBundle | None] = {}
    keys = ledger_keys(store)
    report = ImpactReport(bundle.version)
    for record in reversed(records):  # oldest first, so examples read in time order
        log = log_receipts(store, tenant, record.execution_id)
        version = str(_decision_receipt(record, log)[0].get("policyVersion"))
        if version not in recorded:
            recorded[version] = _load_stored(store, tenant, version)
        report.add(replay_execution(record, bundle, recorded=recorded[version],
                                    log_receipts=log, keys=keys))
    return report

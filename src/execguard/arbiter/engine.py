"""Evaluating an execution request against a compiled policy bundle.

The steps of :meth:`CompiledBundle.evaluate`, in order:

1. The surface must be in the registry, else :class:`UnknownSurface` (an
   error, not a decision).
2. The request's context and signals are checked against the registry; a
   missing or invalid declared field is a SILENCE naming the field.
3. The Cedar request is built from the declared fields only, plus ``action``,
   the computed ``facts`` and the declared ``signals``; of those, Cedar is given
   the attributes the policies of this action read (``arbiter/projection.py``),
   and it evaluates only the policies that can apply to this action.
4. Cedar's answer is mapped to an outcome, failing closed:

   - a firing ``forbid`` without ``@escalate``      -> DENY
   - any evaluation error or rejected request      -> SILENCE ``EVALUATION_ERROR``
   - a firing ``@escalate`` forbid                 -> ESCALATE
   - a firing ``permit``                           -> PERMIT
   - nothing fired                                 -> SILENCE ``NO_MATCHING_POLICY``

The error rule comes before ESCALATE and PERMIT because Cedar skips a policy
whose evaluation errors: an erroring ``forbid`` would otherwise silently stop
forbidding. Any unexpected exception becomes SILENCE ``EVALUATION_ERROR``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import cedarpy
import orjson

from execguard.arbiter.bundle import PolicyBundle
from execguard.arbiter.context import FieldProblem, convert_fields
from execguard.arbiter.facts import FACT_TYPES
from execguard.arbiter.projection import project, projection_of, scoped_action
from execguard.arbiter.registry import DECIMAL_LIMIT, SurfaceRegistry, SurfaceSpec
from execguard.protocol.errors import BundleInvalid, UnknownSurface
from execguard.protocol.outcome import Outcome
from execguard.protocol.request import MAX_SAFE_INTEGER, ExecutionRequest

__all__ = ["ApprovalRule", "CompiledBundle", "Evaluation", "PolicyMeta", "approval_rule"]

ANONYMOUS_ACTOR = "anonymous"
NO_SUBJECT = "none"
#: How Cedar names a policy in its diagnostics: by its positional id, ``policy3``.
_CEDAR_POLICY_REF_RE = re.compile(r"policy `(policy\d+)`")


@dataclass(frozen=True)
class Evaluation:
    """The arbiter's answer for one request under one policy version."""

    outcome: Outcome
    reason_code: str  # e.g. "WITHIN_LIMIT", "SANCTIONED_BENEFICIARY", "MISSING_CONTEXT"
    reason: str  # one sentence for a person
    determining_policies: tuple[str, ...]  # @ids of the policies that decided
    policy_version: str
    errors: tuple[str, ...] = ()  # Cedar diagnostics, for operators
    #: For ESCALATE: who must approve, and how many of them.
    approval: ApprovalRule | None = None


@dataclass(frozen=True)
class ApprovalRule:
    """Who resolves an escalation: ``@approvers("group")`` and ``@quorum("n")``."""

    approvers: str
    quorum: int


DEFAULT_APPROVERS = "approvers"
_GROUP_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}\Z")


def approval_rule(annotations: Mapping[str, Any], policy_id: str) -> ApprovalRule:
    """The approval rule of an escalating policy; refuse values that would fail open."""
    group = annotations.get("approvers") or DEFAULT_APPROVERS
    quorum_text = annotations.get("quorum") or "1"
    if not isinstance(group, str) or not _GROUP_RE.match(group):
        raise BundleInvalid(f"@approvers({group!r}) is not a group name (lower-case letters, "
                            "digits, - and _)", key=policy_id)
    if not isinstance(quorum_text, str) or not (quorum_text.isascii() and quorum_text.isdigit()) \
            or not 1 <= int(quorum_text) <= 10:
        raise BundleInvalid(f"@quorum({quorum_text!r}) must be a whole number from 1 to 10",
                            key=policy_id)
    return ApprovalRule(group, int(quorum_text))


def _speaking(policies: list[PolicyMeta]) -> PolicyMeta:
    """The policy that speaks for a decision: the first (by @id) that gives a @reason, so
    one without (``POLICY_FORBID``) never hides one that says why (a sanctions hit)."""
    return next((m for m in policies if m.reason), policies[0])


@dataclass(frozen=True)
class PolicyMeta:
    """What the engine needs to know about one Cedar policy."""

    id: str
    effect: str
    reason: str | None
    escalate: bool
    approval: ApprovalRule | None = None


class CompiledBundle:
    """A bundle parsed once for evaluation: policy set, full schema and policy metadata."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle
        self.version = bundle.version
        self.registry: SurfaceRegistry = bundle.registry
        self._schema = cedarpy.Schema.from_str(bundle.schema_text)
        self._entities = cedarpy.Entities.from_json_str("[]")
        parsed = json.loads(cedarpy.policies_to_json_str(bundle.policy_text))
        meta: dict[str, PolicyMeta] = {}
        for cedar_id, policy in parsed["staticPolicies"].items():
            annotations = policy.get("annotations", {})
            escalate = "escalate" in annotations
            meta[cedar_id] = PolicyMeta(
                id=annotations["id"],
                effect=policy["effect"],
                reason=annotations.get("reason"),
                escalate=escalate,
                approval=approval_rule(annotations, annotations["id"]) if escalate else None,
            )
        self._meta = MappingProxyType(meta)
        # Cedar's diagnostics name policies by position; a person needs the @id and the file.
        self._labels = MappingProxyType({
            info.cedar_id: f"{info.id!r} ({info.file}:{info.line})" if info.line
            else f"{info.id!r} ({info.file})" for info in bundle.policies})
        self._projection = projection_of(parsed)
        # Each surface is evaluated against the policies that can apply to it: one scoped
        # to ``action == Action::"x"`` never applies to another action, yet Cedar would
        # check it on every call. With an approval in hand, escalating forbids stop
        # firing: the same policies without them (same ids), so hard forbids and permits
        # still decide.
        self._applicable = {
            (surface, approved): tuple(
                cedar_id for cedar_id, policy in parsed["staticPolicies"].items()
                if scoped_action(policy) in (None, surface)
                and not (approved and meta[cedar_id].escalate))
            for surface in self.registry.names() for approved in (False, True)}
        self._policy_sets = {
            key: cedarpy.PolicySet.from_json_str(json.dumps({**parsed, "staticPolicies": {
                cedar_id: parsed["staticPolicies"][cedar_id] for cedar_id in ids}}))
            for key, ids in self._applicable.items()}

    def applicable_policies(self, surface: str, *, approved: bool = False) -> tuple[str, ...]:
        """The ``@id`` of every policy evaluated for requests on ``surface`` (with an approval
        in hand: without the escalating forbids)."""
        return tuple(self._meta[cedar_id].id
                     for cedar_id in self._applicable.get((surface, approved), ()))

    def evaluate(self, request: ExecutionRequest, facts: Mapping[str, Any], *,
                 approved: bool = False) -> Evaluation:
        """Decide ``request`` given ``facts`` (from :func:`compute_facts`); never reads the clock.

        ``approved``: the request carries an approval that met its quorum, so
        escalating forbids no longer fire; a hard forbid still denies, and
        without a permit it is still SILENCE. Raises :class:`UnknownSurface`
        for a surface the registry does not name; every other problem is a
        SILENCE, never an exception.
        """
        spec = self.registry.get(request.surface)
        if spec is None:
            raise UnknownSurface(request.surface)
        try:
            return self._evaluate(spec, request, facts, approved)
        except Exception as exc:  # fail closed: whatever went wrong, no permit
            return self._silence(
                "EVALUATION_ERROR",
                "The policy evaluation failed, so no permit can be issued.",
                errors=(f"{type(exc).__name__}: {exc}",),
            )

    def _evaluate(
        self, spec: SurfaceSpec, request: ExecutionRequest, facts: Mapping[str, Any],
        approved: bool = False,
    ) -> Evaluation:
        context = convert_fields(spec.context, request.context, "context", spec.sensitive)
        if isinstance(context, FieldProblem):
            code = "MISSING_CONTEXT" if context.missing else "INVALID_CONTEXT"
            return self._silence(code, context.reason)
        signals = convert_fields(spec.signals, request.signals, "signals")
        if isinstance(signals, FieldProblem):
            code = "MISSING_SIGNALS" if signals.missing else "INVALID_SIGNALS"
            return self._silence(code, signals.reason)
        computed = _checked_facts(facts, spec)
        if isinstance(computed, str):
            return self._silence("EVALUATION_ERROR", computed)
        action = request.action if request.action is not None else ""
        if not isinstance(action, str):
            raise TypeError(f"request.action must be a string, got {type(action).__name__}")
        full_context = {**context, "action": action, "facts": computed, "signals": signals}
        cedar_request = {
            "principal": {"type": "Actor", "id": request.actor_id or ANONYMOUS_ACTOR},
            "action": {"type": "Action", "id": spec.name},
            "resource": {"type": "Subject", "id": request.subject_digest or NO_SUBJECT},
            # Only what the policies of this action read (see arbiter/projection.py), as
            # JSON text: cedarpy would otherwise encode the dict with the stdlib encoder.
            "context": orjson.dumps(
                project(full_context, self._projection.for_action(spec.name))).decode(),
        }
        policies = self._policy_sets[(spec.name, approved)]
        # No schema argument: the policies were validated against the schema when the bundle
        # was loaded, and convert_fields has already typed the context by the same registry
        # the schema is generated from. Cedar would only check it all again on every call.
        # A value that still did not fit would make a policy error, and errors fail closed.
        result = cedarpy.is_authorized(cedar_request, policies, self._entities)
        errors = tuple(_redact(result.diagnostics.errors, request.context, spec.sensitive))
        return self._outcome(spec.name, result.decision, result.diagnostics.reasons, errors,
                             approved)

    def _name_policies(self, error: str) -> str:
        """A Cedar diagnostic with each positional policy id replaced by its @id and place."""
        return _CEDAR_POLICY_REF_RE.sub(
            lambda match: "policy " + self._labels.get(match.group(1), f"`{match.group(1)}`"),
            error)

    def _erroring_policies(self, errors: tuple[str, ...]) -> list[str]:
        """The @ids of the policies Cedar's diagnostics name (before :meth:`_name_policies`)."""
        return sorted({self._meta[cedar_id].id for error in errors
                       for cedar_id in _CEDAR_POLICY_REF_RE.findall(error)
                       if cedar_id in self._meta})

    def _outcome(
        self, surface: str, decision: cedarpy.Decision, fired_ids: Iterable[str],
        errors: tuple[str, ...], approved: bool = False,
    ) -> Evaluation:
        fired = sorted((self._meta[cedar_id] for cedar_id in fired_ids), key=lambda m: m.id)
        failing = self._erroring_policies(errors) if errors else []
        if errors:
            errors = tuple(self._name_policies(error) for error in errors)
        forbids = [m for m in fired if m.effect == "forbid" and not m.escalate]
        if forbids:
            return self._decide(
                Outcome.DENY, forbids, "POLICY_FORBID", errors,
                f"Policy {_speaking(forbids).id!r} forbids this {surface} request.",
            )
        if errors or decision not in (cedarpy.Decision.Allow, cedarpy.Decision.Deny):
            what = (f"Policy {', '.join(repr(policy_id) for policy_id in failing)}" if failing
                    else "A policy")
            return self._silence(
                "EVALUATION_ERROR",
                f"{what} could not be evaluated for this {surface} request, so no permit can "
                "be issued.",
                errors=errors or (f"Cedar returned no decision ({decision.value})",),
            )
        if approved:
            # The quorum approved this exact request: no hard forbid fired and nothing
            # errored, so it runs (the escalating forbids were left out of this evaluation).
            permits = [m for m in fired if m.effect == "permit"]
            return Evaluation(Outcome.PERMIT, "APPROVED",
                              f"Approved by its approvers; no policy forbids this {surface} "
                              "request.", tuple(m.id for m in permits), self.version, errors)
        escalations = [m for m in fired if m.escalate]
        if escalations:
            rules = [m.approval or ApprovalRule(DEFAULT_APPROVERS, 1) for m in escalations]
            groups = sorted({rule.approvers for rule in rules})
            if len(groups) > 1:
                # One approval has one group of approvers: it cannot stand for the others'.
                return self._silence(
                    "APPROVAL_GROUPS_CONFLICT",
                    f"Policies {', '.join(repr(m.id) for m in escalations)} require approvals "
                    f"of different groups ({', '.join(groups)}) for this {surface} request; "
                    "one approval cannot give both, so it cannot run.",
                    errors=tuple(f"{m.id}: @approvers({rule.approvers!r})"
                                 for m, rule in zip(escalations, rules, strict=True)))
            escalated = self._decide(
                Outcome.ESCALATE, escalations, "APPROVAL_REQUIRED", errors,
                f"Policy {_speaking(escalations).id!r} requires a human approval for this "
                f"{surface} request.",
            )
            # Several escalations of one group: the strictest quorum.
            rule = ApprovalRule(groups[0], max(rule.quorum for rule in rules))
            return replace(escalated, approval=rule)
        if decision == cedarpy.Decision.Allow:
            permits = [m for m in fired if m.effect == "permit"]
            if not permits or len(permits) != len(fired):
                # Cedar allowed without naming only permits: inconsistent, so fail closed.
                return self._silence(
                    "EVALUATION_ERROR", "Cedar allowed the request without a determining permit.",
                    errors=(f"determining policies: {[m.id for m in fired]}",),
                )
            return self._decide(
                Outcome.PERMIT, permits, "POLICY_PERMIT", errors,
                f"Policy {_speaking(permits).id!r} permits this {surface} request.",
            )
        return self._silence("NO_MATCHING_POLICY", f"No policy permits this {surface} request.")

    def _decide(
        self, outcome: Outcome, policies: list[PolicyMeta], default_code: str,
        errors: tuple[str, ...], reason: str,
    ) -> Evaluation:
        return Evaluation(
            outcome=outcome,
            reason_code=_speaking(policies).reason or default_code,
            reason=reason,
            determining_policies=tuple(m.id for m in policies),
            policy_version=self.version,
            errors=errors,
        )

    def _silence(self, code: str, reason: str, errors: tuple[str, ...] = ()) -> Evaluation:
        return Evaluation(Outcome.SILENCE, code, reason, (), self.version, errors)


def _checked_facts(facts: Mapping[str, Any], spec: SurfaceSpec) -> dict[str, Any] | str:
    """The facts the surface declares, with the right types, or why they are unusable.

    A fact that is missing or malformed blocks (SILENCE): a limit that cannot be
    computed must not read as "no spending yet".
    """
    if not isinstance(facts, Mapping):
        return "The facts for this decision are not an object, so no decision can be made."
    checked: dict[str, Any] = {}
    for name, (kind, _cedar_type) in FACT_TYPES.items():
        value = facts.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"The fact facts.{name} could not be computed, so no decision can be made."
        checked[name] = value
    for name, fact in spec.facts.items():
        value = _fact_value(facts.get(name), decimal=fact.cedar_type == "__cedar::decimal")
        if value is None:
            return f"The fact facts.{name} could not be computed, so no decision can be made."
        checked[name] = value
    return checked


def _fact_value(value: Any, *, decimal: bool) -> Any:
    """A computed aggregate as Cedar reads it, or None if it is not a sound one."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal) or value < 0:
        return None
    if not decimal:
        return value if isinstance(value, int) and value <= MAX_SAFE_INTEGER else None
    exact = Decimal(value)
    exponent = exact.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -4 or exact > DECIMAL_LIMIT:
        return None
    text = format(exact, "f")
    return {"__extn": {"fn": "decimal", "arg": text if "." in text else text + ".0"}}


def _redact(errors: Iterable[str], context: Any, sensitive: frozenset[str]) -> list[str]:
    """Cedar diagnostics with sensitive values blanked: they may quote the context."""
    secrets: list[str] = []
    if isinstance(context, Mapping):
        for name in sensitive:
            value = context.get(name)
            items = value if isinstance(value, list) else [value]
            secrets += [str(item) for item in items if item is not None and str(item)]
    redacted = []
    for message in errors:
        for secret in sorted(secrets, key=len, reverse=True):
            message = message.replace(secret, "<redacted>")
        redacted.append(message)
    return redacted

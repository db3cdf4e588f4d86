"""Outcomes on the demo bundle and the fail-closed mapping of Cedar's answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cedarpy
import pytest

from execguard.arbiter import CompiledBundle, Evaluation
from execguard.protocol.errors import UnknownSurface
from execguard.protocol.outcome import Outcome
from execguard.protocol.request import ExecutionRequest

from .conftest import SATURDAY, THURSDAY

PAYMENT = {"amount": 420.5, "currency": "EUR", "beneficiary": "Northwind Traders"}
SANCTIONED = "Count Olaf Imports (fictional)"


def pay(engine: CompiledBundle, facts: dict[str, Any] | None = None, **context: Any) -> Evaluation:
    request = ExecutionRequest(surface="payment.execute", actor_id="agent-7",
                               context={**PAYMENT, **context})
    return engine.evaluate(request, THURSDAY if facts is None else facts)


def run(engine: CompiledBundle, surface: str, context: dict[str, Any],
        facts: dict[str, Any] | None = None, **fields: Any) -> Evaluation:
    return engine.evaluate(ExecutionRequest(surface=surface, context=context, **fields),
                           facts or THURSDAY)


def test_permit_within_limit(demo_engine: CompiledBundle) -> None:
    result = pay(demo_engine)
    assert result == Evaluation(
        Outcome.PERMIT, "WITHIN_LIMIT", "Policy 'payment-within-limit' permits this "
        "payment.execute request.", ("payment-within-limit",), demo_engine.version)


@pytest.mark.parametrize("amount", [0, 10000, 10000.0, 9999.9999, "x"])
def test_limit_boundary(demo_engine: CompiledBundle, amount: Any) -> None:
    expected = Outcome.SILENCE if amount == "x" else Outcome.PERMIT
    assert pay(demo_engine, amount=amount).outcome is expected


def test_escalate_above_limit(demo_engine: CompiledBundle) -> None:
    result = pay(demo_engine, amount=10000.0001)
    assert (result.outcome, result.reason_code, result.determining_policies) == (
        Outcome.ESCALATE, "HIGH_VALUE_PAYMENT", ("payment-high-value",))


def test_sanctioned_beneficiary_is_denied_at_any_amount(demo_engine: CompiledBundle) -> None:
    for amount in (5, 250000):
        result = pay(demo_engine, amount=amount, beneficiary=SANCTIONED)
        assert (result.outcome, result.reason_code, result.determining_policies) == (
            Outcome.DENY, "SANCTIONED_BENEFICIARY", ("payment-sanctioned-beneficiary",))


def test_silence_when_nothing_matches(demo_engine: CompiledBundle) -> None:
    result = run(demo_engine, "deploy.release", {"environment": "production", "service": "api"})
    assert (result.outcome, result.reason_code, result.determining_policies) == (
        Outcome.SILENCE, "NO_MATCHING_POLICY", ())
    passed = run(demo_engine, "deploy.release",
                 {"environment": "production", "service": "api", "tests_passed": True})
    assert (passed.outcome, passed.reason_code) == (Outcome.PERMIT, "TESTS_PASSED")


@pytest.mark.parametrize(("context", "outcome", "code"), [
    ({"row_count": 10, "destination": "internal", "contains_pii": True}, "PERMIT",
     "INTERNAL_EXPORT"),
    ({"row_count": 5000, "destination": "partner", "contains_pii": False}, "PERMIT",
     "SMALL_EXTERNAL_EXPORT"),
    ({"row_count": 10, "destination": "public", "contains_pii": True}, "ESCALATE",
     "PII_EXTERNAL_EXPORT"),
    ({"row_count": 2_000_000, "destination": "internal", "contains_pii": False}, "DENY",
     "BULK_EXPORT_LIMIT"),
    ({"row_count": 2_000_000, "destination": "public", "contains_pii": True}, "DENY",
     "BULK_EXPORT_LIMIT"),
    ({"row_count": 50_000, "destination": "partner", "contains_pii": False}, "SILENCE",
     "NO_MATCHING_POLICY"),
])
def test_data_export(demo_engine: CompiledBundle, context: dict[str, Any], outcome: str,
                     code: str) -> None:
    result = run(demo_engine, "data.export", context)
    assert (result.outcome, result.reason_code) == (Outcome(outcome), code)


@pytest.mark.parametrize(("context", "facts", "outcome", "code"), [
    ({"environment": "staging"}, SATURDAY, "PERMIT", "NON_PRODUCTION"),
    ({"environment": "production", "change_window": True}, THURSDAY, "PERMIT",
     "CHANGE_WINDOW_OPEN"),
    ({"environment": "production"}, THURSDAY, "DENY", "OUTSIDE_CHANGE_WINDOW"),
    ({"environment": "production", "change_window": False}, THURSDAY, "DENY",
     "OUTSIDE_CHANGE_WINDOW"),
    ({"environment": "production", "change_window": True}, SATURDAY, "DENY", "WEEKEND_FREEZE"),
])
def test_infra_apply(demo_engine: CompiledBundle, context: dict[str, Any],
                     facts: dict[str, Any], outcome: str, code: str) -> None:
    result = run(demo_engine, "infra.apply", context, facts)
    assert (result.outcome, result.reason_code) == (Outcome(outcome), code)


@pytest.mark.parametrize(("context", "outcome", "code"), [
    ({"recipients": ["a@corp"], "recipient_count": 1, "external": False, "template": "x"},
     "PERMIT", "INTERNAL_MESSAGE"),
    ({"recipients": ["a@x.com"], "recipient_count": 1, "external": True,
      "template": "password-reset"}, "PERMIT", "APPROVED_TEMPLATE"),
    ({"recipients": ["a@x.com"], "recipient_count": 80, "external": True,
      "template": "password-reset"}, "ESCALATE", "BULK_EXTERNAL_MESSAGE"),
    ({"recipients": ["everyone@example.com"], "recipient_count": 1, "external": False,
      "template": "x"}, "DENY", "DISTRIBUTION_LIST_BLOCKED"),
    ({"recipients": ["a@x.com"], "recipient_count": 1, "external": True, "template": "promo"},
     "SILENCE", "NO_MATCHING_POLICY"),
    ({"recipients": "a@x.com", "recipient_count": 1, "external": True, "template": "promo"},
     "SILENCE", "INVALID_CONTEXT"),
])
def test_comms_send(demo_engine: CompiledBundle, context: dict[str, Any], outcome: str,
                    code: str) -> None:
    result = run(demo_engine, "comms.send", context)
    assert (result.outcome, result.reason_code) == (Outcome(outcome), code)


@pytest.mark.parametrize(("surface", "outcome"), [
    ("tool.invoke", Outcome.PERMIT), ("memory.read", Outcome.PERMIT),
    ("memory.verify", Outcome.PERMIT), ("memory.write", Outcome.SILENCE),
    ("memory.promote", Outcome.SILENCE), ("memory.archive", Outcome.SILENCE),
    ("memory.delete", Outcome.SILENCE), ("execution.external_action", Outcome.SILENCE),
    ("planning.task.claim", Outcome.SILENCE), ("artifact.publish", Outcome.SILENCE),
    ("execution.graph.release", Outcome.SILENCE),
])
def test_trigguard_default_surfaces(demo_engine: CompiledBundle, surface: str,
                                    outcome: Outcome) -> None:
    # The memory client nests its fields; undeclared fields are ignored, not refused.
    result = run(demo_engine, surface, {"memory": {"key": "k", "value": [1, 2]}})
    assert result.outcome is outcome


def test_unknown_surface_raises(demo_engine: CompiledBundle) -> None:
    with pytest.raises(UnknownSurface):
        run(demo_engine, "payment.exec", PAYMENT)


def test_registry_is_exposed(demo_engine: CompiledBundle) -> None:
    spec = demo_engine.registry.get("payment.execute")
    assert spec is not None
    assert (spec.risk, spec.observe_allowed, spec.retention_days, spec.sensitive) == (
        "high", False, 2555, frozenset({"beneficiary_account"}))
    assert spec.context["amount"].required and not spec.context["beneficiary_account"].required
    data = demo_engine.registry.get("data.export")
    assert data is not None and data.observe_allowed
    assert demo_engine.registry.get("nope") is None


# --- context checks -------------------------------------------------------------------------


def test_missing_required_field(demo_engine: CompiledBundle) -> None:
    request = ExecutionRequest(surface="payment.execute",
                               context={"currency": "EUR", "beneficiary": "N"})
    result = demo_engine.evaluate(request, THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "MISSING_CONTEXT")
    assert "context.amount" in result.reason


def test_amount_under_another_key_is_missing(demo_engine: CompiledBundle) -> None:
    request = ExecutionRequest(surface="payment.execute", context={
        "amt": 5, "currency": "EUR", "beneficiary": "N"})
    result = demo_engine.evaluate(request, THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "MISSING_CONTEXT")
    assert "context.amount" in result.reason


@pytest.mark.parametrize(("amount", "got"), [
    ("5000", "string '5000'"),
    (True, "boolean true"),
    (-1, "integer -1"),
    (-0.01, "number -0.01"),
    (float("nan"), "nan"),
    (float("inf"), "inf"),
    (float("-inf"), "-inf"),
    (10**400, "401-digit integer"),
    (12.34567, "number 12.34567"),
    (0.1 + 0.2, "0.30000000000000004"),
    (1e-05, "1e-05"),
    (None, None),
    ([5], "an array"),
    ({"value": 5}, "an object"),
])
def test_invalid_amounts_are_silence(demo_engine: CompiledBundle, amount: Any,
                                     got: str | None) -> None:
    result = pay(demo_engine, amount=amount)
    assert result.outcome is Outcome.SILENCE
    assert result.determining_policies == ()
    if got is None:  # null counts as absent
        assert result.reason_code == "MISSING_CONTEXT"
    else:
        assert result.reason_code == "INVALID_CONTEXT"
        assert result.reason.startswith("context.amount must be")
        assert got in result.reason


@pytest.mark.parametrize(("field", "value"), [
    ("currency", "JPY"), ("currency", 1), ("beneficiary", "x" * 201), ("beneficiary", "\ud800"),
])
def test_invalid_strings_are_silence(demo_engine: CompiledBundle, field: str, value: Any) -> None:
    result = pay(demo_engine, **{field: value})
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "INVALID_CONTEXT")
    assert f"context.{field}" in result.reason


def test_sensitive_value_is_not_echoed(demo_engine: CompiledBundle) -> None:
    result = pay(demo_engine, beneficiary_account="DE89370400440532013000" * 4)
    assert result.reason_code == "INVALID_CONTEXT"
    assert "DE8937" not in result.reason and "88 characters" in result.reason


@pytest.mark.parametrize(("signals", "code"), [
    ({"risk_score": 101}, "INVALID_SIGNALS"),
    ({"risk_score": "high"}, "INVALID_SIGNALS"),
    ({"risk_score": False}, "INVALID_SIGNALS"),
])
def test_invalid_signals_are_silence(demo_engine: CompiledBundle, signals: dict[str, Any],
                                     code: str) -> None:
    request = ExecutionRequest(surface="payment.execute", context=PAYMENT, signals=signals)
    result = demo_engine.evaluate(request, THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, code)
    assert "signals.risk_score" in result.reason


def test_missing_required_signal(small_engine: Callable[..., CompiledBundle]) -> None:
    surfaces = ('[surfaces."job.run"]\nrisk = "low"\n[surfaces."job.run".signals]\n'
                'score = { type = "integer", required = true }\n')
    engine = small_engine({"p.cedar": '@id("p") permit (principal, action, resource);'},
                          surfaces=surfaces)
    result = engine.evaluate(ExecutionRequest(surface="job.run"), THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "MISSING_SIGNALS")
    assert "signals.score" in result.reason
    ok = engine.evaluate(ExecutionRequest(surface="job.run", signals={"score": 1}), THURSDAY)
    assert ok.outcome is Outcome.PERMIT


# --- facts cannot be injected ---------------------------------------------------------------


def test_caller_cannot_inject_facts(demo_engine: CompiledBundle) -> None:
    forged = {"environment": "production", "change_window": True,
              "facts": {"weekday": 3, "hour": 10}, "weekday": 3, "hour": 10, "now": "x"}
    request = ExecutionRequest(surface="infra.apply", context=forged,
                               signals={"facts": {"weekday": 3}, "weekday": 3})
    saturday = demo_engine.evaluate(request, SATURDAY)
    assert (saturday.outcome, saturday.reason_code) == (Outcome.DENY, "WEEKEND_FREEZE")
    assert demo_engine.evaluate(request, THURSDAY).outcome is Outcome.PERMIT


@pytest.mark.parametrize("facts", [
    {}, {**THURSDAY, "weekday": "3"}, {**THURSDAY, "hour": True}, {"now": "x"},
])
def test_unusable_facts_are_silence(demo_engine: CompiledBundle, facts: dict[str, Any]) -> None:
    result = pay(demo_engine, facts=facts)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "EVALUATION_ERROR")


def test_determinism(demo_engine: CompiledBundle) -> None:
    contexts: list[dict[str, Any]] = [PAYMENT, {**PAYMENT, "amount": 50000},
                                      {**PAYMENT, "amount": "x"}]
    for context in contexts:
        results = {pay(demo_engine, **context) for _ in range(5)}
        assert len(results) == 1


def test_sensitive_values_are_redacted_from_cedar_errors(
        demo_engine: CompiledBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    quoted = 'context `{beneficiary_account: "ACCT-998877"}` is not valid'
    answer = {"decision": "NoDecision", "diagnostics": {"errors": [quoted]}}
    monkeypatch.setattr(cedarpy, "is_authorized", lambda *a, **k: cedarpy.AuthzResult(answer))
    result = pay(demo_engine, beneficiary_account="ACCT-998877")
    assert result.reason_code == "EVALUATION_ERROR"
    assert result.errors == ('context `{beneficiary_account: "<redacted>"}` is not valid',)


def test_the_daily_limit_reads_the_computed_facts(demo_engine: CompiledBundle) -> None:
    from decimal import Decimal

    from .conftest import THURSDAY_CLOCK
    request = ExecutionRequest(surface="payment.execute", actor_id="agent-7",
                               context={"amount": 500, "currency": "EUR", "beneficiary": "Acme"})
    under = demo_engine.evaluate(request, {**THURSDAY_CLOCK, "amount_sum_24h": Decimal("50000"),
                                           "payments_1h": 3})
    assert under.outcome is Outcome.PERMIT
    over = demo_engine.evaluate(request, {**THURSDAY_CLOCK,
                                          "amount_sum_24h": Decimal("50000.0001"),
                                          "payments_1h": 3})
    assert (over.outcome, over.reason_code) == (Outcome.DENY, "SPEND_LIMIT")
    assert over.determining_policies == ("payment-daily-limit",)
    # A limit that cannot be computed blocks; it never reads as "nothing spent yet".
    for broken in ({}, {"amount_sum_24h": "0", "payments_1h": 1},
                   {"amount_sum_24h": Decimal("-1"), "payments_1h": 1},
                   {"amount_sum_24h": Decimal("0.00001"), "payments_1h": 1}):
        result = demo_engine.evaluate(request, {**THURSDAY_CLOCK, **broken})
        assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "EVALUATION_ERROR")


# --- several escalations ----------------------------------------------------------------------


def test_escalations_of_one_group_take_the_strictest_quorum_and_of_two_groups_block(
        small_engine: Callable[..., CompiledBundle]) -> None:
    """One approval has one group of approvers; it must not stand for another group's."""
    def escalation(policy_id: str, group: str, quorum: int, above: int) -> str:
        return (f'@id("{policy_id}") @escalate @approvers("{group}") @quorum("{quorum}")\n'
                f'forbid (principal, action, resource) when {{ context.n > {above} }};\n')

    engine = small_engine({"p.cedar": '@id("any") permit (principal, action, resource);\n'
                                      + escalation("big", "finance", 1, 10)
                                      + escalation("bigger", "finance", 2, 100)
                                      + escalation("risky", "security", 1, 1000)})
    for n, quorum in ((11, 1), (101, 2)):
        result = engine.evaluate(ExecutionRequest(surface="job.run", context={"n": n}),
                                 THURSDAY)
        assert result.outcome is Outcome.ESCALATE
        assert (result.approval.approvers, result.approval.quorum) == ("finance", quorum)
    both = engine.evaluate(ExecutionRequest(surface="job.run", context={"n": 1001}), THURSDAY)
    assert (both.outcome, both.reason_code) == (Outcome.SILENCE, "APPROVAL_GROUPS_CONFLICT")
    assert both.approval is None
    assert "finance, security" in both.reason and "'risky'" in both.reason


def test_a_forbid_that_says_why_speaks_for_the_decision(
        small_engine: Callable[..., CompiledBundle]) -> None:
    """Of several forbids that fire, the first by @id spoke: one without a @reason
    ('a-catch-all', POLICY_FORBID) hid the one that says why (a sanctions hit)."""
    engine = small_engine({"p.cedar": '@id("any") permit (principal, action, resource);\n'
                           '@id("a-catch-all") forbid (principal, action, resource) '
                           'when { context.n > 10 };\n'
                           '@id("b-sanctions") @reason("SANCTIONED") forbid (principal, '
                           'action, resource) when { context.n > 100 };\n'})
    result = engine.evaluate(ExecutionRequest(surface="job.run", context={"n": 101}), THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.DENY, "SANCTIONED")
    assert "'b-sanctions'" in result.reason
    assert result.determining_policies == ("a-catch-all", "b-sanctions")
    alone = engine.evaluate(ExecutionRequest(surface="job.run", context={"n": 11}), THURSDAY)
    assert (alone.reason_code, alone.determining_policies) == ("POLICY_FORBID", ("a-catch-all",))

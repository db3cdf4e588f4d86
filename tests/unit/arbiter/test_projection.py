"""Cedar is given only the context paths and the policies that can matter to a request, and
decides exactly as with all of them."""

from __future__ import annotations

import json
from functools import cache
from typing import Any
from unittest import mock

import cedarpy
from hypothesis import given, settings
from hypothesis import strategies as st

import execguard.arbiter.engine as engine_module
from execguard.arbiter import CompiledBundle, PolicyBundle, demo_bundle_path
from execguard.arbiter.projection import ContextProjection, project, projection_of, scoped_action
from execguard.protocol.request import ExecutionRequest

from .conftest import SATURDAY, THURSDAY


def projection(policies: str) -> ContextProjection:
    return projection_of(json.loads(cedarpy.policies_to_json_str(policies)))


def test_attribute_accesses_and_has_tests_are_the_paths() -> None:
    found = projection("""
        permit (principal, action == Action::"pay", resource) when {
          context.amount.lessThan(decimal("1.0")) && context.facts.sum_24h > 1 &&
          context["odd key"] == 1 && context has facts.hour && context.facts["n"] == 2
        };""")
    assert found.for_action("pay") == {"amount": None, "odd key": None, "facts": None}
    # `has facts` keeps facts whole; without it only the named facts are kept.
    found = projection("""
        permit (principal, action == Action::"pay", resource)
        when { context.facts.sum_24h > 1 && context.facts has hour };""")
    assert found.for_action("pay") == {"facts": {"sum_24h": None, "hour": None}}


def test_paths_inside_any_expression_are_found() -> None:
    found = projection("""
        permit (principal, action == Action::"a", resource) when {
          [context.q].contains(1) && {r: context.r}.r == 1 && context.s like "x*" &&
          (if context.t then context.u.v else 0) == 0 && principal.p == context.w
        };""")
    assert found.for_action("a") == {"q": None, "r": None, "s": None, "t": None,
                                     "u": {"v": None}, "w": None}


def test_a_record_used_as_a_value_is_kept_whole() -> None:
    assert projection("""permit (principal, action, resource)
                         when { context == {} };""").for_action("x") is None
    found = projection("""permit (principal, action == Action::"a", resource)
                          when { context.facts == {} && context.facts.hour == 1 };""")
    assert found.for_action("a") == {"facts": None}


def test_scoped_policies_count_for_their_action_only() -> None:
    found = projection("""
        permit (principal, action == Action::"a", resource) when { context.x == 1 };
        permit (principal, action == Action::"b", resource) when { context.y == 1 };
        forbid (principal, action in [Action::"a", Action::"c"], resource) when { context.z };
        permit (principal, action, resource) when { context.all == 1 };""")
    assert found.for_action("a") == {"x": None, "z": None, "all": None}
    assert found.for_action("b") == {"y": None, "z": None, "all": None}
    # An action no policy names alone gets the paths of the policies that may apply to it.
    assert found.for_action("c") == {"z": None, "all": None}
    assert projection('permit (principal, action, resource);').for_action("a") == {}


def test_literals_are_not_expressions() -> None:
    found = projection("""permit (principal, action == Action::"a", resource)
                          when { context.x == "context" && ["context"].contains(context.y) };""")
    assert found.for_action("a") == {"x": None, "y": None}


def test_project_keeps_only_the_named_paths() -> None:
    amount = {"__extn": {"fn": "decimal", "arg": "0.01"}}
    context = {"amount": amount, "currency": "EUR",
               "facts": {"sum": amount, "hour": 3, "now": "2026-11-27T10:00:00Z"}}
    assert project(context, {"amount": None, "facts": {"sum": None}, "absent": None}) \
        == {"amount": amount, "facts": {"sum": amount}}
    assert project(context, {}) == {}
    assert project(context, None) is context
    # An extension value is one value: a path into it keeps it whole.
    assert project(context, {"amount": {"fn": None}}) == {"amount": amount}


def test_demo_payment_context_is_what_its_policies_read() -> None:
    engine = CompiledBundle(PolicyBundle.from_directory(demo_bundle_path()))
    assert engine._projection.for_action("payment.execute") == {
        "amount": None, "beneficiary": None, "facts": {"amount_sum_24h": None}}


@cache
def demo_engine() -> CompiledBundle:
    return CompiledBundle(PolicyBundle.from_directory(demo_bundle_path()))


#: A valid context per demo surface, which the examples then change in a few fields.
VALID = {
    "payment.execute": {"amount": 10, "currency": "EUR", "beneficiary": "Northwind"},
    "data.export": {"row_count": 10, "destination": "internal", "contains_pii": False},
    "infra.apply": {"environment": "production", "change_window": True},
    "deploy.release": {"environment": "production", "service": "api", "tests_passed": True},
    "comms.send": {"recipients": ["a@example.com"], "recipient_count": 1, "external": True,
                   "template": "order-confirmation"},
}
values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 2_000_000), st.text(max_size=6),
    st.sampled_from(["internal", "partner", "production", "dev", "EUR", "USD",
                     "order-confirmation", "Count Olaf Imports (fictional)"]),
    st.decimals(min_value=0, max_value=60_000, places=2, allow_nan=False).map(float),
    st.lists(st.sampled_from(["all-staff@example.com", "a@example.com"]), max_size=2),
)
changes = st.dictionaries(
    st.sampled_from(sorted({name for context in VALID.values() for name in context}
                           | {"beneficiary_account", "other"})),
    values, max_size=3)
surfaces = st.sampled_from(sorted(demo_engine().registry.names()))
facts = st.sampled_from([THURSDAY, SATURDAY]).flatmap(lambda clock: st.builds(
    lambda total, count: {**clock, "amount_sum_24h": total, "payments_1h": count},
    st.decimals(min_value=0, max_value=60_000, places=2, allow_nan=False),
    st.integers(0, 100)))


@cache
def engine_with_every_policy_everywhere() -> CompiledBundle:
    """The demo bundle, every policy evaluated for every surface (none counted as scoped)."""
    with mock.patch.object(engine_module, "scoped_action", lambda _policy: None):
        return CompiledBundle(PolicyBundle.from_directory(demo_bundle_path()))


@settings(max_examples=500, deadline=None)
@given(surface=surfaces, change=changes, facts=facts, approved=st.booleans(),
       signals=st.dictionaries(st.sampled_from(["risk_score"]), values, max_size=1))
def test_evaluation_decides_as_with_the_whole_context_and_every_policy(
        surface: str, change: dict[str, Any], facts: dict[str, Any], approved: bool,
        signals: dict[str, Any]) -> None:
    context = {**VALID.get(surface, {}), **change}
    request = ExecutionRequest(surface=surface, actor_id="agent-7", context=context,
                               signals=signals, action="run")
    decided = demo_engine().evaluate(request, facts, approved=approved)
    with mock.patch.object(engine_module, "project", lambda full, _projection: full):
        assert decided == demo_engine().evaluate(request, facts, approved=approved)
    assert decided == engine_with_every_policy_everywhere().evaluate(
        request, facts, approved=approved)


def test_a_surface_is_evaluated_against_its_own_policies_and_the_unscoped_ones(
        small_engine: Any) -> None:
    demo = demo_engine()
    assert set(demo.applicable_policies("payment.execute")) == {
        "payment-within-limit", "payment-high-value", "payment-daily-limit",
        "payment-sanctioned-beneficiary"}
    # With an approval in hand the escalating forbid is left out; the hard forbids stay.
    assert set(demo.applicable_policies("payment.execute", approved=True)) == {
        "payment-within-limit", "payment-daily-limit", "payment-sanctioned-beneficiary"}
    assert demo.applicable_policies("no.such.surface") == ()

    two = """\
[surfaces."job.run"]
risk = "low"
[surfaces."job.run".context]
n = { type = "integer", required = true }
[surfaces."job.stop"]
risk = "low"
"""
    engine = small_engine({"p.cedar": """
@id("run-small") permit (principal, action == Action::"job.run", resource)
when { context.n < 10 };
@id("stop-any") permit (principal, action == Action::"job.stop", resource);
@id("nobody-at-all") forbid (principal, action, resource) when { principal == Actor::"x" };
@id("run-or-stop") forbid (principal, action in [Action::"job.run", Action::"job.stop"],
                            resource) when { principal == Actor::"y" };
"""}, surfaces=two, schema="entity Actor;\nentity Subject;\n")
    assert set(engine.applicable_policies("job.run")) == {
        "run-small", "nobody-at-all", "run-or-stop"}
    assert set(engine.applicable_policies("job.stop")) == {
        "stop-any", "nobody-at-all", "run-or-stop"}
    stopped = engine.evaluate(ExecutionRequest(surface="job.stop", actor_id="y"), THURSDAY)
    assert stopped.determining_policies == ("run-or-stop",)


def test_scoped_action_names_only_an_exact_action_scope() -> None:
    parsed = json.loads(cedarpy.policies_to_json_str(
        'permit (principal, action == Action::"a", resource);\n'
        'permit (principal, action in [Action::"a"], resource);\n'
        "permit (principal, action, resource);"))
    assert sorted(map(str, map(scoped_action, parsed["staticPolicies"].values()))) \
        == ["None", "None", "a"]

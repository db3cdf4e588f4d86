"""Policy test cases (``tests/*.toml`` in a bundle) and ``execguard policy test``."""

from __future__ import annotations

import json
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from execguard.arbiter import CompiledBundle, PolicyBundle, demo_bundle_path
from execguard.arbiter.testing import (
    DEFAULT_NOW,
    case_facts,
    load_cases,
    parse_case_file,
    run_case,
)
from execguard.protocol.errors import BundleInvalid
from execguard.protocol.outcome import Outcome
from tests.conftest import run_cli

from .conftest import demo_files

PAY = 'surface = "payment.execute", actorId = "a", context = { amount = 250.5, ' \
      'currency = "EUR", beneficiary = "Acme" }'


def case(request: str = PAY, expect: str = 'decision = "PERMIT"', extra: str = "",
         name: str = "small payment") -> str:
    return (f'[[case]]\nname = "{name}"\nrequest = {{ {request} }}\n{extra}'
            f"expect = {{ {expect} }}\n")


def parse_one(text: str):  # type: ignore[no-untyped-def]
    (parsed,) = parse_case_file("tests/payments.toml", text)
    return parsed


@pytest.mark.parametrize(("text", "message"), [
    ("[[case]\nname = 1", "not valid TOML"),
    ("", "holds no test"),
    ("[[cases]]\nname = 'x'\n", "unknown top-level key 'cases'"),
    ("case = 3\n", "one or more [[case]] tables"),
    ('[[case]]\nrequest = { surface = "x" }\nexpect = { decision = "PERMIT" }\n',
     "[case #1]: missing 'name'"),
    ('[[case]]\nname = "n"\nrequest = { surface = "x" }\n', "[case 'n']: missing 'expect'"),
    (case(expect='decision = "ALLOW"'), "expect.decision must be one of PERMIT, DENY"),
    (case(expect='decision = "DENY", reason = "spend limit"'), "UPPER_SNAKE_CASE"),
    (case(expect='decision = "DENY", policies = "payment-daily-limit"'),
     "expect.policies must be an array"),
    (case(expect='decision = "DENY", because = "x"'), "unknown key 'because'"),
    (case(extra='expected = { decision = "PERMIT" }\n'), "unknown key 'expected'"),
    (case(request='actorId = "a"'), "request.surface: expected a surface name"),
    (case(request='surface = "payment.execute", actor = "a"'), "unknown key 'actor'"),
    (case(request='surface = "payment.execute", context = { facts = { now = "x" } }'),
     "request.context.facts: expected no caller-supplied 'facts'"),
    (case(request='surface = "payment.execute", context = { due = 2026-11-26 }'),
     "write dates as strings"),
    (case(extra='facts = { weekday = 6 }\n'), "facts.weekday is derived from facts.now"),
    (case(extra='facts = { now = "Saturday" }\n'), "facts.now must be an RFC 3339 time"),
    (case(extra='facts = { now = 2026-11-28T10:00:00 }\n'), "facts.now must be an RFC 3339"),
    (case(extra='facts = { amount_sum_24h = "lots" }\n'), "facts.amount_sum_24h must be a number"),
    (case(extra='facts = { amount_sum_24h = -1 }\n'), "facts.amount_sum_24h must be a number"),
    (case(extra='facts = "none"\n'), "'facts' must be a table"),
    (case() + case(), "another case in this file has the same name"),
])
def test_malformed_cases_name_the_file_the_line_and_the_case(text: str, message: str) -> None:
    with pytest.raises(BundleInvalid) as caught:
        parse_case_file("tests/payments.toml", text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("tests/payments.toml")


def test_errors_point_at_the_line_of_the_failing_case() -> None:
    text = case(name="first") + "\n" + case(name="second", expect='decision = "NO"')
    with pytest.raises(BundleInvalid) as caught:
        parse_case_file("tests/payments.toml", text)
    assert caught.value.line == 6 and caught.value.key == "case 'second'"


def test_a_bundle_with_a_malformed_case_file_is_refused_whole() -> None:
    files = demo_files()
    files["tests/broken.toml"] = case(expect='decision = "MAYBE"').encode()
    with pytest.raises(BundleInvalid, match=r"tests/broken.toml:1 \[case 'small payment'\]"):
        PolicyBundle.from_files(files)


@pytest.mark.parametrize("path", ["tests/cases.json", "tests/more/cases.toml", "cases.toml"])
def test_only_toml_files_directly_under_tests_are_allowed(path: str) -> None:
    files = {**demo_files(), path: case().encode()}
    with pytest.raises(BundleInvalid, match="is not part of a policy bundle"):
        PolicyBundle.from_files(files)


def test_case_files_are_part_of_the_version() -> None:
    files = demo_files()
    before = PolicyBundle.from_files(files)
    files["tests/extra.toml"] = case().encode()
    after = PolicyBundle.from_files(files)
    assert after.version != before.version
    assert "tests/extra.toml" in after.files
    assert [c.name for c in load_cases(after) if c.file == "tests/extra.toml"] == [
        "small payment"]


def test_facts_default_to_a_thursday_morning_and_no_history(demo_bundle: PolicyBundle) -> None:
    parsed = parse_one(case())
    spec = demo_bundle.registry.get("payment.execute")
    assert spec is not None
    facts = case_facts(parsed, spec)
    assert parsed.now == DEFAULT_NOW
    assert facts == {"now": "2026-11-26T10:00:00Z", "hour": 10, "weekday": 4,
                     "date": "2026-11-26", "amount_sum_24h": Decimal("250.5"),
                     "payments_1h": 1}


def test_given_facts_override_the_defaults(demo_bundle: PolicyBundle) -> None:
    parsed = parse_one(case(extra='facts = { now = "2026-11-28T23:30:00-02:00", '
                                  'amount_sum_24h = "49999.9999", payments_1h = 7 }\n'))
    spec = demo_bundle.registry.get("payment.execute")
    assert spec is not None
    assert case_facts(parsed, spec) == {
        "now": "2026-11-29T01:30:00Z", "hour": 1, "weekday": 7, "date": "2026-11-29",
        "amount_sum_24h": Decimal("49999.9999"), "payments_1h": 7}


def test_facts_a_surface_does_not_declare_are_reported(demo_engine: CompiledBundle) -> None:
    parsed = parse_one(case(extra="facts = { amount_sum_1h = 3 }\n"))
    result = run_case(demo_engine, parsed)
    assert not result.ok and result.evaluation is None
    assert "facts.amount_sum_1h is not a fact of payment.execute" in result.problems[0]
    whole = parse_one(case(extra='facts = { payments_1h = "2.5" }\n'))
    assert "whole number" in run_case(demo_engine, whole).problems[0]


def test_a_case_passes_when_the_bundle_decides_as_expected(demo_engine: CompiledBundle) -> None:
    parsed = parse_one(case(expect='decision = "PERMIT", reason = "WITHIN_LIMIT", '
                                   'policies = ["payment-within-limit"]'))
    result = run_case(demo_engine, parsed)
    assert result.ok and result.problems == ()
    assert result.got() == "PERMIT WITHIN_LIMIT [payment-within-limit]"
    assert result.to_json()["ok"] is True


def test_a_case_fails_naming_each_difference(demo_engine: CompiledBundle) -> None:
    parsed = parse_one(case(expect='decision = "DENY", reason = "SPEND_LIMIT", '
                                   'policies = ["payment-daily-limit"]',
                            extra='facts = { amount_sum_24h = "50000.5" }\n'))
    assert run_case(demo_engine, parsed).ok
    relaxed = parse_one(case(expect='decision = "DENY", reason = "SPEND_LIMIT", '
                                    'policies = ["payment-daily-limit"]'))
    result = run_case(demo_engine, relaxed)
    assert not result.ok
    assert result.evaluation is not None and result.evaluation.outcome is Outcome.PERMIT
    assert result.problems == (
        "expected decision DENY, got PERMIT (WITHIN_LIMIT)",
        "expected reason SPEND_LIMIT, got WITHIN_LIMIT",
        "expected policies [payment-daily-limit], got [payment-within-limit]")


def test_a_case_for_an_unknown_surface_fails(demo_engine: CompiledBundle) -> None:
    parsed = parse_one(case(request='surface = "payment.exec"'))
    result = run_case(demo_engine, parsed)
    assert not result.ok and "'payment.exec' is not in this bundle" in result.problems[0]


def test_the_demo_bundle_passes_its_own_cases_covering_every_policy() -> None:
    result = run_cli("policy", "test", str(demo_bundle_path()), "--json")
    report = json.loads(result.stdout)
    assert report["failed"] == 0 and report["passed"] >= 40
    assert report["untestedPolicies"] == []
    assert {c["got"]["reason"] for c in report["cases"]} >= {"SPEND_LIMIT", "WEEKEND_FREEZE"}
    table = run_cli("policy", "test", "src/execguard/demo_bundle")
    assert f"{report['passed']} passed, 0 failed" in table.stdout


def test_a_wrong_expectation_fails_naming_the_case(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    infra = bundle / "tests" / "infra.toml"
    text = infra.read_text()
    wrong = text.replace('facts = { now = "2026-11-28T10:00:00Z" }\n'
                         'expect = { decision = "DENY", reason = "WEEKEND_FREEZE"',
                         'facts = { now = "2026-11-28T10:00:00Z" }\n'
                         'expect = { decision = "PERMIT", reason = "WEEKEND_FREEZE"', 1)
    assert wrong != text
    infra.write_text(wrong)
    result = run_cli("policy", "test", str(bundle), check=False)
    assert result.returncode == 1
    assert ("FAIL tests/infra.toml:25 [case 'weekend freeze: production on Saturday is "
            "refused even in a change window']: expected decision PERMIT, got DENY "
            "(WEEKEND_FREEZE)") in result.stdout
    assert "1 failed" in result.stdout
    report = json.loads(run_cli("policy", "test", str(bundle), "--json", check=False).stdout)
    assert [c["name"] for c in report["cases"] if not c["ok"]] == [
        "weekend freeze: production on Saturday is refused even in a change window"]


def test_a_malformed_case_file_fails_naming_file_and_case(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    (bundle / "tests" / "extra.toml").write_text(case(expect='decision = "ALLOW"'))
    result = run_cli("policy", "test", str(bundle), check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: tests/extra.toml:1 [case 'small payment']: "
                                    "expect.decision must be one of")
    assert "Traceback" not in result.stderr


def test_a_bundle_without_cases_fails(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    shutil.rmtree(bundle / "tests")
    result = run_cli("policy", "test", str(bundle), check=False)
    assert result.returncode == 1 and "has no test cases" in result.stderr

"""Every refusal names the file, the line and (where there is one) the key."""

from __future__ import annotations

import pytest

from execguard.arbiter import PolicyBundle
from execguard.protocol.errors import BundleInvalid

from .conftest import demo_files


def refused_with(**replacements: tuple[str, str]) -> BundleInvalid:
    """Load the demo bundle with text replaced in the named files (``a__b_cedar`` = a/b.cedar)."""
    files = demo_files()
    for key, (old, new) in replacements.items():
        path = key.replace("__", "/").replace("_cedarschema", ".cedarschema") \
            .replace("_cedar", ".cedar").replace("_toml", ".toml")
        text = files[path].decode()
        assert old in text, f"{old!r} not in {path}"
        files[path] = text.replace(old, new, 1).encode()
    with pytest.raises(BundleInvalid) as info:
        PolicyBundle.from_files(files)
    return info.value


def line_of(path: str, needle: str) -> int:
    """The 1-based line of the first line containing ``needle`` in the demo file ``path``."""
    lines = demo_files()[path].decode().splitlines()
    return next(number for number, line in enumerate(lines, 1) if needle in line)


def assert_located(error: BundleInvalid, file: str, line: int, key: str | None) -> None:
    assert (error.file, error.line, error.key) == (file, line, key)
    text = str(error)
    assert text.startswith(f"{file}:{line}")
    if key is not None:
        assert f"[{key}]" in text


def test_registry_unknown_key() -> None:
    error = refused_with(surfaces_toml=('risk = "critical"', 'risk = "critical"\nobserv = true'))
    assert_located(error, "surfaces.toml", line_of("surfaces.toml", 'risk = "critical"') + 1,
                   "surfaces.infra.apply.observ")
    assert "did you mean 'observe'" in str(error)


def test_registry_typo_in_type() -> None:
    error = refused_with(surfaces_toml=('amount = { type = "decimal"',
                                        'amount = { type = "decmal"'))
    assert_located(error, "surfaces.toml", line_of("surfaces.toml", "amount = {"),
                   "surfaces.payment.execute.context.amount.type")
    assert "'decmal'" in str(error)


def test_registry_reserved_context_field() -> None:
    error = refused_with(surfaces_toml=("tests_passed = {", "facts = {"))
    assert_located(error, "surfaces.toml", line_of("surfaces.toml", "tests_passed = {"),
                   "surfaces.deploy.release.context.facts")


def test_registry_sensitive_field_must_be_declared() -> None:
    error = refused_with(surfaces_toml=('sensitive = ["beneficiary_account"]',
                                        'sensitive = ["iban"]'))
    assert_located(error, "surfaces.toml", line_of("surfaces.toml", "sensitive = ["),
                   "surfaces.payment.execute.sensitive")


def test_registry_wrong_value_type() -> None:
    error = refused_with(surfaces_toml=("retention_days = 2555", 'retention_days = "7y"'))
    assert_located(error, "surfaces.toml", line_of("surfaces.toml", "retention_days = 2555"),
                   "surfaces.payment.execute.retention_days")


def test_registry_toml_syntax_error_keeps_tomllib_line() -> None:
    error = refused_with(surfaces_toml=('risk = "medium"', 'risk = "medium'))
    expected = line_of("surfaces.toml", 'risk = "medium"')
    assert (error.file, error.line) == ("surfaces.toml", expected)


def test_schema_declaring_an_action() -> None:
    declared = 'entity Subject;\n\naction "payment.execute";'
    error = refused_with(schema_cedarschema=("entity Subject;", declared))
    assert_located(error, "schema.cedarschema",
                   line_of("schema.cedarschema", "entity Subject;") + 2, None)
    assert "declares an action" in str(error)


def test_schema_syntax_error_has_a_line() -> None:
    error = refused_with(schema_cedarschema=("entity Subject;", "entity Subject {\n  a: Strng\n};"))
    assert_located(error, "schema.cedarschema",
                   line_of("schema.cedarschema", "entity Subject;") + 1, None)


def test_schema_must_declare_actor() -> None:
    error = refused_with(schema_cedarschema=("entity Actor;", "entity Agent;"))
    assert (error.file, error.key) == ("schema.cedarschema", "Actor")


def test_policy_failing_validation_names_its_id_line() -> None:
    # `>` is defined on Long only; the amount is a decimal.
    error = refused_with(policies__payments_cedar=(
        'context.amount.greaterThan(decimal("10000.0"))', "context.amount > 10000"))
    assert_located(error, "policies/payments.cedar",
                   line_of("policies/payments.cedar", '@id("payment-high-value")'),
                   "payment-high-value")
    assert "does not validate" in str(error)


def test_policy_reading_an_unguarded_optional_field_fails_validation() -> None:
    error = refused_with(policies__sanctions_cedar=(
        "].contains(context.beneficiary)", "].contains(context.beneficiary_account)"))
    assert error.key == "payment-sanctioned-beneficiary"
    assert "optional attribute" in str(error)


def test_policy_naming_an_unknown_surface_fails_validation() -> None:
    error = refused_with(policies__deploy_cedar=('Action::"deploy.release"',
                                                 'Action::"deploy.relase"'))
    assert_located(error, "policies/deploy.cedar",
                   line_of("policies/deploy.cedar", "@id("), "deploy-tests-passed")


def test_duplicate_id_names_the_second_one() -> None:
    error = refused_with(policies__payments_cedar=('@id("payment-high-value")',
                                                   '@id("payment-within-limit")'))
    assert_located(error, "policies/payments.cedar",
                   line_of("policies/payments.cedar", '@id("payment-high-value")'),
                   "payment-within-limit")
    assert "policies/payments.cedar:" + str(
        line_of("policies/payments.cedar", '@id("payment-within-limit")')) in str(error)


def test_missing_id_names_the_policy_start() -> None:
    error = refused_with(policies__payments_cedar=('@id("payment-high-value")\n', ""))
    assert_located(error, "policies/payments.cedar",
                   line_of("policies/payments.cedar", '@id("payment-high-value")'), None)
    assert "no @id" in str(error)


def test_syntax_error_names_the_offending_line() -> None:
    error = refused_with(policies__payments_cedar=('decimal("10000.0")) };',
                                                   'decimal("10000.0") };'))
    assert_located(error, "policies/payments.cedar",
                   line_of("policies/payments.cedar", "lessThanOrEqual"), None)
    assert "syntax error" in str(error)


def test_reason_must_be_upper_snake() -> None:
    error = refused_with(policies__payments_cedar=('@reason("HIGH_VALUE_PAYMENT")',
                                                   '@reason("high value")'))
    assert_located(error, "policies/payments.cedar",
                   line_of("policies/payments.cedar", '@reason("HIGH_VALUE_PAYMENT")'),
                   "payment-high-value")


def test_escalate_only_on_forbid() -> None:
    error = refused_with(policies__deploy_cedar=('@reason("TESTS_PASSED")',
                                                 '@reason("TESTS_PASSED")\n@escalate'))
    assert_located(error, "policies/deploy.cedar",
                   line_of("policies/deploy.cedar", '@reason("TESTS_PASSED")') + 1,
                   "deploy-tests-passed")

"""Cedar skips a policy whose evaluation errors; ExecGuard must never turn that into a PERMIT."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from execguard.arbiter import CompiledBundle, PolicyBundle
from execguard.protocol.errors import BundleInvalid
from execguard.protocol.outcome import Outcome
from execguard.protocol.request import ExecutionRequest

from .conftest import THURSDAY, THURSDAY_CLOCK, write_bundle

PERMIT_ALL = '@id("run-all")\n@reason("ALWAYS")\npermit (principal, action, resource);\n'
# Validates but overflows a 64-bit Long for any n > 807 (and does not fire for n <= 0).
FORBID_OVERFLOW = """\
@id("overflow")
forbid (principal, action, resource) when { context.n > 0 && context.n + 9223372036854775000 > 0 };
"""


def job(n: int = 1000, **fields: Any) -> ExecutionRequest:
    return ExecutionRequest(surface="job.run", actor_id="agent-1", context={"n": n}, **fields)


def raw_cedar(engine: CompiledBundle, n: int) -> cedarpy.AuthzResult:
    """What Cedar itself answers, to show the test exercises the dangerous case."""
    context = {"n": n, "action": "", "facts": THURSDAY_CLOCK, "signals": {}}
    request = {"principal": {"type": "Actor", "id": "agent-1"},
               "action": {"type": "Action", "id": "job.run"},
               "resource": {"type": "Subject", "id": "none"}, "context": context}
    return cedarpy.is_authorized(request, engine.bundle.policy_text, [],
                                 schema=engine.bundle.schema_text)


def test_erroring_forbid_is_not_a_permit(small_engine: Callable[..., CompiledBundle]) -> None:
    engine = small_engine({"permit.cedar": PERMIT_ALL, "forbid.cedar": FORBID_OVERFLOW})
    cedar = raw_cedar(engine, 1000)
    assert cedar.decision == cedarpy.Decision.Allow and cedar.diagnostics.errors
    result = engine.evaluate(job(), THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "EVALUATION_ERROR")
    assert result.determining_policies == ()
    assert any("error while evaluating policy" in error for error in result.errors)


@pytest.mark.parametrize("actor", [
    "entity Actor { clearance: Long };", "entity Actor { role?: String };",
    "entity Group;\nentity Actor in [Group];", "entity Actor tags String;"])
def test_a_principal_with_data_is_refused(tmp_path: Path, actor: str) -> None:
    """ExecGuard passes no entity data: ``forbid ... when { principal has role &&
    principal.role == "intern" }`` (or ``principal in Group::"blocked"``) never fired, and
    the request was permitted; an unguarded attribute read made every request SILENCE."""
    root = write_bundle(tmp_path / "b", {"a.cedar": PERMIT_ALL},
                        schema=f"{actor}\nentity Subject;\n")
    with pytest.raises(BundleInvalid, match="passes no entity data") as info:
        PolicyBundle.from_directory(root)
    assert info.value.file == "schema.cedarschema" and info.value.key == "Actor"


def test_firing_forbid_still_denies_despite_another_error(
        small_engine: Callable[..., CompiledBundle]) -> None:
    deny_big = '@id("too-big")\n@reason("TOO_BIG")\nforbid (principal, action, resource) ' \
               "when { context.n > 10 };\n"
    engine = small_engine({"a.cedar": PERMIT_ALL, "b.cedar": FORBID_OVERFLOW,
                           "c.cedar": deny_big})
    result = engine.evaluate(job(), THURSDAY)
    assert (result.outcome, result.reason_code, result.determining_policies) == (
        Outcome.DENY, "TOO_BIG", ("too-big",))


def test_erroring_escalation_is_not_a_permit(
        small_engine: Callable[..., CompiledBundle]) -> None:
    escalate = FORBID_OVERFLOW.replace('@id("overflow")', '@id("overflow")\n@escalate')
    engine = small_engine({"a.cedar": PERMIT_ALL, "b.cedar": escalate})
    assert engine.evaluate(job(), THURSDAY).reason_code == "EVALUATION_ERROR"
    assert engine.evaluate(job(n=-5), THURSDAY).outcome is Outcome.PERMIT


def test_unguarded_optional_signal_is_refused_at_push(tmp_path: Path) -> None:
    # The direct way to make a forbid error on an absent attribute is refused by validation.
    unguarded = '@id("risky")\nforbid (principal, action, resource) when { context.signals.x > 1 };'
    root = write_bundle(tmp_path / "b", {"a.cedar": PERMIT_ALL, "b.cedar": unguarded})
    with pytest.raises(BundleInvalid) as info:
        PolicyBundle.from_directory(root)
    assert (info.value.file, info.value.line, info.value.key) == ("policies/b.cedar", 1, "risky")


def test_guarded_optional_signal(small_engine: Callable[..., CompiledBundle]) -> None:
    guarded = ('@id("risky")\n@reason("RISKY")\nforbid (principal, action, resource) '
               "when { context.signals has x && context.signals.x > 1 };")
    engine = small_engine({"a.cedar": PERMIT_ALL, "b.cedar": guarded})
    assert engine.evaluate(job(), THURSDAY).outcome is Outcome.PERMIT
    assert engine.evaluate(job(signals={"x": 5}), THURSDAY).reason_code == "RISKY"


def test_cedar_raising_is_evaluation_error(small_engine: Callable[..., CompiledBundle],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    engine = small_engine({"a.cedar": PERMIT_ALL})

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(cedarpy, "is_authorized", broken)
    result = engine.evaluate(job(), THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "EVALUATION_ERROR")
    assert result.errors == ("RuntimeError: engine exploded",)


@pytest.mark.parametrize("answer", [
    {"decision": "NoDecision", "diagnostics": {"errors": ["failed to build request: bad"]}},
    {"decision": "Allow", "diagnostics": {"reason": ["policy99"], "errors": []}},
    {"decision": "Allow", "diagnostics": {"reason": [], "errors": []}},
    {"decision": "Deny", "diagnostics": {"reason": [], "errors": ["error while evaluating"]}},
])
def test_odd_cedar_answers_are_not_permits(small_engine: Callable[..., CompiledBundle],
                                           monkeypatch: pytest.MonkeyPatch,
                                           answer: dict[str, Any]) -> None:
    engine = small_engine({"a.cedar": PERMIT_ALL})
    monkeypatch.setattr(cedarpy, "is_authorized", lambda *a, **k: cedarpy.AuthzResult(answer))
    result = engine.evaluate(job(), THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "EVALUATION_ERROR")


def test_default_reason_codes(small_engine: Callable[..., CompiledBundle]) -> None:
    policies = {
        "a.cedar": '@id("p") permit (principal, action, resource) when { context.n < 10 };',
        "b.cedar": '@id("e") @escalate forbid (principal, action, resource) '
                   "when { context.n >= 10 && context.n < 20 };",
        "c.cedar": '@id("f") forbid (principal, action, resource) when { context.n >= 20 };',
    }
    engine = small_engine(policies)
    codes = [engine.evaluate(job(n), THURSDAY).reason_code for n in (1, 15, 25)]
    assert codes == ["POLICY_PERMIT", "APPROVAL_REQUIRED", "POLICY_FORBID"]


def test_policy_ids_are_mapped_across_files(small_engine: Callable[..., CompiledBundle]) -> None:
    # Files are concatenated in sorted path order; Cedar's positional ids must map back to
    # the right @id whatever order the files were written in.
    policies = {
        "z.cedar": '@id("z-permit") @reason("Z") permit (principal, action, resource) '
                   "when { context.n == 2 };",
        "a.cedar": '@id("a-permit") @reason("A") permit (principal, action, resource) '
                   "when { context.n == 1 };\n"
                   '@id("a-second") @reason("A_TWO") permit (principal, action, resource) '
                   "when { context.n == 1 };",
    }
    engine = small_engine(policies)
    one = engine.evaluate(job(1), THURSDAY)
    assert (one.reason_code, one.determining_policies) == ("A", ("a-permit", "a-second"))
    two = engine.evaluate(job(2), THURSDAY)
    assert (two.reason_code, two.determining_policies) == ("Z", ("z-permit",))
    parsed = json.loads(cedarpy.policies_to_json_str(engine.bundle.policy_text))
    assert parsed["staticPolicies"]["policy2"]["annotations"]["id"] == "z-permit"


def test_an_evaluation_error_names_the_policy_by_its_id_and_place(
        small_engine: Callable[..., CompiledBundle]) -> None:
    # Cedar names a failing policy by its position (`policy1`), which no author can act on.
    engine = small_engine({"a.cedar": PERMIT_ALL, "b.cedar": FORBID_OVERFLOW})
    result = engine.evaluate(job(), THURSDAY)
    assert (result.outcome, result.reason_code) == (Outcome.SILENCE, "EVALUATION_ERROR")
    assert "'overflow'" in result.reason and "job.run" in result.reason
    assert result.errors[0].startswith(
        "error while evaluating policy 'overflow' (policies/b.cedar:1): integer overflow")
    assert "`policy1`" not in result.errors[0]


def test_policy_test_prints_the_evaluation_error_of_a_failing_case(tmp_path: Path) -> None:
    from tests.conftest import run_cli
    root = write_bundle(tmp_path / "b", {"a.cedar": PERMIT_ALL, "b.cedar": FORBID_OVERFLOW})
    (root / "tests").mkdir()
    (root / "tests" / "jobs.toml").write_text(
        '[[case]]\nname = "a big job runs"\nrequest = { surface = "job.run", '
        'context = { n = 1000 } }\nexpect = { decision = "PERMIT" }\n')
    result = run_cli("policy", "test", str(root), check=False)
    assert result.returncode == 1
    assert ("FAIL tests/jobs.toml:1 [case 'a big job runs']: expected decision PERMIT, "
            "got SILENCE (EVALUATION_ERROR)") in result.stdout
    assert ("  evaluation error: error while evaluating policy 'overflow' "
            "(policies/b.cedar:1): integer overflow") in result.stdout

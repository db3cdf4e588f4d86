"""Policy test cases: ``tests/*.toml`` files of a bundle, evaluated like real requests.

A case file holds one or more ``[[case]]`` tables::

    [[case]]
    name = "small payment runs"
    request = { surface = "payment.execute", actorId = "a",
                context = { amount = 250, currency = "EUR", beneficiary = "Acme" } }
    facts = { now = "2026-11-28T10:00:00Z", amount_sum_24h = "50250", payments_1h = 3 }
    expect = { decision = "DENY", reason = "SPEND_LIMIT", policies = ["payment-daily-limit"] }

``request`` is a ``POST /execute`` body and is checked exactly as the gateway
checks one. ``facts`` is optional: ``now`` (RFC 3339 or a TOML date-time with
an offset) gives ``hour``, ``weekday`` and ``date`` as :func:`compute_facts`
does, and defaults to :data:`DEFAULT_NOW`, a Thursday at 10:00 UTC; a stateful
fact the case does not give is computed as for an actor with no history (the
request itself is its only permit). Decimal facts are best written as strings,
which are exact. ``expect.reason`` and ``expect.policies`` are optional.

Parsing checks only the shape, so a bundle with tests loads without evaluating
anything; whether a case's surface and facts exist in the bundle is reported
when the case runs. Parsing raises :class:`BundleInvalid` naming the file, the
line of the case and the case.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from execguard.arbiter.facts import FACT_TYPES, compute_facts
from execguard.arbiter.registry import SurfaceSpec
from execguard.protocol.errors import BundleInvalid, MalformedRequest
from execguard.protocol.outcome import Outcome, parse_timestamp
from execguard.protocol.request import ExecutionRequest, describe, parse_execution_request

if TYPE_CHECKING:  # the engine imports bundle.py, which imports this module
    from execguard.arbiter.bundle import PolicyBundle
    from execguard.arbiter.engine import CompiledBundle, Evaluation

__all__ = [
    "DEFAULT_NOW",
    "TESTS_DIR",
    "CaseResult",
    "Expectation",
    "PolicyCase",
    "case_facts",
    "is_case_file",
    "load_cases",
    "parse_case_file",
    "run_case",
    "run_cases",
]

TESTS_DIR = "tests"
#: Thursday 2026-11-26, 10:00 UTC: a working day inside office hours.
DEFAULT_NOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)

_CASE_KEYS = frozenset({"name", "request", "facts", "expect"})
_REQUEST_KEYS = frozenset({"surface", "action", "actorId", "context", "signals",
                           "subjectDigest"})
_EXPECT_KEYS = frozenset({"decision", "reason", "policies"})
_REASON_RE = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*\Z")
_CASE_HEADER_RE = re.compile(r"^\s*\[\[\s*case\s*\]\]")
_DERIVED_FACTS = frozenset(FACT_TYPES) - {"now"}
MAX_NAME_LENGTH = 200
#: Reservations are counted in 10**-4 units, Cedar decimal's scale (as the gateway does).
_UNITS = 10_000


@dataclass(frozen=True)
class Expectation:
    """What a case expects; ``None`` means "not checked"."""

    decision: Outcome
    reason: str | None = None
    policies: tuple[str, ...] | None = None

    def describe(self) -> str:
        """``PERMIT WITHIN_LIMIT [payment-within-limit]``, leaving out what is not checked."""
        return _describe(self.decision.value, self.reason, self.policies)


@dataclass(frozen=True)
class PolicyCase:
    """One parsed ``[[case]]``."""

    file: str
    name: str
    line: int | None
    request: ExecutionRequest
    now: datetime
    facts: Mapping[str, int | Decimal]  # the stateful facts the case gives
    expect: Expectation


@dataclass(frozen=True)
class CaseResult:
    """A case and what the bundle decided (or why it could not be evaluated)."""

    case: PolicyCase
    evaluation: Evaluation | None
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """The bundle decided as the case expects."""
        return self.evaluation is not None and not self.problems

    def got(self) -> str:
        """What the bundle decided, in the form :meth:`Expectation.describe` uses."""
        if self.evaluation is None:
            return "not evaluated"
        ev = self.evaluation
        return _describe(ev.outcome.value, ev.reason_code, ev.determining_policies or None)

    def to_json(self) -> dict[str, Any]:
        """The result as ``policy test --json`` prints it."""
        expect, ev = self.case.expect, self.evaluation
        return {
            "file": self.case.file, "name": self.case.name, "ok": self.ok,
            "expected": {"decision": expect.decision.value, "reason": expect.reason,
                         "policies": list(expect.policies) if expect.policies is not None
                         else None},
            "got": None if ev is None else {
                "decision": ev.outcome.value, "reason": ev.reason_code,
                "policies": list(ev.determining_policies), "reasonText": ev.reason,
                "errors": list(ev.errors)},
            "problems": list(self.problems),
        }


def _describe(decision: str, reason: str | None, policies: Iterable[str] | None) -> str:
    text = decision if reason is None else f"{decision} {reason}"
    return text if policies is None else f"{text} [{', '.join(policies)}]"


def is_case_file(path: str) -> bool:
    """Whether a bundle-relative path is a test case file: ``tests/<name>.toml``."""
    parts = path.split("/")
    return len(parts) == 2 and parts[0] == TESTS_DIR and parts[1].endswith(".toml")


# -- parsing ------------------------------------------------------------------------------


class _Where:
    """Builds errors located at one case of one file."""

    def __init__(self, file: str, line: int | None, label: str | None) -> None:
        self.file, self.line, self.label = file, line, label

    def fail(self, message: str) -> BundleInvalid:
        return BundleInvalid(message, file=self.file, line=self.line, key=self.label)

    def table(self, value: Any, what: str, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be a table, got {_toml_kind(value)}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(f"{what} has the unknown key {unknown[0]!r} "
                            f"(allowed: {', '.join(sorted(allowed))})")
        return value


def _toml_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if not isinstance(value, str | int | float | bool | list):
        return f"a TOML {type(value).__name__}"
    return describe(value)


def parse_case_file(path: str, text: str) -> list[PolicyCase]:
    """The cases of one ``tests/*.toml`` file; :class:`BundleInvalid` on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        raise BundleInvalid(f"not valid TOML: {exc}", file=path,
                            line=int(match.group(1)) if match else None) from None
    whole = _Where(path, None, None)
    if set(data) != {"case"}:
        extra = sorted(set(data) - {"case"})
        raise whole.fail(f"unknown top-level key {extra[0]!r}; write each test as a [[case]] "
                         "table" if extra else "holds no test; add a [[case]] table")
    raw_cases = data["case"]
    if not isinstance(raw_cases, list) or not raw_cases:
        raise whole.fail("'case' must be one or more [[case]] tables, got "
                         f"{_toml_kind(raw_cases)}")
    headers = [number for number, line in enumerate(text.splitlines(), 1)
               if _CASE_HEADER_RE.match(line)]
    lines: list[int | None] = [*headers] if len(headers) == len(raw_cases) \
        else [None] * len(raw_cases)  # inline tables have no header line to point at
    cases: list[PolicyCase] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_cases):
        name = raw.get("name") if isinstance(raw, dict) else None
        label = f"case {name!r}" if isinstance(name, str) and name else f"case #{index + 1}"
        case = _parse_case(_Where(path, lines[index], label), raw)
        if case.name in seen:
            raise _Where(path, lines[index], label).fail(
                "another case in this file has the same name; names must be unique")
        seen.add(case.name)
        cases.append(case)
    return cases


def _parse_case(where: _Where, raw: Any) -> PolicyCase:
    case = where.table(raw, "a case", _CASE_KEYS)
    for required in ("name", "request", "expect"):
        if required not in case:
            raise where.fail(f"missing '{required}'")
    name = case["name"]
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
        raise where.fail(f"'name' must be a string of 1 to {MAX_NAME_LENGTH} characters, "
                         f"got {_toml_kind(name)}")
    request = _parse_request(where, case["request"])
    now, facts = _parse_facts(where, case.get("facts", {}))
    return PolicyCase(where.file, name, where.line, request, now, facts,
                      _parse_expect(where, case["expect"]))


def _parse_request(where: _Where, raw: Any) -> ExecutionRequest:
    body = where.table(raw, "'request'", _REQUEST_KEYS)
    try:
        encoded = json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        # TOML has dates and infinities; a request on the wire has neither.
        raise where.fail(f"'request' holds a value JSON cannot carry ({exc}); "
                         "write dates as strings") from None
    try:
        return parse_execution_request(encoded)
    except MalformedRequest as exc:
        raise where.fail(f"request.{exc.field}: expected {exc.expected}, "
                         f"got {exc.got}") from None


def _parse_facts(where: _Where, raw: Any) -> tuple[datetime, dict[str, int | Decimal]]:
    if not isinstance(raw, dict):
        raise where.fail(f"'facts' must be a table, got {_toml_kind(raw)}")
    given: dict[str, Any] = raw
    now = DEFAULT_NOW
    facts: dict[str, int | Decimal] = {}
    for key, value in given.items():
        if key == "now":
            now = _parse_now(where, value)
        elif key in _DERIVED_FACTS:
            raise where.fail(f"facts.{key} is derived from facts.now; set 'now' instead")
        else:
            facts[key] = _fact_number(where, key, value)
    return now, facts


def _parse_now(where: _Where, value: Any) -> datetime:
    if isinstance(value, str):
        try:
            return parse_timestamp(value)
        except ValueError:
            pass
    elif isinstance(value, datetime) and value.utcoffset() is not None:
        return value.astimezone(UTC)
    raise where.fail("facts.now must be an RFC 3339 time with a zone, such as "
                     f"'2026-11-26T10:00:00Z', got {_toml_kind(value)}")


def _fact_number(where: _Where, key: str, value: Any) -> int | Decimal:
    number: int | Decimal | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str | float) and not isinstance(value, bool):
        try:  # a float as written (its shortest repr), a string exactly
            number = Decimal(value if isinstance(value, str) else repr(value))
        except InvalidOperation:
            number = None
        if number is not None and not number.is_finite():
            number = None
    if number is None or number < 0:
        raise where.fail(f"facts.{key} must be a number of at least 0 (decimals as strings, "
                         f"e.g. \"49000.50\"), got {_toml_kind(value)}")
    return number


def _parse_expect(where: _Where, raw: Any) -> Expectation:
    expect = where.table(raw, "'expect'", _EXPECT_KEYS)
    decisions = [o.value for o in Outcome]
    decision = expect.get("decision")
    if decision not in decisions:
        raise where.fail(f"expect.decision must be one of {', '.join(decisions)}, "
                         f"got {_toml_kind(decision)}")
    reason = expect.get("reason")
    if reason is not None and not (isinstance(reason, str) and _REASON_RE.match(reason)):
        raise where.fail("expect.reason must be an UPPER_SNAKE_CASE reason code such as "
                         f"'WITHIN_LIMIT', got {_toml_kind(reason)}")
    policies = expect.get("policies")
    if policies is not None and (not isinstance(policies, list) or not all(
            isinstance(p, str) and p for p in policies)):
        raise where.fail("expect.policies must be an array of policy @ids, got "
                         f"{_toml_kind(policies)}")
    return Expectation(Outcome(decision), reason,
                       tuple(sorted(policies)) if policies is not None else None)


def load_cases(bundle: PolicyBundle) -> list[PolicyCase]:
    """Every case of the bundle, file by file in path order."""
    cases: list[PolicyCase] = []
    for path in sorted(p for p in bundle.files if is_case_file(p)):
        cases.extend(parse_case_file(path, bundle.files[path].decode("utf-8")))
    return cases


# -- running ------------------------------------------------------------------------------


def case_facts(case: PolicyCase, spec: SurfaceSpec) -> dict[str, Any] | str:
    """The facts a case is evaluated with, or what is wrong with the ones it gives."""
    unknown = sorted(set(case.facts) - set(spec.facts))
    if unknown:
        declared = ", ".join(sorted(spec.facts)) or "none"
        return (f"facts.{unknown[0]} is not a fact of {spec.name} "
                f"(its stateful facts: {declared})")
    facts: dict[str, Any] = compute_facts(case.now)
    for name, fact in spec.facts.items():
        if name in case.facts:
            value = case.facts[name]
            if fact.cedar_type == "__cedar::Long":
                if value != int(value):
                    return f"facts.{name} is a whole number ({fact.aggregate}), got {value}"
                value = int(value)
            facts[name] = value
        else:
            facts[name] = _no_history(fact.aggregate, fact.field, fact.field_type, case.request)
    return facts


def _no_history(aggregate: str, field_name: str | None, field_type: str | None,
                request: ExecutionRequest) -> int | Decimal:
    """A stateful fact for an actor with no earlier permits: the request is its only one.

    The same arithmetic as the gateway's ``facts_for`` with ``NoHistory``, which the
    arbiter cannot import (it sits below the server).
    """
    if aggregate == "count":
        return 1
    value = request.context.get(field_name) if field_name else None
    units = 0
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            scaled = Decimal(repr(value) if isinstance(value, float) else value) * _UNITS
        except InvalidOperation:
            scaled = Decimal(0)
        if scaled.is_finite() and scaled == scaled.to_integral_value():
            units = int(scaled)
    return Decimal(units) / _UNITS if field_type == "decimal" else units // _UNITS


def run_case(engine: CompiledBundle, case: PolicyCase) -> CaseResult:
    """Evaluate one case and compare the answer with its expectation."""
    spec = engine.registry.get(case.request.surface)
    if spec is None:
        return CaseResult(case, None, (
            f"surface {case.request.surface!r} is not in this bundle's surfaces.toml",))
    facts = case_facts(case, spec)
    if isinstance(facts, str):
        return CaseResult(case, None, (facts,))
    evaluation = engine.evaluate(case.request, facts)
    expect, problems = case.expect, []
    if evaluation.outcome is not expect.decision:
        problems.append(f"expected decision {expect.decision.value}, "
                        f"got {evaluation.outcome.value} ({evaluation.reason_code})")
    if expect.reason is not None and evaluation.reason_code != expect.reason:
        problems.append(f"expected reason {expect.reason}, got {evaluation.reason_code}")
    got_policies = tuple(sorted(evaluation.determining_policies))
    if expect.policies is not None and got_policies != expect.policies:
        problems.append(f"expected policies [{', '.join(expect.policies)}], "
                        f"got [{', '.join(got_policies)}]")
    return CaseResult(case, evaluation, tuple(problems))


def run_cases(engine: CompiledBundle, cases: Iterable[PolicyCase]) -> list[CaseResult]:
    """Evaluate every case, in order."""
    return [run_case(engine, case) for case in cases]

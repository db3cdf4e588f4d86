"""Checking a request's context and signals against the registry, and converting them for Cedar.

Only declared fields reach Cedar, converted to the Cedar JSON form of their
declared type; undeclared ones are dropped here (they still count in the
request hash). Every value is checked again even though the HTTP layer already
parsed the body strictly, because ``evaluate`` can be called with any mapping:
a NaN, an infinity, a boolean where a number belongs or a 400-digit integer
must come back as a SILENCE naming the field, never reach Cedar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from execguard.arbiter.registry import DECIMAL_LIMIT, INTEGER_LIMIT, FieldSpec, decimal_text
from execguard.protocol.request import describe

__all__ = ["FieldProblem", "convert_fields"]


@dataclass(frozen=True)
class FieldProblem:
    """Why a set of fields cannot be evaluated: one missing or invalid field."""

    missing: bool
    path: str
    reason: str


def _got(value: Any, sensitive: bool) -> str:
    # A sensitive value must not be echoed into a reason that ends up in a receipt.
    if not sensitive:
        return describe(value)
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return describe(value)  # null, arrays and objects: describe() shows no content


def _in_range(spec: FieldSpec, number: int | Decimal) -> str | None:
    if spec.minimum is not None and number < spec.minimum:
        return f"at least {spec.minimum}"
    if spec.maximum is not None and number > spec.maximum:
        return f"at most {spec.maximum}"
    return None


def _valid_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _convert(spec: FieldSpec, value: Any) -> tuple[Any, str | None]:
    """``(cedar_value, None)`` when ``value`` fits ``spec``, else ``(None, expected)``."""
    if spec.type == "boolean":
        return (value, None) if isinstance(value, bool) else (None, "true or false")
    if spec.type == "integer":
        expected = f"an integer within ±{INTEGER_LIMIT}"
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > INTEGER_LIMIT:
            return None, expected
        problem = _in_range(spec, value)
        return (None, f"an integer {problem}") if problem else (value, None)
    if spec.type == "decimal":
        expected = f"a number with at most 4 fractional digits within ±{DECIMAL_LIMIT}"
        if isinstance(value, float) and not math.isfinite(value):
            return None, "a finite number"
        text = decimal_text(value)
        if text is None:
            return None, expected
        problem = _in_range(spec, Decimal(text))
        if problem:
            return None, f"a number {problem}"
        return {"__extn": {"fn": "decimal", "arg": text}}, None
    if spec.type == "string":
        if not isinstance(value, str) or not _valid_text(value):
            return None, "a string"
        if spec.max_length is not None and len(value) > spec.max_length:
            return None, f"a string of at most {spec.max_length} characters"
        if spec.enum is not None and value not in spec.enum:
            return None, "one of " + ", ".join(repr(item) for item in spec.enum)
        return value, None
    if spec.type == "string_set":
        if (not isinstance(value, list | tuple)
                or not all(isinstance(item, str) and _valid_text(item) for item in value)):
            return None, "an array of strings"
        return list(value), None
    return None, f"a value of the unsupported type {spec.type!r}"


def convert_fields(
    specs: Mapping[str, FieldSpec],
    values: Any,
    where: str,
    sensitive: frozenset[str] = frozenset(),
) -> dict[str, Any] | FieldProblem:
    """The Cedar record for the declared fields of ``values``, or the first problem.

    ``where`` is ``"context"`` or ``"signals"``; problems name ``where.field``.
    Fields are checked in registry order, so the same request always reports
    the same field.
    """
    if not isinstance(values, Mapping):
        return FieldProblem(False, where, f"{where} must be an object, got {describe(values)}.")
    record: dict[str, Any] = {}
    for name, spec in specs.items():
        path = f"{where}.{name}"
        if name not in values or values[name] is None:
            if spec.required:
                return FieldProblem(True, path, f"{path} is required but was not sent.")
            continue
        value = values[name]
        converted, expected = _convert(spec, value)
        if expected is not None:
            got = _got(value, name in sensitive)
            return FieldProblem(False, path, f"{path} must be {expected}, got {got}.")
        record[name] = converted
    return record

"""The surface registry parser, on its own."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from execguard.arbiter.registry import decimal_text, parse_registry
from execguard.protocol.errors import BundleInvalid

BASE = '[surfaces."a.b"]\nrisk = "low"\n'


def refused(text: str) -> BundleInvalid:
    with pytest.raises(BundleInvalid) as info:
        parse_registry(text)
    assert info.value.file == "surfaces.toml"
    return info.value


def test_defaults_and_field_options() -> None:
    registry = parse_registry(BASE + '[surfaces."a.b".context]\n'
                              'n = { type = "integer", min = -3, max = 9 }\n'
                              'd = { type = "decimal", required = true, min = 0.5 }\n'
                              's = { type = "string", enum = ["x", "y"], max_length = 4 }\n')
    spec = registry.get("a.b")
    assert spec is not None
    assert (spec.description, spec.observe_allowed, spec.retention_days, spec.sensitive) == (
        "", False, 365, frozenset())
    assert list(spec.context) == ["n", "d", "s"]
    assert (spec.context["n"].minimum, spec.context["n"].maximum) == (-3, 9)
    assert spec.context["d"].required and spec.context["d"].minimum == Decimal("0.5")
    assert spec.context["s"].enum == ("x", "y") and spec.context["s"].max_length == 4
    assert registry.names() == ("a.b",) and "a.b" in registry and len(registry) == 1


@pytest.mark.parametrize(("text", "key", "line"), [
    ("[surfaces]\n", "surfaces", 1),
    ('[surfaces."a.b"]\ndescription = "x"\n', "surfaces.a.b", 1),
    (BASE + "colour = 1\n", "surfaces.a.b.colour", 3),
    (BASE + "observe = 1\n", "surfaces.a.b.observe", 3),
    (BASE + "retention_days = 0\n", "surfaces.a.b.retention_days", 3),
    (BASE + "retention_days = true\n", "surfaces.a.b.retention_days", 3),
    (BASE + "sensitive = [1]\n", "surfaces.a.b.sensitive", 3),
    (BASE + '[surfaces."a.b".context]\nx = { type = "strnig" }\n',
     "surfaces.a.b.context.x.type", 4),
    (BASE + '[surfaces."a.b".context]\nx = { required = true }\n', "surfaces.a.b.context.x", 4),
    (BASE + '[surfaces."a.b".context]\nx = { type = "string", required = "yes" }\n',
     "surfaces.a.b.context.x.required", 4),
    (BASE + '[surfaces."a.b".context]\nx = { type = "string", minimum = 1 }\n',
     "surfaces.a.b.context.x.minimum", 4),
    (BASE + '[surfaces."a.b".context]\nx = { type = "boolean", enum = ["a"] }\n',
     "surfaces.a.b.context.x.enum", 4),
    (BASE + '[surfaces."a.b".context]\nx = { type = "integer", min = 1.5 }\n',
     "surfaces.a.b.context.x.min", 4),
    (BASE + '[surfaces."a.b".context]\nx = { type = "decimal", max = 0.00001 }\n',
     "surfaces.a.b.context.x.max", 4),
    (BASE + '[surfaces."a.b".context]\nx = { type = "integer", min = 5, max = 1 }\n',
     "surfaces.a.b.context.x.min", 4),
    (BASE + '[surfaces."a.b".context]\nx = { type = "string", enum = [] }\n',
     "surfaces.a.b.context.x.enum", 4),
    (BASE + '[surfaces."a.b".context]\n"bad-name" = { type = "string" }\n',
     "surfaces.a.b.context.bad-name", 4),
    (BASE + '[surfaces."a.b".context]\nsignals = { type = "string" }\n',
     "surfaces.a.b.context.signals", 4),
    (BASE + '[surfaces."a.b".context]\naction = { type = "string" }\n',
     "surfaces.a.b.context.action", 4),
    (BASE + '[surfaces."a.b".context]\nnow = { type = "string" }\n',
     "surfaces.a.b.context.now", 4),
    # Cedar reads a record key "__expr" as an escape: every request would be SILENCE.
    (BASE + '[surfaces."a.b".context]\n__expr = { type = "string" }\n',
     "surfaces.a.b.context.__expr", 4),
    (BASE + '[surfaces."a.b".signals]\nx = { type = "integer", max_length = 3 }\n',
     "surfaces.a.b.signals.x.max_length", 4),
    ('[surfaces."bad name"]\nrisk = "low"\n', "surfaces.bad name", 1),
    ("[other]\n", "other", 1),
])
def test_refusals_name_key_and_line(text: str, key: str, line: int) -> None:
    error = refused(text)
    assert (error.key, error.line) == (key, line), str(error)
    assert str(error).startswith(f"surfaces.toml:{line} [{key}]: ")


def test_line_search_follows_the_surface() -> None:
    text = ('[surfaces."a"]\nrisk = "low"\n[surfaces."a".context]\nx = { type = "string" }\n'
            '[surfaces."b"]\nrisk = "low"\n[surfaces."b".context]\nx = { type = "strin" }\n')
    assert refused(text).line == 8


def test_toml_syntax_error() -> None:
    error = refused(BASE + "observe = \n")
    assert error.line == 3 and error.key is None


@pytest.mark.parametrize(("value", "text"), [
    (0, "0.0"), (-7, "-7.0"), (12000.5, "12000.5"), (1e3, "1000.0"), (0.0001, "0.0001"),
    (-0.0, "-0.0"), (922337203685477, "922337203685477.0"),
    (922337203685477.5, "922337203685477.5"),
])
def test_decimal_text(value: float, text: str) -> None:
    assert decimal_text(value) == text


@pytest.mark.parametrize("value", [
    True, False, float("nan"), float("inf"), 1e-5, 0.1 + 0.2, 10**400, 922337203685478,
    1e16, "1.0", None,
])
def test_decimal_text_refuses(value: Any) -> None:
    assert decimal_text(value) is None


def test_line_search_follows_dotted_headers() -> None:
    text = ('[surfaces."b"]\nrisk = "low"\n[surfaces."b".context]\nx = { type = "string" }\n'
            '[surfaces."b".signals]\nx = { type = "strin" }\n')
    assert refused(text).line == 6

"""The surface registry: ``surfaces.toml`` of a policy bundle.

Each surface names the context fields a caller must or may send (with their
types and ranges), the signals it may send, its risk, whether observe mode is
allowed, which context fields are sensitive, and how long its receipts are
kept. Parsing is strict: an unknown key, a misspelt type or a value of the
wrong type is refused with :class:`BundleInvalid` naming the file, the line and
the dotted key, because a silently ignored typo would weaken a policy.

``tomllib`` reports no positions for keys, so the line of a key is found by
searching the file text for its segments in order; this is a best effort for
the message, never used for a decision.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from execguard.arbiter.facts import FactSpec, parse_fact, parse_window
from execguard.protocol.errors import BundleInvalid
from execguard.protocol.request import MAX_SAFE_INTEGER, describe

__all__ = [
    "DECIMAL_LIMIT",
    "FIELD_TYPES",
    "INTEGER_LIMIT",
    "RESERVED_FIELD_NAMES",
    "RISK_LEVELS",
    "FieldSpec",
    "SurfaceRegistry",
    "SurfaceSpec",
    "decimal_text",
    "parse_registry",
]

REGISTRY_FILE = "surfaces.toml"
#: Registry field type -> Cedar type in the generated schema. ``__cedar::`` keeps a
#: bundle's own common types from shadowing the built-in ones.
FIELD_TYPES: Mapping[str, str] = MappingProxyType({
    "boolean": "__cedar::Bool",
    "decimal": "__cedar::decimal",
    "integer": "__cedar::Long",
    "string": "__cedar::String",
    "string_set": "Set<__cedar::String>",
})
RISK_LEVELS = ("low", "medium", "high", "critical")
#: Context names ExecGuard fills in itself; a registry may not declare them.
RESERVED_FIELD_NAMES = frozenset({"action", "facts", "now", "signals"})
#: Cedar's ``decimal`` is a 64-bit integer scaled by 10**4.
DECIMAL_LIMIT = Decimal("922337203685477.5807")
#: The largest integer a request's integer field may hold. A PERMIT keeps its numeric
#: context fields exactly, in units of 10**-4 in 64 bits, for the sums of stateful facts
#: (as Cedar keeps a decimal), so an integer field has a decimal's range.
INTEGER_LIMIT = int(DECIMAL_LIMIT)
MAX_RETENTION_DAYS = 36500

_SURFACE_KEYS = frozenset(
    {"description", "risk", "observe", "retention_days", "sensitive", "context", "signals",
     "facts", "approval_expiry"}
)
_FIELD_KEYS = frozenset({"type", "required", "min", "max", "enum", "max_length"})
# Same alphabet as the request parser accepts for ``surface``.
_SURFACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}\Z")
# Plain identifiers, so policies can write ``context.amount``.
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


@dataclass(frozen=True)
class FieldSpec:
    """One declared context or signals field."""

    name: str
    type: str
    required: bool = False
    minimum: int | Decimal | None = None
    maximum: int | Decimal | None = None
    enum: tuple[str, ...] | None = None
    max_length: int | None = None

    @property
    def cedar_type(self) -> str:
        """The Cedar schema type this field is declared as."""
        return FIELD_TYPES[self.type]


@dataclass(frozen=True)
class SurfaceSpec:
    """Everything the registry says about one surface."""

    name: str
    risk: str
    description: str = ""
    observe_allowed: bool = False
    retention_days: int = 365
    sensitive: frozenset[str] = frozenset()
    context: Mapping[str, FieldSpec] = field(default_factory=dict)
    signals: Mapping[str, FieldSpec] = field(default_factory=dict)
    #: Stateful facts computed from the ledger (``context.facts.<name>``).
    facts: Mapping[str, FactSpec] = field(default_factory=dict)
    #: How long an escalation waits for its approvers before it resolves to SILENCE.
    approval_expiry_seconds: int = 24 * 3600


class SurfaceRegistry:
    """The surfaces of one bundle, by name, in file order."""

    def __init__(self, surfaces: Mapping[str, SurfaceSpec]) -> None:
        self._surfaces = MappingProxyType(dict(surfaces))

    def get(self, name: str) -> SurfaceSpec | None:
        """The surface called ``name``, or ``None`` when it is not registered."""
        return self._surfaces.get(name)

    def names(self) -> tuple[str, ...]:
        """The registered surface names, in file order."""
        return tuple(self._surfaces)

    def __contains__(self, name: object) -> bool:
        return name in self._surfaces

    def __iter__(self) -> Iterator[SurfaceSpec]:
        return iter(self._surfaces.values())

    def __len__(self) -> int:
        return len(self._surfaces)


def decimal_text(value: int | float) -> str | None:
    """The Cedar ``decimal`` literal for a JSON number, or ``None`` if it has none.

    Floats are taken as their shortest repr (what the JSON text said), so
    ``0.1 + 0.2`` is refused for having more than four fractional digits rather
    than rounded. Integers become ``"N.0"``, because Cedar needs the point.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        exact = Decimal(repr(value))
        exponent = exact.as_tuple().exponent
        if not isinstance(exponent, int) or exponent < -4:
            return None
    else:
        if abs(value) > DECIMAL_LIMIT:
            return None
        exact = Decimal(value)
    if abs(exact) > DECIMAL_LIMIT:
        return None
    text = format(exact, "f")
    return text if "." in text else text + ".0"


class _Reader:
    """Walks the parsed TOML and turns every problem into a located BundleInvalid."""

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines()

    def fail(self, message: str, path: tuple[str, ...]) -> BundleInvalid:
        return BundleInvalid(
            message, file=REGISTRY_FILE, line=self._line_of(path), key=".".join(path)
        )

    def _line_of(self, path: tuple[str, ...]) -> int | None:
        # Find each segment on or after the line of the previous one; the last
        # segment found is the best position we can name.
        start, found = 0, None
        for segment in path:
            escaped = re.escape(segment)
            forms = [rf"\"{escaped}\"", rf"'{escaped}'"]
            if re.fullmatch(r"[A-Za-z0-9_-]+", segment):  # TOML allows it unquoted
                forms.append(rf"(?<![\w\"'-]){escaped}(?![\w-])")
            pattern = re.compile(rf"(?:{'|'.join(forms)})\s*(?:=|\.|\])")
            for index in range(start, len(self._lines)):
                line = self._lines[index]
                if line.lstrip().startswith("#"):
                    continue
                if pattern.search(line):
                    start, found = index, index + 1
                    break
        return found

    def table(self, value: Any, path: tuple[str, ...], allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"expected a table, got {describe_toml(value)}", path)
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.fail(
                    f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))}){suggestion}",
                    (*path, key),
                )
        return value

    def boolean(self, value: Any, path: tuple[str, ...]) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"expected true or false, got {describe_toml(value)}", path)
        return value

    def integer(self, value: Any, path: tuple[str, ...], low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(
                f"expected an integer from {low} to {high}, got {describe_toml(value)}", path
            )
        return value

    def string(self, value: Any, path: tuple[str, ...]) -> str:
        if not isinstance(value, str):
            raise self.fail(f"expected a string, got {describe_toml(value)}", path)
        return value

    def bound(self, value: Any, kind: str, path: tuple[str, ...]) -> int | Decimal:
        if kind == "integer":
            return self.integer(value, path, -MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
        text = decimal_text(value)
        if text is None:
            raise self.fail(
                "expected a number with at most 4 fractional digits within "
                f"±{DECIMAL_LIMIT}, got {describe_toml(value)}",
                path,
            )
        return Decimal(text)


def describe_toml(value: Any) -> str:
    """Like :func:`describe`, but names TOML tables and dates as such."""
    if isinstance(value, dict):
        return "a table"
    if not isinstance(value, str | int | float | bool | list):
        return f"a {type(value).__name__}"
    return describe(value)


def _field(reader: _Reader, name: str, raw: Any, path: tuple[str, ...]) -> FieldSpec:
    if not _FIELD_RE.match(name):
        raise reader.fail(
            "field names must be identifiers (a letter or _, then letters, digits or _; "
            "at most 64 characters)",
            path,
        )
    if name.startswith("__"):
        # Cedar's JSON reads a record key such as "__expr" as an escape: every request
        # with the field would be SILENCE.
        raise reader.fail("field names must not begin with '__' (Cedar reserves them)", path)
    spec = reader.table(raw, path, _FIELD_KEYS)
    if "type" not in spec:
        raise reader.fail(f"missing 'type' (one of {', '.join(FIELD_TYPES)})", path)
    kind = spec["type"]
    if kind not in FIELD_TYPES:
        hint = difflib.get_close_matches(str(kind), list(FIELD_TYPES), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise reader.fail(
            f"unknown type {kind!r} (one of {', '.join(FIELD_TYPES)}){suggestion}",
            (*path, "type"),
        )
    required = reader.boolean(spec.get("required", False), (*path, "required"))
    for option, kinds in (("min", ("integer", "decimal")), ("max", ("integer", "decimal")),
                          ("enum", ("string",)), ("max_length", ("string",))):
        if option in spec and kind not in kinds:
            raise reader.fail(
                f"{option!r} applies only to {' and '.join(kinds)} fields, not {kind}",
                (*path, option),
            )
    minimum = reader.bound(spec["min"], kind, (*path, "min")) if "min" in spec else None
    maximum = reader.bound(spec["max"], kind, (*path, "max")) if "max" in spec else None
    if minimum is not None and maximum is not None and minimum > maximum:
        raise reader.fail(f"min {minimum} is greater than max {maximum}", (*path, "min"))
    enum = None
    if "enum" in spec:
        values = spec["enum"]
        if (not isinstance(values, list) or not values
                or not all(isinstance(item, str) for item in values)):
            raise reader.fail(
                f"expected a non-empty array of strings, got {describe_toml(values)}",
                (*path, "enum"),
            )
        if len(set(values)) != len(values):
            raise reader.fail("enum lists a value more than once", (*path, "enum"))
        enum = tuple(values)
    max_length = None
    if "max_length" in spec:
        max_length = reader.integer(spec["max_length"], (*path, "max_length"), 1, 1_000_000)
    return FieldSpec(name, kind, required, minimum, maximum, enum, max_length)


def _fields(
    reader: _Reader, raw: Any, path: tuple[str, ...], reserved: frozenset[str]
) -> Mapping[str, FieldSpec]:
    if not isinstance(raw, dict):
        raise reader.fail(f"expected a table of fields, got {describe_toml(raw)}", path)
    fields: dict[str, FieldSpec] = {}
    for name, spec in raw.items():
        if name in reserved:
            raise reader.fail(
                f"{name!r} is reserved: ExecGuard sets context.{name} itself", (*path, name)
            )
        fields[name] = _field(reader, name, spec, (*path, name))
    return MappingProxyType(fields)


def _surface(reader: _Reader, name: str, raw: Any) -> SurfaceSpec:
    path = ("surfaces", name)
    if not _SURFACE_RE.match(name):
        raise reader.fail(
            "surface names are 1 to 200 letters, digits or . _ : - (starting with a letter "
            "or digit)",
            path,
        )
    spec = reader.table(raw, path, _SURFACE_KEYS)
    if "risk" not in spec:
        raise reader.fail(f"missing 'risk' (one of {', '.join(RISK_LEVELS)})", path)
    risk = spec["risk"]
    if risk not in RISK_LEVELS:
        raise reader.fail(
            f"expected one of {', '.join(RISK_LEVELS)}, got {describe_toml(risk)}",
            (*path, "risk"),
        )
    description = reader.string(spec.get("description", ""), (*path, "description"))
    observe = reader.boolean(spec.get("observe", False), (*path, "observe"))
    retention = reader.integer(
        spec.get("retention_days", 365), (*path, "retention_days"), 1, MAX_RETENTION_DAYS
    )
    context = _fields(reader, spec.get("context", {}), (*path, "context"), RESERVED_FIELD_NAMES)
    signals = _fields(reader, spec.get("signals", {}), (*path, "signals"), frozenset())
    sensitive_raw = spec.get("sensitive", [])
    if not isinstance(sensitive_raw, list) or not all(isinstance(s, str) for s in sensitive_raw):
        raise reader.fail(
            f"expected an array of context field names, got {describe_toml(sensitive_raw)}",
            (*path, "sensitive"),
        )
    for item in sensitive_raw:
        if item not in context:
            raise reader.fail(
                f'sensitive field {item!r} is not declared under [surfaces."{name}".context]',
                (*path, "sensitive"),
            )
    facts_raw = spec.get("facts", {})
    if not isinstance(facts_raw, dict):
        raise reader.fail(f"expected a table of facts, got {describe_toml(facts_raw)}",
                          (*path, "facts"))
    types = {f.name: f.type for f in context.values()}
    facts = MappingProxyType({fact: parse_fact(reader, fact, raw, (*path, "facts", fact), types)
                              for fact, raw in facts_raw.items()})
    for fact in facts.values():
        # A sum keeps each permit's value in clear (the reservation, and the total stored
        # with the decision), and an approval re-evaluates a sensitive field from a
        # stand-in, which would reserve 0 for the approved amount.
        if fact.field in sensitive_raw:
            raise reader.fail(f"cannot sum the sensitive field {fact.field!r}: its values "
                              "would be kept in clear, and an approved request would "
                              "reserve a stand-in instead of its value",
                              (*path, "facts", fact.name, "field"))
    expiry = parse_window(reader, spec.get("approval_expiry", "24h"), (*path, "approval_expiry"))
    return SurfaceSpec(
        facts=facts,
        approval_expiry_seconds=expiry,
        name=name,
        risk=risk,
        description=description,
        observe_allowed=observe,
        retention_days=retention,
        sensitive=frozenset(sensitive_raw),
        context=context,
        signals=signals,
    )


def parse_registry(text: str) -> SurfaceRegistry:
    """Parse the text of ``surfaces.toml``; raise :class:`BundleInvalid` on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        raise BundleInvalid(
            f"not valid TOML: {exc}", file=REGISTRY_FILE,
            line=int(match.group(1)) if match else None,
        ) from None
    reader = _Reader(text)
    reader.table(data, (), frozenset({"surfaces"}))
    surfaces = data.get("surfaces")
    if not isinstance(surfaces, dict) or not surfaces:
        raise reader.fail("declares no surfaces; add at least one [surfaces.\"name\"]",
                          ("surfaces",))
    return SurfaceRegistry({name: _surface(reader, name, raw) for name, raw in surfaces.items()})

"""Facts: values policies may use that the caller must not supply.

ExecGuard computes facts itself and puts them into ``context.facts``. The
caller's own ``context`` never reaches that key, because only fields declared
in the registry are passed to Cedar and ``facts`` cannot be declared. The
clock is read by whoever calls :func:`compute_facts`, never by the engine, so
an evaluation can be replayed with the same facts and give the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = ["AGGREGATES", "FACT_TYPES", "SCOPES", "FactSpec", "compute_facts", "parse_fact",
           "parse_window"]

#: Every fact, with its Python type and its Cedar type in the generated schema.
FACT_TYPES: Mapping[str, tuple[type, str]] = MappingProxyType({
    "now": (str, "__cedar::String"),
    "hour": (int, "__cedar::Long"),
    "weekday": (int, "__cedar::Long"),
    "date": (str, "__cedar::String"),
})


def compute_facts(now: datetime) -> dict[str, Any]:
    """The facts for a decision taken at ``now`` (which must carry a time zone).

    ``now`` is UTC to the second (``2026-11-26T22:30:00Z``), ``hour`` 0-23 and
    ``date`` are in UTC, and ``weekday`` is ISO (Monday is 1, Sunday 7).
    A naive datetime is refused: guessing its zone would shift every
    time-based policy by the server's offset.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("compute_facts needs an aware datetime, e.g. datetime.now(UTC)")
    moment = now.astimezone(UTC)
    return {
        "now": moment.isoformat(timespec="seconds")[:19] + "Z",  # C, unlike strftime
        "hour": moment.hour,
        "weekday": moment.isoweekday(),
        "date": moment.date().isoformat(),
    }


# -- stateful facts declared in the registry ---------------------------------------------

AGGREGATES = ("count", "sum")
SCOPES = ("actor", "tenant")
_FACT_KEYS = frozenset({"aggregate", "field", "window", "per"})
_FACT_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}\Z")
_WINDOW_RE = re.compile(r"^([1-9][0-9]{0,6})([smhd])\Z")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_SECONDS = 90 * 86400


@dataclass(frozen=True)
class FactSpec:
    """A fact ExecGuard computes from its own ledger for each decision on a surface.

    ``count``: the permits issued in the window (per actor or per tenant) that are
    still live or were used, i.e. not released by a FAILURE outcome or by expiring
    unused. ``sum``: the same permits' total of a numeric context ``field``. A
    PERMIT reserves its share at once, inside the ledger's write lock, so
    concurrent requests can never together exceed a limit.
    """

    name: str
    aggregate: str
    window: str
    window_seconds: int
    per: str
    field: str | None = None
    field_type: str | None = None

    @property
    def cedar_type(self) -> str:
        """The Cedar type of this fact in the generated schema."""
        if self.aggregate == "sum" and self.field_type == "decimal":
            return "__cedar::decimal"
        return "__cedar::Long"


def parse_window(reader: Any, value: Any, path: tuple[str, ...]) -> int:
    """A duration like ``30m``, ``24h`` or ``7d`` (at most 90 days), in seconds."""
    match = _WINDOW_RE.match(value) if isinstance(value, str) else None
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    if not match or seconds > MAX_WINDOW_SECONDS:
        raise reader.fail("expected a duration like '90s', '30m', '1h' or '24h' (at most 90d)",
                          path)
    return seconds


def parse_fact(reader: Any, name: str, raw: Any, path: tuple[str, ...],
               context_types: Mapping[str, str]) -> FactSpec:
    """One ``[surfaces."x".facts]`` entry, checked against the surface's context fields."""
    if not _FACT_NAME_RE.match(name) or name in FACT_TYPES:
        raise reader.fail(f"fact names are lower-case identifiers other than "
                          f"{', '.join(FACT_TYPES)}", path)
    spec = reader.table(raw, path, _FACT_KEYS)
    aggregate = spec.get("aggregate")
    if aggregate not in AGGREGATES:
        raise reader.fail(f"expected 'aggregate' to be one of {', '.join(AGGREGATES)}",
                          (*path, "aggregate"))
    window = spec.get("window")
    seconds = parse_window(reader, window, (*path, "window"))
    per = spec.get("per", "actor")
    if per not in SCOPES:
        raise reader.fail(f"expected 'per' to be one of {', '.join(SCOPES)}", (*path, "per"))
    field = spec.get("field")
    if aggregate == "sum":
        if not isinstance(field, str) or context_types.get(field) not in ("decimal", "integer"):
            raise reader.fail("a sum needs 'field': a declared decimal or integer context "
                              "field", (*path, "field"))
    elif field is not None:
        raise reader.fail("'field' applies only to aggregate = \"sum\"", (*path, "field"))
    return FactSpec(name, str(aggregate), str(window), seconds, str(per), field,
                    context_types.get(field) if field else None)

"""Facts: values policies may use that the caller must not supply.

ExecGuard computes facts itself and puts them into ``context.facts``. The
caller's own ``context`` never reaches that key, because only fields declared
in the registry are passed to Cedar and ``facts`` cannot be declared. The
clock is read by whoever calls :func:`compute_facts`, never by the engine, so
an evaluation can be replayed with the same facts and give the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = ["FACT_TYPES", "compute_facts"]

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
        "now": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hour": moment.hour,
        "weekday": moment.isoweekday(),
        "date": moment.date().isoformat(),
    }

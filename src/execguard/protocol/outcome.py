"""The four decisions and the protocol constants every part shares."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

__all__ = ["PROTOCOL_VERSION", "Outcome", "format_timestamp", "parse_timestamp"]

#: Named in every receipt and in the keys document.
PROTOCOL_VERSION = "execguard/1"


class Outcome(StrEnum):
    """A decision. Only PERMIT lets an action run."""

    PERMIT = "PERMIT"
    DENY = "DENY"
    ESCALATE = "ESCALATE"
    SILENCE = "SILENCE"


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-11-26T22:30:00.123Z``."""
    # isoformat is C and a third of strftime's cost; a UTC time ends in "+00:00".
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_timestamp(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or an offset); naive input is taken as UTC.
    Raises ``ValueError`` for text that is not one, or names a moment outside the years
    1–9999 in UTC (such as ``0001-01-01T00:00:00+01:00``)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1-9999 in UTC") from None

"""Shared by the SQL ledger's modules: the one seam for driver errors, and JSON text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from execguard.protocol.errors import StorageUnavailable

__all__ = ["dumps", "translate_errors"]


@contextmanager
def translate_errors(what: str, errors: tuple[type[Exception], ...]) -> Iterator[None]:
    """Turn each of a driver's ``errors`` into :class:`StorageUnavailable` (one seam)."""
    try:
        yield
    except errors as exc:
        raise StorageUnavailable(f"{what} failed: {exc}") from exc


def dumps(value: Any) -> str:
    """Compact JSON text for a stored column (read back with ``json.loads``).

    orjson is several times faster than the standard library on the append path;
    what it refuses (an integer beyond 64 bits) is written by the standard library.
    Input never holds NaN or infinities: requests refuse them at parse time.
    """
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

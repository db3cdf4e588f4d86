"""Shared by the SQL ledger's modules: the one seam for driver errors, and JSON text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

"""Shared by the SQL ledger's modules: the one seam for driver errors, JSON text, and the
key of a stored Merkle node."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from execguard.protocol.errors import StorageUnavailable

__all__ = ["LAST_LEAF_SQL", "dumps", "node_key", "node_row", "translate_errors"]


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


def node_key(level: int, index: int) -> int:
    """The last leaf a Merkle node covers: the nodes of one append share it, so keyed by
    it (then level) they are neighbours at the end of ``merkle_nodes``."""
    return ((index + 1) << level) - 1


#: :func:`node_key` in SQL, over a row's ``level`` and ``idx`` (schema upgrades).
LAST_LEAF_SQL = "((idx + 1) << level) - 1"


def node_row(tenant: str, node: tuple[int, int, bytes]) -> tuple[str, int, int, bytes, int]:
    """A ``merkle_nodes`` row for a node ``(level, index, hash)``."""
    level, index, digest = node
    return tenant, level, index, digest, node_key(level, index)

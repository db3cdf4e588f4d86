"""Execution ids: UUIDv7 (RFC 9562), so that ids minted one after another sort together.

Each decision's id is a key in several indexes (executions, the log's by-execution
index, reservations and their amounts). Random ids (v4) put every insert on a
random page of each of them: under load a decision dirtied one page per index, and
once the database outgrew the cache, read it first. Time-ordered ids append to the
right-hand edge instead, where a batch's inserts share pages (measured in process
on SQLite: about a third more decisions per second, a third less system CPU).

An id still carries 74 random bits, so ids cannot be guessed; its first 48 bits
are the millisecond of the decision, which its receipt states anyway. Pure: the
caller supplies the time and the randomness.
"""

from __future__ import annotations

import uuid

__all__ = ["ENTROPY_BYTES", "execution_id"]

#: Random bytes an id needs (of which 74 bits are kept).
ENTROPY_BYTES = 10


def execution_id(unix_ms: int, entropy: bytes) -> str:
    """The UUIDv7 of millisecond ``unix_ms`` and ``entropy``, in canonical text form."""
    if len(entropy) != ENTROPY_BYTES:
        raise ValueError(f"entropy must be {ENTROPY_BYTES} bytes, got {len(entropy)}")
    if not 0 <= unix_ms < 1 << 48:
        raise ValueError(f"unix_ms must fit in 48 bits, got {unix_ms}")
    raw = bytearray(unix_ms.to_bytes(6, "big") + entropy)
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # the RFC 9562 variant
    return str(uuid.UUID(bytes=bytes(raw)))

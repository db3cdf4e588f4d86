"""Execution ids: UUIDv7 (RFC 9562), so that ids minted one after another sort together.

Each decision's id is a key in several indexes (executions, the log's by-execution
index, reservations and their amounts). Random ids (v4) put every insert on a
random page of each of them: under load a decision dirtied one page per index, and
once the database outgrew the cache, read it first. Time-ordered ids append to the
right-hand edge instead, where a batch's inserts share pages (measured in process
on SQLite: about a third more decisions per second, a third less system CPU).

An id still carries 74 random bits, so ids cannot be guessed; its first 48 bits
are the millisecond it was minted, which the decision's receipt states anyway.
"""

from __future__ import annotations

import os
import time
import uuid

__all__ = ["new_execution_id"]


def new_execution_id(now_ns: int | None = None) -> str:
    """A fresh UUIDv7 in its canonical text form (``now_ns``: the time, for tests)."""
    millis = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    raw = bytearray(millis.to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # the RFC 9562 variant
    return str(uuid.UUID(bytes=bytes(raw)))

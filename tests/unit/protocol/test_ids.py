"""Execution ids: valid UUIDv7, unique, and ordered by the time they were minted."""

from __future__ import annotations

import time
import uuid

from execguard.protocol.ids import new_execution_id


def test_an_id_is_a_canonical_uuid7_carrying_its_millisecond() -> None:
    now_ns = 1_795_000_000_123_456_789
    text = new_execution_id(now_ns)
    parsed = uuid.UUID(text)
    assert str(parsed) == text  # canonical lower-case 8-4-4-4-12 form
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert int.from_bytes(parsed.bytes[:6], "big") == now_ns // 1_000_000


def test_ids_are_unique_and_sort_by_time() -> None:
    start = time.time_ns()
    ids = [new_execution_id(start + step * 1_000_000) for step in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # a later millisecond always sorts after, as text too
    same_millisecond = {new_execution_id(start) for _ in range(10_000)}
    assert len(same_millisecond) == 10_000  # 74 random bits each

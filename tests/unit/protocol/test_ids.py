"""Execution ids: valid UUIDv7, unique, and ordered by the time they were minted."""

from __future__ import annotations

import os
import uuid

import pytest

from execguard.protocol.ids import ENTROPY_BYTES, execution_id


def test_known_answer() -> None:
    # RFC 9562 appendix A.6's example: 2022-02-22 19:22:22 UTC, random bits as given there.
    entropy = bytes.fromhex("0cc3" "18c4dc0c0c07398f")
    assert execution_id(0x017F22E279B0, entropy) == "017f22e2-79b0-7cc3-98c4-dc0c0c07398f"


def test_an_id_is_a_canonical_uuid7_carrying_its_millisecond() -> None:
    text = execution_id(1_795_000_000_123, os.urandom(ENTROPY_BYTES))
    parsed = uuid.UUID(text)
    assert str(parsed) == text  # canonical lower-case 8-4-4-4-12 form
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert int.from_bytes(parsed.bytes[:6], "big") == 1_795_000_000_123


def test_ids_are_unique_and_sort_by_time() -> None:
    start = 1_795_000_000_000
    ids = [execution_id(start + step, os.urandom(ENTROPY_BYTES)) for step in range(2000)]
    assert ids == sorted(ids)  # a later millisecond always sorts after, as text too
    same_millisecond = {execution_id(start, os.urandom(ENTROPY_BYTES)) for _ in range(10_000)}
    assert len(same_millisecond) == 10_000  # 74 random bits each


@pytest.mark.parametrize(("unix_ms", "entropy"), [(-1, b"\0" * 10), (1 << 48, b"\0" * 10),
                                                   (0, b"\0" * 9)])
def test_out_of_range_input_is_refused(unix_ms: int, entropy: bytes) -> None:
    with pytest.raises(ValueError):
        execution_id(unix_ms, entropy)

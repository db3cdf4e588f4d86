"""Receipt timestamps: RFC 3339 UTC with milliseconds, read back exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from execguard.protocol.outcome import format_timestamp, parse_timestamp


def test_known_answers() -> None:
    assert format_timestamp(datetime(2026, 11, 26, 22, 30, 0, 123999, tzinfo=UTC)) \
        == "2026-11-26T22:30:00.123Z"
    # Another offset is shown in UTC; milliseconds are truncated, never rounded up.
    assert format_timestamp(datetime(2026, 11, 27, 0, 30, tzinfo=timezone(timedelta(hours=2)))) \
        == "2026-11-26T22:30:00.000Z"
    assert format_timestamp(datetime(999, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)) \
        == "0999-01-02T03:04:05.006Z"


@given(st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=st.just(UTC)))
def test_same_text_as_strftime_and_read_back(moment: datetime) -> None:
    text = format_timestamp(moment)
    assert text == moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    assert parse_timestamp(text) == moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def test_a_moment_outside_the_utc_years_is_a_value_error() -> None:
    # Valid text whose UTC moment falls before year 1 or after 9999: callers catch
    # ValueError for bad input, so it must not surface as an OverflowError.
    for text in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        with pytest.raises(ValueError, match="outside the years"):
            parse_timestamp(text)
    assert parse_timestamp("0001-01-01T00:00:00Z") == datetime(1, 1, 1, tzinfo=UTC)

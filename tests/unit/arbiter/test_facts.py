from datetime import UTC, datetime, timedelta, timezone

import pytest

from execguard.arbiter import compute_facts


def test_facts_are_utc_to_the_second() -> None:
    facts = compute_facts(datetime(2026, 11, 26, 22, 30, 15, 987654, tzinfo=UTC))
    assert facts == {"now": "2026-11-26T22:30:15Z", "hour": 22, "weekday": 4,
                     "date": "2026-11-26"}


def test_other_zones_are_converted_to_utc() -> None:
    # 01:30 on Sunday in UTC+3 is 22:30 on Saturday in UTC.
    moment = datetime(2026, 11, 29, 1, 30, tzinfo=timezone(timedelta(hours=3)))
    assert compute_facts(moment) == {"now": "2026-11-28T22:30:00Z", "hour": 22, "weekday": 6,
                                     "date": "2026-11-28"}


@pytest.mark.parametrize(("day", "weekday"), [(23, 1), (28, 6), (29, 7)])
def test_weekday_is_iso(day: int, weekday: int) -> None:
    assert compute_facts(datetime(2026, 11, day, tzinfo=UTC))["weekday"] == weekday


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        compute_facts(datetime(2026, 11, 26, 22, 30))

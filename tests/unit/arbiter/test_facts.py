from datetime import UTC, datetime, timedelta, timezone

import pytest

from execguard.arbiter import compute_facts
from execguard.arbiter.registry import parse_registry
from execguard.protocol.errors import BundleInvalid


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


@pytest.mark.parametrize(("fact", "key"), [
    ('spent = { aggregate = "avg", field = "n", window = "1h" }', "aggregate"),
    ('spent = { aggregate = "sum", window = "1h" }', "field"),
    ('spent = { aggregate = "sum", field = "label", window = "1h" }', "field"),
    ('spent = { aggregate = "sum", field = "n", window = "1 hour" }', "window"),
    ('spent = { aggregate = "sum", field = "n", window = "100d" }', "window"),
    ('spent = { aggregate = "count", window = "1h", per = "planet" }', "per"),
    ('spent = { aggregate = "count", window = "1h", colour = 1 }', "colour"),
    ('hour = { aggregate = "count", window = "1h" }', "hour"),
])
def test_stateful_facts_are_checked_when_the_bundle_is_read(fact: str, key: str) -> None:
    text = ('[surfaces."job.run"]\nrisk = "low"\n\n[surfaces."job.run".context]\n'
            'n = { type = "decimal" }\nlabel = { type = "string" }\n\n'
            f'[surfaces."job.run".facts]\n{fact}\n')
    with pytest.raises(BundleInvalid) as info:
        parse_registry(text)
    assert info.value.key is not None and key in info.value.key
    assert info.value.file == "surfaces.toml"


def test_stateful_facts_are_typed_for_cedar() -> None:
    registry = parse_registry(
        '[surfaces."job.run"]\nrisk = "low"\n\n[surfaces."job.run".context]\n'
        'n = { type = "decimal" }\nk = { type = "integer" }\n\n[surfaces."job.run".facts]\n'
        'n_sum_1h = { aggregate = "sum", field = "n", window = "1h" }\n'
        'k_sum_1d = { aggregate = "sum", field = "k", window = "1d", per = "tenant" }\n'
        'runs_30m = { aggregate = "count", window = "30m" }\n')
    facts = registry.get("job.run").facts
    assert facts["n_sum_1h"].cedar_type == "__cedar::decimal"
    assert facts["k_sum_1d"].cedar_type == "__cedar::Long"
    assert facts["k_sum_1d"].window_seconds == 86400 and facts["k_sum_1d"].per == "tenant"
    assert facts["runs_30m"].window_seconds == 1800 and facts["runs_30m"].per == "actor"


def test_a_sum_of_a_sensitive_field_is_refused() -> None:
    """A sensitive field is stored as a digest, but a sum keeps each value in clear, and an
    approval re-evaluates the request with a stand-in for it: the approved PERMIT reserved
    0 of its amount, so the actor could pass its limit by the approved amount."""
    text = ('[surfaces."pay"]\nrisk = "high"\nsensitive = ["amount"]\n\n'
            '[surfaces."pay".context]\namount = { type = "decimal", min = 0 }\n\n'
            '[surfaces."pay".facts]\n'
            'paid_24h = { aggregate = "sum", field = "amount", window = "24h" }\n')
    with pytest.raises(BundleInvalid, match="sensitive field 'amount'") as info:
        parse_registry(text)
    assert info.value.key == "surfaces.pay.facts.paid_24h.field"
    assert info.value.line == 9
    # Counting the permits of a surface with a sensitive field is fine: it keeps no value.
    counted = text.replace('aggregate = "sum", field = "amount"', 'aggregate = "count"')
    assert parse_registry(counted).get("pay").facts["paid_24h"].aggregate == "count"

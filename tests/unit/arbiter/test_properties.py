"""Property: payment.execute is PERMIT exactly when every rule of the demo bundle allows it."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from execguard.arbiter import CompiledBundle, PolicyBundle, demo_bundle_path
from execguard.protocol.outcome import Outcome
from execguard.protocol.request import ExecutionRequest

from .conftest import THURSDAY

SANCTIONED = [
    "Oceanic Shell Holdings (fictional)",
    "Blackwater Lagoon Trading (fictional)",
    "Count Olaf Imports (fictional)",
    "Globex Front Company (fictional)",
]
ABSENT = object()


@cache
def engine() -> CompiledBundle:
    return CompiledBundle(PolicyBundle.from_directory(demo_bundle_path()))


json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-20, max_value=20_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1, max_value=20_000),
    st.decimals(min_value=-1, max_value=20_000, places=4, allow_nan=False).map(float),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6,
)
# Each field is often valid, so that requests valid but for one field are common.
amounts = st.one_of(
    st.just(ABSENT),
    st.sampled_from([0, 10000, 10000.0, 10000.0001, -0.0, -0.0001, 9999.99995, 1e-4, 1e-5]),
    st.integers(min_value=-20, max_value=20_000),
    st.decimals(min_value=-2, max_value=20_000, places=4, allow_nan=False).map(float),
    json_values,
)
currencies = st.one_of(st.sampled_from(["USD", "EUR", "GBP"]),
                       st.sampled_from([ABSENT, "usd", "JPY"]), json_values)
beneficiaries = st.one_of(st.sampled_from([*SANCTIONED, "Northwind", "x" * 201, ABSENT]),
                          st.text(max_size=12), json_values)
accounts = st.one_of(st.just(ABSENT), st.text(max_size=70), json_values)
risk_scores = st.one_of(st.just(ABSENT), st.integers(-5, 105), json_values)
extras = st.dictionaries(st.sampled_from(["facts", "now", "hour", "weekday", "signals", "amt"]),
                         json_values, max_size=3)


def valid_amount(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and (not math.isfinite(value) or round(value, 4) != value):
        return False
    return 0 <= value <= 10000


def expected_permit(context: dict[str, Any], signals: dict[str, Any]) -> bool:
    account = context.get("beneficiary_account")
    risk = signals.get("risk_score")
    return (
        valid_amount(context.get("amount"))
        and context.get("currency") in ("USD", "EUR", "GBP")
        and isinstance(context.get("beneficiary"), str)
        and len(context["beneficiary"]) <= 200
        and context["beneficiary"] not in SANCTIONED
        and (account is None or (isinstance(account, str) and len(account) <= 64))
        and (risk is None or (type(risk) is int and 0 <= risk <= 100))
    )


@settings(max_examples=400, deadline=None)
@given(amount=amounts, currency=currencies, beneficiary=beneficiaries, account=accounts,
       risk=risk_scores, extra=extras)
def test_permit_only_when_every_rule_allows(amount: Any, currency: Any, beneficiary: Any,
                                            account: Any, risk: Any,
                                            extra: dict[str, Any]) -> None:
    context = dict(extra)
    for key, value in (("amount", amount), ("currency", currency),
                       ("beneficiary", beneficiary), ("beneficiary_account", account)):
        if value is not ABSENT:
            context[key] = value
    signals = {} if risk is ABSENT else {"risk_score": risk}
    request = ExecutionRequest(surface="payment.execute", context=context, signals=signals)
    result = engine().evaluate(request, THURSDAY)
    assert (result.outcome is Outcome.PERMIT) == expected_permit(context, signals), result
    if result.outcome is Outcome.PERMIT:
        assert result.determining_policies == ("payment-within-limit",)

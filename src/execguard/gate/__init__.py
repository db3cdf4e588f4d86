"""Enforcement points: nothing runs without a valid, single-use permit.

    from execguard.gate import Gate, ExecutionBlocked

    gate = Gate()   # EXECGUARD_URL and EXECGUARD_API_KEY, or Gate(url, api_key)

    @gate.guard(surface="payment.execute", context=lambda amount, to: {
        "amount": amount, "currency": "EUR", "beneficiary": to})
    def pay(amount, to): ...

    try:
        pay(250, "Acme Office Supplies")      # runs only after PERMIT + consume
    except ExecutionBlocked as blocked:
        print(blocked.decision, blocked.reason, blocked.execution_id)

``AsyncGate`` is the same for asyncio. ``execguard run`` and ``execguard proxy``
are the command-line and HTTP enforcement points built on the same core.
"""

from execguard.gate._core import ExecutionBlocked, Permit, digest_result, prepare
from execguard.gate.client import DEFAULT_TIMEOUT, AsyncGate, Gate

__all__ = ["DEFAULT_TIMEOUT", "AsyncGate", "ExecutionBlocked", "Gate", "Permit",
           "digest_result", "prepare"]

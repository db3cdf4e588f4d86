"""A decision's fact reads are known before it is decided: exactly the ones it makes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from execguard.arbiter import PolicyBundle, demo_bundle_path
from execguard.arbiter.facts import FactSpec
from execguard.arbiter.registry import SurfaceSpec
from execguard.ledger import FactQuery, FactRead
from execguard.protocol.request import ExecutionRequest
from execguard.server.decisions import fact_reads, facts_for

PAYMENT = PolicyBundle.from_directory(demo_bundle_path()).registry.get("payment.execute")
assert PAYMENT is not None and PAYMENT.facts
#: The demo's facts (the actor's) and facts of everyone's permits, in two windows.
MIXED = dataclasses.replace(PAYMENT, facts={
    **PAYMENT.facts,
    "tenant_count_1h": FactSpec("tenant_count_1h", "count", "1h", 3600, "tenant"),
    "tenant_sum_7d": FactSpec("tenant_sum_7d", "sum", "7d", 7 * 86400, "tenant", "amount",
                              "decimal"),
})


class Recording:
    """A FactReader that notes each read and answers distinct numbers."""

    def __init__(self) -> None:
        self.reads: list[FactRead] = []

    def measure(self, surface: str, actor: str | None, queries: Sequence[FactQuery],
                now: float) -> list[int]:
        self.reads.append(FactRead(surface, actor, tuple(queries), now))
        return [len(self.reads) * 10 + n for n in range(len(queries))]


@pytest.mark.parametrize("spec", [PAYMENT, MIXED], ids=["demo", "both-scopes"])
@pytest.mark.parametrize("actor", ["agent-7", None])
def test_the_reads_planned_are_the_reads_made(spec: SurfaceSpec, actor: str | None) -> None:
    request = ExecutionRequest(surface=spec.name, actor_id=actor, context={"amount": 12.5})
    reader = Recording()
    facts = facts_for(spec, request, 1_800_000_000.25, reader)
    assert list(fact_reads(spec, request, 1_800_000_000.25)) == reader.reads
    assert {read.actor for read in reader.reads} == \
        ({actor or ""} if spec is PAYMENT else {actor or "", None})
    assert set(facts) >= set(spec.facts)

"""Policy decisions: Cedar bundles, the surface registry, evaluation and facts.

Quick start::

    from datetime import UTC, datetime
    from execguard.arbiter import CompiledBundle, PolicyBundle, compute_facts, demo_bundle_path
    from execguard.protocol import ExecutionRequest

    bundle = PolicyBundle.from_directory(demo_bundle_path())   # raises BundleInvalid
    engine = CompiledBundle(bundle)
    request = ExecutionRequest(
        surface="payment.execute", actor_id="agent-7",
        context={"amount": 420.5, "currency": "EUR", "beneficiary": "Northwind Traders"},
    )
    result = engine.evaluate(request, compute_facts(datetime.now(UTC)))
    result.outcome, result.reason_code     # (Outcome.PERMIT, "WITHIN_LIMIT")

Default deny: only a firing ``permit`` with no firing ``forbid`` and no
evaluation error gives PERMIT. The arbiter imports nothing from ExecGuard
but ``execguard.protocol``.
"""

from execguard.arbiter.bundle import PolicyBundle, PolicyInfo, bundle_version, demo_bundle_path
from execguard.arbiter.engine import CompiledBundle, Evaluation
from execguard.arbiter.facts import compute_facts
from execguard.arbiter.registry import FieldSpec, SurfaceRegistry, SurfaceSpec

__all__ = [
    "CompiledBundle",
    "Evaluation",
    "FieldSpec",
    "PolicyBundle",
    "PolicyInfo",
    "SurfaceRegistry",
    "SurfaceSpec",
    "bundle_version",
    "compute_facts",
    "demo_bundle_path",
]

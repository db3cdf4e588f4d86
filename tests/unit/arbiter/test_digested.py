"""A stored request evaluated again when its sensitive fields are only digests."""

from __future__ import annotations

from execguard.arbiter import PolicyBundle, demo_bundle_path
from execguard.arbiter.digested import stored_context
from execguard.protocol.request import digest_value

SALARY = """

[surfaces."salary.pay"]
risk = "high"
observe = false
{sensitive}

[surfaces."salary.pay".context]
salary = {{ type = "decimal", required = true, min = 0 }}

[surfaces."salary.pay".facts]
{fact}
"""
POLICY = b"""
@id("salary-ok")
@reason("SALARY_OK")
permit (principal, action == Action::"salary.pay", resource);
"""


def bundle_with(sensitive: str, fact: str) -> PolicyBundle:
    demo = PolicyBundle.from_directory(demo_bundle_path())
    files = dict(demo.files)
    files["surfaces.toml"] += SALARY.format(sensitive=sensitive, fact=fact).encode()
    files["policies/salary.cedar"] = POLICY
    return PolicyBundle.from_files(files)


def test_a_field_digested_when_decided_that_a_later_policy_sums_cannot_be_stood_in() -> None:
    """Sensitive when the request was decided, the salary was stored as a digest; the
    policy active at the approval sums it (no longer sensitive there). A stand-in would
    reserve 0 instead of the approved salary."""
    then = bundle_with('sensitive = ["salary"]',
                       'payouts_1d = { aggregate = "count", window = "24h" }')
    now = bundle_with("", 'paid_1d = { aggregate = "sum", field = "salary", window = "24h" }')
    stored = {"salary": digest_value(1234.5)}
    spec_then, spec_now = then.registry.get("salary.pay"), now.registry.get("salary.pay")
    assert spec_then is not None and spec_now is not None
    why = stored_context(now, spec_now, spec_then, stored)
    assert isinstance(why, str) and "paid_1d" in why and "context.salary" in why
    # Only counted, the field gets a stand-in as before.
    assert stored_context(then, spec_then, None, stored) == {"salary": 0}

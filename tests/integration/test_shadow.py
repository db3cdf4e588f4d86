"""Shadow mode: a candidate policy on live traffic, recorded but never in effect."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx

from execguard.arbiter import demo_bundle_path
from execguard.server.gateway import POLICY_CACHE_SECONDS
from tests.conftest import Gateway, run_cli

PAY = {"currency": "EUR", "beneficiary": "Acme Office Supplies"}


def test_shadow_disagreements_are_recorded_without_changing_decisions(
        fresh_gateway: Gateway, tmp_path: Path) -> None:
    candidate = tmp_path / "candidate"
    shutil.copytree(demo_bundle_path(), candidate)
    payments = candidate / "policies" / "payments.cedar"
    payments.write_text(payments.read_text().replace('decimal("10000.0")', 'decimal("1000.0")'))
    version = run_cli("policy", "push", str(candidate),
                      data=fresh_gateway.data).stdout.strip().splitlines()[-1]
    run_cli("policy", "shadow", version, data=fresh_gateway.data)
    # Set by another process: the gateway sees it within its policy cache time.
    time.sleep(POLICY_CACHE_SECONDS)
    amounts = [100, 500, 2_000, 5_000, 9_000, 20_000]
    with fresh_gateway.client() as client:
        answers = [client.post("/execute", json={
            "surface": "payment.execute", "actorId": f"a{i}",
            "context": {**PAY, "amount": amount}}).json()
            for i, amount in enumerate(amounts)]
        # Observe mode answers PERMIT whatever the policy decides: the shadow is compared
        # with what it decides (ESCALATE here, as the candidate's), not with the answer.
        observed = client.post("/execute", json={
            "surface": "data.export", "executionMode": "observe",
            "context": {"row_count": 10, "destination": "public", "contains_pii": True}}).json()
    assert (observed["decision"], observed["would_decision"]) == ("PERMIT", "ESCALATE")
    # The active policy decided, as if no shadow existed.
    assert [a["decision"] for a in answers] == ["PERMIT"] * 5 + ["ESCALATE"]
    report = json.loads(run_cli("policy", "shadow-report", "--json",
                                data=fresh_gateway.data).stdout)
    assert report["disagreements"] == 3
    (group,) = report["groups"]
    assert group["from"] == "PERMIT (WITHIN_LIMIT)"
    assert group["to"] == "ESCALATE (HIGH_VALUE_PAYMENT)"
    assert set(group["examples"]) <= {a["execution_id"] for a in answers[2:5]}
    table = run_cli("policy", "shadow-report", data=fresh_gateway.data).stdout
    assert "3 disagreement(s)" in table

    run_cli("policy", "shadow", "--off", data=fresh_gateway.data)
    time.sleep(POLICY_CACHE_SECONDS)
    with fresh_gateway.client() as client:
        client.post("/execute", json={"surface": "payment.execute", "actorId": "later",
                                      "context": {**PAY, "amount": 3_000}})
    again = json.loads(run_cli("policy", "shadow-report", "--json",
                               data=fresh_gateway.data).stdout)
    assert again["disagreements"] == 3
    missing = run_cli("policy", "shadow", "0" * 64, data=fresh_gateway.data, check=False)
    assert missing.returncode == 1 and "not stored" in missing.stderr


def store_a_bundle_that_no_longer_loads(gateway: Gateway, *, shadow: bool) -> str:
    """A bundle stored (as by an earlier release) that this release's rules refuse: an
    Actor with attributes, which a policy could never see. Made the shadow candidate, or
    the active policy."""
    from execguard.ledger import open_ledger
    from execguard.protocol.policyversion import bundle_version

    files = {path.relative_to(demo_bundle_path()).as_posix(): path.read_bytes()
             for path in demo_bundle_path().rglob("*") if path.is_file()}
    files["schema.cedarschema"] = b"entity Actor { role?: String };\nentity Subject;\n"
    version = bundle_version(files)
    store = open_ledger(gateway.ledger)
    try:
        store.put_bundle("demo", version, files, "2026-11-28T00:00:00.000Z")
        if shadow:
            store.set_shadow("demo", version, "2026-11-28T00:00:00.000Z")
        else:
            store.activate_bundle("demo", version, "2026-11-28T00:00:00.000Z")
    finally:
        store.close()
    time.sleep(POLICY_CACHE_SECONDS)
    return version


def pay_100(gateway: Gateway) -> httpx.Response:
    with gateway.client() as client:
        return client.post("/execute", json={"surface": "payment.execute", "actorId": "a",
                                             "context": {**PAY, "amount": 100}})


def test_a_shadow_candidate_that_no_longer_loads_leaves_decisions_alone(
        fresh_gateway: Gateway) -> None:
    """The shadow is a comparison only: a candidate that does not load failed every
    decision of the tenant (500 bundle_invalid)."""
    store_a_bundle_that_no_longer_loads(fresh_gateway, shadow=True)
    answer = pay_100(fresh_gateway)
    assert answer.status_code == 200, answer.text
    assert answer.json()["decision"] == "PERMIT"


def test_an_active_policy_that_no_longer_loads_fails_closed_saying_what_to_do(
        fresh_gateway: Gateway) -> None:
    """It was a 500 (an internal error, to operators and metrics); it is the tenant's
    policy that cannot be used: 503, naming the version, the problem and the way out."""
    version = store_a_bundle_that_no_longer_loads(fresh_gateway, shadow=False)
    answer = pay_100(fresh_gateway)
    assert answer.status_code == 503, answer.text
    message = answer.json()["message"]
    assert version[:12] in message and "passes no entity data" in message
    assert "policy push --activate" in message

"""Stateful limits: a per-actor daily spend limit that holds under concurrency."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from execguard.arbiter import demo_bundle_path
from execguard.arbiter.registry import INTEGER_LIMIT
from tests.conftest import Gateway, free_port, run_cli

PAY = {"currency": "EUR", "beneficiary": "Acme Office Supplies"}


def pay(client: httpx.Client, actor: str, amount: float) -> dict[str, Any]:
    return client.post("/execute", json={"surface": "payment.execute", "actorId": actor,
                                         "context": {**PAY, "amount": amount}}).json()


def test_concurrent_payments_never_exceed_the_daily_limit(fresh_gateway: Gateway) -> None:
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def burst() -> None:
        with fresh_gateway.client() as client:
            start.wait()
            for _ in range(5):
                answer = pay(client, "agent-rush", 1000)
                with lock:
                    answers.append(answer)

    threads = [threading.Thread(target=burst) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = Counter((a["decision"], a["reasonCode"]) for a in answers)
    assert outcomes == {("PERMIT", "WITHIN_LIMIT"): 50, ("DENY", "SPEND_LIMIT"): 50}
    permitted = sum(1000 for a in answers if a["decision"] == "PERMIT")
    assert permitted == 50_000

    with fresh_gateway.client() as client:
        # Another actor has a limit of its own.
        assert pay(client, "agent-calm", 1000)["decision"] == "PERMIT"
        # A failed payment frees its share of the limit...
        failed = next(a for a in answers if a["decision"] == "PERMIT")
        consumed = client.post(f"/v1/permits/{failed['execution_id']}/consume",
                               json={"requestHash": failed["receipt"]["requestHash"]})
        assert consumed.status_code == 200
        assert pay(client, "agent-rush", 1000)["reasonCode"] == "SPEND_LIMIT"
        client.post(f"/executions/{failed['execution_id']}/outcome",
                    json={"result": "FAILURE", "latencyMs": 5})
        freed = pay(client, "agent-rush", 1000)
        assert (freed["decision"], freed["reasonCode"]) == ("PERMIT", "WITHIN_LIMIT")
        assert pay(client, "agent-rush", 0.01)["reasonCode"] == "SPEND_LIMIT"
        # The facts a decision used are stored with it.
        record = client.get(f"/verify/{freed['execution_id']}").json()
        assert record["receipt"]["factsDigest"]


TTL_SECONDS = 4


def test_an_unused_permit_releases_its_share_when_it_expires(tmp_path: Any) -> None:
    data = tmp_path / "data"
    run_cli("init", data=data)
    gateway = Gateway(data=data, port=free_port(),
                      api_key=(data / "demo-api-key").read_text().strip(),
                      # Long enough for the six requests below on a busy machine (with
                      # 1 s, a one-second stall let the first permit expire too early).
                      env={"EXECGUARD_TOKEN_TTL_SECONDS": str(TTL_SECONDS)})
    gateway.start()
    try:
        with gateway.client() as client:
            assert pay(client, "agent-slow", 50_000)["decision"] == "ESCALATE"
            assert pay(client, "agent-slow", 10_000)["decision"] == "PERMIT"
            for _ in range(4):
                assert pay(client, "agent-slow", 10_000)["decision"] == "PERMIT"
            assert pay(client, "agent-slow", 1)["reasonCode"] == "SPEND_LIMIT"
            time.sleep(TTL_SECONDS + 0.3)  # none of the five permits was used: they expire
            assert pay(client, "agent-slow", 10_000)["decision"] == "PERMIT"
    finally:
        gateway.stop()


BATCH_SURFACE = """
[surfaces."batch.run"]
description = "Run a batch job over some items"
risk = "low"
observe = false

[surfaces."batch.run".context]
items = { type = "integer", required = true, min = 0 }

[surfaces."batch.run".facts]
items_1h = { aggregate = "sum", field = "items", window = "1h", per = "actor" }
"""
BATCH_POLICY = """
@id("batch-within-limit")
@reason("BATCH_OK")
permit (principal, action == Action::"batch.run", resource);

@id("batch-limit")
@reason("BATCH_LIMIT")
forbid (principal, action == Action::"batch.run", resource)
when { context.facts.items_1h > 2000000000000000 };
"""


def push_demo_with(gateway: Gateway, tmp_path: Path, surfaces: str, **policies: str) -> None:
    """Activate the demo bundle with ``surfaces`` added, and each policy file named."""
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    with (bundle / "surfaces.toml").open("a") as registry:
        registry.write(surfaces)
    for name, text in policies.items():
        (bundle / "policies" / f"{name}.cedar").write_text(text)
    run_cli("policy", "push", str(bundle), "--activate", data=gateway.data)


def test_the_largest_amounts_are_decided_and_summed_exactly(fresh_gateway: Gateway,
                                                           tmp_path: Path) -> None:
    """Amounts are kept in units of 10**-4 in 64 bits: an integer field holds at most
    INTEGER_LIMIT (a larger one is a SILENCE naming it, never a failed append), and a
    total past 64 bits is still exact (it once failed every later decision of the actor
    as a storage fault)."""
    push_demo_with(fresh_gateway, tmp_path, BATCH_SURFACE, batch=BATCH_POLICY)

    def run(client: httpx.Client, actor: str, items: int) -> tuple[str, str]:
        answer = client.post("/execute", json={"surface": "batch.run", "actorId": actor,
                                               "context": {"items": items}})
        assert answer.status_code == 200, answer.text
        return answer.json()["decision"], answer.json()["reasonCode"]

    with fresh_gateway.client() as client:
        deadline = time.monotonic() + 10  # the active policy is cached for a second
        while client.post("/execute", json={"surface": "batch.run", "actorId": "probe",
                                            "context": {"items": 0}}).json()[
                "decision"] != "PERMIT":
            assert time.monotonic() < deadline, "the pushed policy never took effect"
            time.sleep(0.2)
        too_large = client.post("/execute", json={"surface": "batch.run", "actorId": "big",
                                                  "context": {"items": INTEGER_LIMIT + 1}})
        assert too_large.json()["decision"] == "SILENCE"
        assert too_large.json()["reasonCode"] == "INVALID_CONTEXT"
        assert f"context.items must be an integer within ±{INTEGER_LIMIT}" in \
            too_large.json()["reason"]
        # 2 x INTEGER_LIMIT x 10**4 units is past 2**63: the third one's total still counts.
        assert run(client, "big", INTEGER_LIMIT) == ("PERMIT", "BATCH_OK")
        assert run(client, "big", INTEGER_LIMIT) == ("PERMIT", "BATCH_OK")
        assert run(client, "big", INTEGER_LIMIT) == ("DENY", "BATCH_LIMIT")
        assert run(client, "big", 1) == ("PERMIT", "BATCH_OK")
        assert run(client, "other", INTEGER_LIMIT) == ("PERMIT", "BATCH_OK")
        assert client.get("/readyz").status_code == 200
        faults = [line for line in client.get("/metrics").text.splitlines()
                  if line.startswith('execguard_fail_closed_total{cause="storage_unavailable"}')]
        assert faults == ['execguard_fail_closed_total{cause="storage_unavailable"} 0']


SALARY_SURFACE = """

[surfaces."salary.pay"]
risk = "high"
observe = false
sensitive = ["salary"]

[surfaces."salary.pay".context]
salary = { type = "decimal", required = true, min = 0 }
bonus = { type = "integer", required = true, min = 0 }

[surfaces."salary.pay".facts]
payouts_1d = { aggregate = "count", window = "24h", per = "actor" }
"""
SALARY_POLICY = """
@id("salary-ok")
@reason("SALARY_OK")
permit (principal, action == Action::"salary.pay", resource);
"""


def test_a_sensitive_amount_is_not_kept_with_the_permit_s_share(fresh_gateway: Gateway,
                                                               tmp_path: Path) -> None:
    """A permit's share of the limits keeps the request's numbers so that sums can count
    them; a sensitive one was kept there in clear, while its execution kept a digest."""
    push_demo_with(fresh_gateway, tmp_path, SALARY_SURFACE, salary=SALARY_POLICY)
    with fresh_gateway.client() as client:
        deadline = time.monotonic() + 10  # the active policy is cached for a second
        while (answer := client.post("/execute", json={
                "surface": "salary.pay", "actorId": "hr",
                "context": {"salary": 1234567.89, "bonus": 500}}).json())["decision"] \
                != "PERMIT":
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)
    kept = fresh_gateway.sql("SELECT field, units FROM reservation_amounts"
                             " WHERE execution_id = ?", (answer["execution_id"],))
    assert kept == [("bonus", 500 * 10_000)]
    assert "1234567" not in repr(fresh_gateway.sql("SELECT * FROM executions"))

"""Stateful limits: a per-actor daily spend limit that holds under concurrency."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx

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

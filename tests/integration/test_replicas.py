"""Three gateway replicas on one PostgreSQL database, under concurrent load through all of them.

They share the database and the data directory's keys, as replicas behind a load
balancer do. Whatever replica a request reaches, the tenant has one gapless log
and one Merkle tree, an idempotency key is evaluated once, a permit is consumed
once and a per-actor limit holds.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from execguard.ledger import open_ledger
from execguard.protocol.chain import entry_hash
from execguard.protocol.merkle import MemoryTree
from tests.conftest import (
    BACKENDS,
    Gateway,
    PostgresSession,
    api_key_from,
    free_port,
    init_args,
    run_cli,
)

pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS,
                                reason="EXECGUARD_TEST_BACKENDS excludes postgresql")

PAY = {"currency": "EUR", "beneficiary": "Acme Office Supplies"}
REPLICAS = 3
#: An actor id that Slack would show as a mention of the whole channel and a link.
PHISHING = "<!channel> <https://phish.example/|approved already: confirm here>"


@pytest.fixture
def replicas(tmp_path: Path, postgres: PostgresSession) -> Iterator[list[Gateway]]:
    database = postgres.new_url()
    data = tmp_path / "data"
    key = api_key_from(run_cli(*init_args(database), data=data).stdout)
    gateways = [Gateway(data=data, port=free_port(), api_key=key, database=database)
                for _ in range(REPLICAS)]
    try:
        for gateway in gateways:
            gateway.start()
        yield gateways
    finally:
        for gateway in gateways:
            if gateway.process is not None and gateway.process.poll() is None:
                gateway.stop()


def all_at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released together; their results in order."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_three_replicas_keep_one_log_and_every_guarantee(replicas: list[Gateway]) -> None:
    clients = [gateway.client() for gateway in replicas]
    try:
        run_load(clients)
    finally:
        for client in clients:
            client.close()
    database = replicas[0].database
    assert database is not None
    check_one_log(database)
    audit = run_cli("audit", "--db", database, "--no-state", "--json", check=False)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert all(report["ok"] for report in json.loads(audit.stdout))


def run_load(clients: list[httpx.Client]) -> None:
    def execute(replica: int, body: dict[str, Any], key: str | None = None) -> Any:
        headers = {"Idempotency-Key": key} if key else {}
        response = clients[replica].post("/execute", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    # Idempotency across replicas: one key sent to every replica at once is evaluated once.
    for round_ in range(10):
        key = f"replica-key-{round_}-{uuid.uuid4()}"
        body = {"surface": "payment.execute", "actorId": f"idem-{round_}",
                "context": {**PAY, "amount": 10 + round_}}
        answers = all_at_once([lambda r=r, b=body, k=key: execute(r, b, k)
                               for r in range(REPLICAS)])
        assert len({a["execution_id"] for a in answers}) == 1, answers
        assert len({json.dumps(a["receipt"], sort_keys=True) for a in answers}) == 1

    # A permit is consumed once, whichever replicas the attempts reach.
    permits = [execute(i % REPLICAS, {"surface": "payment.execute", "actorId": f"use-{i}",
                                      "context": {**PAY, "amount": 5}}) for i in range(10)]
    for answer in permits:
        assert answer["decision"] == "PERMIT"

        def consume(replica: int, answer: dict[str, Any] = answer) -> httpx.Response:
            return clients[replica].post(
                f"/v1/permits/{answer['execution_id']}/consume",
                json={"requestHash": answer["receipt"]["requestHash"]})

        attempts = all_at_once([lambda r=r: consume(r) for r in range(REPLICAS)])
        codes = Counter(a.status_code for a in attempts)
        assert codes[200] == 1, [a.text for a in attempts]
        refused = [a.json() for a in attempts if a.status_code != 200]
        assert all(r["error"] == "permit_already_consumed" for r in refused), refused

    # A limit holds across replicas: the demo allows 50,000 a day per actor.
    spends = all_at_once([lambda i=i: execute(i % REPLICAS, {
        "surface": "payment.execute", "actorId": "agent-everywhere",
        "context": {**PAY, "amount": 5000}}) for i in range(15)])
    outcomes = Counter((a["decision"], a["reasonCode"]) for a in spends)
    assert outcomes == {("PERMIT", "WITHIN_LIMIT"): 10, ("DENY", "SPEND_LIMIT"): 5}

    # And plain concurrent traffic through all three.
    plain = all_at_once([lambda i=i: [execute(i % REPLICAS, {
        "surface": "payment.execute", "actorId": f"plain-{i}",
        "context": {**PAY, "amount": 1 + n}}) for n in range(10)] for i in range(12)])
    assert sum(len(batch) for batch in plain) == 120
    # Every replica signs checkpoints of the shared log.
    for client in clients:
        assert client.get("/v1/log/checkpoint").status_code == 200


def check_one_log(database: str) -> None:
    store = open_ledger(database, readonly=True)
    try:
        size = store.log_size("demo")
        entries = store.log_entries("demo", 0, size)
        # 10 idempotent + 10 permits + 10 consumes + 20 refusals + 15 limit + 120 plain.
        assert size == 185
        assert [e.index for e in entries] == list(range(size))
        previous = None
        for entry in entries:
            assert entry.receipt["logIndex"] == entry.index
            assert entry.prev_hash == previous
            assert entry.entry_hash == entry_hash(entry.index, previous, entry.receipt_hash)
            previous = entry.entry_hash
        tree = MemoryTree(e.leaf_hash for e in entries)
        checkpoints = store.checkpoints("demo")
        assert checkpoints, "no checkpoint was signed"
        sizes = [c.size for c in checkpoints]
        assert len(sizes) == len(set(sizes))
        for checkpoint in checkpoints:
            # Each replica computed its roots from the one stored tree: no forks.
            assert checkpoint.root == tree.root(checkpoint.size)
        assert store.tree_root("demo", size) == tree.root()
    finally:
        store.close()


def test_webhooks_go_out_once_per_event_and_a_locked_table_blocks_nothing(
        replicas: list[Gateway]) -> None:
    """Whichever replica takes an event announces it, once, signed. Reading the webhooks
    is not the request's business: with the table locked (a maintenance job), the
    replica that escalated still answers everything else at once. A Slack message shows
    the requester's actor id as text, never as a link or a mention."""
    import psycopg

    from execguard.server.webhooks import sign_payload
    from tests.integration.test_approvals import Receiver, approver, escalate

    first = replicas[0]
    assert first.database is not None
    hooks, slack = Receiver(), Receiver()
    clients = [gateway.client() for gateway in replicas]
    try:
        run_cli("webhooks", "add", hooks.url, "--secret", "s3cret", data=first.data)
        run_cli("webhooks", "add", slack.url, "--format", "slack", "--event",
                "approval.requested", data=first.data)
        alice, bob = approver(first, "finance", "alice"), approver(first, "finance", "bob")
        key = f"hook-{uuid.uuid4()}"
        answers = all_at_once([lambda c=c: escalate(c, actor="dave", key=key) for c in clients])
        execution_id = answers[0]["execution_id"]
        votes = all_at_once([
            lambda: replicas[1].client(api_key=alice).post(
                f"/v1/approvals/{execution_id}/approve", json={}),
            lambda: replicas[2].client(api_key=bob).post(
                f"/v1/approvals/{execution_id}/deny", json={})])
        assert sorted(v.status_code for v in votes) == [200, 409]
        hooks.wait_for(2)

        with psycopg.connect(first.database) as locker:
            locker.execute("LOCK TABLE webhooks IN ACCESS EXCLUSIVE MODE")
            escalating = threading.Thread(target=escalate, args=(clients[0], PHISHING))
            escalating.start()
            time.sleep(0.5)  # the escalation is answered: its event reads the webhooks
            started = time.monotonic()
            assert httpx.get(f"{first.url}/healthz", timeout=30).status_code == 200
            waited = time.monotonic() - started
            time.sleep(0.5)
            locker.rollback()
        escalating.join()
        assert waited < 1.0, f"/healthz waited {waited:.1f} s for the webhooks table"
        hooks.wait_for(3)
        slack.wait_for(2)
        time.sleep(1.0)  # nothing more comes
    finally:
        for client in clients:
            client.close()
        hooks.server.shutdown()
        slack.server.shutdown()
    text = json.loads(slack.deliveries[-1][1])["text"]
    assert "<" not in text and "by &lt;!channel&gt; &lt;https://phish.example/|" in text, text
    events = [(headers["X-ExecGuard-Event"], json.loads(body)["executionId"])
              for headers, body in hooks.deliveries]
    assert Counter(events) == {("approval.requested", execution_id): 1,
                               ("approval.resolved", execution_id): 1,
                               ("approval.requested", events[2][1]): 1}, events
    for headers, body in hooks.deliveries:
        assert headers["X-ExecGuard-Signature"] == sign_payload(
            "s3cret", headers["X-ExecGuard-Timestamp"], body)

"""SIGKILL in the middle of concurrent load loses nothing acknowledged and forks nothing.

Several client threads ask for decisions (each with an idempotency key), consume
the permits and report outcomes while checkpoints are issued every 0.2 s. The
gateway is killed with SIGKILL at a random moment, restarted on the same data,
and this is repeated. Then, for everything a client was answered:

- every decision, consumption and outcome answered 200 (and every refusal
  answered with a receipt) is in the log with the very same receipt;
- an idempotency key names one decision, before and after every crash;
- no permit was consumed twice: at most one ``consume`` entry per execution;
- every checkpoint a client saw is stored, and every stored checkpoint's root is
  the root of the log's tree at its size (no fork), as consistency proofs show;
- ``execguard audit`` re-derives the whole log and finds nothing wrong.

It runs once per backend (the ``database`` fixture: the SQLite file, PostgreSQL).
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, api_key_from, free_port, init_args, run_cli

ROUNDS = 10
WORKERS = 6
#: After the first answer of a round, the kill comes within this many seconds.
KILL_WINDOW = (0.2, 1.0)
SEED = 20261127


@dataclass
class Observed:
    """Everything the clients were answered, over all rounds (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> request body
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> answer
    unanswered: set[str] = field(default_factory=set)  # keys sent without an answer
    consumes: list[dict[str, Any]] = field(default_factory=list)  # receipts answered
    unconsumed: set[str] = field(default_factory=set)  # permits whose consume had no answer
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)  # a client thread's failure
    interrupted: int = 0  # requests in flight at a kill, sent again after the restart

    def answered(self) -> int:
        with self.lock:
            return len(self.decisions) + len(self.consumes) + len(self.outcomes)


def restart(gateway: Gateway) -> None:
    """Start (again) on the same data, on a new port: the old one may linger in TIME_WAIT."""
    gateway.port = free_port()
    gateway.start()


def kill(gateway: Gateway) -> None:
    """SIGKILL: no shutdown hook runs, nothing is drained or flushed."""
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGKILL)
    gateway.process.wait(timeout=30)


def new_gateway(tmp_path: Path, database: str | None) -> Gateway:
    """An initialised data directory (SQLite or PostgreSQL ledger), not started yet."""
    data = tmp_path / "data"
    init = run_cli(*init_args(database), data=data)
    # Checkpoints often, so some are being signed when the kill comes.
    return Gateway(data=data, port=free_port(), api_key=api_key_from(init.stdout),
                   database=database, env={"EXECGUARD_CHECKPOINT_INTERVAL_SECONDS": "0.2"})


class Worker:
    """One client thread: decide, then maybe consume (sometimes twice) and report."""

    def __init__(self, gateway: Gateway, seen: Observed, stop: threading.Event,
                 rng: random.Random, name: str) -> None:
        self.gateway, self.seen, self.stop, self.rng, self.name = gateway, seen, stop, rng, name

    def run(self) -> None:
        try:
            with self.gateway.client() as client:
                while not self.stop.is_set():
                    try:
                        self.one(client)
                    except httpx.HTTPError:
                        time.sleep(0.01)  # the gateway is gone: no answer, no acknowledgement
        except BaseException as exc:  # reported by the test thread, with its traceback
            with self.seen.lock:
                self.seen.errors.append(exc)

    def one(self, client: httpx.Client) -> None:
        key = f"{self.name}-{uuid.uuid4()}"
        body = {"surface": "payment.execute", "actorId": f"crash-{uuid.uuid4().hex[:8]}",
                "context": {"amount": self.rng.randint(1, 500), "currency": "EUR",
                            "beneficiary": "Acme Office Supplies"}}
        with self.seen.lock:
            self.seen.bodies[key] = body
            self.seen.unanswered.add(key)
        answer = decide(client, key, body, self.seen)
        if answer is None or answer["decision"] != "PERMIT" or self.rng.random() < 0.2:
            return
        for _ in range(2 if self.rng.random() < 0.3 else 1):  # a second try must be refused
            consume(client, answer, self.seen)
        if self.rng.random() < 0.5:
            response = client.post(f"/executions/{answer['execution_id']}/outcome",
                                   json={"result": "SUCCESS", "latencyMs": 3})
            if response.status_code == 200:
                with self.seen.lock:
                    self.seen.outcomes.append(response.json()["receipt"])
        if self.rng.random() < 0.1:
            response = client.get("/v1/log/checkpoint")
            if response.status_code == 200:
                with self.seen.lock:
                    self.seen.checkpoints.append(response.json())


def decide(client: httpx.Client, key: str, body: dict[str, Any],
           seen: Observed) -> dict[str, Any] | None:
    """POST /execute; record a 200 (the same key must always get the same answer)."""
    response = client.post("/execute", json=body, headers={"Idempotency-Key": key})
    if response.status_code != 200:
        assert response.status_code == 503, response.text  # only "not now" is acceptable
        return None
    answer: dict[str, Any] = response.json()
    with seen.lock:
        earlier = seen.decisions.setdefault(key, answer)
        seen.unanswered.discard(key)
    assert earlier["receipt"] == answer["receipt"], \
        f"idempotency key {key} got two different decisions"
    return answer


def consume(client: httpx.Client, answer: dict[str, Any], seen: Observed) -> None:
    """Consume a permit; record the receipt of a success or of a refusal."""
    execution_id = answer["execution_id"]
    with seen.lock:
        seen.unconsumed.add(execution_id)
    response = client.post(f"/v1/permits/{execution_id}/consume",
                           json={"requestHash": answer["receipt"]["requestHash"]})
    if response.status_code not in (200, 409):
        assert response.status_code == 503, response.text
        return
    receipt = response.json()["receipt"]
    if response.status_code == 409:
        assert receipt["consumeResult"] == "REFUSED", response.text
    with seen.lock:
        seen.consumes.append(receipt)
        seen.unconsumed.discard(execution_id)


def settle(gateway: Gateway, seen: Observed) -> None:
    """Send again what got no answer before the kill: keys and consumes must resolve once."""
    with seen.lock:
        keys = sorted(seen.unanswered)
        permits = sorted(seen.unconsumed)
        seen.interrupted += len(keys) + len(permits)
    with gateway.client() as client:
        for key in keys:
            decide(client, key, seen.bodies[key], seen)
        for execution_id in permits:
            answer = next((a for a in seen.decisions.values()
                           if a["execution_id"] == execution_id), None)
            if answer is not None:
                consume(client, answer, seen)


def load_then_kill(gateway: Gateway, seen: Observed, rng: random.Random) -> None:
    stop = threading.Event()
    workers = [Worker(gateway, seen, stop, random.Random(rng.random()), f"w{i}")
               for i in range(WORKERS)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    before = seen.answered()
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while seen.answered() == before and not seen.errors:
            assert time.monotonic() < deadline, "no answer under load within 20 s"
            time.sleep(0.005)
        time.sleep(rng.uniform(*KILL_WINDOW))
        kill(gateway)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a client thread did not stop"
    if seen.errors:
        raise seen.errors[0]


def whole_log(client: httpx.Client) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    while True:
        page = client.get("/v1/log/entries",
                          params={"start": len(entries), "end": len(entries) + 1000})
        if page.status_code == 422:  # start is past the end: an empty page
            return entries
        assert page.status_code == 200, page.text
        got = page.json()["entries"]
        if not got:
            return entries
        entries += got


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_decision(tmp_path: Path,
                                                           database: str | None) -> None:
    gateway = new_gateway(tmp_path, database)
    seen = Observed()
    rng = random.Random(SEED)
    try:
        gateway.start()
        with gateway.client() as client:
            keys_document = client.get("/.well-known/trigguard/keys.json").json()
        for _ in range(ROUNDS):
            load_then_kill(gateway, seen, rng)
            restart(gateway)
            settle(gateway, seen)  # also checks replays across the crash
        with gateway.client() as client:
            for key in list(seen.decisions)[::7]:  # a sample: replayed once more
                assert decide(client, key, seen.bodies[key], seen) is not None
            log = whole_log(client)
            stored = client.get("/v1/log/checkpoints").json()["checkpoints"]
            roots = {c["size"]: client.get("/v1/log/proof/consistency",
                                           params={"from": c["size"], "to": len(log)})
                     .json()["fromRoot"] for c in stored}
        assert not seen.unanswered, "a key got no answer even after a restart"
    finally:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()

    # Enough happened for the check to mean something.
    assert len(seen.decisions) >= 10 * ROUNDS, len(seen.decisions)
    assert seen.interrupted > 0, "no kill came while a request was in flight"
    assert any(r["consumeResult"] == "CONSUMED" for r in seen.consumes)
    assert seen.outcomes

    # 1. Every receipt a client was answered is in the log, byte for byte the same.
    by_hash = {e["receipt"]["receiptHash"]: e for e in log}
    assert [e["index"] for e in log] == list(range(len(log)))
    answered = [a["receipt"] for a in seen.decisions.values()] + seen.consumes + seen.outcomes
    missing = [r for r in answered if by_hash.get(r["receiptHash"], {}).get("receipt") != r]
    assert not missing, f"{len(missing)} answered receipts are not in the log: {missing[:3]}"
    # One idempotency key, one decision: the log has no second decision for a replayed key.
    decided = Counter(e["executionId"] for e in log if e["kind"] == "decision")
    assert all(decided[a["execution_id"]] == 1 for a in seen.decisions.values())

    # 2. No permit was consumed twice.
    consumed = Counter(e["executionId"] for e in log if e["kind"] == "consume")
    assert consumed and max(consumed.values()) == 1, consumed.most_common(3)
    refused = defaultdict(list)
    for e in log:
        if e["kind"] == "consume-refused":
            refused[e["executionId"]].append(e["receipt"]["refusalReason"])
    assert any("ALREADY_CONSUMED" in reasons for reasons in refused.values())

    # 3. No checkpoint forked: what clients saw is stored, and every root is the tree's.
    stored_roots = {c["size"]: c["root"] for c in stored}
    assert len(stored_roots) == len(stored) and len(stored) >= ROUNDS
    for checkpoint in seen.checkpoints:
        assert stored_roots.get(checkpoint["size"]) == checkpoint["root"], checkpoint
    forked = {size: (root, roots[size]) for size, root in stored_roots.items()
              if roots[size] != root}
    assert not forked, f"checkpoints whose root is not the log's: {forked}"

    # 4. The auditor agrees, from the database itself, against the keys pinned at the start.
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys_document))
    audit = run_cli("audit", "--db", gateway.ledger, "--keys", str(keys_file), "--no-state",
                    "--json", check=False)
    assert audit.returncode == 0, f"audit failed:\n{audit.stdout}\n{audit.stderr}"

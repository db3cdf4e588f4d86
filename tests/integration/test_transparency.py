"""The Merkle log over HTTP: checkpoints, proofs, entries, bundles, key rotation."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from execguard.protocol.checkpoint import open_checkpoint
from execguard.protocol.logentry import receipt_leaf_hash
from execguard.protocol.merkle import MemoryTree, verify_consistency, verify_inclusion
from execguard.verify import KeySet, verify_receipt
from tests.conftest import Gateway, api_key_from, run_cli

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}


def decide(client: httpx.Client, n: int, amount: int = 250) -> list[dict[str, Any]]:
    return [client.post("/execute", json={"surface": "payment.execute",
                                          "context": {**PAY, "amount": amount + i}}).json()
            for i in range(n)]


def keys_of(client: httpx.Client) -> KeySet:
    return KeySet.from_document(client.get("/.well-known/trigguard/keys.json").json())


def b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def test_checkpoint_proofs_and_entries_agree_with_the_receipts(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        answers = decide(client, 13)
        client.post(f"/executions/{answers[0]['execution_id']}/outcome",
                    json={"result": "SUCCESS", "latencyMs": 3})
        keys = keys_of(client)
        head = client.get("/v1/log/checkpoint").json()
        assert head["size"] == 14
        checkpoint = open_checkpoint(head["note"], keys.note_verifiers(), origin="execguard/demo")
        assert checkpoint.size == 14 and base64.b64encode(checkpoint.root).decode() == head["root"]

        entries = client.get("/v1/log/entries", params={"start": 0, "end": 14}).json()["entries"]
        assert [e["index"] for e in entries] == list(range(14))
        assert entries[13]["receipt"]["receiptType"] == "outcome"
        tree = MemoryTree()
        for entry in entries:
            verify_receipt(entry["receipt"], keys)
            leaf = receipt_leaf_hash("demo", entry["receipt"])
            assert b64d(entry["leafHash"]) == leaf
            tree.append(leaf)
        assert tree.root() == checkpoint.root

        for index in (0, 5, 12, 13):
            proof = client.get("/v1/log/proof/inclusion", params={"index": index}).json()
            assert proof["treeSize"] == 14
            verify_inclusion(tree.read(0, index), index, 14, [b64d(h) for h in proof["hashes"]],
                             checkpoint.root)
        older = client.get("/v1/log/proof/inclusion", params={"index": 2, "size": 7}).json()
        verify_inclusion(tree.read(0, 2), 2, 7, [b64d(h) for h in older["hashes"]], tree.root(7))

        for first in (1, 6, 8, 14):
            proof = client.get("/v1/log/proof/consistency", params={"from": first}).json()
            verify_consistency(first, 14, [b64d(h) for h in proof["hashes"]], tree.root(first),
                               checkpoint.root)
            assert b64d(proof["fromRoot"]) == tree.root(first)


def test_log_api_refuses_ranges_it_does_not_have(client: httpx.Client) -> None:
    decide(client, 1)
    size = client.get("/v1/log/checkpoint").json()["size"]
    for path, params, field in [
        ("/v1/log/proof/inclusion", {"index": size}, "index"),
        ("/v1/log/proof/inclusion", {"index": 0, "size": size + 1}, "size"),
        ("/v1/log/proof/consistency", {"from": size + 1}, "from"),
        ("/v1/log/proof/consistency", {"from": 0}, "from"),
        ("/v1/log/entries", {"start": 0, "end": 5000}, "end"),
        ("/v1/log/entries", {"start": -1, "end": 3}, "start"),
        ("/v1/log/proof/inclusion", {"index": "x"}, "index"),
        # Beyond a signed 64-bit integer: SQLite could not even be asked (it was a 500).
        ("/v1/log/checkpoints", {"min_size": 2**63}, "min_size"),
        ("/v1/log/entries", {"start": 2**63 - 1, "end": 2**63}, "end"),
        ("/v1/log/entries", {"start": 10**20, "end": 10**20 + 1}, "start"),
        ("/v1/log/proof/inclusion", {"index": 0, "size": 10**30}, "size"),
        ("/v1/log/proof/consistency", {"from": 1, "to": 2**64}, "to"),
    ]:
        response = client.get(path, params=params)
        assert response.status_code == 422, (path, params)
        assert response.json()["field"] == field, (path, params)
    assert client.get("/v1/receipts/nope/bundle").status_code == 404


def test_checkpoints_are_issued_on_schedule_without_being_asked(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        decide(client, 5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stored = client.get("/v1/log/checkpoints").json()["checkpoints"]
            if stored and stored[-1]["size"] == 5:
                break
            time.sleep(0.1)
        assert stored[-1]["size"] == 5
        sizes = [c["size"] for c in stored]
        assert sizes == sorted(set(sizes))


def test_each_tenant_has_its_own_log(fresh_gateway: Gateway) -> None:
    acme_key = api_key_from(run_cli("keys", "create", "--tenant", "acme",
                                    data=fresh_gateway.data).stdout)
    run_cli("policy", "push", "src/execguard/demo_bundle", "--tenant", "acme", "--activate",
            data=fresh_gateway.data)
    with fresh_gateway.client() as demo, fresh_gateway.client(api_key=acme_key) as acme:
        decide(demo, 4)
        decide(acme, 2)
        demo_head = demo.get("/v1/log/checkpoint").json()
        acme_head = acme.get("/v1/log/checkpoint").json()
        assert (demo_head["size"], acme_head["size"]) == (4, 2)
        assert acme_head["origin"] == "execguard/acme"
        entries = acme.get("/v1/log/entries", params={"start": 0, "end": 4}).json()["entries"]
        assert len(entries) == 2


def test_bundle_holds_everything_to_verify_offline(client: httpx.Client) -> None:
    answer = decide(client, 1)[0]
    bundle = client.get(f"/v1/receipts/{answer['execution_id']}/bundle").json()
    assert bundle["format"] == "execguard-bundle/1"
    assert bundle["receipt"] == answer["receipt"]
    keys = keys_of(client)
    checkpoint = open_checkpoint(bundle["checkpoint"], keys.note_verifiers())
    proof = bundle["inclusionProof"]
    assert proof["index"] == answer["receipt"]["logIndex"] < checkpoint.size == proof["treeSize"]
    verify_inclusion(receipt_leaf_hash("demo", bundle["receipt"]), proof["index"],
                     proof["treeSize"], [b64d(h) for h in proof["hashes"]], checkpoint.root)


def test_key_rotation_keeps_old_evidence_verifying(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        before = decide(client, 3)
        old_key = before[0]["receipt"]["authorityKeyId"]
        old_checkpoint = client.get("/v1/log/checkpoint").json()
        new_key = run_cli("keys", "rotate", data=fresh_gateway.data).stdout.strip().splitlines()[-1]
        assert new_key != old_key
        deadline = time.monotonic() + 10
        made = len(before)
        while True:  # the gateway notices a rotation within a second
            after = decide(client, 1)[0]
            made += 1
            if after["receipt"]["authorityKeyId"] == new_key or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert after["receipt"]["authorityKeyId"] == new_key
        document = client.get("/.well-known/trigguard/keys.json").json()
        status = {k["keyId"]: k["status"] for k in document["keys"]}
        assert status == {old_key: "retired", new_key: "active"}
        keys = KeySet.from_document(document)
        for answer in [*before, after]:
            verify_receipt(answer["receipt"], keys)
        open_checkpoint(old_checkpoint["note"], keys.note_verifiers())
        head = client.get("/v1/log/checkpoint").json()
        assert head["keyId"] == new_key
        open_checkpoint(head["note"], keys.note_verifiers())
    # The log spans the rotation and audits clean under the published keys.
    audit = run_cli("audit", "--url", fresh_gateway.url, "--api-key", fresh_gateway.api_key,
                    "--no-state", "--json")
    (report,) = json.loads(audit.stdout)
    assert report["ok"] and report["entries"] == made and report["checkpointsVerified"] >= 2


@pytest.mark.parametrize("path", ["/v1/log/checkpoint", "/v1/log/entries?start=0&end=1",
                                  "/v1/log/proof/inclusion?index=0"])
def test_log_api_needs_a_key(gateway: Gateway, path: str) -> None:
    with gateway.client(api_key="") as anonymous:
        assert anonymous.get(path).status_code == 401

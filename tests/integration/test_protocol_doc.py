"""docs/PROTOCOL.md is enough to reproduce our hashes: recomputed here without ExecGuard's code."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tests.conftest import REPO

DOC = (REPO / "docs" / "PROTOCOL.md").read_text()


def block(tag: str) -> str:
    match = re.search(r"```\w+ " + re.escape(tag) + r"\n(.*?)\n```", DOC, re.S)
    assert match, f"no block {tag!r} in docs/PROTOCOL.md"
    return match.group(1)


def page_canonical_json(value: Any) -> bytes:
    """The page's "canonical JSON", for documents with ASCII keys and no floats.

    For such documents RFC 8785 is: keys sorted (UTF-16 order equals code-point order for
    ASCII), no white space, minimal string escaping, integers as decimal digits.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def page_receipt_hash(receipt: dict[str, Any]) -> str:
    """Recipe steps 1-3."""
    rest = {k: v for k, v in receipt.items()
            if k not in ("receiptHash", "authoritySignature", "authorityKeyId")}
    return hashlib.sha256(page_canonical_json(rest)).hexdigest()


def page_verify_signature(receipt: dict[str, Any], pem: str) -> None:
    """Recipe step 4, in reverse."""
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, Ed25519PublicKey)
    key.verify(base64.b64decode(receipt["authoritySignature"], validate=True),
               bytes.fromhex(receipt["receiptHash"]))


def test_worked_receipt_example_follows_the_recipe() -> None:
    receipt = json.loads(block("example-receipt"))
    rest = {k: v for k, v in receipt.items()
            if k not in ("receiptHash", "authoritySignature", "authorityKeyId")}
    assert page_canonical_json(rest).decode() == block("example-receipt-canonical")
    assert page_receipt_hash(receipt) == receipt["receiptHash"]
    page_verify_signature(receipt, block("example-public-key") + "\n")
    raw = serialization.load_pem_public_key(block("example-public-key").encode()).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert receipt["authorityKeyId"] == "eg-" + hashlib.sha256(raw).hexdigest()[:16]


def test_worked_request_hash_example_follows_the_recipe() -> None:
    normalized = json.loads(block("example-normalized-request"))
    assert set(normalized) == {"tenant", "surface", "action", "actorId", "context", "signals",
                               "subjectDigest"}
    digest = hashlib.sha256(page_canonical_json(normalized)).hexdigest()
    assert digest == block("example-request-hash")
    account = hashlib.sha256(page_canonical_json("DE89370400440532013000")).hexdigest()
    assert normalized["context"]["beneficiary_account"] == "sha256:" + account


def test_live_receipts_follow_the_recipe(client: httpx.Client) -> None:
    answer = client.post("/execute", json={
        "surface": "payment.execute", "actorId": "agent-7",
        "context": {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"},
        "signals": {"risk_score": 12}}).json()
    receipt = answer["receipt"]
    assert page_receipt_hash(receipt) == receipt["receiptHash"]
    keys = client.get("/.well-known/trigguard/keys.json").json()["keys"]
    pem = next(k["publicKeyPem"] for k in keys if k["keyId"] == receipt["authorityKeyId"])
    page_verify_signature(receipt, pem)
    normalized = {"tenant": "demo", "surface": "payment.execute", "action": None,
                  "actorId": "agent-7",
                  "context": {"amount": 250, "currency": "EUR",
                              "beneficiary": "Acme Office Supplies"},
                  "signals": {"risk_score": 12}, "subjectDigest": None}
    assert receipt["requestHash"] == hashlib.sha256(page_canonical_json(normalized)).hexdigest()

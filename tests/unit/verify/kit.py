"""Real evidence for the verifier tests, built with protocol functions only (no server).

Keys documents, receipts, tokens and bundles here have the exact shapes the
gateway produces (server/gateway.py::keys_document, server/transparency.py::
build_bundle), rebuilt independently so the verifier is tested against the
format, not against the server's code.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from execguard.protocol.checkpoint import Checkpoint, sign_checkpoint, verifier_key
from execguard.protocol.logentry import leaf_record, receipt_leaf_hash
from execguard.protocol.merkle import MemoryTree
from execguard.protocol.receipt import seal_receipt
from execguard.protocol.signing import Signer
from execguard.protocol.token import execution_token_claims, issue_execution_token

#: The PROTOCOL.md example key (seed 00 01 … 1f), the key it rotated to, and a stranger's.
OLD = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
NEW = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64))))
STRANGER = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96))))

AUTHORITY = "execguard"
TENANT = "demo"
SURFACE = "payment.execute"
REQUEST_HASH = "ff47c3cea894e71a5d9d4db1864b8b4263b887f1002a523882b84f8c86d685e6"
POLICY_VERSION = "5d41402abc4b2a76b9719d911017c592ae2b9f6c1d1e0c4c5e2b3a4f5e6d7c8b"
EXECUTION_ID = "3f2b8c1e-9a4d-4e7b-8c1f-2d6e5a7b9c01"
#: 2026-11-26T22:30:00Z, the issue time of every test token.
ISSUED_AT = 1_795_732_200
TTL = 60
BUNDLE_FORMAT = "execguard-bundle/1"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def key_entry(signer: Signer, status: str = "active", *,
              authority: str = AUTHORITY) -> dict[str, Any]:
    """One entry of ``keys``, as ``Gateway.keys_document`` writes it."""
    return {"keyId": signer.key_id, "algorithm": "Ed25519", "publicKeyPem": signer.public_pem,
            "status": status, "noteVerifierKey": verifier_key(authority, signer.public_key)}


def keys_document(*entries: dict[str, Any], authority: str | None = AUTHORITY) -> dict[str, Any]:
    """A keys document; by default the single active key :data:`NEW`."""
    document: dict[str, Any] = {"protocol": "execguard/1",
                                "keys": list(entries) or [key_entry(NEW)]}
    if authority is not None:
        document["authority"] = authority
    return document


def rotated_document() -> dict[str, Any]:
    """Two keys: :data:`OLD` retired, :data:`NEW` active."""
    return keys_document(key_entry(OLD, "retired"), key_entry(NEW))


def decision_receipt(index: int, signer: Signer, **fields: Any) -> dict[str, Any]:
    """A sealed decision receipt at log index ``index``."""
    unsealed = {
        "receiptType": "decision", "executionId": f"{EXECUTION_ID[:-2]}{index:02d}",
        "decision": "PERMIT", "surface": SURFACE, "actorId": "agent-7",
        "timestamp": f"2026-11-26T22:30:{index % 60:02d}.123Z", "requestHash": REQUEST_HASH,
        "policyVersion": POLICY_VERSION, "reasonCode": "WITHIN_LIMIT",
        "determiningPolicies": ["payment-within-limit"], "executionMode": "enforce",
        "wouldDecision": None, "protocolVersion": "execguard/1", "authorityId": AUTHORITY,
        "subjectDigest": None, "logIndex": index, **fields,
    }
    return seal_receipt(unsealed, signer)


def token_claims(**overrides: Any) -> dict[str, Any]:
    claims = execution_token_claims(
        issuer=AUTHORITY, tenant=TENANT, surface=SURFACE, request_hash=REQUEST_HASH,
        execution_id=EXECUTION_ID, actor_id="agent-7", policy_version=POLICY_VERSION,
        issued_at=ISSUED_AT, ttl_seconds=TTL)
    claims.update(overrides)
    return claims


def token(signer: Signer = NEW, **overrides: Any) -> str:
    """A permit issued exactly as the gateway issues one."""
    return issue_execution_token(token_claims(**overrides), signer)


class Log:
    """One tenant's log: receipts and the Merkle tree of their leaves."""

    def __init__(self, tenant: str = TENANT) -> None:
        self.tenant = tenant
        self.receipts: list[dict[str, Any]] = []
        self.tree = MemoryTree()

    def append(self, signer: Signer, **fields: Any) -> dict[str, Any]:
        receipt = decision_receipt(self.tree.size, signer, **fields)
        self.tree.append(receipt_leaf_hash(self.tenant, receipt))
        self.receipts.append(receipt)
        return receipt

    def checkpoint(self, signer: Signer, size: int | None = None, *,
                   origin: str | None = None, name: str = AUTHORITY) -> str:
        size = self.tree.size if size is None else size
        return sign_checkpoint(
            Checkpoint(origin or f"{AUTHORITY}/{self.tenant}", size, self.tree.root(size)),
            name, signer)

    def bundle(self, index: int, signer: Signer = NEW, size: int | None = None,
               **checkpoint_args: Any) -> dict[str, Any]:
        """A bundle shaped like ``server.transparency.build_bundle``'s."""
        size = self.tree.size if size is None else size
        receipt = self.receipts[index]
        return {
            "format": BUNDLE_FORMAT,
            "tenant": self.tenant,
            "receipt": receipt,
            "leaf": leaf_record(self.tenant, receipt),
            "inclusionProof": {"index": index, "treeSize": size,
                               "hashes": [b64(h) for h in self.tree.inclusion_proof(index, size)]},
            "checkpoint": self.checkpoint(signer, size, **checkpoint_args),
        }


def filled_log(entries: int = 5, signer: Signer = NEW, tenant: str = TENANT) -> Log:
    log = Log(tenant)
    for _ in range(entries):
        log.append(signer)
    return log


def compact_json(value: Any) -> str:
    """JSON with no insignificant white space: every byte of it means something."""
    return json.dumps(value, separators=(",", ":"))

import base64
import copy

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from execguard.protocol.canonical import canonical_json, sha256_hex
from execguard.protocol.errors import (
    ReceiptHashMismatch,
    SignatureInvalid,
    VerificationError,
)
from execguard.protocol.receipt import check_receipt, receipt_hash, seal_receipt
from execguard.protocol.signing import Signer
from execguard.protocol.token import execution_token_claims, issue_execution_token

FIXED = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))

FIELDS = {
    "receiptType": "decision", "executionId": "0b7d5c1e-0000-4000-8000-000000000001",
    "decision": "PERMIT", "surface": "payment.execute", "actorId": "agent-7",
    "timestamp": "2026-11-26T22:30:00.123Z", "requestHash": "ab" * 32,
    "policyVersion": "cd" * 32, "reasonCode": "WITHIN_LIMIT",
    "determiningPolicies": ["payment-permit"], "executionMode": "enforce",
    "wouldDecision": None, "protocolVersion": "execguard/1", "authorityId": "execguard",
    "subjectDigest": None, "logIndex": 0,
}


def test_hash_recipe_known_answer() -> None:
    sealed = seal_receipt(FIELDS, FIXED)
    # The recipe, by hand: JCS of everything but the three seal fields, SHA-256, hex.
    assert sealed["receiptHash"] == sha256_hex(canonical_json(FIELDS))
    assert receipt_hash(sealed) == sealed["receiptHash"]
    # Ed25519 is deterministic: the same key and hash always give these bytes.
    signature = base64.b64decode(sealed["authoritySignature"], validate=True)
    assert len(signature) == 64
    FIXED.public_key.verify(signature, bytes.fromhex(sealed["receiptHash"]))
    assert sealed["authorityKeyId"] == FIXED.key_id and FIXED.key_id.startswith("eg-")
    assert seal_receipt(FIELDS, FIXED) == sealed


def test_sealed_receipt_checks() -> None:
    sealed = seal_receipt(FIELDS, FIXED)
    assert check_receipt(sealed, FIXED.public_key) == sealed["receiptHash"]


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_editing_any_field_fails_the_recipe(field: str) -> None:
    sealed = seal_receipt(FIELDS, FIXED)
    tampered = copy.deepcopy(sealed)
    tampered[field] = "DENY" if tampered[field] != "DENY" else "PERMIT"
    with pytest.raises(ReceiptHashMismatch):
        check_receipt(tampered, FIXED.public_key)


def test_adding_a_field_fails_the_recipe() -> None:
    tampered = {**seal_receipt(FIELDS, FIXED), "approvedBy": "mallory"}
    with pytest.raises(ReceiptHashMismatch):
        check_receipt(tampered, FIXED.public_key)


def test_signature_of_another_key_or_altered_bytes_fails() -> None:
    sealed = seal_receipt(FIELDS, FIXED)
    with pytest.raises(SignatureInvalid):
        check_receipt(sealed, Signer.generate().public_key)
    raw = bytearray(base64.b64decode(sealed["authoritySignature"]))
    raw[0] ^= 1
    with pytest.raises(SignatureInvalid):
        check_receipt({**sealed, "authoritySignature": base64.b64encode(raw).decode()},
                      FIXED.public_key)
    with pytest.raises(VerificationError):
        check_receipt({**sealed, "authoritySignature": "not base64!"}, FIXED.public_key)
    with pytest.raises(VerificationError):
        check_receipt({**sealed, "receiptHash": sealed["receiptHash"].upper()},
                      FIXED.public_key)


def test_execution_token_carries_documented_claims() -> None:
    claims = execution_token_claims(
        issuer="execguard", tenant="demo", surface="payment.execute", request_hash="ab" * 32,
        execution_id="e1", actor_id="agent-7", policy_version="cd" * 32,
        issued_at=1_800_000_000, ttl_seconds=60)
    token = issue_execution_token(claims, FIXED)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == FIXED.key_id
    decoded = jwt.decode(token, FIXED.public_key, algorithms=["EdDSA"], audience="payment.execute",
                         options={"verify_exp": False, "verify_iat": False,
                                  "verify_nbf": False})
    assert decoded == claims
    assert decoded["exp"] - decoded["iat"] == 60
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, Signer.generate().public_key, algorithms=["EdDSA"],
                   audience="payment.execute", options={"verify_exp": False})

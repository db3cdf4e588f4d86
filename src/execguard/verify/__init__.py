"""Offline verification: trust nothing but a pinned keys document.

    keys = KeySet.from_document(json.load(open("keys.json")))

    # an enforcement point, right before it executes the action:
    permit = verify_execution_token(token, keys, now=time.time(),
                                    surface="payment.execute", request_hash=digest)

    receipt = verify_receipt(extract_receipt(response), keys)   # hash recipe + signature
    proven = verify_bundle(json.load(open("bundle.json")), keys)  # + in the signed log

    kind, evidence = classify_evidence(text)   # "token", "bundle" or "receipt"

Every verifier returns a typed result or raises :class:`VerificationError`
(``execguard.protocol.errors``) saying which check failed; none returns a bool.
"""

from execguard.verify.bundle import BUNDLE_FORMAT, BundleMalformed, VerifiedBundle, verify_bundle
from execguard.verify.evidence import classify_evidence
from execguard.verify.keys import KeySet, PublishedKey
from execguard.verify.receipt import VerifiedReceipt, extract_receipt, verify_receipt
from execguard.verify.token import (
    TokenExpired,
    TokenInvalid,
    TokenMismatch,
    TokenNotYetValid,
    TokenSignatureInvalid,
    VerifiedToken,
    verify_execution_token,
)

__all__ = [
    "BUNDLE_FORMAT",
    "BundleMalformed",
    "KeySet",
    "PublishedKey",
    "TokenExpired",
    "TokenInvalid",
    "TokenMismatch",
    "TokenNotYetValid",
    "TokenSignatureInvalid",
    "VerifiedBundle",
    "VerifiedReceipt",
    "VerifiedToken",
    "classify_evidence",
    "extract_receipt",
    "verify_bundle",
    "verify_execution_token",
    "verify_receipt",
]

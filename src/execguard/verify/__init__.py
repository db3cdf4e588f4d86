"""Offline verification: trust nothing but pinned public keys.

    keys = KeySet.from_document(json.load(open("keys.json")))
    verified = verify_receipt(receipt, keys)    # raises VerificationError if not valid
"""

from execguard.verify.receipt import KeySet, VerifiedReceipt, extract_receipt, verify_receipt

__all__ = ["KeySet", "VerifiedReceipt", "extract_receipt", "verify_receipt"]

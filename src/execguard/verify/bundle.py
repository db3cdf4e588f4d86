"""Offline verification of a receipt bundle: receipt + inclusion proof + signed checkpoint.

A bundle (``GET /executions/{id}/bundle``) lets anyone holding the pinned keys
document check, without the server, that a receipt is genuine *and* recorded
in the tenant's append-only log at the position it claims::

    {"format": "execguard-bundle/1", "tenant": "demo", "receipt": {...},
     "leaf": {...}, "inclusionProof": {"index": 7, "treeSize": 12, "hashes": [...]},
     "checkpoint": "<signed note>"}

Nothing in the bundle is taken on its word: the leaf is recomputed from the
receipt, the root comes only from the signed checkpoint, and the checkpoint
only counts if a pinned key signed it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from execguard.protocol.canonical import canonical_json
from execguard.protocol.checkpoint import Checkpoint, open_checkpoint
from execguard.protocol.errors import CanonicalizationError, VerificationError
from execguard.protocol.logentry import leaf_record, receipt_leaf_hash
from execguard.protocol.merkle import HASH_SIZE, verify_inclusion
from execguard.verify.keys import KeySet
from execguard.verify.receipt import VerifiedReceipt, verify_receipt

__all__ = ["BUNDLE_FORMAT", "BundleMalformed", "VerifiedBundle", "decode_hash", "verify_bundle"]

#: The ``format`` of the only bundle version this verifier understands.
BUNDLE_FORMAT = "execguard-bundle/1"

# A versioned format has a closed field set: an unknown (or misspelt) field is refused,
# so that no byte of a bundle can change without verification noticing.
_REQUIRED = frozenset({"format", "tenant", "receipt", "inclusionProof", "checkpoint"})
_OPTIONAL = frozenset({"leaf"})
_PROOF_FIELDS = frozenset({"index", "treeSize", "hashes"})

_STEPS = {1: "format", 2: "receipt", 3: "leaf", 4: "checkpoint", 5: "inclusion"}


class BundleMalformed(VerificationError):
    """The bundle is not ``execguard-bundle/1``, or its parts contradict one another."""

    code = "bundle_malformed"

    def __init__(self, step: int, reason: str) -> None:
        self.step, self.reason = step, reason
        super().__init__(f"bundle step {step} ({_STEPS[step]}): {reason}")


@dataclass(frozen=True)
class VerifiedBundle:
    """A receipt proven to be entry ``index`` of a log whose signed checkpoint covers it."""

    receipt: VerifiedReceipt
    tenant: str
    checkpoint: Checkpoint
    index: int
    tree_size: int


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_shape(bundle: Any) -> None:
    """Step 1: the format, and every field present with its type."""
    if not isinstance(bundle, Mapping):
        raise BundleMalformed(1, "a bundle is a JSON object")
    if bundle.get("format") != BUNDLE_FORMAT:
        raise BundleMalformed(1, f"format is {bundle.get('format')!r}, "
                                 f"expected {BUNDLE_FORMAT!r}")
    missing = sorted(_REQUIRED - bundle.keys())
    unknown = sorted(set(bundle.keys()) - _REQUIRED - _OPTIONAL)
    if missing or unknown:
        raise BundleMalformed(1, f"missing fields {missing}, unknown fields {unknown}")
    if not isinstance(bundle["tenant"], str) or not bundle["tenant"]:
        raise BundleMalformed(1, "tenant is not a non-empty string")
    if not isinstance(bundle["receipt"], Mapping):
        raise BundleMalformed(1, "receipt is not an object")
    if not isinstance(bundle["checkpoint"], str):
        raise BundleMalformed(1, "checkpoint is not a signed note (text)")
    if "leaf" in bundle and not isinstance(bundle["leaf"], Mapping):
        raise BundleMalformed(1, "leaf is not an object")
    proof = bundle["inclusionProof"]
    if not isinstance(proof, Mapping) or set(proof.keys()) != _PROOF_FIELDS:
        raise BundleMalformed(1, "inclusionProof is not an object of exactly "
                                 "index, treeSize and hashes")
    if not _is_index(proof["index"]) or not _is_index(proof["treeSize"]):
        raise BundleMalformed(1, "inclusionProof index and treeSize are not integers >= 0")
    if not isinstance(proof["hashes"], list) or not all(
            isinstance(h, str) for h in proof["hashes"]):
        raise BundleMalformed(1, "inclusionProof hashes is not a list of strings")


def decode_hash(text: Any) -> bytes:
    """A hash from strict standard base64 of 32 bytes, in its one canonical spelling.

    A 32-byte value leaves 2 unused bits in the last base64 character; refusing
    other spellings makes every change to the text a change to the hash. Raises
    :class:`VerificationError` for anything else.
    """
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != HASH_SIZE or base64.b64encode(raw).decode("ascii") != text:
        raise VerificationError(f"not canonical base64 of {HASH_SIZE} bytes")
    return raw


def _decode_hash(text: str, position: int) -> bytes:
    try:
        return decode_hash(text)
    except VerificationError as exc:
        raise BundleMalformed(5, f"inclusionProof hashes[{position}] is {exc}") from None


def _note_step(exc: VerificationError, number: int) -> None:
    # Keep the protocol's own exception (callers catch e.g. InclusionProofInvalid by type),
    # and record in its traceback which step of the bundle check raised it.
    exc.add_note(f"while verifying a bundle, step {number} ({_STEPS[number]})")


def verify_bundle(bundle: Mapping[str, Any], keys: KeySet) -> VerifiedBundle:
    """Verify a bundle offline; return what it proves or raise :class:`VerificationError`.

    1. ``format`` is ``execguard-bundle/1``; every field is present and typed,
       and no unknown field is present (:class:`BundleMalformed`);
    2. the receipt verifies: hash recipe and signature under a pinned key, active
       or retired (:func:`verify_receipt`; ``ReceiptHashMismatch``,
       ``SignatureInvalid``, ``UnknownKey``);
    3. the leaf is recomputed from the receipt and the bundle's tenant; a ``leaf``
       carried by the bundle must equal it (:class:`BundleMalformed`);
    4. the checkpoint is a note signed by a pinned note verifier key, for the log
       ``<authority>/<tenant>`` (``UnknownNoteKey``, ``NoteSignatureInvalid``,
       ``CheckpointOriginMismatch``, ``CheckpointMalformed``);
    5. the proof is for the receipt's ``logIndex`` in the checkpoint's tree size
       (:class:`BundleMalformed`), and it leads from the leaf to the checkpoint's
       root (``InclusionProofInvalid``).
    """
    # 1. shape
    _check_shape(bundle)
    tenant: str = bundle["tenant"]
    proof: Mapping[str, Any] = bundle["inclusionProof"]
    # 2. the receipt
    try:
        verified = verify_receipt(bundle["receipt"], keys)
    except VerificationError as exc:
        _note_step(exc, 2)
        raise
    receipt = verified.receipt
    # 3. the leaf, from the receipt alone (never from the bundle's copy)
    index = receipt.get("logIndex")
    if not _is_index(index):
        raise BundleMalformed(3, "the receipt's logIndex is not an integer >= 0")
    try:
        leaf = receipt_leaf_hash(tenant, receipt)
        expected_leaf = canonical_json(leaf_record(tenant, receipt))
    except CanonicalizationError:
        # The receipt hashed, so only the tenant can lack a canonical form (a lone surrogate).
        raise BundleMalformed(3, "the tenant has no canonical JSON form") from None
    if "leaf" in bundle:
        try:
            carried = canonical_json(bundle["leaf"])
        except CanonicalizationError:
            carried = b""
        # Compare canonical bytes, not Python values (in Python 1 == 1.0 == True).
        if carried != expected_leaf:
            raise BundleMalformed(3, "the bundle's leaf is not the leaf recomputed from its "
                                     "receipt and tenant")
    # 4. the checkpoint, under the pinned keys only
    verifiers = keys.note_verifiers()
    if not verifiers:
        raise BundleMalformed(4, "the keys document has no authority and no noteVerifierKey, "
                                 "so no checkpoint can be trusted")
    expected_origin = f"{keys.authority}/{tenant}" if keys.authority is not None else None
    try:
        checkpoint = open_checkpoint(bundle["checkpoint"], verifiers, origin=expected_origin)
    except VerificationError as exc:
        _note_step(exc, 4)
        raise
    if expected_origin is None and not checkpoint.origin.endswith(f"/{tenant}"):
        raise BundleMalformed(4, f"checkpoint origin {checkpoint.origin!r} is not a log of "
                                 f"tenant {tenant!r}")
    # 5. the inclusion proof, against the signed root
    if proof["index"] != index:
        raise BundleMalformed(5, f"inclusionProof index {proof['index']} is not the "
                                 f"receipt's logIndex {index}")
    if proof["treeSize"] != checkpoint.size:
        raise BundleMalformed(5, f"inclusionProof treeSize {proof['treeSize']} is not the "
                                 f"checkpoint's size {checkpoint.size}")
    hashes = [_decode_hash(h, i) for i, h in enumerate(proof["hashes"])]
    try:
        verify_inclusion(leaf, index, checkpoint.size, hashes, checkpoint.root)
    except VerificationError as exc:
        _note_step(exc, 5)
        raise
    return VerifiedBundle(verified, tenant, checkpoint, index, checkpoint.size)

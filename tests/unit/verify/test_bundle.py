"""Receipt bundles: a receipt, its inclusion proof and a signed checkpoint, checked offline."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from execguard.protocol.checkpoint import (
    CheckpointOriginMismatch,
    NoteSignatureInvalid,
    UnknownNoteKey,
)
from execguard.protocol.errors import ReceiptHashMismatch, UnknownKey, VerificationError
from execguard.protocol.merkle import InclusionProofInvalid
from execguard.protocol.receipt import seal_receipt
from execguard.verify import BundleMalformed, KeySet, verify_bundle, verify_receipt
from tests.unit.verify.kit import (
    AUTHORITY,
    NEW,
    OLD,
    STRANGER,
    TENANT,
    Log,
    b64,
    compact_json,
    filled_log,
    key_entry,
    keys_document,
    rotated_document,
)

KEYS = KeySet.from_document(rotated_document())


def strict_json(text: str) -> Any:
    """Parse as the verifier's callers do: duplicate keys refused."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    return json.loads(text, object_pairs_hook=unique)


# --- what must verify ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 9])
def test_every_entry_of_a_log_verifies(size: int) -> None:
    log = filled_log(size)
    for index in range(size):
        verified = verify_bundle(log.bundle(index), KEYS)
        assert (verified.index, verified.tree_size, verified.tenant) == (index, size, TENANT)
        assert verified.checkpoint.origin == f"{AUTHORITY}/{TENANT}"
        assert verified.receipt.receipt_hash == log.receipts[index]["receiptHash"]


def test_an_older_checkpoint_covering_the_entry_verifies() -> None:
    log = filled_log(7)
    assert verify_bundle(log.bundle(2, size=3), KEYS).tree_size == 3


def test_a_bundle_without_its_optional_leaf_verifies() -> None:
    bundle = filled_log().bundle(1)
    del bundle["leaf"]
    verify_bundle(bundle, KEYS)


def test_rotation_a_retired_key_keeps_verifying_what_it_signed() -> None:
    log = Log()
    for _ in range(3):
        log.append(OLD)
    for _ in range(2):
        log.append(NEW)
    # the old key's receipts under the new key's checkpoint, and under its own old checkpoint
    for index, signer, size in [(1, NEW, 5), (1, OLD, 3), (4, NEW, 5)]:
        verified = verify_bundle(log.bundle(index, signer, size), KEYS)
        expected = "retired" if index < 3 else "active"
        assert verified.receipt.key_status == expected
        assert verify_receipt(log.receipts[index], KEYS).key_status == expected
    # and once the old key is gone from a document, nothing it signed verifies
    only_new = KeySet.from_document(keys_document(key_entry(NEW)))
    with pytest.raises(UnknownKey):
        verify_bundle(log.bundle(1, NEW, 5), only_new)
    with pytest.raises(UnknownNoteKey):
        verify_bundle(log.bundle(4, OLD, 5), only_new)


def test_without_authority_the_stated_note_keys_and_origin_suffix_decide() -> None:
    keys = KeySet.from_document(keys_document(key_entry(NEW), authority=None))
    log = filled_log()
    verify_bundle(log.bundle(0), keys)
    with pytest.raises(BundleMalformed, match="step 4"):
        verify_bundle(log.bundle(0, origin=f"{AUTHORITY}/other"), keys)


# --- tampering: every byte counts --------------------------------------------------------


def _changes(text: str, replacements: Any) -> Any:
    """Each single-character change of ``text`` that still parses as strict JSON."""
    for position, char in enumerate(text):
        for replacement in replacements(char):
            if replacement == char:
                continue
            changed = text[:position] + replacement + text[position + 1:]
            try:
                yield position, strict_json(changed)
            except ValueError:
                continue


def _assert_every_change_fails(replacements: Any, entries: int, index: int) -> int:
    text = compact_json(filled_log(entries).bundle(index))
    verify_bundle(strict_json(text), KEYS)
    tried = 0
    for position, changed in _changes(text, replacements):
        tried += 1
        try:
            verify_bundle(changed, KEYS)
        except VerificationError:
            continue
        pytest.fail(f"changing character {position} ({text[position - 10:position + 10]!r}) "
                    "still verifies")
    return tried


def _neighbours(char: str) -> list[str]:
    # Low-bit flips and the case flip reach every neighbouring base64 digit (unused bits),
    # every other digit of a number and every letter case of a field name.
    code = ord(char)
    return [chr(code ^ bit) for bit in (0x01, 0x02, 0x04, 0x20) if 0x20 <= code ^ bit < 0x7F]


def test_every_neighbouring_character_change_fails() -> None:
    assert _assert_every_change_fails(_neighbours, entries=5, index=2) > 3000


@pytest.mark.slow
def test_every_single_byte_change_fails() -> None:
    # Every ASCII byte at every position (a byte of 0x80 or more is not UTF-8 on its own).
    everything = [chr(code) for code in range(0x80)]
    assert _assert_every_change_fails(lambda _: everything, entries=2, index=1) > 90_000


# --- tampering: the attacks, one by one --------------------------------------------------


def test_an_edited_receipt_fails_at_the_receipt_step() -> None:
    bundle = filled_log().bundle(2)
    bundle["receipt"]["decision"] = "DENY"
    with pytest.raises(ReceiptHashMismatch) as caught:
        verify_bundle(bundle, KEYS)
    assert "step 2 (receipt)" in caught.value.__notes__[0]


def test_a_stated_leaf_that_is_not_the_receipts() -> None:
    bundle = filled_log().bundle(2)
    bundle["leaf"]["decision"] = "DENY"
    with pytest.raises(BundleMalformed, match=r"step 3 \(leaf\)"):
        verify_bundle(bundle, KEYS)


def test_a_checkpoint_signed_by_another_key() -> None:
    with pytest.raises(UnknownNoteKey):
        verify_bundle(filled_log().bundle(2, STRANGER), KEYS)


def test_a_checkpoint_signed_under_another_name() -> None:
    with pytest.raises(UnknownNoteKey):
        verify_bundle(filled_log().bundle(2, name="impostor"), KEYS)


def test_a_checkpoint_whose_signature_was_replaced() -> None:
    bundle = filled_log().bundle(2)
    forged = filled_log().checkpoint(STRANGER)
    # the pinned key's name and key id, with the stranger's signature bytes
    bundle["checkpoint"] = bundle["checkpoint"][:-90] + forged[-90:]
    with pytest.raises((NoteSignatureInvalid, UnknownNoteKey)):
        verify_bundle(bundle, KEYS)


def test_a_checkpoint_of_another_tenants_log() -> None:
    with pytest.raises(CheckpointOriginMismatch, match="execguard/demo"):
        verify_bundle(filled_log().bundle(2, origin=f"{AUTHORITY}/other"), KEYS)


def test_a_bundle_relabelled_for_another_tenant() -> None:
    bundle = filled_log().bundle(2)
    bundle["tenant"] = "other"
    del bundle["leaf"]
    with pytest.raises(CheckpointOriginMismatch):
        verify_bundle(bundle, KEYS)


def test_a_receipt_of_another_log_at_the_same_index() -> None:
    bundle = filled_log().bundle(2)
    other_log = Log("other")
    for _ in range(3):
        other_log.append(NEW, actorId="agent-9")
    # genuinely signed, at the index the proof is for, but never entered in this log
    bundle["receipt"] = other_log.receipts[2]
    del bundle["leaf"]
    with pytest.raises(InclusionProofInvalid, match="does not lead to the given root"):
        verify_bundle(bundle, KEYS)


def test_a_receipt_of_the_same_log_with_another_proof() -> None:
    log = filled_log()
    bundle = log.bundle(2)
    bundle["receipt"] = log.receipts[3]
    bundle["leaf"] = log.bundle(3)["leaf"]
    with pytest.raises(BundleMalformed, match="index 2 is not the receipt's logIndex 3"):
        verify_bundle(bundle, KEYS)
    bundle["inclusionProof"]["index"] = 3
    with pytest.raises(InclusionProofInvalid):
        verify_bundle(bundle, KEYS)


def test_a_proof_for_another_index() -> None:
    log = filled_log()
    bundle = log.bundle(2)
    bundle["inclusionProof"]["hashes"] = log.bundle(3)["inclusionProof"]["hashes"]
    with pytest.raises(InclusionProofInvalid):
        verify_bundle(bundle, KEYS)


def test_a_tree_size_other_than_the_checkpoints() -> None:
    log = filled_log(6)
    bundle = log.bundle(2, size=5)
    bundle["inclusionProof"] = log.bundle(2, size=6)["inclusionProof"]
    with pytest.raises(BundleMalformed, match="treeSize 6 is not the checkpoint's size 5"):
        verify_bundle(bundle, KEYS)


def test_a_checkpoint_that_does_not_cover_the_entry() -> None:
    log = filled_log(6)
    bundle = log.bundle(4)
    bundle["checkpoint"] = log.checkpoint(NEW, 3)
    bundle["inclusionProof"]["treeSize"] = 3
    with pytest.raises(InclusionProofInvalid, match="not below the tree size"):
        verify_bundle(bundle, KEYS)


def test_a_proof_hash_spelt_differently_is_refused() -> None:
    bundle = filled_log().bundle(2)
    first = bundle["inclusionProof"]["hashes"][0]
    for spelling in (first.rstrip("="), first + "\n", "=" + first[1:], b64(bytes(31))):
        bundle["inclusionProof"]["hashes"][0] = spelling
        with pytest.raises(BundleMalformed, match=r"hashes\[0\]"):
            verify_bundle(bundle, KEYS)


def test_without_any_note_key_no_checkpoint_is_trusted() -> None:
    entry = key_entry(NEW)
    del entry["noteVerifierKey"]
    keys = KeySet.from_document(keys_document(entry, authority=None))
    with pytest.raises(BundleMalformed, match="step 4"):
        verify_bundle(filled_log().bundle(0), keys)


# --- malformed bundles ----------------------------------------------------------------------


def _broken(change: Any) -> dict[str, Any]:
    bundle = copy.deepcopy(filled_log(3).bundle(1))
    change(bundle)
    return bundle


@pytest.mark.parametrize("change", [
    lambda b: b.update(format="execguard-bundle/2"),
    lambda b: b.pop("format"),
    lambda b: b.pop("checkpoint"),
    lambda b: b.pop("inclusionProof"),
    lambda b: b.update(extra=1),
    lambda b: b.update(tenant=""),
    lambda b: b.update(tenant=["demo"]),
    lambda b: b.update(receipt="{}"),
    lambda b: b.update(checkpoint=None),
    lambda b: b.update(leaf=[]),
    lambda b: b["inclusionProof"].update(index=True),
    lambda b: b["inclusionProof"].update(index=-1),
    lambda b: b["inclusionProof"].update(treeSize="3"),
    lambda b: b["inclusionProof"].update(hashes="abc"),
    lambda b: b["inclusionProof"].update(hashes=[None]),
    lambda b: b["inclusionProof"].pop("hashes"),
    lambda b: b["inclusionProof"].update(rootHash="x"),
])
def test_malformed_bundles_fail_at_step_one(change: Any) -> None:
    with pytest.raises(BundleMalformed, match=r"step 1 \(format\)"):
        verify_bundle(_broken(change), KEYS)


def test_not_a_mapping() -> None:
    with pytest.raises(BundleMalformed):
        verify_bundle([], KEYS)  # type: ignore[arg-type]


def test_a_signed_receipt_without_a_log_index() -> None:
    log = filled_log(3)
    bundle = log.bundle(1)
    bundle["receipt"] = seal_receipt({**log.receipts[1], "logIndex": "1"}, NEW)
    with pytest.raises(BundleMalformed, match="logIndex"):
        verify_bundle(bundle, KEYS)


def test_a_tenant_with_no_canonical_form() -> None:
    bundle = filled_log(3).bundle(1)
    bundle["tenant"] = "\ud800"
    with pytest.raises(BundleMalformed, match="canonical"):
        verify_bundle(bundle, KEYS)

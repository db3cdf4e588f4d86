"""The pinned keys document: authority, note verifier keys, self-contradicting documents."""

from __future__ import annotations

from typing import Any

import pytest

from execguard.protocol.checkpoint import verifier_key
from execguard.protocol.errors import UnknownKey, VerificationError
from execguard.verify import KeySet, PublishedKey
from execguard.verify import receipt as receipt_module
from tests.unit.verify.kit import (
    AUTHORITY,
    NEW,
    OLD,
    STRANGER,
    key_entry,
    keys_document,
    rotated_document,
)


def _entry(**changes: Any) -> dict[str, Any]:
    return {**key_entry(NEW), **changes}


def _without_note_key() -> dict[str, Any]:
    entry = key_entry(NEW)
    del entry["noteVerifierKey"]
    return entry


def test_document_keeps_authority_status_and_note_keys() -> None:
    keys = KeySet.from_document(rotated_document())
    assert keys.authority == AUTHORITY
    assert keys.get(OLD.key_id).status == "retired"
    assert keys.get(NEW.key_id).status == "active"
    assert keys.note_verifiers() == [verifier_key(AUTHORITY, OLD.public_key),
                                     verifier_key(AUTHORITY, NEW.public_key)]
    assert isinstance(keys.get(NEW.key_id), PublishedKey)


def test_receipt_module_still_exports_the_same_keyset() -> None:
    assert receipt_module.KeySet is KeySet


def test_note_key_is_derived_from_the_authority_when_not_stated() -> None:
    keys = KeySet.from_document(keys_document(_without_note_key()))
    assert keys.note_verifiers() == [verifier_key(AUTHORITY, NEW.public_key)]


def test_without_authority_or_note_key_there_are_no_note_verifiers() -> None:
    keys = KeySet.from_document(keys_document(_without_note_key(), authority=None))
    assert keys.authority is None
    assert keys.note_verifiers() == []


def test_without_authority_a_stated_note_key_is_kept() -> None:
    keys = KeySet.from_document(keys_document(key_entry(NEW), authority=None))
    assert keys.authority is None
    assert keys.note_verifiers() == [verifier_key(AUTHORITY, NEW.public_key)]


def test_unknown_key_id() -> None:
    with pytest.raises(UnknownKey, match=STRANGER.key_id):
        KeySet.from_document(keys_document()).get(STRANGER.key_id)


@pytest.mark.parametrize(("document", "message"), [
    ({}, "no 'keys' list"),
    ({"keys": []}, "lists no keys"),
    ({"keys": ["x"]}, "not an object"),
    (keys_document(_entry(publicKeyPem=None)), "lacks keyId or publicKeyPem"),
    (keys_document(_entry(algorithm="RS256")), "not an Ed25519 key"),
    (keys_document(_entry(status=1)), "status"),
    (keys_document(_entry(keyId=OLD.key_id)), "not the id of its publicKeyPem"),
    (keys_document(key_entry(NEW), key_entry(NEW)), "listed twice"),
    (keys_document(authority=""), "authority"),
    (keys_document(_without_note_key(), authority="exec guard"), "cannot name a note key"),
    # a note key for another key would let an unpinned key sign checkpoints
    (keys_document(_entry(noteVerifierKey=verifier_key(AUTHORITY, STRANGER.public_key))),
     "another public key"),
    (keys_document(_entry(noteVerifierKey=verifier_key("other", NEW.public_key))),
     "names 'other'"),
    (keys_document(_entry(noteVerifierKey="execguard+00000000+AAAA")), "invalid"),
    (keys_document(_entry(noteVerifierKey=7)), "not a string"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_malformed_documents_are_refused(document: Any, message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        KeySet.from_document(document)

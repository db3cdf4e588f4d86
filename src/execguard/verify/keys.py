"""The pinned keys document (docs/PROTOCOL.md §4): the only thing a verifier trusts.

A :class:`KeySet` is built once from the keys document a relying party pinned
(a file, or a copy fetched out of band). Every verifier in this package takes
one and trusts nothing else: not a key embedded in the evidence, not a name.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from execguard.protocol.checkpoint import NoteArgumentError, parse_verifier_key, verifier_key
from execguard.protocol.errors import UnknownKey, VerificationError
from execguard.protocol.signing import key_id_for, load_public_key_pem

__all__ = ["KeySet", "PublishedKey"]


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublishedKey:
    """One key of a keys document.

    ``note_verifier_key`` is the signed-note verifier key string
    (``<authority>+<hash>+<key>``) under which this key signs checkpoints, or
    ``None`` when the document neither states one nor names its authority.
    """

    key_id: str
    public_key: Ed25519PublicKey
    status: str
    note_verifier_key: str | None = None


class KeySet:
    """The keys of a keys document, with the authority that publishes them.

    ``{"protocol", "authority", "keys": [{keyId, algorithm, publicKeyPem, status,
    noteVerifierKey}]}``. Retired keys stay: what they signed keeps verifying.
    """

    def __init__(self, keys: Mapping[str, PublishedKey], authority: str | None = None) -> None:
        self.keys = dict(keys)
        self._authority = authority

    @property
    def authority(self) -> str | None:
        """The document's ``authority`` (the checkpoint signer name), or ``None`` if absent."""
        return self._authority

    @classmethod
    def from_document(cls, document: Any) -> KeySet:
        """Parse a keys document; refuse anything malformed or self-contradictory.

        A document that disagrees with itself (a key id that is not the key's,
        a note verifier key for another key or authority, the same id twice) is
        refused rather than half-used: it was not produced by a gateway.
        """
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            raise VerificationError("the keys document has no 'keys' list")
        authority = document.get("authority")
        if authority is not None and (not isinstance(authority, str) or not authority):
            raise VerificationError("the keys document's 'authority' is not a non-empty string")
        keys: dict[str, PublishedKey] = {}
        for position, item in enumerate(document["keys"]):
            key = _published_key(position, item, authority)
            if key.key_id in keys:
                raise VerificationError(f"key {key.key_id!r} is listed twice in the keys document")
            keys[key.key_id] = key
        if not keys:
            raise VerificationError("the keys document lists no keys")
        return cls(keys, authority)

    def get(self, key_id: str) -> PublishedKey:
        """The key with this id; :class:`UnknownKey` if it is not pinned."""
        try:
            return self.keys[key_id]
        except KeyError:
            raise UnknownKey(key_id) from None

    def note_verifiers(self) -> list[str]:
        """The verifier key strings that may sign checkpoints (active and retired keys)."""
        return [k.note_verifier_key for k in self.keys.values() if k.note_verifier_key]


def _published_key(position: int, item: Any, authority: str | None) -> PublishedKey:
    """One entry of ``keys``, checked against itself and the document's authority."""
    if not isinstance(item, Mapping):
        raise VerificationError(f"keys[{position}] is not an object")
    key_id, pem = item.get("keyId"), item.get("publicKeyPem")
    if not isinstance(key_id, str) or not isinstance(pem, str):
        raise VerificationError(f"keys[{position}] lacks keyId or publicKeyPem")
    if item.get("algorithm", "Ed25519") != "Ed25519":
        raise VerificationError(f"key {key_id!r} is not an Ed25519 key")
    status = item.get("status", "active")
    if not isinstance(status, str):
        raise VerificationError(f"key {key_id!r} has a status that is not a string")
    public_key = load_public_key_pem(pem)
    # PROTOCOL.md §4 defines keyId from the key; a mismatch means a hand-edited document.
    if key_id != key_id_for(public_key):
        raise VerificationError(f"keyId {key_id!r} is not the id of its publicKeyPem")
    return PublishedKey(key_id, public_key, status,
                        _note_verifier_key(key_id, public_key, item.get("noteVerifierKey"),
                                           authority))


def _note_verifier_key(key_id: str, public_key: Ed25519PublicKey, stated: Any,
                       authority: str | None) -> str | None:
    """The stated ``noteVerifierKey`` if it is this key's, else the one derived from authority."""
    if stated is None:
        if authority is None:
            return None
        try:
            return verifier_key(authority, public_key)
        except NoteArgumentError as exc:
            raise VerificationError(f"authority {authority!r} cannot name a note key: "
                                    f"{exc}") from None
    if not isinstance(stated, str):
        raise VerificationError(f"key {key_id!r}: noteVerifierKey is not a string")
    try:
        name, _, note_key = parse_verifier_key(stated)
    except NoteArgumentError as exc:
        raise VerificationError(f"key {key_id!r}: noteVerifierKey is invalid: {exc}") from None
    # Checkpoints must be signed by the very key the PEM pins, under the authority's name;
    # anything else would let the document smuggle in a second, unpinned signer.
    if not hmac.compare_digest(_raw(note_key), _raw(public_key)):
        raise VerificationError(f"key {key_id!r}: noteVerifierKey is for another public key")
    if authority is not None and name != authority:
        raise VerificationError(f"key {key_id!r}: noteVerifierKey names {name!r}, "
                                f"but the document's authority is {authority!r}")
    return stated

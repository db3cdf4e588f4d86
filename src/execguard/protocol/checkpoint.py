"""Checkpoints (c2sp.org/tlog-checkpoint) in signed notes (c2sp.org/signed-note), Ed25519.

A checkpoint is the signed head of the log::

    execguard.example/demo
    42
    <base64 of the 32-byte RFC 9162 root>

    — execguard.example/demo <base64(4-byte key ID || 64-byte Ed25519 signature)>

Building (:func:`sign_note`, :class:`Checkpoint`, :func:`verifier_key`) raises
:class:`NoteArgumentError`, a ``ValueError``, on values that have no valid
encoding. Reading (:func:`open_note`, :meth:`Checkpoint.from_text`,
:func:`open_checkpoint`) raises :class:`~execguard.protocol.errors.VerificationError`
subclasses: the text is untrusted until it has been opened.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from execguard.protocol.errors import (
    ExecGuardError,
    SignatureInvalid,
    VerificationError,
)
from execguard.protocol.signing import Signer, verify_ed25519

__all__ = [
    "MAX_SIGNATURES",
    "SIGNATURE_TYPE_ED25519",
    "Checkpoint",
    "CheckpointMalformed",
    "CheckpointOriginMismatch",
    "NoteArgumentError",
    "NoteMalformed",
    "NoteSignatureInvalid",
    "UnknownNoteKey",
    "Verifiers",
    "note_key_hash",
    "open_checkpoint",
    "open_note",
    "parse_verifier_key",
    "sign_checkpoint",
    "sign_note",
    "verifier_key",
]

#: signed-note "Signature types": 0x01 is Ed25519 over the note text.
SIGNATURE_TYPE_ED25519 = 0x01

#: signed-note: verifiers SHOULD cap the signature count and MUST accept at least 16.
MAX_SIGNATURES = 100

#: Trusted keys: name -> public key, or verifier key strings ``name+hash+key``.
Verifiers = Mapping[str, Ed25519PublicKey] | Iterable[str]

# signed-note "Format": em dash (U+2014), space, key name, space, base64 signature.
_SIG_PREFIX = "\u2014 "
_HASH_SIZE = 32
_MAX_TREE_SIZE = 2**64 - 1  # tree sizes are uint64 in every implementation we interoperate with
_SIZE_RE = re.compile(r"0|[1-9][0-9]*")  # tlog-checkpoint: no leading zeroes unless "0"
_KEY_HASH_RE = re.compile(r"[0-9a-fA-F]{8}")


class NoteArgumentError(ExecGuardError, ValueError):
    """A note, checkpoint or key cannot be built from these values (a caller bug)."""

    code = "invalid_note_argument"


class NoteMalformed(VerificationError):
    """The signed note does not follow c2sp.org/signed-note."""

    code = "note_malformed"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed signed note: {reason}")


class NoteSignatureInvalid(SignatureInvalid):
    """A signature line of a trusted key (name and key ID match) does not verify."""

    code = "note_signature_invalid"

    def __init__(self, name: str) -> None:
        super().__init__(name, "note")


class UnknownNoteKey(VerificationError):
    """No signature on the note is from a trusted key."""

    code = "unknown_note_key"

    def __init__(self, signers: list[str]) -> None:
        self.signers = signers
        named = ", ".join(repr(s) for s in signers) or "nobody"
        super().__init__(f"the note has no signature from a trusted key (signed by {named})")


class CheckpointMalformed(VerificationError):
    """The note text is not a c2sp.org/tlog-checkpoint body."""

    code = "checkpoint_malformed"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed checkpoint: {reason}")


class CheckpointOriginMismatch(VerificationError):
    """The checkpoint is from another log than the one expected."""

    code = "checkpoint_origin_mismatch"

    def __init__(self, expected: str, got: str) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"checkpoint origin is {got!r}, expected {expected!r}")


# --- shared text rules -------------------------------------------------------------------------


def _text_problem(text: str) -> str | None:
    """signed-note: valid UTF-8, no ASCII control characters other than newline."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    for ch in text:
        if ch < "\x20" and ch != "\n":
            return f"control character U+{ord(ch):04X}"
    return None


def _name_problem(name: str) -> str | None:
    """signed-note: key names are non-empty, with no Unicode spaces and no plus (U+002B)."""
    if not isinstance(name, str) or not name:
        return "the key name is empty or not text"
    if any(ch.isspace() for ch in name) or "+" in name:
        return f"key name {name!r} contains a space or a plus"
    return _text_problem(name)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64decode_canonical(text: str) -> bytes | None:
    """Standard padded base64, and only its canonical spelling.

    Re-encoding rejects spellings that differ only in the unused low bits of the
    last character, so that every change to a signature or root is a change to
    the decoded bytes.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    return raw if _b64(raw) == text else None


def _raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    if not isinstance(public_key, Ed25519PublicKey):
        raise NoteArgumentError("only Ed25519 public keys are supported")
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- keys ----------------------------------------------------------------------------------------


def note_key_hash(name: str, public_key: Ed25519PublicKey) -> bytes:
    """signed-note "Ed25519 signatures": SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    problem = _name_problem(name)
    if problem:
        raise NoteArgumentError(problem)
    material = bytes([SIGNATURE_TYPE_ED25519]) + _raw_public_key(public_key)
    return hashlib.sha256(name.encode("utf-8") + b"\n" + material).digest()[:4]


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The verifier key string ``<name>+<8 hex key ID>+<base64(0x01 || key)>``."""
    material = bytes([SIGNATURE_TYPE_ED25519]) + _raw_public_key(public_key)
    return f"{name}+{note_key_hash(name, public_key).hex()}+{_b64(material)}"


def parse_verifier_key(text: str) -> tuple[str, bytes, Ed25519PublicKey]:
    """Parse ``<name>+<hash>+<key>``: return (name, 4-byte key ID, public key).

    The key ID must be the one the name and key hash to. Names hold no plus, but
    base64 may, so only the first two pluses separate fields.
    """
    parts = text.split("+", 2) if isinstance(text, str) else []
    if len(parts) != 3:
        raise NoteArgumentError("a verifier key is <name>+<hash>+<base64 key>")
    name, hash_hex, key_b64 = parts
    problem = _name_problem(name)
    if problem:
        raise NoteArgumentError(f"verifier key: {problem}")
    if not _KEY_HASH_RE.fullmatch(hash_hex):
        raise NoteArgumentError(f"verifier key {name!r}: the key ID is not 8 hex digits")
    material = _b64decode_canonical(key_b64)
    if material is None or len(material) != 33 or material[0] != SIGNATURE_TYPE_ED25519:
        raise NoteArgumentError(
            f"verifier key {name!r}: the key is not base64 of 0x01 || a 32-byte Ed25519 key")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(material[1:])
    except ValueError as exc:
        raise NoteArgumentError(f"verifier key {name!r}: {exc}") from exc
    key_hash = bytes.fromhex(hash_hex)
    if note_key_hash(name, public_key) != key_hash:
        raise NoteArgumentError(f"verifier key {name!r}: key ID {hash_hex} does not match the key")
    return name, key_hash, public_key


def _trusted(verifiers: Verifiers) -> dict[tuple[str, bytes], Ed25519PublicKey]:
    """Index trusted keys by (name, key ID): signed-note identifies a key by both."""
    table: dict[tuple[str, bytes], Ed25519PublicKey] = {}
    if isinstance(verifiers, Mapping):
        for name, key in verifiers.items():
            table[(name, note_key_hash(name, key))] = key
    else:
        for vkey in [verifiers] if isinstance(verifiers, str) else verifiers:
            name, key_hash, key = parse_verifier_key(vkey)
            table[(name, key_hash)] = key
    if not table:
        raise NoteArgumentError("no trusted keys were given, so no note can verify")
    return table


# --- notes ---------------------------------------------------------------------------------------


def sign_note(text: str, name: str, signer: Signer) -> str:
    """Sign ``text`` (which must end in a newline) as ``name``; return the signed note."""
    if not isinstance(text, str) or not text.endswith("\n"):
        raise NoteArgumentError("note text must end in a newline")
    problem = _text_problem(text)
    if problem:
        raise NoteArgumentError(f"note text: {problem}")
    key_hash = note_key_hash(name, signer.public_key)
    # signed-note: the signature covers the note text including its final newline.
    signature = signer.sign(text.encode("utf-8"))
    return f"{text}\n{_SIG_PREFIX}{name} {_b64(key_hash + signature)}\n"


def open_note(signed: str, verifiers: Verifiers) -> tuple[str, list[str]]:
    """Check a signed note; return (note text, names of trusted keys whose signatures verified).

    Signatures of unknown keys are ignored. Raises :class:`NoteMalformed`,
    :class:`NoteSignatureInvalid` (a trusted key's signature fails) or
    :class:`UnknownNoteKey` (no trusted key signed).
    """
    trusted = _trusted(verifiers)
    if not isinstance(signed, str):
        raise NoteMalformed("a signed note is text")
    problem = _text_problem(signed)
    if problem:
        raise NoteMalformed(problem)
    # signed-note: "the text is separated from the signatures by the last empty line".
    split = signed.rfind("\n\n")
    if split < 0:
        raise NoteMalformed("no blank line between the text and the signatures")
    text, block = signed[: split + 1], signed[split + 2:]
    if not block:
        raise NoteMalformed("no signature lines after the blank line")
    if not block.endswith("\n"):
        raise NoteMalformed("the last signature line does not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteMalformed(f"more than {MAX_SIGNATURES} signatures")
    message = text.encode("utf-8")
    verified: list[str] = []
    signers: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.startswith(_SIG_PREFIX):
            raise NoteMalformed(f"signature line {number} does not start with an em dash and space")
        name, space, sig_b64 = line[len(_SIG_PREFIX):].partition(" ")
        problem = _name_problem(name)
        if not space or problem:
            reason = problem or "no signature after the name"
            raise NoteMalformed(f"signature line {number}: {reason}")
        blob = _b64decode_canonical(sig_b64)
        # 4-byte key ID plus at least one byte of signature.
        if blob is None or len(blob) < 5:
            raise NoteMalformed(f"signature line {number}: the signature is not valid base64")
        signers.append(name)
        key = trusted.get((name, blob[:4]))
        if key is None:
            # signed-note: "Verifiers MUST ignore signatures from unknown keys, even if they
            # share a name or ID (but not both) with a known key."
            continue
        # "If the key name and ID match a known key, verifiers MUST verify the signature."
        # "If a signature from a known key fails to verify, clients SHOULD reject the whole note."
        try:
            verify_ed25519(key, blob[4:], message, key_id=name, what="note")
        except SignatureInvalid:
            raise NoteSignatureInvalid(name) from None
        if name not in verified:
            verified.append(name)
    # "If no signature from a known key verifies successfully, clients MUST reject the note."
    if not verified:
        raise UnknownNoteKey(signers)
    return text, verified


# --- checkpoints ---------------------------------------------------------------------------------


def _checkpoint_problem(origin: object, size: object, root: object,
                        extensions: tuple[object, ...]) -> str | None:
    # tlog-checkpoint "Note text" 1: the origin is non-empty (we also refuse edge spaces,
    # which would not survive being copied into configuration).
    if not isinstance(origin, str) or not origin:
        return "the origin is empty"
    if origin.strip() != origin or "\n" in origin:
        return f"origin {origin!r} has leading or trailing whitespace or a newline"
    problem = _text_problem(origin)
    if problem:
        return f"origin: {problem}"
    # 2: the tree size, a non-negative integer (uint64 on the wire).
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_TREE_SIZE:
        return f"tree size {size!r} is not an integer in [0, 2**64)"
    # 3: the root hash of the RFC 6962 tree at that size: SHA-256 here.
    if not isinstance(root, bytes) or len(root) != _HASH_SIZE:
        return f"the root hash is not {_HASH_SIZE} bytes"
    # 4: extension lines are opaque, optional, and MUST be non-empty.
    for ext in extensions:
        if not isinstance(ext, str) or not ext or "\n" in ext:
            return f"extension line {ext!r} is empty or not a single line"
        problem = _text_problem(ext)
        if problem:
            return f"extension line: {problem}"
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin, tree size, root hash and optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", tuple(self.extensions))
        problem = _checkpoint_problem(self.origin, self.size, self.root, self.extensions)
        if problem:
            raise NoteArgumentError(f"checkpoint: {problem}")

    def to_text(self) -> str:
        """The note text: origin, size, base64 root, extension lines, each ending in newline."""
        lines = [self.origin, str(self.size), _b64(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text strictly; raise :class:`CheckpointMalformed`."""
        if not isinstance(text, str) or not text.endswith("\n"):
            raise CheckpointMalformed("the text does not end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointMalformed("fewer than three lines (origin, size, root)")
        origin, size_text, root_text, *extensions = lines
        if not _SIZE_RE.fullmatch(size_text):
            raise CheckpointMalformed(f"tree size {size_text!r} is not a decimal without "
                                      "leading zeroes")
        root = _b64decode_canonical(root_text)
        if root is None:
            raise CheckpointMalformed(f"root hash {root_text!r} is not standard base64")
        size = int(size_text)
        problem = _checkpoint_problem(origin, size, root, tuple(extensions))
        if problem:
            raise CheckpointMalformed(problem)
        return cls(origin, size, root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, name: str, signer: Signer) -> str:
    """The checkpoint as a signed note; tlog-checkpoint: ``name`` SHOULD be the origin."""
    return sign_note(checkpoint.to_text(), name, signer)


def open_checkpoint(signed: str, verifiers: Verifiers, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint and parse it; check its origin when one is given."""
    text, _ = open_note(signed, verifiers)
    checkpoint = Checkpoint.from_text(text)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointOriginMismatch(origin, checkpoint.origin)
    return checkpoint

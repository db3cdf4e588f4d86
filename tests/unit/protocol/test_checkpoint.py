"""C2SP checkpoints in signed notes: known answers, round trips, tampering, malformed notes."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from execguard.protocol.checkpoint import (
    MAX_SIGNATURES,
    Checkpoint,
    CheckpointMalformed,
    CheckpointOriginMismatch,
    NoteArgumentError,
    NoteMalformed,
    NoteSignatureInvalid,
    UnknownNoteKey,
    note_key_hash,
    open_checkpoint,
    open_note,
    parse_verifier_key,
    sign_checkpoint,
    sign_note,
    verifier_key,
)
from execguard.protocol.errors import ExecGuardError, SignatureInvalid, VerificationError
from execguard.protocol.signing import Signer

FIXED = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
OTHER = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64))))
ORIGIN = "execguard.example/demo"
# The RFC 6962 reference tree of 8 leaves (see test_merkle.py).
ROOT8 = bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
CP = Checkpoint(ORIGIN, 8, ROOT8)
VKEY = "execguard.example/demo+55a8e95c+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4"
SIGNED = (
    "execguard.example/demo\n"
    "8\n"
    "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n"
    "\n"
    "— execguard.example/demo VajpXIMEJ6sKnf4HuMx7JSraBqcaMBFQH8UMDlJFjEDw8tHeNZTP9y4eIyMKXux24U6M"
    "1vuDys0FdPEdmKaJaczLvgg=\n"
)

# golang.org/x/mod/sumdb/note's documented example: an independent implementation's bytes.
GO_SKEY_SEED = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_NOTE = (GO_TEXT + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1F"
           "FYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")


def _raw(signer: Signer) -> bytes:
    return signer.public_key.public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw)


# --- known answers -------------------------------------------------------------------------------


def test_signed_checkpoint_known_answer() -> None:
    assert CP.to_text() == f"{ORIGIN}\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n"
    assert verifier_key(ORIGIN, FIXED.public_key) == VKEY
    # Ed25519 is deterministic: the same key and text always give these bytes.
    assert sign_checkpoint(CP, ORIGIN, FIXED) == SIGNED
    assert open_checkpoint(SIGNED, [VKEY], origin=ORIGIN) == CP


def test_known_answer_by_the_spec_recipe() -> None:
    """Re-check SIGNED with hashlib and cryptography alone, following signed-note."""
    text, sig_line = SIGNED.split("\n\n")
    text += "\n"  # the note text includes its final newline, not the blank line
    assert sig_line.startswith("\u2014 ") and sig_line.endswith("\n")
    name, b64 = sig_line[2:-1].split(" ")
    blob = base64.b64decode(b64, validate=True)
    key_id = hashlib.sha256(name.encode() + b"\n\x01" + _raw(FIXED)).digest()[:4]
    assert blob[:4] == key_id == note_key_hash(ORIGIN, FIXED.public_key)
    assert len(blob) == 4 + 64
    FIXED.public_key.verify(blob[4:], text.encode())
    key_b64 = base64.b64encode(b"\x01" + _raw(FIXED)).decode()
    assert f"{name}+{key_id.hex()}+{key_b64}" == VKEY


def test_go_sumdb_note_example_byte_for_byte() -> None:
    go = Signer(Ed25519PrivateKey.from_private_bytes(GO_SKEY_SEED))
    assert verifier_key("PeterNeumann", go.public_key) == GO_VKEY
    assert sign_note(GO_TEXT, "PeterNeumann", go) == GO_NOTE
    assert open_note(GO_NOTE, GO_VKEY) == (GO_TEXT, ["PeterNeumann"])


# --- verifier keys -------------------------------------------------------------------------------


def test_parse_verifier_key_round_trip() -> None:
    name, key_hash, key = parse_verifier_key(VKEY)
    assert (name, key_hash) == (ORIGIN, bytes.fromhex("55a8e95c"))
    assert verifier_key(name, key) == VKEY
    # Base64 may hold a plus: only the first two pluses separate fields
    # (this key is from transparency-dev/formats' note tests).
    assert parse_verifier_key("TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6")[0] \
        == "TEST"


@pytest.mark.parametrize("bad", [
    "", ORIGIN, f"{ORIGIN}+55a8e95c", VKEY.replace("55a8e95c", "55a8e95d"),
    VKEY.replace("55a8e95c", "55a8e95"), VKEY.replace("+AQ", "+Ag"), VKEY[:-1], VKEY + "=",
    VKEY.replace(ORIGIN, "execguard.example/other"), VKEY.replace(ORIGIN, "a b"),
    "+" + VKEY.split("+", 1)[1],
])
def test_bad_verifier_keys(bad: str) -> None:
    with pytest.raises(NoteArgumentError, match="verifier key"):
        parse_verifier_key(bad)


# --- checkpoint text -----------------------------------------------------------------------------

# Origins: no spaces or controls at all (so none at the edges); extension lines: any text
# without ASCII controls, spaces included.
origins = st.text(st.characters(exclude_categories=("C", "Z")), min_size=1, max_size=30)
lines = st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs",)), min_size=1,
                max_size=20)


@given(origins, st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32),
       st.lists(lines, max_size=3))
def test_checkpoint_round_trip(origin: str, size: int, root: bytes, ext: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(ext))
    assert Checkpoint.from_text(cp.to_text()) == cp
    assert open_checkpoint(sign_checkpoint(cp, ORIGIN, FIXED), [VKEY]) == cp


def test_extensions_are_kept_in_order() -> None:
    cp = Checkpoint(ORIGIN, 0, bytes(32), ("ext one", "ext two"))
    assert cp.to_text().endswith("=\next one\next two\n")
    assert Checkpoint.from_text(cp.to_text()).extensions == ("ext one", "ext two")


ROOT_B64 = "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg="


@pytest.mark.parametrize(("text", "reason"), [
    (f"{ORIGIN}\n8\n{ROOT_B64}", "newline"),
    (f"{ORIGIN}\n8\n", "three lines"),
    (f"{ORIGIN}\n08\n{ROOT_B64}\n", "leading zeroes"),
    (f"{ORIGIN}\n+8\n{ROOT_B64}\n", "leading zeroes"),
    (f"{ORIGIN}\n 8\n{ROOT_B64}\n", "leading zeroes"),
    (f"{ORIGIN}\n-1\n{ROOT_B64}\n", "leading zeroes"),
    (f"{ORIGIN}\n\n{ROOT_B64}\n", "leading zeroes"),
    (f"{ORIGIN}\n８\n{ROOT_B64}\n", "leading zeroes"),  # a fullwidth digit is not ASCII
    (f"{ORIGIN}\n{2**64}\n{ROOT_B64}\n", "2\\*\\*64"),
    (f"{ORIGIN}\n8\n{ROOT_B64[:-1]}\n", "base64"),
    (f"{ORIGIN}\n8\n{ROOT_B64[:-2]}R=\n", "base64"),  # non-canonical last character
    (f"{ORIGIN}\n8\n{base64.b64encode(bytes(31)).decode()}\n", "32 bytes"),
    (f"\n8\n{ROOT_B64}\n", "origin is empty"),
    (f"{ORIGIN} \n8\n{ROOT_B64}\n", "whitespace"),
    (f"{ORIGIN}\n8\n{ROOT_B64}\n\n", "extension"),
    (f"{ORIGIN}\n8\n{ROOT_B64}\nok\n\nlater\n", "extension"),
    (f"{ORIGIN}\x07\n8\n{ROOT_B64}\n", "control character"),
])
def test_checkpoint_text_is_strict(text: str, reason: str) -> None:
    with pytest.raises(CheckpointMalformed, match=reason):
        Checkpoint.from_text(text)


@pytest.mark.parametrize("fields", [
    ("", 1, ROOT8), (" x", 1, ROOT8), ("a\nb", 1, ROOT8), (ORIGIN, -1, ROOT8),
    (ORIGIN, 2**64, ROOT8), (ORIGIN, True, ROOT8), (ORIGIN, 1, ROOT8[:31]),
    (ORIGIN, 1, ROOT8, ("",)), (ORIGIN, 1, ROOT8, ("a\nb",)),
])
def test_checkpoint_fields_are_checked(fields: tuple[object, ...]) -> None:
    with pytest.raises(NoteArgumentError):
        Checkpoint(*fields)  # type: ignore[arg-type]


# --- tampering -----------------------------------------------------------------------------------


def test_every_single_character_change_is_rejected() -> None:
    for i, ch in enumerate(SIGNED):
        for sub in ("A", "0", "\n"):
            if sub == ch:
                continue
            with pytest.raises(VerificationError):
                open_checkpoint(SIGNED[:i] + sub + SIGNED[i + 1:], [VKEY])
        with pytest.raises(VerificationError):
            open_checkpoint(SIGNED[:i] + SIGNED[i + 1:], [VKEY])


def test_tampering_fails_with_the_right_error() -> None:
    with pytest.raises(NoteSignatureInvalid):
        open_checkpoint(SIGNED.replace("\n8\n", "\n9\n"), [VKEY])
    with pytest.raises(NoteSignatureInvalid):
        open_checkpoint(SIGNED.replace("Xcna", "Xcnb"), [VKEY])
    with pytest.raises(NoteSignatureInvalid):
        open_checkpoint(SIGNED.replace("dPEd", "dPEe"), [VKEY])
    # A changed key name no longer names the trusted key: that line is ignored.
    with pytest.raises(UnknownNoteKey):
        open_checkpoint(SIGNED.replace("— execguard.example/demo", "— execguard.example/demx"),
                        [VKEY])


def test_origin_is_checked_when_given() -> None:
    assert open_checkpoint(SIGNED, [VKEY]).origin == ORIGIN
    with pytest.raises(CheckpointOriginMismatch, match=r"expected 'example\.com/other'"):
        open_checkpoint(SIGNED, [VKEY], origin="example.com/other")


# --- several signatures --------------------------------------------------------------------------


def _sig_line(text: str, name: str, signer: Signer) -> str:
    return sign_note(text, name, signer).split("\n\n")[-1]


def test_unknown_signatures_are_ignored() -> None:
    text = CP.to_text()
    # Another key; the trusted name with a foreign key; a foreign name with the trusted key.
    extra = (_sig_line(text, "witness.example/w1", OTHER) + _sig_line(text, ORIGIN, OTHER)
             + _sig_line(text, "alias.example", FIXED))
    for signed in (SIGNED + extra, text + "\n" + extra + SIGNED.split("\n\n")[1]):
        assert open_note(signed, [VKEY]) == (text, [ORIGIN])
        assert open_checkpoint(signed, {ORIGIN: FIXED.public_key}) == CP


def test_all_trusted_signers_are_reported() -> None:
    signed = SIGNED + _sig_line(CP.to_text(), "witness.example/w1", OTHER)
    trusted = [VKEY, verifier_key("witness.example/w1", OTHER.public_key)]
    assert open_note(signed, trusted)[1] == [ORIGIN, "witness.example/w1"]


def test_a_bad_signature_from_a_trusted_key_rejects_the_note() -> None:
    forged = _sig_line("something else\n", "witness.example/w1", OTHER)
    trusted = [VKEY, verifier_key("witness.example/w1", OTHER.public_key)]
    with pytest.raises(NoteSignatureInvalid, match=r"witness\.example/w1"):
        open_note(SIGNED + forged, trusted)
    assert issubclass(NoteSignatureInvalid, SignatureInvalid)


def test_no_trusted_signature() -> None:
    with pytest.raises(UnknownNoteKey, match=r"execguard\.example/demo"):
        open_note(SIGNED, [verifier_key("witness.example/w1", OTHER.public_key)])
    with pytest.raises(NoteArgumentError, match="no trusted keys"):
        open_note(SIGNED, [])


def test_signature_count_limit() -> None:
    text = CP.to_text()
    unknown = _sig_line(text, "witness.example/w1", OTHER)
    # signed-note: verifiers MUST accept at least 16 signatures.
    assert open_note(SIGNED + unknown * 16, [VKEY])[1] == [ORIGIN]
    with pytest.raises(NoteMalformed, match="more than"):
        open_note(SIGNED + unknown * MAX_SIGNATURES, [VKEY])


# --- malformed notes -----------------------------------------------------------------------------

SIG = SIGNED.split("\n\n")[1]


@pytest.mark.parametrize(("signed", "reason"), [
    (CP.to_text() + SIG, "no blank line"),
    (SIGNED[:-1], "does not end in a newline"),
    (CP.to_text() + "\n", "no signature lines"),
    (SIGNED.replace("\u2014 ", "- "), "em dash"),
    (SIGNED.replace("\u2014 ", "\u2013 "), "em dash"),
    (SIGNED.replace("\u2014 ", "\u2014"), "em dash"),
    (SIGNED.replace(SIG[-10:], "!!garbage\n"), "not valid base64"),
    (SIGNED.replace("vgg=\n", "vgg\n"), "not valid base64"),  # padding missing
    (CP.to_text() + "\n\u2014 " + ORIGIN + " AAAA\n", "not valid base64"),  # shorter than 5 bytes
    (CP.to_text() + "\n\u2014 " + ORIGIN + "\n", "no signature after the name"),
    (CP.to_text()[:-1] + "\u2014 " + SIG[2:], "no blank line"),  # body not ending in newline
    (SIGNED.replace("\n8\n", "\n8\r\n"), "control character"),
    (SIGNED + "\n", "no signature lines"),
])
def test_malformed_notes(signed: str, reason: str) -> None:
    with pytest.raises(NoteMalformed, match=reason):
        open_note(signed, [VKEY])


def test_note_text_may_hold_empty_lines() -> None:
    # signed-note: "The note text MAY contain empty lines; the text is separated from the
    # signatures by the last empty line in the note."
    text = "first\n\nthird\n\n"
    assert open_note(sign_note(text, ORIGIN, FIXED), [VKEY]) == (text, [ORIGIN])


@pytest.mark.parametrize(("text", "name"), [
    ("no final newline", ORIGIN), ("bell \x07\n", ORIGIN), ("ok\n", ""), ("ok\n", "a b"),
    ("ok\n", "a+b"), ("ok\n", "tab\there"), ("ok\n", "nbsp\u00a0here"),
])
def test_sign_note_refuses_what_cannot_be_opened(text: str, name: str) -> None:
    with pytest.raises(NoteArgumentError):
        sign_note(text, name, FIXED)


def test_error_hierarchy() -> None:
    for cls in (NoteMalformed, NoteSignatureInvalid, UnknownNoteKey, CheckpointMalformed,
                CheckpointOriginMismatch):
        assert issubclass(cls, VerificationError)
        assert not issubclass(cls, ValueError)
    assert issubclass(NoteArgumentError, ValueError)
    assert issubclass(NoteArgumentError, ExecGuardError)
    assert not issubclass(NoteArgumentError, VerificationError)

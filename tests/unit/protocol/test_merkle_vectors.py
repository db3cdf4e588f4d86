"""The transparency-dev/merkle proof vectors (RFC 6962 / RFC 9162), read from ../shared."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import pytest

from execguard.protocol.errors import VerificationError
from execguard.protocol.merkle import verify_consistency, verify_inclusion

VECTORS = Path(__file__).parents[3].parent / "shared" / "vectors" / "merkle"
ABSENT = f"Merkle test vectors not found at {VECTORS} (the shared dir beside the repo root)"


def _files(kind: str) -> list[Any]:
    if not VECTORS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT), id="absent")]
    files = sorted((VECTORS / kind).rglob("*.json"))
    return [pytest.param(f, id=str(f.relative_to(VECTORS / kind))) for f in files]


def _hash(value: object) -> bytes:
    """A vector hash field; null, absent or non-base64 becomes bytes no verifier accepts."""
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b"\xff" * 33  # wrong length on purpose: the case must still be rejected


def _proof(value: object) -> list[bytes]:
    # "proof": null is how the Go vectors write an empty proof (e.g. size 1 happy paths).
    if value is None:
        return []
    assert isinstance(value, list)
    return [_hash(p) for p in value]


def _int(value: object) -> int:
    # A missing size or index is malformed: -1 is refused by both verifiers.
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def test_vector_set_is_present_and_complete() -> None:
    if not VECTORS.is_dir():
        pytest.skip(ABSENT)
    files = list(VECTORS.rglob("*.json"))
    assert len(files) >= 100, f"only {len(files)} vector files under {VECTORS}"
    cases = [json.loads(f.read_text()) for f in files]
    assert any(c["wantErr"] is False for c in cases)
    assert any(c["wantErr"] is True for c in cases)


@pytest.mark.parametrize("path", _files("inclusion"))
def test_inclusion_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    args = (_hash(case.get("leafHash")), _int(case.get("leafIdx")), _int(case.get("treeSize")),
            _proof(case.get("proof")), _hash(case.get("root")))
    if case["wantErr"]:
        with pytest.raises(VerificationError):
            verify_inclusion(*args)
    else:
        assert verify_inclusion(*args) is None, case["desc"]


@pytest.mark.parametrize("path", _files("consistency"))
def test_consistency_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    args = (_int(case.get("size1")), _int(case.get("size2")), _proof(case.get("proof")),
            _hash(case.get("root1")), _hash(case.get("root2")))
    if case["wantErr"]:
        with pytest.raises(VerificationError):
            verify_consistency(*args)
    else:
        assert verify_consistency(*args) is None, case["desc"]

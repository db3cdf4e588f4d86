"""RFC 9162 Merkle trees: known answers, the RFC's worked example, properties, read counts."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from execguard.protocol.errors import ExecGuardError, VerificationError
from execguard.protocol.merkle import (
    EMPTY_ROOT,
    CompactRange,
    ConsistencyProofInvalid,
    InclusionProofInvalid,
    MemoryTree,
    TreeArgumentError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
    subtree_hash,
    verify_consistency,
    verify_inclusion,
)

# The RFC 6962 reference leaves, as in transparency-dev/merkle's testonly data.
RFC_LEAVES = [
    b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)), bytes(range(0x60, 0x70)),
]
# Their well-known roots for sizes 1..8.
RFC_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def naive_mth(entries: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.1 written out literally, over raw entries."""
    n = len(entries)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + entries[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + naive_mth(entries[:k]) + naive_mth(entries[k:])).digest()


ENTRIES = [i.to_bytes(4, "big") for i in range(600)]
TREE = MemoryTree.from_entries(ENTRIES)
RFC_TREE = MemoryTree.from_entries(RFC_LEAVES)


# --- known answers ---------------------------------------------------------------------------


def test_hash_prefixes_known_answers() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"").hex() == RFC_ROOTS[0]
    left, right = b"a" * 32, b"b" * 32
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()


@pytest.mark.parametrize("size", range(1, 9))
def test_rfc_reference_roots(size: int) -> None:
    assert RFC_TREE.root(size).hex() == RFC_ROOTS[size - 1]
    assert naive_mth(RFC_LEAVES[:size]).hex() == RFC_ROOTS[size - 1]


def test_known_proofs_of_reference_tree() -> None:
    want = [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert [p.hex() for p in RFC_TREE.inclusion_proof(0, 8)] == want
    assert [p.hex() for p in RFC_TREE.consistency_proof(1, 8)] == want
    assert RFC_TREE.root() == RFC_TREE.root(8) == root_hash(8, RFC_TREE.read)
    assert root_hash(0, RFC_TREE.read) == EMPTY_ROOT


def test_rfc9162_section_2_1_5_example() -> None:
    """The 7-leaf tree of RFC 9162 §2.1.5, node names as in the RFC."""
    d = RFC_LEAVES[:7]
    a, b, c, dd, e, f, d6 = (naive_mth([x]) for x in d)
    g, h, i = naive_mth(d[0:2]), naive_mth(d[2:4]), naive_mth(d[4:6])
    j = d6
    k, l_ = naive_mth(d[0:4]), naive_mth(d[4:7])
    assert RFC_TREE.inclusion_proof(0, 7) == [b, h, l_]
    assert RFC_TREE.inclusion_proof(3, 7) == [c, g, l_]
    assert RFC_TREE.inclusion_proof(4, 7) == [f, j, k]
    assert RFC_TREE.inclusion_proof(6, 7) == [i, k]
    assert RFC_TREE.consistency_proof(3, 7) == [c, dd, g, l_]
    assert RFC_TREE.consistency_proof(4, 7) == [l_]
    assert RFC_TREE.consistency_proof(6, 7) == [i, j, k]
    assert a == RFC_TREE.read(0, 0) and e == RFC_TREE.read(0, 4)


# --- argument errors and the error tree ----------------------------------------------------------


def test_error_hierarchy() -> None:
    assert issubclass(TreeArgumentError, ValueError)
    assert issubclass(TreeArgumentError, ExecGuardError)
    assert not issubclass(TreeArgumentError, VerificationError)
    for cls in (InclusionProofInvalid, ConsistencyProofInvalid):
        assert issubclass(cls, VerificationError)
        assert not issubclass(cls, ValueError)


@pytest.mark.parametrize("call", [
    lambda: inclusion_proof(5, 5, TREE.read),
    lambda: inclusion_proof(-1, 5, TREE.read),
    lambda: inclusion_proof(0, 0, TREE.read),
    lambda: consistency_proof(0, 5, TREE.read),
    lambda: consistency_proof(0, 0, TREE.read),
    lambda: consistency_proof(6, 5, TREE.read),
    lambda: root_hash(-1, TREE.read),
    lambda: subtree_hash(3, 2, TREE.read),
    lambda: TREE.root(601),
    lambda: TREE.read(0, 600),
    lambda: TREE.read(10, 0),
    lambda: CompactRange().append(b"short"),
])
def test_invalid_arguments_raise_value_error(call: object) -> None:
    with pytest.raises(TreeArgumentError):
        call()  # type: ignore[operator]


def test_equal_sizes() -> None:
    root = TREE.root(9)
    assert TREE.consistency_proof(9, 9) == []
    verify_consistency(9, 9, [], root, root)
    with pytest.raises(ConsistencyProofInvalid, match="not empty"):
        verify_consistency(9, 9, [root], root, root)
    with pytest.raises(ConsistencyProofInvalid, match="roots differ"):
        verify_consistency(9, 9, [], root, TREE.root(8))
    with pytest.raises(ConsistencyProofInvalid, match="empty tree"):
        verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)


def test_consistency_error_carries_evidence() -> None:
    proof = TREE.consistency_proof(5, 9)
    with pytest.raises(ConsistencyProofInvalid) as info:
        verify_consistency(5, 9, proof, TREE.root(5), TREE.root(8))
    err = info.value
    assert (err.size1, err.size2, err.root2, err.proof) == (5, 9, TREE.root(8), tuple(proof))
    assert "second root" in str(err)


def test_wrong_proof_length_is_named() -> None:
    proof = TREE.inclusion_proof(3, 10)
    with pytest.raises(InclusionProofInvalid, match=f"expected {len(proof)} proof hashes"):
        verify_inclusion(TREE.read(0, 3), 3, 10, proof[:-1], TREE.root(10))


# --- properties ----------------------------------------------------------------------------------


def _flip(h: bytes, bit: int) -> bytes:
    out = bytearray(h)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def size_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, 300))
    return size, draw(st.integers(0, size - 1))


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    size2 = draw(st.integers(2, 300))
    return draw(st.integers(1, size2 - 1)), size2


@given(size_and_index(), st.data())
def test_inclusion_proofs_verify_and_mutations_fail(case: tuple[int, int],
                                                    data: st.DataObject) -> None:
    size, index = case
    leaf, root = TREE.read(0, index), TREE.root(size)
    proof = TREE.inclusion_proof(index, size)
    assert verify_inclusion(leaf, index, size, proof, root) is None

    def rejected(leaf_: bytes, index_: int, size_: int, proof_: list[bytes], root_: bytes) -> None:
        with pytest.raises(InclusionProofInvalid):
            verify_inclusion(leaf_, index_, size_, proof_, root_)

    if proof:
        at = data.draw(st.integers(0, len(proof) - 1), label="element")
        bit = data.draw(st.integers(0, 255), label="bit")
        rejected(leaf, index, size, [*proof[:at], _flip(proof[at], bit), *proof[at + 1:]], root)
        rejected(leaf, index, size, proof[:-1], root)
    rejected(leaf, index, size, [*proof, TREE.read(0, 0)], root)
    bit = data.draw(st.integers(0, 255), label="leaf or root bit")
    rejected(_flip(leaf, bit), index, size, proof, root)
    rejected(leaf, index, size, proof, _flip(root, bit))
    other = data.draw(st.integers(0, 2 * size).filter(lambda i: i != index), label="index")
    rejected(leaf, other, size, proof, root)
    # A wrong size is caught against that size's real root...
    wrong = data.draw(st.integers(1, 600).filter(lambda s: s != size), label="size")
    rejected(leaf, index, wrong, proof, TREE.root(wrong))
    # ...and against the true root whenever the proof shape differs.
    if index >= wrong or len(inclusion_proof(index, wrong, TREE.read)) != len(proof):
        rejected(leaf, index, wrong, proof, root)


@given(two_sizes(), st.data())
def test_consistency_proofs_verify_and_mutations_fail(sizes: tuple[int, int],
                                                      data: st.DataObject) -> None:
    size1, size2 = sizes
    root1, root2 = TREE.root(size1), TREE.root(size2)
    proof = TREE.consistency_proof(size1, size2)
    assert verify_consistency(size1, size2, proof, root1, root2) is None

    def rejected(s1: int, s2: int, proof_: list[bytes], r1: bytes, r2: bytes) -> None:
        with pytest.raises(ConsistencyProofInvalid):
            verify_consistency(s1, s2, proof_, r1, r2)

    at = data.draw(st.integers(0, len(proof) - 1), label="element")
    bit = data.draw(st.integers(0, 255), label="bit")
    rejected(size1, size2, [*proof[:at], _flip(proof[at], bit), *proof[at + 1:]], root1, root2)
    rejected(size1, size2, proof[:-1], root1, root2)
    rejected(size1, size2, [*proof, TREE.read(0, 0)], root1, root2)
    rejected(size1, size2, proof, root2, root1)
    rejected(size1, size2, proof, _flip(root1, bit), root2)
    rejected(size1, size2, proof, root1, _flip(root2, bit))
    wrong1 = data.draw(st.integers(1, size2).filter(lambda s: s != size1), label="size1")
    rejected(wrong1, size2, proof, TREE.root(wrong1), root2)
    wrong2 = data.draw(st.integers(size1, 600).filter(lambda s: s != size2), label="size2")
    rejected(size1, wrong2, proof, root1, TREE.root(wrong2))


@given(two_sizes(), st.data())
def test_rewriting_an_old_leaf_breaks_consistency(sizes: tuple[int, int],
                                                  data: st.DataObject) -> None:
    size1, size2 = sizes
    changed = data.draw(st.integers(0, size1 - 1), label="changed leaf")
    forged = list(ENTRIES[:size2])
    forged[changed] = b"rewritten"
    forged_tree = MemoryTree.from_entries(forged)
    with pytest.raises(ConsistencyProofInvalid):
        verify_consistency(size1, size2, forged_tree.consistency_proof(size1, size2),
                           TREE.root(size1), forged_tree.root())


def test_compact_range_matches_naive_for_every_size() -> None:
    cr = CompactRange()
    assert cr.root() == EMPTY_ROOT == naive_mth([])
    for n, entry in enumerate(ENTRIES[:300], start=1):
        created = cr.append(leaf_hash(entry))
        assert cr.size == n
        assert cr.root() == naive_mth(ENTRIES[:n])
        # The reported nodes are exactly the perfect subtrees this leaf completes.
        assert created[0] == (0, n - 1, leaf_hash(entry))
        assert len(created) == ((n - 1) ^ n).bit_length()
        for level, index, h in created:
            assert (index + 1) << level == n
            assert h == naive_mth(ENTRIES[index << level:(index + 1) << level])


@given(st.lists(st.binary(max_size=8), max_size=70))
def test_compact_range_root_over_random_entries(entries: list[bytes]) -> None:
    cr = CompactRange()
    cr.extend(leaf_hash(e) for e in entries)
    assert cr.root() == naive_mth(entries)


@given(st.integers(0, 600), st.lists(st.binary(max_size=4), max_size=20))
def test_compact_range_resumes_from_stored_nodes(size: int, more: list[bytes]) -> None:
    cr = CompactRange.from_reader(size, TREE.read)
    assert cr.size == size and cr.root() == TREE.root(size)
    cr.extend(leaf_hash(e) for e in more)
    assert cr.root() == naive_mth([*ENTRIES[:size], *more])


def test_subtree_hash_of_unaligned_range_is_still_correct() -> None:
    for start in range(0, 20):
        for end in range(start, 40):
            assert subtree_hash(start, end, TREE.read) == naive_mth(ENTRIES[start:end])


# --- O(log n) reads ------------------------------------------------------------------------------


class CountingReader:
    """A synthetic tree of ``size`` leaves: counts reads and refuses incomplete nodes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reads = 0

    def __call__(self, level: int, index: int) -> bytes:
        assert level >= 0 and index >= 0 and (index + 1) << level <= self.size, (level, index)
        self.reads += 1
        return hashlib.sha256(f"{level}/{index}".encode()).digest()


def _bound(n: int) -> float:
    return 4 * math.log2(n) + 8


@settings(max_examples=50)
@given(st.integers(1, 2_000_000), st.data())
def test_reads_are_logarithmic(size: int, data: st.DataObject) -> None:
    reader = CountingReader(size)
    root_hash(size, reader)
    assert reader.reads <= _bound(size)

    reader.reads = 0
    index = data.draw(st.integers(0, size - 1), label="index")
    inclusion_proof(index, size, reader)
    assert reader.reads <= _bound(size)

    reader.reads = 0
    size1 = data.draw(st.integers(1, size), label="size1")
    consistency_proof(size1, size, reader)
    assert reader.reads <= _bound(size)


def test_reads_for_size_100k() -> None:
    n = 100_000
    reader = CountingReader(n)
    for call in (lambda: root_hash(n, reader), lambda: inclusion_proof(n - 1, n, reader),
                 lambda: inclusion_proof(12_345, n, reader),
                 lambda: consistency_proof(99_999, n, reader),
                 lambda: consistency_proof(33_333, n, reader)):
        reader.reads = 0
        call()
        assert 0 < reader.reads <= _bound(n)

"""RFC 9162 Merkle trees: hashes, proofs, proof checks and an incremental tree.

The tree is read through a :data:`NodeReader`: ``read(level, index)`` returns the
hash of the *perfect* subtree over leaves ``[index * 2**level, (index + 1) * 2**level)``
(level 0: leaf hashes). A store keeping the nodes :meth:`CompactRange.append` reports
serves roots and proofs with O(log n) reads and no rehashing.

Builders raise :class:`TreeArgumentError` (a ``ValueError``) for ranges that do not
exist; the checkers return ``None`` or raise a ``VerificationError``, never a bool.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence

from execguard.protocol.errors import ExecGuardError, VerificationError

__all__ = [
    "EMPTY_ROOT", "HASH_SIZE", "CompactRange", "ConsistencyProofInvalid",
    "InclusionProofInvalid", "MemoryTree", "NodeReader", "TreeArgumentError",
    "consistency_proof", "inclusion_proof", "leaf_hash", "node_hash", "root_hash",
    "subtree_hash", "verify_consistency", "verify_inclusion",
]

#: Size in bytes of every hash in the tree (SHA-256).
HASH_SIZE = 32

#: RFC 9162 §2.1.1: the hash of an empty list is the hash of the empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()

#: ``read(level, index)`` -> hash of the perfect subtree at that position.
NodeReader = Callable[[int, int], bytes]


class TreeArgumentError(ExecGuardError, ValueError):
    """A root or proof was asked for a range the tree does not have (a caller bug)."""

    code = "invalid_tree_range"


class InclusionProofInvalid(VerificationError):
    """An inclusion proof does not show the leaf at that index in the tree with that root."""

    code = "inclusion_proof_invalid"

    def __init__(self, reason: str, *, index: int, size: int) -> None:
        self.reason, self.index, self.size = reason, index, size
        super().__init__(f"inclusion proof for leaf {index} in tree size {size}: {reason}")


class ConsistencyProofInvalid(VerificationError):
    """A consistency proof does not show the larger tree extends the smaller one."""

    code = "consistency_proof_invalid"

    def __init__(self, reason: str, *, size1: int, size2: int, root1: bytes, root2: bytes,
                 proof: Sequence[bytes]) -> None:
        # Keep the evidence: both tree heads and the proof, so an alarm can be acted on.
        self.reason, self.size1, self.size2 = reason, size1, size2
        self.root1, self.root2, self.proof = root1, root2, tuple(proof)
        super().__init__(f"consistency proof from tree size {size1} to {size2}: {reason}")


# --- hashing -------------------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1: MTH({d(0)}) = SHA-256(0x00 || d(0))."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: SHA-256(0x01 || MTH(left) || MTH(right))."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """RFC 9162 §2.1.1: k, the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


# --- building from a NodeReader ------------------------------------------------------------


def subtree_hash(start: int, end: int, read: NodeReader) -> bytes:
    """MTH of leaves ``[start, end)``, reading stored perfect subtrees where it can.

    For the ranges the RFC recursion produces (``start`` a multiple of the
    smallest power of two >= ``end - start``, as in every root and proof below)
    each split has one perfect, aligned side, so this makes O(log n) reads. Any
    other range is still hashed correctly, from smaller pieces.
    """
    if start < 0 or end < start:
        raise TreeArgumentError(f"invalid leaf range [{start}, {end})")
    if start == end:
        return EMPTY_ROOT
    return _mth(start, end, read)


def _mth(start: int, end: int, read: NodeReader) -> bytes:
    n = end - start
    if n & (n - 1) == 0 and start % n == 0:
        # A perfect, aligned subtree: the store already has its hash.
        return read(n.bit_length() - 1, start // n)
    # RFC 9162 §2.1.1: MTH(D[n]) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n])).
    k = _split(n)
    return node_hash(_mth(start, start + k, read), _mth(start + k, end, read))


def root_hash(size: int, read: NodeReader) -> bytes:
    """The root of the tree of the first ``size`` leaves (EMPTY_ROOT for 0)."""
    if size < 0:
        raise TreeArgumentError(f"tree size {size} is negative")
    return subtree_hash(0, size, read)


def inclusion_proof(index: int, size: int, read: NodeReader) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(index, D[size]), ordered from the leaf up to the root.

    Only the first sibling off the tree's right edge can be an imperfect subtree,
    so this makes O(log n) reads.
    """
    if not 0 <= index < size:
        raise TreeArgumentError(f"leaf index {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        mid = start + _split(end - start)
        if index < mid:
            # m < k: PATH(m, D[0:k]) : MTH(D[k:n])
            path.append(subtree_hash(mid, end, read))
            end = mid
        else:
            # m >= k: PATH(m - k, D[k:n]) : MTH(D[0:k])
            path.append(subtree_hash(start, mid, read))
            start = mid
    # We walked root-to-leaf; the RFC lists the path leaf-to-root.
    path.reverse()
    return path


def consistency_proof(size1: int, size2: int, read: NodeReader) -> list[bytes]:
    """RFC 9162 §2.1.4.1 PROOF(size1, D[size2]); empty when the sizes are equal.

    A proof from the empty tree is refused: it would prove nothing.
    """
    if size1 <= 0:
        raise TreeArgumentError(f"no consistency proof from tree size {size1}")
    if size1 > size2:
        raise TreeArgumentError(f"tree size {size1} is larger than tree size {size2}")
    proof: list[bytes] = []
    start, end = 0, size2
    whole_old_tree = True  # the RFC's flag b: are we still on the old tree's own root?
    while True:
        m, n = size1 - start, end - start
        if m == n:
            # SUBPROOF(m, D[m], true) = {}; SUBPROOF(m, D[m], false) = {MTH(D[m])}
            if not whole_old_tree:
                proof.append(subtree_hash(start, end, read))
            break
        k = _split(n)
        if m <= k:
            # m <= k: SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            proof.append(subtree_hash(start + k, end, read))
            end = start + k
        else:
            # m > k: SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            proof.append(subtree_hash(start, start + k, read))
            start += k
            whole_old_tree = False
    # Each ":" appends after the recursive part, so the order is innermost first.
    proof.reverse()
    return proof


# --- verification ----------------------------------------------------------------------------


def _hash_ok(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _inclusion_steps(fn: int, sn: int) -> list[bool]:
    """RFC 9162 §2.1.3.2 step 4's index arithmetic: True where the proof hash is on the left.

    The walk depends only on the index and size, so its length is the one
    correct proof length; checking that first gives a precise error.
    """
    steps: list[bool] = []
    while sn > 0:
        # 4b: "If LSB(fn) is set, or if fn is equal to sn"
        if fn & 1 or fn == sn:
            steps.append(True)
            # 4b.ii: "right-shift both fn and sn equally until either LSB(fn) is set or fn is 0"
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            steps.append(False)
        # 4c: "right-shift both fn and sn one time"
        fn >>= 1
        sn >>= 1
    return steps


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes],
                     root: bytes) -> None:
    """RFC 9162 §2.1.3.2: return if ``proof`` shows ``leaf`` at ``index`` under ``root``.

    Raises :class:`InclusionProofInvalid` otherwise.
    """

    def fail(reason: str) -> InclusionProofInvalid:
        return InclusionProofInvalid(reason, index=index, size=size)

    # 1. "Compare leaf_index from the inclusion_proof against tree_size ..."
    if not 0 <= index < size:
        raise fail("the leaf index is not below the tree size")
    if not (_hash_ok(leaf) and _hash_ok(root) and all(_hash_ok(p) for p in proof)):
        raise fail(f"the leaf, root and proof hashes must each be {HASH_SIZE} bytes")
    # 2. fn = leaf_index, sn = tree_size - 1; steps 4a and 5 ("sn is 0") become a length check.
    steps = _inclusion_steps(index, size - 1)
    if len(proof) != len(steps):
        raise fail(f"expected {len(steps)} proof hashes, got {len(proof)}")
    # 3. "Set r to hash."  4. Fold in each proof element.
    r = leaf
    for p, p_is_left in zip(proof, steps, strict=True):
        r = node_hash(p, r) if p_is_left else node_hash(r, p)
    # 5. "... verify that r is equal to the root_hash."
    if not hmac.compare_digest(r, root):
        raise fail("the proof does not lead to the given root")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes,
                       root2: bytes) -> None:
    """RFC 9162 §2.1.4.2: return if ``proof`` shows tree ``root2`` extends tree ``root1``.

    Raises :class:`ConsistencyProofInvalid` otherwise. Equal sizes need an empty
    proof and equal roots. A proof from size 0 is refused.
    """

    def fail(reason: str) -> ConsistencyProofInvalid:
        return ConsistencyProofInvalid(reason, size1=size1, size2=size2, root1=root1,
                                       root2=root2, proof=proof)

    if size1 <= 0:
        raise fail("a consistency proof from the empty tree proves nothing")
    if size1 > size2:
        raise fail("the first tree is larger than the second")
    if size1 == size2:
        # Same size: the same tree, so nothing to prove and nothing to hash.
        if proof:
            raise fail("the sizes are equal but the proof is not empty")
        if not hmac.compare_digest(root1, root2):
            raise fail("the sizes are equal but the roots differ")
        return
    if not (_hash_ok(root1) and _hash_ok(root2) and all(_hash_ok(p) for p in proof)):
        raise fail(f"the root and proof hashes must each be {HASH_SIZE} bytes")
    # 1. "If consistency_path is an empty array, stop and fail the proof verification."
    if not proof:
        raise fail("the proof is empty")
    # 2. "If first is an exact power of 2, then prepend first_hash to the consistency_path."
    path = list(proof)
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    # 3. fn = first - 1, sn = second - 1.
    fn, sn = size1 - 1, size2 - 1
    # 4. "If LSB(fn) is set, then right-shift both fn and sn equally until LSB(fn) is not set."
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Steps 6a and 7 ("sn is 0") depend only on the sizes; as a length check they
    # give a precise error. Each step keeps a flag: does c also fold into fr?
    steps = _inclusion_steps(fn, sn)
    if len(path) != 1 + len(steps):
        expected = 1 + len(steps) - (len(path) - len(proof))
        raise fail(f"expected {expected} proof hashes, got {len(proof)}")
    # 5. "Set both fr and sr to the first value in the consistency_path array."
    fr = sr = path[0]
    # 6. For each subsequent value c: 6b folds c into both on the left, else into sr only.
    for c, c_is_left in zip(path[1:], steps, strict=True):
        if c_is_left:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
        else:
            sr = node_hash(sr, c)
    # 7. "verify that the fr calculated is equal to the first_hash supplied, that the sr
    #    calculated is equal to the second_hash value supplied"
    if not hmac.compare_digest(fr, root1):
        raise fail("the proof does not lead to the first root")
    if not hmac.compare_digest(sr, root2):
        raise fail("the proof does not lead to the second root")


# --- incremental trees -------------------------------------------------------------------------


class CompactRange:
    """An append-only tree that keeps only the right edge: one hash per set bit of ``size``.

    Appending is amortised O(1) hashing, so recomputing the root of a million
    leaves is O(n) total; :meth:`append` reports every perfect node it completes
    so that a store can persist exactly those and serve them as a NodeReader.
    """

    def __init__(self) -> None:
        self._size = 0
        # Perfect subtree roots from the left (largest) to the right (smallest).
        self._edge: list[bytes] = []

    @classmethod
    def from_reader(cls, size: int, read: NodeReader) -> CompactRange:
        """Resume at ``size`` from stored nodes: one read per set bit of ``size``."""
        if size < 0:
            raise TreeArgumentError(f"tree size {size} is negative")
        tree = cls()
        offset = 0
        for level in reversed(range(size.bit_length())):
            if size >> level & 1:
                tree._edge.append(read(level, offset >> level))
                offset += 1 << level
        tree._size = size
        return tree

    def copy(self) -> CompactRange:
        """An independent copy (appending to one leaves the other as it was)."""
        tree = CompactRange()
        tree._edge = list(self._edge)
        tree._size = self._size
        return tree

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf hash; return the new perfect nodes ``(level, index, hash)``, leaf first."""
        if not _hash_ok(leaf):
            raise TreeArgumentError(f"a leaf hash must be {HASH_SIZE} bytes")
        created = [(0, self._size, leaf)]
        level, index, h = 0, self._size, leaf
        # A set bit at ``level`` of the old size is a waiting left sibling of that height.
        while self._size >> level & 1:
            h = node_hash(self._edge.pop(), h)
            level += 1
            index >>= 1
            created.append((level, index, h))
        self._edge.append(h)
        self._size += 1
        return created

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Append many leaf hashes, discarding the node reports."""
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        """The current root: RFC 9162 §2.1.1, the edge subtrees folded from the right."""
        if not self._edge:
            return EMPTY_ROOT
        h = self._edge[-1]
        for left in reversed(self._edge[:-1]):
            h = node_hash(left, h)
        return h


class MemoryTree:
    """A reference in-memory tree: every perfect node, one list per level.

    Its :meth:`read` is a NodeReader; roots and proofs for any size up to the
    current one delegate to the module functions, exactly as a store would.
    """

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self._range = CompactRange()
        self._levels: list[list[bytes]] = []
        for leaf in leaves:
            self.append(leaf)

    @classmethod
    def from_entries(cls, entries: Iterable[bytes]) -> MemoryTree:
        """A tree whose leaves are the RFC 9162 leaf hashes of raw ``entries``."""
        return cls(leaf_hash(e) for e in entries)

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self._range.size

    def append(self, leaf: bytes) -> int:
        """Add a leaf hash; return its index."""
        index = self._range.size
        for level, _node_index, h in self._range.append(leaf):
            if level == len(self._levels):
                self._levels.append([])
            # Nodes complete left to right, so node_index is always the end of its level.
            self._levels[level].append(h)
        return index

    def read(self, level: int, index: int) -> bytes:
        """The hash of the perfect subtree at ``(level, index)``; it must be complete."""
        if not (0 <= level < len(self._levels) and 0 <= index < len(self._levels[level])):
            raise TreeArgumentError(f"no complete node at level {level}, index {index}")
        return self._levels[level][index]

    def root(self, size: int | None = None) -> bytes:
        """The root at ``size`` leaves (default: all)."""
        return root_hash(self._size_arg(size), self.read)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.3.1 proof of leaf ``index`` in the tree of ``size`` leaves."""
        return inclusion_proof(index, self._size_arg(size), self.read)

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.4.1 proof that tree ``size2`` extends tree ``size1``."""
        return consistency_proof(size1, self._size_arg(size2), self.read)

    def _size_arg(self, size: int | None) -> int:
        if size is None:
            return self.size
        if size > self.size:
            raise TreeArgumentError(f"tree size {size} is beyond the {self.size} leaves held")
        return size

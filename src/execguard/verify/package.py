"""Verifying an auditor package (``execguard export``) with no network.

A package holds receipts, each with an inclusion proof against one signed
checkpoint, plus the policy bundles the receipts name. Steps:

1. the checkpoint note verifies under the pinned keys and names this tenant's log,
   and the manifest's ``treeSize`` is its size;
2. for each receipt: the hash recipe and signature verify, its leaf is
   recomputed from it, and its inclusion proof leads to the checkpoint's root;
3. the entries are what the manifest says: in increasing index order, each once,
   within the checkpoint's tree and the manifest's time range; as many as its
   ``receipts``; and, for a package of the whole log (no ``since``, no ``until``),
   every index from 0 to ``treeSize - 1``;
4. every policy bundle's files hash to its version, and every decision
   receipt's ``policyVersion`` is among them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from execguard.protocol.checkpoint import Checkpoint, open_checkpoint
from execguard.protocol.errors import VerificationError
from execguard.protocol.logentry import receipt_leaf_hash
from execguard.protocol.merkle import verify_inclusion
from execguard.protocol.policyversion import bundle_version
from execguard.verify.audit import Finding
from execguard.verify.bundle import decode_hash
from execguard.verify.keys import KeySet
from execguard.verify.receipt import verify_receipt

__all__ = ["PackageReport", "verify_package"]


@dataclass
class PackageReport:
    """What the verification of a package found."""

    tenant: str
    checkpoint: Checkpoint | None
    receipts: int = 0
    receipts_verified: int = 0
    policies_verified: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every receipt, proof and policy verified."""
        return not self.findings and self.checkpoint is not None


def _hashes(proof: Mapping[str, Any]) -> list[bytes]:
    hashes = proof.get("hashes")
    if not isinstance(hashes, list):
        raise VerificationError("inclusion proof hashes are not a list")
    try:
        return [decode_hash(h) for h in hashes]
    except VerificationError as exc:
        raise VerificationError(f"an inclusion proof hash is {exc}") from None


class _Coverage:
    """Step 3: which indexes the package holds, against what its manifest claims.

    Entries come in increasing index order, so one pass with the last index seen
    finds every repeat, gap and stray without remembering the indexes.
    """

    def __init__(self, report: PackageReport, manifest: Mapping[str, Any], size: int) -> None:
        self.report, self.size, self.last = report, size, -1
        self.since, self.until = manifest.get("since"), manifest.get("until")
        self.whole = self.since is None and self.until is None
        for name in ("since", "until"):
            if manifest.get(name) is not None and not isinstance(manifest.get(name), str):
                self._find("modified", None, f"the manifest's {name} is not a timestamp")

    def _find(self, kind: str, index: int | None, message: str) -> None:
        self.report.findings.append(Finding(kind, index, message))

    def add(self, index: int, timestamp: Any) -> None:
        if not 0 <= index < self.size:
            self._find("inserted", index, f"receipt {index} is outside the checkpoint's "
                       f"{self.size} entries")
            return
        if index <= self.last:
            self._find("inserted", index, f"receipt {index} comes after receipt {self.last}: "
                       "a package holds each entry once, in index order (a duplicate or a "
                       "reordered line)")
            return
        if self.whole and index > self.last + 1:
            self._missing(index)
        self.last = index
        stamp = timestamp if isinstance(timestamp, str) else ""
        if (isinstance(self.since, str) and stamp < self.since) or \
                (isinstance(self.until, str) and stamp >= self.until):
            self._find("inserted", index, f"receipt {index} ({timestamp!r}) is outside the "
                       f"package's range {self.since} to {self.until}")

    def _missing(self, end: int) -> None:
        first = self.last + 1
        which = f"receipt {first} is" if end == first + 1 else \
            f"receipts {first} to {end - 1} are"
        self._find("deleted", first, f"{which} missing from a package of the whole log")

    def finish(self, claimed: Any) -> None:
        if self.whole and self.last < self.size - 1:
            self._missing(self.size)
        if claimed != self.report.receipts or type(claimed) is not int:
            self._find("deleted" if type(claimed) is int and claimed > self.report.receipts
                       else "inserted", None, f"the manifest lists {claimed!r} receipts; "
                       f"entries.jsonl holds {self.report.receipts}")


def verify_package(*, tenant: str, keys: KeySet, checkpoint_note: str,
                   entries: Iterable[Mapping[str, Any]],
                   policies: Mapping[str, Mapping[str, bytes]],
                   manifest: Mapping[str, Any]) -> PackageReport:
    """Check a package's receipts, proofs, checkpoint and policies against its manifest;
    never raises on bad data."""
    report = PackageReport(tenant, None)
    # 1. the checkpoint
    try:
        origin = f"{keys.authority}/{tenant}" if keys.authority else None
        checkpoint = open_checkpoint(checkpoint_note, keys.note_verifiers(), origin=origin)
        if not checkpoint.origin.endswith(f"/{tenant}"):
            raise VerificationError(f"the checkpoint is of another log: {checkpoint.origin}")
        report.checkpoint = checkpoint
    except VerificationError as exc:
        report.findings.append(Finding("checkpoint", None, f"the checkpoint does not verify: "
                                       f"{exc}"))
        return report
    if manifest.get("treeSize") != checkpoint.size:
        report.findings.append(Finding("checkpoint", None, f"the manifest's treeSize "
                                       f"{manifest.get('treeSize')!r} is not the checkpoint's "
                                       f"size {checkpoint.size}"))
    coverage = _Coverage(report, manifest, checkpoint.size)
    named: set[str] = set()
    # 2 and 3. each receipt, its proof and its place
    for entry in entries:
        report.receipts += 1
        receipt = entry.get("receipt")
        index = receipt.get("logIndex") if isinstance(receipt, Mapping) else None
        if type(index) is int:
            coverage.add(index, receipt.get("timestamp"))
        try:
            if entry.get("problem"):
                raise VerificationError(str(entry["problem"]))
            if not isinstance(receipt, Mapping) or type(index) is not int:
                raise VerificationError("the entry has no receipt with a logIndex")
            verify_receipt(receipt, keys)
            proof = entry.get("inclusionProof")
            if not isinstance(proof, Mapping) or proof.get("index") != index \
                    or proof.get("treeSize") != checkpoint.size:
                raise VerificationError("its inclusion proof is not for this receipt and "
                                        "checkpoint")
            verify_inclusion(receipt_leaf_hash(tenant, receipt), index, checkpoint.size,
                             _hashes(proof), checkpoint.root)
        except VerificationError as exc:
            where = f"receipt {index}" if type(index) is int else \
                f"entry {report.receipts} of entries.jsonl"
            report.findings.append(Finding("modified", index if type(index) is int else None,
                                           f"{where}: {exc}"))
            continue
        report.receipts_verified += 1
        if receipt.get("receiptType", "decision") == "decision" and receipt.get("policyVersion"):
            named.add(str(receipt["policyVersion"]))
    coverage.finish(manifest.get("receipts"))
    # 4. the policies
    for version, files in sorted(policies.items()):
        if bundle_version(files) != version:
            report.findings.append(Finding("modified", None, f"policy bundle {version}: its "
                                           "files do not hash to its version"))
        else:
            report.policies_verified += 1
    for version in sorted(named - set(policies)):
        report.findings.append(Finding("deleted", None, f"policy bundle {version}, named by "
                                       "receipts, is missing from the package"))
    return report

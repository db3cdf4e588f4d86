"""Verifying an auditor package (``execguard export``) with no network.

A package holds receipts, each with an inclusion proof against one signed
checkpoint, plus the policy bundles the receipts name. Steps:

1. the checkpoint note verifies under the pinned keys and names this tenant's log;
2. for each receipt: the hash recipe and signature verify, its leaf is
   recomputed from it, and its inclusion proof leads to the checkpoint's root;
3. every policy bundle's files hash to its version, and every decision
   receipt's ``policyVersion`` is among them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from execguard.protocol.checkpoint import Checkpoint, open_checkpoint
from execguard.protocol.errors import VerificationError
from execguard.protocol.logentry import receipt_leaf_hash
from execguard.protocol.merkle import verify_inclusion
from execguard.protocol.policyversion import bundle_version
from execguard.verify.audit import Finding
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
    try:
        return [base64.b64decode(h, validate=True) for h in proof["hashes"]]
    except (KeyError, TypeError, binascii.Error) as exc:
        raise VerificationError(f"inclusion proof hashes are malformed: {exc}") from None


def verify_package(*, tenant: str, keys: KeySet, checkpoint_note: str,
                   entries: Iterable[Mapping[str, Any]],
                   policies: Mapping[str, Mapping[str, bytes]]) -> PackageReport:
    """Check a package's receipts, proofs, checkpoint and policies; never raises on bad data."""
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
    named: set[str] = set()
    # 2. each receipt and its proof
    for entry in entries:
        report.receipts += 1
        receipt = entry.get("receipt")
        index = receipt.get("logIndex") if isinstance(receipt, Mapping) else None
        try:
            if not isinstance(receipt, Mapping) or not isinstance(index, int):
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
            report.findings.append(Finding("modified", index if isinstance(index, int) else None,
                                           f"receipt {index}: {exc}"))
            continue
        report.receipts_verified += 1
        if receipt.get("receiptType", "decision") == "decision" and receipt.get("policyVersion"):
            named.add(str(receipt["policyVersion"]))
    # 3. the policies
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

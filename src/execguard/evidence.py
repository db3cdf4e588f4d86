"""Where audit evidence comes from: a database file, a running gateway, an export package.

This is the I/O edge of auditing: it reads bytes and hands them, untrusted,
to :mod:`execguard.verify`, which decides. It also keeps the audit state file:
the last tree head verified per log, so the next audit can prove the log
still extends it.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from execguard.ledger import CheckpointRecord, SQLStore
from execguard.ledger._sql_util import node_key
from execguard.protocol.checkpoint import verifier_key
from execguard.protocol.errors import ConfigError, StorageUnavailable, VerificationError
from execguard.protocol.merkle import HASH_SIZE
from execguard.protocol.signing import load_public_key_pem
from execguard.verify.audit import (
    AuditEntry,
    ConsistencySource,
    StoredCheckpoint,
    StoredNodes,
    TrustedHead,
)
from execguard.verify.bundle import decode_hash
from execguard.verify.evidence import read_evidence_json

__all__ = [
    "PACKAGE_FORMAT",
    "AuditState",
    "ExportSummary",
    "LogEvidence",
    "Package",
    "database_evidence",
    "default_state_path",
    "export_package",
    "gateway_evidence",
    "keys_document_from_store",
    "read_package",
]


@dataclass
class LogEvidence:
    """One tenant's log as a source holds it: size, signed checkpoints, entries, tree."""

    tenant: str
    size: int
    checkpoints: list[StoredCheckpoint]
    entries: Iterator[AuditEntry]
    consistency: ConsistencySource | None = None
    nodes: StoredNodes | None = None


def read_receipt(text: Any) -> dict[str, Any]:
    """A stored receipt's text read as the one strict reader reads evidence, or raise
    VerificationError.

    Fast path: text that orjson writes back byte for byte (the ledger stores receipts
    in orjson's compact form) holds no duplicate key, since a written object never
    does; anything else is read by the strict reader, which refuses duplicates.
    """
    if isinstance(text, str):
        try:
            value = orjson.loads(text)
            if isinstance(value, dict) and orjson.dumps(value) == text.encode():
                return value
        except (orjson.JSONDecodeError, orjson.JSONEncodeError, UnicodeEncodeError):
            pass  # the strict reader says precisely what is wrong
        return read_evidence_json(text, "the receipt")
    if isinstance(text, bytes):
        return read_evidence_json(text, "the receipt")
    raise VerificationError(f"the receipt is stored as {type(text).__name__}, not text")


def _entry(index: Any, text: Any, leaf: Any = None, prev: Any = None, chained: Any = None,
           kind: Any = None, execution_id: Any = None, receipt_hash: Any = None) -> AuditEntry:
    columns = {"leaf_hash": bytes(leaf) if isinstance(leaf, memoryview) else leaf,
               "prev_hash": prev, "entry_hash": chained, "kind": kind,
               "execution_id": execution_id, "receipt_hash": receipt_hash}
    if isinstance(text, dict):  # already parsed strictly by the source's reader
        return AuditEntry(index, text, **columns)
    try:
        receipt = read_receipt(text)
    except VerificationError as exc:
        return AuditEntry(index, None, problem=str(exc), **columns)
    return AuditEntry(index, receipt, **columns)


def _decoded_hash(text: Any) -> Any:
    """Canonical base64 of a hash as bytes; anything else as it came (it will not match)."""
    try:
        return decode_hash(text)
    except VerificationError:
        return text


# -- a database file -------------------------------------------------------------------


def keys_document_from_store(store: SQLStore, authority: str) -> dict[str, Any]:
    """The keys document as the gateway would publish it, read from the database."""
    return {"protocol": "execguard/1", "authority": authority,
            "keys": [{"keyId": k.key_id, "algorithm": "Ed25519", "publicKeyPem": k.public_pem,
                      "status": k.status,
                      "noteVerifierKey": verifier_key(authority, load_public_key_pem(k.public_pem))}
                     for k in store.signing_keys()]}


def database_evidence(store: SQLStore, tenant: str) -> LogEvidence:
    """A tenant's log read straight from a (read-only) database file, rows as stored."""
    rows = store.iter_log(tenant)
    return LogEvidence(
        tenant=tenant, size=store.log_size(tenant),
        checkpoints=[StoredCheckpoint(note, size, bytes(root) if isinstance(root, memoryview)
                                      else root)
                     for size, root, note in store.checkpoint_rows(tenant)],
        entries=(_entry(*r) for r in rows),
        consistency=lambda first, second: store.consistency_proof(tenant, first, second),
        nodes=_stored_nodes(store, tenant))


def _stored_nodes(store: SQLStore, tenant: str) -> StoredNodes:
    """The stored Merkle nodes as the gateway reads them: by (last leaf, level)."""
    for level, index, digest, last_leaf in store.iter_merkle_nodes(tenant):
        raw = bytes(digest) if isinstance(digest, memoryview) else digest
        keyed = type(level) is int and type(index) is int and type(last_leaf) is int \
            and 0 <= level < 64 and index >= 0 and node_key(level, index) == last_leaf
        # A row keyed elsewhere is never read as this node: it cannot match.
        yield level, index, raw if keyed else None


# -- a running gateway -----------------------------------------------------------------


def gateway_evidence(client: httpx.Client, page: int = 1000) -> LogEvidence:
    """The caller's tenant's log, fetched page by page from a gateway's log API.

    Every answer is read by the one strict reader of evidence. An empty log has no
    checkpoint yet (404) and is audited as the empty log it is.
    """
    def get(path: str, *, missing_ok: bool = False, **params: Any) -> dict[str, Any] | None:
        try:
            response = client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise StorageUnavailable(f"cannot reach {client.base_url}: {exc}") from exc
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code != 200:
            raise ConfigError(f"{client.base_url}{path} answered {response.status_code}: "
                              f"{response.text[:200]}")
        try:
            return read_evidence_json(response.content, f"the answer of {path}")
        except VerificationError as exc:
            raise ConfigError(f"{client.base_url}: {exc}") from None

    def page_of(path: str, key: str, **params: Any) -> list[dict[str, Any]]:
        items = (get(path, **params) or {}).get(key)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigError(f"{client.base_url}{path} answered no list of {key}")
        return items

    head = get("/v1/log/checkpoint", missing_ok=True)
    size = head.get("size") if head is not None else 0
    if type(size) is not int or size < 0:
        raise ConfigError(f"{client.base_url}/v1/log/checkpoint answered size {size!r}")
    listed: list[dict[str, Any]] = []
    while True:  # every checkpoint, a page at a time
        last = listed[-1].get("size") if listed else -1
        batch = page_of("/v1/log/checkpoints", "checkpoints",
                        min_size=last + 1 if type(last) is int else 0, limit=10000)
        listed += batch
        if len(batch) < 10000 or type(last) is not int:
            break
    checkpoints = [StoredCheckpoint(c.get("note"), c.get("size"), _decoded_hash(c.get("root")))
                   for c in listed]
    origin = (get("/v1/log/checkpoints", limit=1) or {}).get("origin")
    if head is None and (checkpoints or not isinstance(origin, str)):
        raise ConfigError(f"{client.base_url}/v1/log/checkpoint answered 404")
    tenant = str(origin).rsplit("/", 1)[-1]

    def entries() -> Iterator[AuditEntry]:
        for start in range(0, size, page):
            for e in page_of("/v1/log/entries", "entries", start=start,
                             end=min(size, start + page)):
                yield _entry(e.get("index"), e.get("receipt"), _decoded_hash(e.get("leafHash")),
                             e.get("prevEntryHash"), e.get("entryHash"), e.get("kind"),
                             e.get("executionId"))

    def consistency(first: int, second: int) -> list[bytes]:
        proof = get("/v1/log/proof/consistency", **{"from": first, "to": second}) or {}
        return [decode_hash(h) for h in proof["hashes"]]

    return LogEvidence(tenant=tenant, size=size, checkpoints=checkpoints, entries=entries(),
                       consistency=consistency)


# -- the audit state file --------------------------------------------------------------


def default_state_path() -> Path:
    """``$XDG_STATE_HOME/execguard/audit-state.json`` (``~/.local/state`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "execguard" / "audit-state.json"


class AuditState:
    """The last tree head verified for each log (by origin), kept between audits."""

    FORMAT = "execguard-audit-state/1"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.logs: dict[str, dict[str, Any]] = {}
        if not path.exists():
            return
        try:
            data = read_evidence_json(path.read_bytes(), "its content")
        except VerificationError as exc:
            raise self._damaged(str(exc)) from None
        if data.get("format") != self.FORMAT:
            raise self._damaged(f"format is {data.get('format')!r}, not {self.FORMAT!r}")
        logs = data.get("logs")
        if not isinstance(logs, dict):
            raise self._damaged('"logs" is not an object of tree heads by origin')
        for origin, entry in logs.items():
            self._head(origin, entry)  # each one checked now, before any audit relies on it
        self.logs = logs

    def _damaged(self, why: str) -> ConfigError:
        return ConfigError(f"audit state file {self.path} is damaged: {why}; it is what "
                           "detects rollbacks, so it is not ignored")

    def _head(self, origin: str, entry: Any) -> TrustedHead:
        if not isinstance(entry, dict):
            raise self._damaged(f"the entry of {origin!r} is not an object")
        size, root, when = entry.get("size"), _decoded_hash(entry.get("root")), \
            entry.get("verifiedAt")
        if type(size) is not int or size < 0:
            raise self._damaged(f"the size of {origin!r} is {size!r}, not an integer >= 0")
        if not isinstance(root, bytes):
            raise self._damaged(f"the root of {origin!r} is {entry.get('root')!r}, not "
                                f"base64 of {HASH_SIZE} bytes")
        if when is not None and not isinstance(when, str):
            raise self._damaged(f"verifiedAt of {origin!r} is not text")
        return TrustedHead(size, root, when)

    def trusted(self, origin: str) -> TrustedHead | None:
        """The head an earlier audit verified for this log, if any."""
        entry = self.logs.get(origin)
        return None if entry is None else self._head(origin, entry)

    def remember(self, origin: str, size: int, root: bytes, when: str) -> None:
        """Record a verified head (only ever moving forward)."""
        current = self.trusted(origin)
        if current is None or current.size <= size:
            self.logs[origin] = {"size": size, "root": base64.b64encode(root).decode(),
                                 "verifiedAt": when}

    def save(self) -> None:
        """Write atomically: a crash leaves the old state or the new one, never half."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": self.FORMAT, "logs": self.logs}, indent=2))
        os.replace(tmp, self.path)


# -- auditor packages ------------------------------------------------------------------

PACKAGE_FORMAT = "execguard-export/1"


@dataclass(frozen=True)
class ExportSummary:
    """What ``export`` wrote."""

    path: Path
    receipts: int
    policies: int
    tree_size: int


def export_package(store: SQLStore, tenant: str, checkpoint: CheckpointRecord,
                   keys_document: dict[str, Any], out: Path, *, since: str | None = None,
                   until: str | None = None, created_at: str = "") -> ExportSummary:
    """Write receipts from ``since`` to ``until`` with proofs against ``checkpoint``."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    versions: set[str] = set()
    count = 0
    with (out / "entries.jsonl").open("w", encoding="utf-8") as handle:
        for row in store.iter_log(tenant):
            index, text = row[0], row[1]
            if index < 0:  # not an entry of the log (the audit reports such rows)
                continue
            if index >= checkpoint.size:
                break
            receipt = json.loads(text)
            stamp = str(receipt.get("timestamp", ""))
            if (since and stamp < since) or (until and stamp >= until):
                continue
            proof = store.inclusion_proof(tenant, index, checkpoint.size)
            handle.write(json.dumps({"receipt": receipt, "inclusionProof": {
                "index": index, "treeSize": checkpoint.size,
                "hashes": [base64.b64encode(h).decode() for h in proof]}},
                ensure_ascii=False) + "\n")
            count += 1
            if receipt.get("receiptType", "decision") == "decision" and \
                    receipt.get("policyVersion"):
                versions.add(receipt["policyVersion"])
    for version in sorted(versions):
        bundle = store.get_bundle(tenant, version)
        if bundle is None:
            raise StorageUnavailable(f"policy bundle {version} named by receipts is not stored")
        for relative, data in bundle.files.items():
            target = out / "policies" / version / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    (out / "checkpoint.txt").write_text(checkpoint.note, encoding="utf-8")
    (out / "keys.json").write_text(json.dumps(keys_document, indent=2), encoding="utf-8")
    (out / "manifest.json").write_text(json.dumps({
        "format": PACKAGE_FORMAT, "tenant": tenant, "since": since, "until": until,
        "createdAt": created_at, "receipts": count, "treeSize": checkpoint.size,
        "policies": sorted(versions)}, indent=2), encoding="utf-8")
    return ExportSummary(out, count, len(versions), checkpoint.size)


@dataclass
class Package:
    """An auditor package as read from disk (still untrusted)."""

    manifest: dict[str, Any]
    keys_document: Any
    checkpoint_note: str
    entries: Iterator[dict[str, Any]]
    policies: dict[str, dict[str, bytes]]


def _bundle_files(directory: Path) -> dict[str, bytes]:
    """A bundle's files by relative POSIX path; hidden ones (a name starting with ".")
    are not part of a bundle (PROTOCOL.md §7), as the gateway reads bundles."""
    files: dict[str, bytes] = {}
    for file in sorted(directory.rglob("*")):
        relative = file.relative_to(directory).as_posix()
        if file.is_file() and not any(part.startswith(".") for part in relative.split("/")):
            files[relative] = file.read_bytes()
    return files


def read_package(path: Path) -> Package:
    """Read a package directory written by :func:`export_package`.

    Every JSON document in it is read by the one strict reader of evidence. A file
    that cannot be read at all is a :class:`ConfigError`; a damaged line of
    ``entries.jsonl`` is handed on as an unreadable entry, for the verifier to report.
    """
    def document(name: str) -> dict[str, Any]:
        try:
            return read_evidence_json((path / name).read_bytes(), name)
        except (OSError, VerificationError) as exc:
            raise ConfigError(f"cannot read the package at {path}: {exc}") from None

    manifest = document("manifest.json")
    if manifest.get("format") != PACKAGE_FORMAT:
        raise ConfigError(f"{path} is not an ExecGuard export ({manifest.get('format')!r})")
    keys_document = document("keys.json")
    try:
        note = (path / "checkpoint.txt").read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the package at {path}: {exc}") from None
    policies: dict[str, dict[str, bytes]] = {}
    root = path / "policies"
    if root.is_dir():
        for version_dir in sorted(p for p in root.iterdir()
                                  if p.is_dir() and not p.name.startswith(".")):
            policies[version_dir.name] = _bundle_files(version_dir)

    def entries() -> Iterator[dict[str, Any]]:
        with (path / "entries.jsonl").open("rb") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    yield read_evidence_json(line, f"entries.jsonl line {number}")
                except VerificationError as exc:
                    yield {"receipt": None, "problem": str(exc)}

    return Package(manifest, keys_document, note, entries(), policies)

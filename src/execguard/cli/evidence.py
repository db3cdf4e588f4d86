"""``execguard receipt verify``, ``verify``, ``audit`` and ``export``: the auditor's commands."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from execguard.cli._common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    TenantOption,
    app,
    datadir,
    err,
    load_json_source,
    out,
    read_file,
    receipt_app,
)
from execguard.evidence import (
    AuditState,
    LogEvidence,
    database_evidence,
    default_state_path,
    export_package,
    gateway_evidence,
    keys_document_from_store,
    read_package,
)
from execguard.ledger import open_ledger
from execguard.protocol.errors import ConfigError, VerificationError
from execguard.verify import (
    KeySet,
    classify_evidence,
    extract_receipt,
    verify_bundle,
    verify_execution_token,
    verify_receipt,
)
from execguard.verify.audit import LogAuditor, LogAuditReport
from execguard.verify.evidence import read_evidence_json
from execguard.verify.package import verify_package


@receipt_app.command("verify")
def receipt_verify(
    file: Annotated[Path, typer.Argument(help="A receipt, or a response holding one.")],
    keys: Annotated[str, typer.Option(help="Keys document: a file or a URL.")],
    as_json: JsonOption = False,
) -> None:
    """Verify a receipt offline: recompute its hash and check its signature."""
    keyset = KeySet.from_document(load_json_source(keys))
    _verify_and_report(lambda: _verify_one("receipt", read_evidence_json(read_file(file),
                                                                         str(file)), keyset, 0.0),
                       as_json)


# -- whole-log audit -------------------------------------------------------------------


def _keyset(keys: str | None, fallback: Any, where: str, as_json: bool) -> KeySet:
    if keys is not None:
        return KeySet.from_document(load_json_source(keys))
    if not as_json:
        err.print(Text("note", style="yellow"), f": keys taken from {where} itself; pin them "
                  "with --keys FILE|URL so a replaced key set cannot go unnoticed", sep="")
    return KeySet.from_document(fallback)


def _audit_log(evidence: LogEvidence, keys: KeySet, state: AuditState | None,
               quiet: bool) -> LogAuditReport:
    origin = f"{keys.authority}/{evidence.tenant}"
    auditor = LogAuditor(tenant=evidence.tenant, keys=keys, checkpoints=evidence.checkpoints,
                         trusted=state.trusted(origin) if state else None,
                         consistency=evidence.consistency, nodes=evidence.nodes)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, transient=True,
                  disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task(f"auditing {origin}", total=evidence.size)
        for count, entry in enumerate(evidence.entries, 1):
            auditor.add(entry)
            if count % 1000 == 0:
                progress.update(task, completed=count)
    report = auditor.finish()
    if state is not None and report.ok and report.latest is not None:
        state.remember(report.origin, report.latest.size, report.latest.root, _now())
    return report


def _now() -> str:
    from datetime import UTC, datetime

    from execguard.protocol.outcome import format_timestamp
    return format_timestamp(datetime.now(UTC))


def _print_reports(reports: list[LogAuditReport], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{
            "tenant": r.tenant, "origin": r.origin, "entries": r.entries,
            "root": base64.b64encode(r.root).decode(), "checkpointsVerified":
            r.checkpoints_verified, "ok": r.ok, "firstBadIndex": r.first_bad_index,
            "findingCount": r.finding_count,
            "findings": [{"kind": f.kind, "index": f.index, "message": f.message}
                         for f in r.findings]} for r in reports], indent=2))
        return
    table = Table("log", "entries", "checkpoints verified", "root", "first bad index", "verdict")
    for r in reports:
        table.add_row(r.origin, str(r.entries), str(r.checkpoints_verified),
                      base64.b64encode(r.root).decode()[:16] + "…",
                      "-" if r.first_bad_index is None else str(r.first_bad_index),
                      Text("clean", style="green") if r.ok else
                      Text(f"{r.finding_count} finding(s)", style="red"))
    out.print(table)
    for r in reports:
        if r.ok and r.entries == 0:
            out.print(f"{r.origin}: the log is empty, and an empty log is clean")
        for f in r.findings[:50]:
            where = "" if f.index is None else f" at index {f.index}"
            out.print(Text.assemble((f.kind, "red"), f"{where}: {f.message}"))


@app.command()
def audit(
    url: Annotated[str | None, typer.Option(help="Audit a running gateway's log.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="EXECGUARD_API_KEY",
                                                help="API key for --url.")] = None,
    db: Annotated[str | None, typer.Option(help="Audit a ledger database, opened read-only: "
                                           "a SQLite file or a postgresql:// URL.")] = None,
    package: Annotated[Path | None, typer.Option(help="Verify an export package, "
                                                 "offline.")] = None,
    keys: Annotated[str | None, typer.Option(help="Pinned keys document: file or URL.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's log (--db).")] = None,
    authority: Annotated[str, typer.Option(help="The gateway's authority id (--db "
                                           "without --keys).")] = "execguard",
    state: Annotated[Path | None, typer.Option(help="Audit state file (last verified head "
                                               "per log).")] = None,
    no_state: Annotated[bool, typer.Option("--no-state", help="Neither read nor write "
                                           "the state file.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Re-derive a whole log and check it against its signed checkpoints and receipts.

    Reports any modified, deleted, inserted or reordered entry and any forked or rolled-back
    checkpoint, naming the first bad index. Exit code 0 when clean, 1 otherwise.
    """
    sources = [s for s in (url, db, package) if s is not None]
    if len(sources) != 1:
        raise ConfigError("give exactly one of --url, --db or --package")
    if package is not None:
        raise typer.Exit(_audit_package(package, keys, as_json))
    audit_state = None if no_state else AuditState(state or default_state_path())
    reports: list[LogAuditReport] = []
    if db is not None:
        if "://" in db:  # a URL, not a file: one that cannot work is refused without its password
            from execguard.server.datadir import checked_database_url
            checked_database_url(db, "--db")
        store = open_ledger(db, readonly=True)
        try:
            keyset = _keyset(keys, keys_document_from_store(store, authority), "the database",
                             as_json)
            tenants = store.tenants()
            if tenant is not None and tenant not in tenants:
                raise ConfigError(f"the database has no tenant {tenant!r} (its tenants: "
                                  f"{', '.join(tenants) or 'none'})")
            for name in [tenant] if tenant else tenants:
                reports.append(_audit_log(database_evidence(store, name), keyset,
                                          audit_state, as_json))
        finally:
            store.close()
    else:
        assert url is not None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
            fallback = client.get("/.well-known/trigguard/keys.json").json() \
                if keys is None else None
            keyset = _keyset(keys, fallback, "the gateway", as_json)
            reports.append(_audit_log(gateway_evidence(client), keyset, audit_state,
                                      as_json))
    if audit_state is not None:
        audit_state.save()
    _print_reports(reports, as_json)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


def _audit_package(path: Path, keys: str | None, as_json: bool) -> int:
    package = read_package(path)
    keyset = _keyset(keys, package.keys_document, "the package", as_json)
    report = verify_package(tenant=str(package.manifest.get("tenant")), keys=keyset,
                            checkpoint_note=package.checkpoint_note, entries=package.entries,
                            policies=package.policies, manifest=package.manifest)
    if as_json:
        print(json.dumps({"tenant": report.tenant, "ok": report.ok,
                          "receipts": report.receipts,
                          "receiptsVerified": report.receipts_verified,
                          "policiesVerified": report.policies_verified,
                          "treeSize": report.checkpoint.size if report.checkpoint else None,
                          "findings": [{"kind": f.kind, "index": f.index, "message": f.message}
                                       for f in report.findings]}, indent=2))
    else:
        table = Table("package", "receipts verified", "policies verified", "checkpoint",
                      "verdict")
        table.add_row(str(path), f"{report.receipts_verified}/{report.receipts}",
                      str(report.policies_verified),
                      str(report.checkpoint.size) if report.checkpoint else "-",
                      Text("valid", style="green") if report.ok else Text("INVALID", style="red"))
        out.print(table)
        for f in report.findings[:50]:
            out.print(Text.assemble((f.kind, "red"), f": {f.message}"))
    return 0 if report.ok else 1


# -- export ----------------------------------------------------------------------------


def _when(text: str | None, name: str) -> str | None:
    """An RFC 3339 timestamp, or a relative one like ``7d``, ``24h``, ``30m`` ago."""
    if text is None:
        return None
    from datetime import UTC, datetime, timedelta

    from execguard.protocol.outcome import format_timestamp, parse_timestamp
    units = {"d": "days", "h": "hours", "m": "minutes"}
    try:
        if text[:-1].isdigit() and text[-1:] in units:
            delta = timedelta(**{units[text[-1]]: int(text[:-1])})
            return format_timestamp(datetime.now(UTC) - delta)
        return format_timestamp(parse_timestamp(text))
    except (ValueError, OverflowError):  # not a time, or an age before the year 1
        raise ConfigError(f"--{name} {text!r} is neither an RFC 3339 timestamp nor an age "
                          "like 7d, 24h or 30m") from None


@app.command()
def export(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="A new directory.")],
    since: Annotated[str | None, typer.Option(help="From (RFC 3339, or 7d/24h/30m ago).")] = None,
    until: Annotated[str | None, typer.Option(help="Until, exclusive.")] = None,
    tenant: TenantOption = "demo",
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Write an auditor package: receipts, proofs, a checkpoint, keys and policy bundles.

    `execguard audit --package OUT` verifies it with no network.
    """
    from execguard.server.settings import Settings
    from execguard.server.transparency import Transparency
    start, end = _when(since, "since"), _when(until, "until")
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"--since {since!r} is not before --until {until!r}: "
                          "nothing could be exported")
    settings = Settings.from_env(data_dir=data)
    directory = datadir(data)
    store = directory.open_store()
    try:
        checkpoint = Transparency(settings, store,
                                  directory.signer_source(store)).issue_checkpoint(tenant)
        if checkpoint is None:
            raise ConfigError(f"the log of tenant {tenant!r} is empty: nothing to export")
        summary = export_package(
            store, tenant, checkpoint, keys_document_from_store(store, settings.authority_id),
            out_dir, since=start, until=end, created_at=_now())
    finally:
        store.close()
    out.print(f"Exported {summary.receipts} receipts and {summary.policies} policy bundles "
              f"with proofs against checkpoint {summary.tree_size} to {summary.path}")


# -- verify one piece of evidence ------------------------------------------------------


def _verify_one(kind: str, evidence: Any, keyset: KeySet, at: float) -> dict[str, Any]:
    """Verify a token, bundle or receipt; return what a person or a script needs to see."""
    if kind == "token":
        token = verify_execution_token(evidence, keyset, now=at)
        claims = token.claims
        return {"kind": "token", "executionId": token.execution_id, "keyId": token.key_id,
                "surface": claims["surface"], "tenant": claims["tenant"],
                "requestHash": claims["request_hash"], "expiresAt": token.expires_at,
                "summary": f"execution token for {claims['surface']} (tenant "
                           f"{claims['tenant']}, execution {token.execution_id})"}
    if kind == "bundle":
        bundle = verify_bundle(evidence, keyset)
        receipt = bundle.receipt.receipt
        return {"kind": "bundle", "executionId": receipt.get("executionId"),
                "keyId": bundle.receipt.key_id, "decision": receipt.get("decision"),
                "logIndex": bundle.index, "treeSize": bundle.tree_size,
                "origin": bundle.checkpoint.origin,
                "summary": f"{_decided(receipt)} receipt {receipt.get('executionId')}, "
                           f"entry {bundle.index} of {bundle.checkpoint.origin} "
                           f"(checkpoint of {bundle.tree_size} entries)"}
    verified = verify_receipt(extract_receipt(evidence), keyset)
    receipt = verified.receipt
    verdict = receipt.get("decision") or receipt.get("outcome")
    shown = _decided(receipt) if receipt.get("decision") else verdict
    return {"kind": "receipt", "executionId": receipt.get("executionId"),
            "keyId": verified.key_id, "decision": verdict,
            "summary": f"{receipt.get('receiptType', 'decision')} receipt "
                       f"{receipt.get('executionId')} ({shown} on {receipt.get('surface')})"}


def _decided(receipt: Mapping[str, Any]) -> str:
    """A decision receipt's decision as a person must read it: an observe-mode PERMIT is
    no permit, and says what enforcing would have decided."""
    if receipt.get("executionMode") == "observe":
        return (f"{receipt.get('decision')} (observe mode, not enforced; would be "
                f"{receipt.get('wouldDecision')})")
    return str(receipt.get("decision"))


@app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="A receipt (or a response holding one), an "
                                         "execution token, or a bundle.")],
    keys: Annotated[str, typer.Option(help="Pinned keys document: a file or a URL.")],
    at: Annotated[str | None, typer.Option(help="Check a token's validity at this RFC 3339 "
                                           "time instead of now.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Verify a receipt, an execution token or a bundle offline. Exit 0 if valid, 1 if not.

    Receipts: the hash is recomputed from every field and the signature checked. Tokens:
    signature, algorithm, claims and validity window. Bundles: the receipt, its inclusion
    proof and the checkpoint's note signature.
    """
    from datetime import UTC, datetime

    from execguard.protocol.outcome import parse_timestamp
    moment = datetime.now(UTC) if at is None else _parse_at(at, parse_timestamp)
    keyset = KeySet.from_document(load_json_source(keys))

    def check() -> dict[str, Any]:
        kind, evidence = classify_evidence(read_file(file).decode("utf-8", errors="replace"))
        return _verify_one(kind, evidence, keyset, moment.timestamp())

    _verify_and_report(check, as_json)


def _verify_and_report(check: Callable[[], dict[str, Any]], as_json: bool) -> None:
    """Run a verification; print the verdict; exit 1 when it does not verify."""
    try:
        result = check()
    except VerificationError as exc:
        if as_json:
            print(json.dumps({"valid": False, "error": exc.code, "reason": str(exc)}))
        else:
            out.print(Text.assemble(("INVALID", "red"), f": {exc}"))
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps({"valid": True, **result}))
    else:
        out.print(Text.assemble(("VALID", "green"),
                                f": {result['summary']}, signed by {result['keyId']}"))


def _parse_at(text: str, parse: Any) -> Any:
    try:
        return parse(text)
    except ValueError:
        raise ConfigError(f"--at {text!r} is not an RFC 3339 timestamp") from None

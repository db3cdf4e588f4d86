"""Benchmark: audit a log of a million receipts, and serve inclusion proofs from it.

1. ``execguard init`` a data directory, then append N decision receipts (default 1,000,000)
   with the gateway's own signing key through the ledger's batch append (the same code
   path the gateway's group commit uses), with a signed checkpoint every 100,000 entries.
2. Time the whole-log audit in this process (one core): receipts/s, against the floor
   of its most expensive part, one Ed25519 verification, measured in the same run.
3. Time ``execguard audit --db`` end to end as a user runs it.
4. Start the gateway on that directory and time ``GET /v1/log/proof/inclusion`` for
   random indexes at the full size: p50/p99 in ms (client side), and the store's own
   proof cost in-process.

    python bench/audit.py [--entries 1000000] [--proofs 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from execguard.evidence import database_evidence, keys_document_from_store
from execguard.ledger import PendingEntry, SQLiteStore
from execguard.protocol.receipt import seal_receipt
from execguard.protocol.signing import Signer, verify_ed25519
from execguard.server.datadir import DataDir
from execguard.server.settings import Settings
from execguard.server.transparency import Transparency
from execguard.verify.audit import LogAuditor
from execguard.verify.keys import KeySet

console = Console(stderr=True)
BATCH = 1000
CHECKPOINT_EVERY = 100_000


def decision(signer: Signer, index_hint: int) -> PendingEntry:
    execution_id = str(uuid.UUID(int=random.getrandbits(128), version=4))
    fields = {
        "receiptType": "decision", "executionId": execution_id, "decision": "PERMIT",
        "surface": "payment.execute", "actorId": f"agent-{index_hint % 97}",
        "timestamp": "2026-11-26T22:30:00.123Z", "requestHash": f"{index_hint:064x}",
        "policyVersion": "ab" * 32, "reasonCode": "WITHIN_LIMIT",
        "determiningPolicies": ["payment-within-limit"], "executionMode": "enforce",
        "wouldDecision": None, "protocolVersion": "execguard/1", "authorityId": "execguard",
        "subjectDigest": None,
    }
    return PendingEntry(
        tenant="demo", kind="decision", execution_id=execution_id,
        seal=lambda index: seal_receipt({**fields, "logIndex": index}, signer),
        execution={"surface": "payment.execute", "actor_id": fields["actorId"],
                   "decision": "PERMIT", "reason_code": "WITHIN_LIMIT",
                   "policy_version": "ab" * 32, "request_hash": fields["requestHash"],
                   "request": {}},
        response={"decision": "PERMIT", "execution_id": execution_id})


def build(data: Path, entries: int) -> None:
    subprocess.run([sys.executable, "-m", "execguard", "init", "--data", str(data)], check=True,
                   capture_output=True)
    directory = DataDir(data)
    store = directory.open_store()
    signers = directory.signer_source(store)
    signer = signers.current()
    transparency = Transparency(Settings(data_dir=data), store, signers)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"appending {entries:,} receipts", total=entries)
        done = 0
        while done < entries:
            n = min(BATCH, entries - done)
            store.commit_batch([decision(signer, done + i) for i in range(n)], time.time())
            done += n
            if done % CHECKPOINT_EVERY == 0 or done == entries:
                transparency.issue_checkpoint("demo")
            progress.update(task, completed=done)
    store.close()


def audit_in_process(db: Path) -> dict[str, float]:
    store = SQLiteStore(db, readonly=True)
    keys = KeySet.from_document(keys_document_from_store(store, "execguard"))
    evidence = database_evidence(store, "demo")
    auditor = LogAuditor(tenant="demo", keys=keys, checkpoints=evidence.checkpoints,
                         consistency=evidence.consistency, nodes=evidence.nodes)
    started = time.perf_counter()
    for entry in evidence.entries:
        auditor.add(entry)
    report = auditor.finish()
    elapsed = time.perf_counter() - started
    store.close()
    if not report.ok:
        raise SystemExit(f"the benchmark log did not audit clean: {report.findings[:3]}")
    return {"entries": report.entries, "seconds": elapsed, "per_second": report.entries / elapsed,
            "checkpoints": report.checkpoints_verified}


def verify_floor() -> float:
    """One Ed25519 verification (the audit's floor), in µs, with the verifier the audit uses."""
    signer = Signer.generate()
    message = bytes(32)
    signature = signer.sign(message)
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        verify_ed25519(signer.public_key, signature, message, key_id="k")
    return (time.perf_counter() - started) / n * 1e6


def audit_cli(db: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "execguard", "audit", "--db", str(db), "--no-state",
                    "--json"], check=True, capture_output=True)
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def proofs(data: Path, size: int, count: int) -> dict[str, float]:
    store = SQLiteStore(data / "execguard.db", readonly=True)
    in_process = []
    for _ in range(count):
        index = random.randrange(size)
        started = time.perf_counter()
        store.inclusion_proof("demo", index, size)
        in_process.append((time.perf_counter() - started) * 1000)
    store.close()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "execguard", "serve", "--data", str(data),
                               "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not start")
            time.sleep(0.1)
        key = (data / "demo-api-key").read_text().strip()
        latencies = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
            for _ in range(count):
                index = random.randrange(size)
                started = time.perf_counter()
                response = client.get("/v1/log/proof/inclusion",
                                      params={"index": index, "size": size})
                latencies.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"http_p50_ms": statistics.median(latencies),
            "http_p99_ms": percentile(latencies, 0.99),
            "store_p50_ms": statistics.median(in_process),
            "store_p99_ms": percentile(in_process, 0.99)}


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--proofs", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="execguard-bench-audit-") as tmp:
        data = Path(tmp) / "data"
        started = time.perf_counter()
        build(data, args.entries)
        build_seconds = time.perf_counter() - started
        console.print(f"built {args.entries:,} receipts in {build_seconds:.0f} s")
        floor_us = verify_floor()
        audit = audit_in_process(data / "execguard.db")
        cli_seconds = audit_cli(data / "execguard.db")
        proof = proofs(data, args.entries, args.proofs)
    per_receipt_us = 1e6 / audit["per_second"]
    figures = {"entries": args.entries, "build_seconds": build_seconds,
               "audit_receipts_per_second": audit["per_second"],
               "audit_us_per_receipt": per_receipt_us, "verify_floor_us": floor_us,
               "floor_ratio": floor_us / per_receipt_us,
               "audit_cli_seconds": cli_seconds,
               "checkpoints_verified": audit["checkpoints"], **proof}
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    table = Table("measure", "figure", title=f"Audit and proofs at {args.entries:,} receipts")
    table.add_row("audit, in process (1 core)", f"{audit['per_second']:,.0f} receipts/s "
                  f"({per_receipt_us:.1f} µs each)")
    table.add_row("floor: one Ed25519 verification", f"{floor_us:.1f} µs "
                  f"(ratio floor/receipt {figures['floor_ratio']:.2f})")
    table.add_row("execguard audit --db, end to end", f"{cli_seconds:.1f} s "
                  f"({args.entries / cli_seconds:,.0f} receipts/s)")
    table.add_row("checkpoints verified", str(audit["checkpoints"]))
    table.add_row("inclusion proof over HTTP", f"p50 {proof['http_p50_ms']:.2f} ms, "
                  f"p99 {proof['http_p99_ms']:.2f} ms")
    table.add_row("inclusion proof, store only", f"p50 {proof['store_p50_ms']:.2f} ms, "
                  f"p99 {proof['store_p99_ms']:.2f} ms")
    Console().print(table)


if __name__ == "__main__":
    main()

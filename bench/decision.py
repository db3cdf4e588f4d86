"""The in-process cost of one decision, against the floor of its parts, in one run.

No HTTP: the decision worker that ``execguard serve`` runs in its decision process
(``server/decision_worker.py``), on a fresh data directory (``execguard init``: the
demo tenant and policy, SQLite, a signing key), called directly. Every request is
a PERMIT on ``payment.execute`` under the demo policy (a stateful surface: its
per-actor limits are read from the live reservations inside the write
transaction), with its own idempotency key.

Measured, each over ``--decisions`` calls after a warm-up, interleaved in rounds
so that a noisy moment is spread over all of them:

- ``decision``: ``DecisionWorker.decide_batch`` with one request, as the server hands
  it over (validated: the server parses the body): Cedar evaluation, token and
  receipt signatures, durable (fsync'd) append to the log, the answer's bytes, as on
  ``POST /execute`` without HTTP. Wall time per call, and process CPU.
- ``decision, no storage``: ``prepare_decision``: the same evaluation, token and
  sealed receipt, with the facts of an empty history and no append.
- floors: ``Cedar evaluation`` (``CompiledBundle.evaluate`` with computed facts),
  ``cedarpy.is_authorized`` alone (the native call with the same arguments), and
  ``Ed25519 signature`` (one signature over 32 bytes, as a receipt's).
- ``batches``: ``--concurrency`` requests per ``decide_batch`` (one transaction, one
  fsync, as under load), decisions/s and CPU per decision: the decision process's
  ceiling.

Run: ``.venv/bin/python bench/decision.py [--decisions 2000] [--rounds 5] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from execguard.protocol.request import parse_execution_request
from execguard.server.datadir import DataDir
from execguard.server.decision_worker import DecisionWorker
from execguard.server.decisions import DecisionInput, NoHistory, facts_for, prepare_decision
from execguard.server.frames import encode_request
from execguard.server.gateway import Gateway
from execguard.server.settings import Settings
from loadgen import percentile
from report import machine

console = Console(stderr=True, highlight=False)

BODY = {"surface": "payment.execute", "actorId": "bench-agent-0",
        "context": {"amount": 0.01, "currency": "EUR", "beneficiary": "Acme Office Supplies"}}


def _request(seq: int, actors: int) -> bytes:
    body = {**BODY, "actorId": f"bench-agent-{seq % actors}"}
    return json.dumps(body).encode()


class Bench:
    """The gateway of a fresh data directory, and the pieces its decisions are made of."""

    def __init__(self, data: Path, actors: int) -> None:
        out = subprocess.run([sys.executable, "-m", "execguard", "init", "--data", str(data)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"execguard init failed: {out.stderr.strip()}")
        directory = DataDir(data)
        self.store = directory.open_store()
        self.signer = directory.load_signer(self.store)
        signer = self.signer

        class Keys:
            def current(self) -> Any:
                return signer

        self.settings = Settings.from_env(data_dir=data)
        self.gateway = Gateway(self.settings, self.store, Keys())
        self.worker = DecisionWorker(self.gateway, self.store)
        self.actors = actors
        self.seq = 0
        bundle, self.compiled = self.gateway.active_bundle("demo")
        self.spec = bundle.registry.get("payment.execute")
        self.sample = parse_execution_request(_request(0, actors))

    def _next(self) -> Any:
        self.seq += 1
        return parse_execution_request(_request(self.seq, self.actors),
                                       idempotency_header=f"bench-{self.seq}")

    def _frame(self) -> tuple[dict[str, Any], bytes]:
        """A request as the server hands it to its decision process (validated there)."""
        self.seq += 1
        request = replace(self.sample, actor_id=f"bench-agent-{self.seq % self.actors}",
                          idempotency_key=f"bench-{self.seq}")
        return ({"id": self.seq, "tenant": "demo", "role": "agent", "keyHash": "bench"},
                encode_request(request))

    def batch(self, size: int) -> None:
        for header, body in self.worker.decide_batch([self._frame() for _ in range(size)]):
            if "batch" in header:
                continue
            if b'"decision":"PERMIT"' not in body:
                raise RuntimeError(f"expected a PERMIT, got {header} {body[:200]!r}")

    def decision(self) -> None:
        self.batch(1)

    def prepared(self) -> None:
        from execguard.protocol.request import normalized_request, request_hash
        request = self._next()
        normalized = normalized_request("demo", request, self.spec.sensitive)
        given = DecisionInput("demo", request, self.spec, self.compiled, normalized,
                              request_hash(normalized), "enforce", f"e-{self.seq}", time.time(),
                              "execguard", 60)
        prepared = prepare_decision(given, self.signer, NoHistory())
        prepared.seal(self.seq)

    def cedar(self) -> None:
        self.compiled.evaluate(self.sample, self.facts)

    def signature(self) -> None:
        self.signer.sign(self.digest)

    def native(self) -> None:
        import cedarpy
        cedarpy.is_authorized(*self.native_args[0], **self.native_args[1])

    def prepare_floors(self) -> None:
        self.facts = facts_for(self.spec, self.sample, time.time(), NoHistory())
        self.digest = os.urandom(32)
        self.native_args = _capture_native_call(self.compiled, self.sample, self.facts)


def _capture_native_call(compiled: Any, request: Any, facts: Any) -> tuple[Any, Any]:
    """The exact arguments ``CompiledBundle.evaluate`` gives ``cedarpy.is_authorized``."""
    import cedarpy

    from execguard.arbiter import engine

    seen: list[tuple[Any, Any]] = []
    original = cedarpy.is_authorized

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs))
        return original(*args, **kwargs)

    engine.cedarpy.is_authorized = spy  # type: ignore[attr-defined]
    try:
        compiled.evaluate(request, facts)
    finally:
        engine.cedarpy.is_authorized = original  # type: ignore[attr-defined]
    if not seen:
        raise RuntimeError("CompiledBundle.evaluate did not call cedarpy.is_authorized")
    return seen[0]


def _time_sync(fn: Callable[[], None], n: int) -> tuple[list[int], float]:
    samples = []
    cpu = time.process_time()
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return samples, time.process_time() - cpu


def _in_batches(bench: Bench, n: int, size: int) -> tuple[float, float]:
    """(decisions/s, CPU µs per decision) deciding ``size`` requests per transaction."""
    batches = max(1, n // size)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        bench.batch(size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return batches * size / wall, cpu / (batches * size) * 1e6


MEASURES = ("decision", "decision, no storage", "Cedar evaluation", "cedarpy.is_authorized",
            "Ed25519 signature")


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    bench.prepare_floors()
    sync = {"decision": bench.decision, "decision, no storage": bench.prepared,
            "Cedar evaluation": bench.cedar, "cedarpy.is_authorized": bench.native,
            "Ed25519 signature": bench.signature}
    for _ in range(args.warmup):  # warm-up: caches, compiled bundle, SQLite pages
        for fn in sync.values():
            fn()
    samples: dict[str, list[int]] = {name: [] for name in MEASURES}
    cpu: dict[str, float] = dict.fromkeys(MEASURES, 0.0)
    per_round = max(1, args.decisions // args.rounds)
    for round_ in range(args.rounds):
        console.print(f"round {round_ + 1}/{args.rounds}")
        names = list(MEASURES)
        names = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in names:
            got, spent = _time_sync(sync[name], per_round)
            samples[name] += got
            cpu[name] += spent
    rows = []
    for name in MEASURES:
        ordered = sorted(samples[name])
        rows.append({"measure": name, "calls": len(ordered),
                     "p50_us": round(percentile(ordered, 0.5) / 1e3, 1),
                     "p99_us": round(percentile(ordered, 0.99) / 1e3, 1),
                     "mean_us": round(sum(ordered) / len(ordered) / 1e3, 1),
                     "cpu_us": round(cpu[name] / len(ordered) * 1e6, 1)})
    rate, cpu_each = _in_batches(bench, args.decisions, args.concurrency)
    return {"machine": machine(), "decisions": args.decisions, "rounds": args.rounds,
            "concurrency": args.concurrency, "rows": rows,
            "in_flight": {"concurrency": args.concurrency, "decisions_per_s": round(rate, 1),
                          "cpu_us_per_decision": round(cpu_each, 1)}}


def print_report(report: dict[str, Any]) -> None:
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    info = report["machine"]
    out.print(f"One decision in process (no HTTP), {report['decisions']} calls per measure in "
              f"{report['rounds']} interleaved rounds; {info['cpus']} CPUs ({info['cpu_model']}),"
              f" Python {info['python']}")
    rows = {row["measure"]: row for row in report["rows"]}
    cedar, sig = rows["Cedar evaluation"]["p50_us"], rows["Ed25519 signature"]["p50_us"]
    floor = cedar + 2 * sig
    table = Table("measure", "p50 µs", "p99 µs", "mean µs", "CPU µs", "p50 ÷ floor",
                  caption=f"floor: Cedar evaluation + two signatures (token, receipt) = "
                          f"{floor:,.0f} µs at p50. CPU: process CPU per call (all threads).")
    for row in report["rows"]:
        ratio = f"{row['p50_us'] / floor:.1f}x" if row["measure"].startswith("decision") else ""
        table.add_row(row["measure"], f"{row['p50_us']:,.1f}", f"{row['p99_us']:,.1f}",
                      f"{row['mean_us']:,.1f}", f"{row['cpu_us']:,.1f}", ratio)
    out.print(table)
    flight = report["in_flight"]
    out.print(f"batches of {flight['concurrency']} (one transaction each): "
              f"{flight['decisions_per_s']:,.0f} decisions/s, "
              f"{flight['cpu_us_per_decision']:,.0f} µs CPU per decision")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=2000, help="calls per measure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--actors", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests per transaction in the batch measure")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if min(args.decisions, args.rounds, args.actors, args.concurrency) < 1 or args.warmup < 0:
        parser.error("counts must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="execguard-decision-"))
    bench = None
    try:
        bench = Bench(workdir / "data", args.actors)
        report = measure(bench, args)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        console.print(f"benchmark failed: {exc}", style="red")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if bench is not None:
            bench.store.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

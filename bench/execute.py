"""Throughput of ``POST /execute``: the real gateway against a FastAPI constant endpoint.

Initialises a temporary data directory with ``execguard init``, starts ``execguard
serve`` and ``bench/baseline_app.py`` (one uvicorn worker each), then drives both,
one after the other, with the same closed-loop load: a PERMIT request under the
demo policy (Cedar evaluation, signed receipt, signed execution token, durable
SQLite append). Every answer must be HTTP 200 with ``"decision":"PERMIT"``.

Load comes from wrk when it is on PATH, else from ``bench/loadgen.py`` (raw
asyncio streams, HTTP/1.1 keep-alive), each in its own process.

Run: ``make bench`` or ``.venv/bin/python bench/execute.py [--duration 10]
[--connections 32 64] [--rounds 1] [--loadgen auto|wrk|python] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from disk import STALL_MS, fsync_floor
from loadgen import LoadResult, LoadSpec
from report import (
    TARGET_P99_MS,
    TARGETS,
    Measurement,
    machine,
    print_table,
    summarise,
    summarise_half,
)
from servers import (
    Server,
    free_port,
    gateway_targets,
    init_datadir,
    machine_busy_seconds,
    start_server,
)
from wrk import find_wrk, run_wrk, write_script, wrk_version

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Every request is a distinct decision: its own idempotency key (so the gateway
# records the key with the decision, and nothing is a replay) and one of
# ``--actors`` actors. A small amount, so that no actor nears the demo policy's
# daily limit (50,000 per actor) and turns the run into DENYs; the limit is still
# evaluated against the actor's live reservations on every request.
BODY = json.dumps({"surface": "payment.execute", "actorId": "bench-agent-{actor}",
                   "context": {"amount": 0.01, "currency": "EUR",
                               "beneficiary": "Acme Office Supplies"}})
IDEMPOTENCY_KEY = "bench-{run}-{seq}"
EXPECT = '"decision":"PERMIT"'

console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


class LoadGenerator:
    """wrk with a Lua script, or the asyncio generator in a separate Python process."""

    def __init__(self, choice: str, workdir: Path, threads: int) -> None:
        wrk = find_wrk() if choice in ("auto", "wrk") else None
        if choice == "wrk" and wrk is None:
            raise SystemExit("--loadgen wrk: wrk is not on PATH")
        self.wrk, self.workdir, self.threads = wrk, workdir, threads
        if wrk is not None:
            self.label = f"{wrk_version(wrk)}, {threads} thread(s), Lua script"
        else:
            self.label = "bench/loadgen.py (Python asyncio streams, 1 process)"

    def run(self, spec: LoadSpec) -> LoadResult:
        if self.wrk is not None:
            script = self.workdir / "execute.lua"
            write_script(script, spec)
            return run_wrk(self.wrk, script, spec, self.threads)
        argv = [sys.executable, str(BENCH / "loadgen.py"), json.dumps(asdict(spec))]
        out = subprocess.run(argv, capture_output=True, text=True,
                             timeout=spec.duration + spec.grace + 30)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr.strip()}")
        return LoadResult.from_json(out.stdout)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(gen: LoadGenerator, server: Server, spec: LoadSpec, warmup: float,
            round_: int) -> Measurement:
    """A warm-up run (discarded), then the timed run with CPU read around it."""
    warm = gen.run(LoadSpec(**{**asdict(spec), "duration": warmup})) if warmup > 0 else None
    cpu_before, children_before = server.cpu_seconds(), _children_cpu()
    loop_before, busy_before = server.main_thread_cpu_seconds(), machine_busy_seconds()
    started = time.perf_counter()
    result = gen.run(spec)
    wall = time.perf_counter() - started
    cpu_after, children_after = server.cpu_seconds(), _children_cpu()
    loop_after, busy_after = server.main_thread_cpu_seconds(), machine_busy_seconds()
    server_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    loop_cpu = None if loop_before is None or loop_after is None else loop_after - loop_before
    return Measurement(
        round=round_, target=server.name, connections=spec.connections, rate=spec.rate,
        result=result,
        warmup_failures=warm.failures if warm else 0,
        server_cpu_us=round(server_cpu / result.requests * 1e6, 1)
        if server_cpu is not None and result.requests else None,
        server_cpu_pct=None if server_cpu is None else round(server_cpu / wall * 100, 1),
        loop_cpu_us=round(loop_cpu / result.requests * 1e6, 1)
        if loop_cpu is not None and result.requests else None,
        loadgen_cpu_pct=round((children_after - children_before) / wall * 100, 1),
        machine_cpu_pct=None if busy_before is None or busy_after is None
        else round((busy_after - busy_before) / wall * 100, 1))


def check_once(server: Server, key: str) -> None:
    """One request before the load: a 200 PERMIT, or stop with the answer shown."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/execute", data=BODY.encode(), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
        if response.status != 200 or EXPECT not in text:
            raise RuntimeError(f"{server.name} answered {response.status}: {text[:500]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Throughput of POST /execute: gateway "
                                     "against a FastAPI constant endpoint.")
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 64],
                        help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every measurement, alternating the order")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="auto: wrk if on PATH, else the Python generator")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--actors", type=int, default=1000,
                        help="distinct actorId values (the demo's limits are per actor)")
    parser.add_argument("--no-half", dest="half", action="store_false",
                        help="skip the latency run at half of each server's maximum")
    parser.add_argument("--db", action="append", default=[], metavar="URL",
                        help="also measure the gateway on this database (postgresql://...); "
                             "'auto' tries the local PostgreSQL server")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1 or min(args.connections) < 1 \
            or args.actors < 1:
        parser.error("durations, rounds and connections must be positive")
    return args


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("the benchmark overran its time budget")


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # stop like Ctrl-C: the finally blocks clean up


def _spec(server: Server, key: str, args: argparse.Namespace, connections: int,
          rate: float = 0.0) -> LoadSpec:
    return LoadSpec(port=server.port, body=BODY, connections=connections,
                    headers={"Authorization": f"Bearer {key}",
                             "Idempotency-Key": IDEMPOTENCY_KEY},
                    duration=args.duration, expect=EXPECT, rate=rate, actors=args.actors,
                    slow_ms=TARGET_P99_MS)


def _progress(m: Measurement) -> None:
    load = f"rate={m.rate:<7,.0f}" if m.rate else f"c={m.connections:<4}"
    console.print(f"round {m.round + 1} {m.target:8} {load} {m.result.rps:9,.0f} req/s  "
                  f"p50 {m.result.p50_ms:7.2f} ms  p99 {m.result.p99_ms:7.2f} ms  "
                  f"failed {m.result.failures} (warm-up {m.warmup_failures})")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start the servers; per round, each server's maximum, then its latency at half of it."""
    gen = LoadGenerator(args.loadgen, workdir, args.wrk_threads)
    # Open-loop (fixed rate) runs need the Python generator: wrk has no rate option.
    paced = LoadGenerator("python", workdir, 1)
    console.print(f"load generator: {gen.label}; at half throughput: {paced.label}")
    servers: list[Server] = []
    stack = ExitStack()  # databases we create, dropped after the servers stop
    try:
        port = free_port()
        servers.append(start_server("baseline", [sys.executable, str(BENCH / "baseline_app.py"),
                                                 "--port", str(port)],
                                    port, workdir / "baseline.log", ROOT))
        keys = {"baseline": "none"}
        for target, db in gateway_targets(stack, sys.executable, args.db):
            data = workdir / f"data-{target}"
            keys[target] = init_datadir(sys.executable, data, db)
            port = free_port()
            argv = [sys.executable, "-m", "execguard", "serve", "--data", str(data),
                    "--port", str(port), *(["--db", db] if db else [])]
            servers.append(start_server(target, argv, port, workdir / f"{target}.log", ROOT))
        for server in servers:
            check_once(server, keys[server.name])
        runs: list[Measurement] = []
        disk: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for server in order:
                best = 0.0
                for conns in args.connections:
                    spec = _spec(server, keys[server.name], args, conns)
                    m = measure(gen, server, spec, args.warmup, round_)
                    runs.append(m)
                    _progress(m)
                    best = max(best, m.result.rps)
                if args.half and best > 0:
                    spec = _spec(server, keys[server.name], args, max(args.connections),
                                 rate=best / 2)
                    m = measure(paced, server, spec, args.warmup, round_)
                    runs.append(m)
                    _progress(m)
            if args.half:  # the servers idle: the disk alone, where the ledgers are
                floor = fsync_floor(workdir, duration=args.duration)
                disk.append({"round": round_, **asdict(floor)})
                console.print(f"round {round_ + 1} disk     fdatasync of a page, "
                              f"{floor.rate:,.0f}/s: p50 {floor.p50_ms:.2f} ms  p99 "
                              f"{floor.p99_ms:.2f} ms  max {floor.max_ms:.2f} ms  "
                              f"over {STALL_MS:.0f} ms: {floor.stalls}")
    finally:
        for server in servers:
            server.stop()
        stack.close()
    targets = [server.name for server in servers]
    return {"load_generator": gen.label, "paced_generator": paced.label, "machine": machine(),
            "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
            "actors": args.actors, "targets": targets,
            "results": summarise(runs, args.connections, targets),
            "half": summarise_half(runs, targets), "disk": disk,
            "runs": [{**asdict(m), "result": asdict(m.result)} for m in runs]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = args.rounds * (len(args.connections) + 1) * (len(TARGETS) + len(args.db))
    budget = 180 + runs * (args.duration + args.warmup + 2 * 10 + 45) \
        + args.rounds * (args.duration + 30)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(budget)
    workdir = Path(tempfile.mkdtemp(prefix="execguard-bench-"))
    try:
        report = run(args, workdir)
    except KeyboardInterrupt:
        console.print("interrupted: servers stopped, temporary files removed")
        return 130
    except (TimeoutError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        console.print(f"benchmark failed: {exc}", style="red")
        return 1
    finally:
        signal.alarm(0)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    failures = sum(row[t]["failures"] for row in report["results"] for t in report["targets"])
    failures += sum(row["failures"] for row in report["half"])
    if failures:
        console.print(f"{failures} request(s) failed the check (HTTP 200 with {EXPECT})",
                      style="red")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's figures: one measurement, the summary over rounds, the machine, the table."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from disk import STALL_MS
from loadgen import LoadResult

__all__ = ["TARGETS", "Measurement", "machine", "print_table", "summarise", "summarise_half"]

TARGETS = ("baseline", "gateway")
#: The issue's targets, on the embedded SQLite default.
TARGET_RATIO = 0.5
TARGET_P99_MS = 10.0


@dataclass
class Measurement:
    """One timed run against one server."""

    round: int
    target: str
    connections: int
    #: Open-loop request rate (requests/s); 0 for a closed-loop run.
    rate: float
    result: LoadResult
    #: Failed checks during the warm-up run (its figures are discarded, its failures not).
    warmup_failures: int
    #: Server CPU (user + system, all threads) per answered request, in microseconds.
    server_cpu_us: float | None
    #: Server CPU over the run, in percent of one core.
    server_cpu_pct: float | None
    #: Load generator CPU over the run, in percent of one core.
    loadgen_cpu_pct: float
    #: The server's main thread's share of ``server_cpu_us`` (uvicorn's event loop; the
    #: rest is the gateway's ledger writer and log threads).
    loop_cpu_us: float | None = None
    #: Every CPU's busy time over the run (all processes), in percent of one core.
    machine_cpu_pct: float | None = None


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarise(runs: list[Measurement], connections: list[int],
              targets: Iterable[str] = TARGETS) -> list[dict[str, Any]]:
    """Per concurrency level and server: medians over rounds; median per-round ratios."""
    targets = list(targets)
    closed = [m for m in runs if not m.rate]
    rows = []
    for conns in connections:
        row: dict[str, Any] = {"connections": conns}
        for target in targets:
            mine = [m for m in closed if m.connections == conns and m.target == target]
            rps = [m.result.rps for m in mine]
            row[target] = {
                "rps": _median(rps), "rps_min": min(rps), "rps_max": max(rps),
                "p50_ms": _median([m.result.p50_ms for m in mine]),
                "p99_ms": _median([m.result.p99_ms for m in mine]),
                "requests": sum(m.result.requests for m in mine),
                "failures": sum(m.result.failures + m.warmup_failures for m in mine),
                "server_cpu_us_per_request": _median([m.server_cpu_us for m in mine]),
                "loop_cpu_us_per_request": _median([m.loop_cpu_us for m in mine]),
                "server_cpu_pct": _median([m.server_cpu_pct for m in mine]),
                "loadgen_cpu_pct": _median([m.loadgen_cpu_pct for m in mine]),
                "machine_cpu_pct": _median([m.machine_cpu_pct for m in mine])}
        for target in targets[1:]:
            ratios = [g.result.rps / b.result.rps
                      for b in closed for g in closed
                      if b.connections == g.connections == conns and b.round == g.round
                      and b.target == targets[0] and g.target == target and b.result.rps]
            row[f"ratio:{target}"] = _median(ratios)
        row["ratio"] = row.get(f"ratio:{targets[1]}") if len(targets) > 1 else None
        rows.append(row)
    return rows


def summarise_half(runs: list[Measurement], targets: Iterable[str]) -> list[dict[str, Any]]:
    """Per server: the open-loop runs at half its maximum (medians over rounds)."""
    rows = []
    for target in targets:
        mine = [m for m in runs if m.rate and m.target == target]
        if not mine:
            continue
        rows.append({"target": target, "rate": _median([m.rate for m in mine]),
                     "rps": _median([m.result.rps for m in mine]),
                     "p50_ms": _median([m.result.p50_ms for m in mine]),
                     "p90_ms": _median([m.result.p90_ms for m in mine]),
                     "p99_ms": _median([m.result.p99_ms for m in mine]),
                     "p99_ms_max": max(m.result.p99_ms for m in mine),
                     "requests": sum(m.result.requests for m in mine),
                     "failures": sum(m.result.failures + m.warmup_failures for m in mine),
                     "server_cpu_pct": _median([m.server_cpu_pct for m in mine]),
                     "server_cpu_us_per_request": _median([m.server_cpu_us for m in mine]),
                     "machine_cpu_pct": _median([m.machine_cpu_pct for m in mine]),
                     "stalls": _stalls([m.result for m in mine])})
    return rows


def _stalls(results: list[LoadResult]) -> dict[str, Any] | None:
    """Where the slow requests of some runs fell (``loadgen.find_stalls``), all together."""
    found = [r.stalls for r in results if r.stalls is not None]
    if not found:
        return None
    slow = sum(s.slow for s in found)
    intervals = [s.interval_s for s in found if s.interval_s is not None]
    return {"slow_pct": 100 * slow / max(1, sum(r.requests for r in results)),
            "in_stalls_pct": 100 * sum(s.slow_in_stalls for s in found) / slow if slow else None,
            "stalls": sum(s.count for s in found),
            "interval_s": _median(intervals) if intervals else None}


def _stall_text(stalls: dict[str, Any] | None) -> str:
    if stalls is None:
        return ""
    text = f"{stalls['slow_pct']:.1f} %"
    if stalls["in_stalls_pct"] is not None:
        text += f" ({stalls['in_stalls_pct']:.0f} % in {stalls['stalls']} stalls"
        if stalls["interval_s"] is not None:
            text += f", every ~{stalls['interval_s']:.1f} s"
        text += ")"
    return text


def machine() -> dict[str, Any]:
    """CPUs usable by this process, CPU model, Python version, platform."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus": cpus, "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform()}


def print_table(report: dict[str, Any]) -> None:
    """The report as a rich table on stdout."""
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
    info = report["machine"]
    out.print(f"POST /execute, {report['duration_s']} s per run after {report['warmup_s']} s "
              f"warm-up, {report['rounds']} round(s); {info['cpus']} CPUs ({info['cpu_model']})"
              f", Python {info['python']}")
    out.print(f"load generator: {escape(report['load_generator'])}; {report.get('actors', 1)} "
              "actors, a fresh idempotency key per request")
    table = Table("conns", "server", "req/s", "p50 ms", "p99 ms", "failed", "CPU µs/req",
                  "loop µs/req", "server CPU %", "loadgen CPU %", "ratio",
                  caption="CPU µs/req: server CPU (all its threads) per request; loop: its "
                  "main thread's (the event loop) part of it. CPU %: of one core. ratio: "
                  "gateway ÷ baseline req/s (median of per-round ratios).")

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    targets = report.get("targets", TARGETS)
    for row in report["results"]:
        for target in targets:
            fig = row[target]
            rps = num(fig["rps"], 0)
            if report["rounds"] > 1:
                rps += f" ({fig['rps_min']:,.0f}–{fig['rps_max']:,.0f})"
            failed = str(fig["failures"]) if not fig["failures"] else f"[red]{fig['failures']}"
            ratio = row.get(f"ratio:{target}")
            table.add_row(str(row["connections"]), target, rps, num(fig["p50_ms"], 2),
                          num(fig["p99_ms"], 2), failed, num(fig["server_cpu_us_per_request"], 0),
                          num(fig.get("loop_cpu_us_per_request"), 0),
                          num(fig["server_cpu_pct"], 0), num(fig["loadgen_cpu_pct"], 0),
                          "" if ratio is None else num(ratio, 2))
    out.print(table)
    if report.get("half"):
        half = Table("server", "rate req/s", "served req/s", "p50 ms", "p90 ms", "p99 ms",
                     "failed", "CPU µs/req", "server CPU %", "machine CPU %",
                     f"over {TARGET_P99_MS:.0f} ms",
                     caption="Open loop at half of the server's best closed-loop req/s in the "
                     "same round; latency counted from when each request was due. Machine "
                     f"CPU: every process's, of {report['machine']['cpus']} CPUs, in % of one. "
                     f"Over {TARGET_P99_MS:.0f} ms: the share of requests, and of those, how "
                     "many fell in stalls (runs of 100 ms in which most requests took that "
                     "long).")
        for row in report["half"]:
            failed = str(row["failures"]) if not row["failures"] else f"[red]{row['failures']}"
            half.add_row(row["target"], num(row["rate"], 0), num(row["rps"], 0),
                         num(row["p50_ms"], 2), num(row["p90_ms"], 2), num(row["p99_ms"], 2),
                         failed, num(row.get("server_cpu_us_per_request"), 0),
                         num(row["server_cpu_pct"], 0), num(row.get("machine_cpu_pct"), 0),
                         _stall_text(row.get("stalls")))
        out.print("Latency at half of the maximum throughput")
        out.print(half)
    for floor in report.get("disk", []):
        out.print(f"Disk floor (round {floor['round'] + 1}, servers idle): fdatasync of an "
                  f"8 KiB append, {floor['rate']:,.0f}/s for {floor['syncs']:,} syncs in the "
                  f"ledgers' file system: p50 {floor['p50_ms']:.2f} ms, p99 "
                  f"{floor['p99_ms']:.2f} ms, max {floor['max_ms']:.2f} ms, "
                  f"{floor['stalls']} over {STALL_MS:.0f} ms. A request waiting on a "
                  "commit waits for its fdatasync: no gateway latency is below this.")
    verdicts = _verdicts(report)
    if verdicts:
        out.print("Targets (SQLite gateway): " + "; ".join(verdicts))


def _verdicts(report: dict[str, Any]) -> list[str]:
    """The issue's targets against this run's figures."""
    out = []
    ratios = [row["ratio:gateway"] for row in report["results"] if row.get("ratio:gateway")]
    if ratios:
        best = max(ratios)
        out.append(f"throughput {best:.2f}x baseline (target >= {TARGET_RATIO}x: "
                   f"{'met' if best >= TARGET_RATIO else 'NOT met'})")
    for row in report.get("half", []):
        if row["target"] == "gateway":
            p99 = row["p99_ms"]
            verdict = (f"p99 {p99:.2f} ms at half max (target <= {TARGET_P99_MS:.0f} ms: "
                       f"{'met' if p99 <= TARGET_P99_MS else 'NOT met'}")
            worst = max((floor["max_ms"] for floor in report.get("disk", [])), default=None)
            if worst is not None:
                verdict += f"; this disk's slowest fdatasync in the same run: {worst:.0f} ms"
            out.append(verdict + ")")
    return out

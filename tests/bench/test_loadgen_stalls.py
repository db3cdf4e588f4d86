"""The benchmark's account of where slow requests fall (``bench/loadgen.py``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"
MS = 1_000_000


def _loadgen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_loadgen", BENCH / "loadgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


loadgen = _loadgen()
WINDOW = loadgen.STALL_WINDOW_NS


def run_of(slow_at: dict[int, int], windows: int = 10, per_window: int = 10
           ) -> tuple[list[int], list[int]]:
    """Start times and latencies: ``per_window`` requests per window, the first
    ``slow_at[w]`` of window ``w`` slow (50 ms), the rest fast (1 ms)."""
    starts, latencies = [], []
    for window in range(windows):
        for i in range(per_window):
            starts.append(window * WINDOW + i * (WINDOW // per_window))
            latencies.append(50 * MS if i < slow_at.get(window, 0) else 1 * MS)
    return starts, latencies


def test_consecutive_stalled_windows_are_one_stall_and_stray_slow_requests_none() -> None:
    starts, latencies = run_of({0: 1, 3: 8, 4: 6, 8: 9})
    found = loadgen.find_stalls(starts, latencies, 10 * MS)
    assert found == loadgen.Stalls(slow=24, count=2, slow_in_stalls=23, interval_s=0.5)


def test_a_window_with_half_of_its_requests_slow_is_not_stalled() -> None:
    starts, latencies = run_of({2: 5, 6: 5})
    found = loadgen.find_stalls(starts, latencies, 10 * MS)
    assert (found.slow, found.count, found.slow_in_stalls, found.interval_s) == (10, 0, 0, None)


def test_a_result_with_stalls_comes_back_from_its_json() -> None:
    starts, latencies = run_of({1: 7, 5: 7, 9: 7})
    result = loadgen.LoadResult(
        requests=100, seconds=1.0, rps=100.0, p50_ms=1.0, p90_ms=50.0, p99_ms=50.0,
        max_ms=50.0, non_200=0, wrong_body=0, errors=0,
        stalls=loadgen.find_stalls(starts, latencies, 10 * MS))
    again = loadgen.LoadResult.from_json(json.dumps(dataclasses.asdict(result)))
    assert again == result and again.stalls.interval_s == 0.4

"""The benchmark's machine-wide CPU reading (``bench/servers.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _servers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_servers", BENCH / "servers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


servers = _servers()


def test_busy_time_counts_user_nice_system_irq_softirq_and_steal_not_idle_or_iowait() -> None:
    #          user nice system idle  iowait irq softirq steal guest guest_nice
    line = "cpu  1000 20   300    9000  500    7   60      5     40    0\n"
    assert servers.busy_seconds(line, ticks=100) == pytest.approx((1000 + 20 + 300 + 7 + 60
                                                                   + 5) / 100)


def test_a_line_other_than_the_total_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu0"):
        servers.busy_seconds("cpu0 1 2 3 4 5 6 7 8 9 10", ticks=100)


def test_this_machines_proc_stat_is_read_and_its_busy_time_never_goes_back() -> None:
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat here")
    first = servers.machine_busy_seconds()
    sum(i * i for i in range(200_000))  # some CPU, so the kernel's tick can count it
    later = servers.machine_busy_seconds()
    assert first is not None and later is not None and later >= first > 0

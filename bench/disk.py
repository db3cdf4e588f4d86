"""The disk's own floor under a durable append: how long one fdatasync takes here.

Every decision the gateway acknowledges was fsync'd first (group-committed: one
fdatasync per transaction). So no latency figure of the gateway can be better than
this disk's fdatasync latency, and a stall of the disk (virtual disks on shared
hosts stall now and then for tens to hundreds of milliseconds) holds every request
that waits on the transaction in flight. This measures it in the same run, in the
same file system as the gateway's data, while the servers are idle: an 8 KiB
append (one page) and one ``fdatasync`` at a fixed rate, like a WAL commit.

Run alone: ``python bench/disk.py [DIRECTORY] [--rate 200] [--duration 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loadgen import percentile

__all__ = ["DiskFloor", "fsync_floor"]

PAGE = 8192
#: A sync slower than this is counted as a stall: the p99 target (``report.TARGET_P99_MS``).
STALL_MS = 10.0


@dataclass(frozen=True)
class DiskFloor:
    """fdatasync latencies of page appends at a fixed rate."""

    rate: float
    syncs: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: Syncs slower than ``STALL_MS``.
    stalls: int


def fsync_floor(directory: Path, rate: float = 200.0, duration: float = 10.0) -> DiskFloor:
    """Append a page and fdatasync, ``rate`` times a second for ``duration`` s."""
    handle, name = tempfile.mkstemp(prefix="fsync-floor-", dir=directory)
    page = os.urandom(PAGE)
    latencies: list[int] = []
    try:
        start = time.perf_counter()
        for n in range(int(rate * duration)):
            wait = start + n / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            began = time.perf_counter_ns()
            os.write(handle, page)
            os.fdatasync(handle)
            latencies.append(time.perf_counter_ns() - began)
    finally:
        os.close(handle)
        os.unlink(name)
    latencies.sort()
    return DiskFloor(rate=rate, syncs=len(latencies),
                     p50_ms=round(percentile(latencies, 0.50) / 1e6, 3),
                     p99_ms=round(percentile(latencies, 0.99) / 1e6, 3),
                     max_ms=round(latencies[-1] / 1e6, 3),
                     stalls=sum(1 for v in latencies if v > STALL_MS * 1e6))


def main() -> None:
    parser = argparse.ArgumentParser(description="fdatasync latency of page appends.")
    parser.add_argument("directory", nargs="?", default=".", type=Path)
    parser.add_argument("--rate", type=float, default=200.0, help="syncs per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    args = parser.parse_args()
    print(json.dumps(asdict(fsync_floor(args.directory, args.rate, args.duration))))


if __name__ == "__main__":
    main()

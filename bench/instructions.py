"""Instructions per decision, counted by valgrind: a figure that shared-machine noise does not move.

Times on this machine move by ±30 % from one hour to the next; the number of
instructions a decision executes does not. This runs the decision process's path
(``DecisionWorker.decide_batch``, as ``bench/decision.py`` does: Cedar, token,
receipt, a durable append; the server has parsed the body) on a fresh data
directory under ``valgrind --tool=callgrind``, counting only while ``--batches``
batches of ``--size`` requests run (after a warm-up), and prints the count per
decision. System calls (the fsync, reads of the database file) are not counted:
compare it with the CPU figures of ``bench/decision.py``, not instead.

Run: ``.venv/bin/python bench/instructions.py [--batches 10] [--size 32] [--json]``
(needs ``valgrind`` on PATH; about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def _toggle(on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                   capture_output=True, check=False, timeout=60)


def inside(batches: int, size: int, warmup: int) -> None:
    """The measured part (run by valgrind): warm up, then count ``batches`` batches."""
    sys.path.insert(0, str(BENCH))
    from decision import Bench

    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp) / "data", actors=1000)
        for _ in range(warmup):
            bench.batch(size)
        _toggle(True)
        for _ in range(batches):
            bench.batch(size)
        _toggle(False)
        bench.store.close()


def count(batches: int, size: int, warmup: int) -> int:
    """Run :func:`inside` under callgrind; the instructions it counted."""
    valgrind = shutil.which("valgrind")
    if valgrind is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not on PATH (Debian: apt-get install -y valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [valgrind, "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, __file__,
             "--inside", "--batches", str(batches), "--size", str(size),
             "--warmup", str(warmup)],
            capture_output=True, text=True, timeout=1800, check=False)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"the counted run failed ({out.returncode}): {out.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches counted")
    parser.add_argument("--size", type=int, default=32, help="requests per batch")
    parser.add_argument("--warmup", type=int, default=5, help="batches before counting")
    parser.add_argument("--json", action="store_true", help="the figure as JSON on stdout")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        inside(args.batches, args.size, args.warmup)
        return 0
    print(f"counting {args.batches} batches of {args.size} under valgrind (about a minute)...",
          file=sys.stderr)
    total = count(args.batches, args.size, args.warmup)
    decisions = args.batches * args.size
    report = {"decisions": decisions, "instructions": total,
              "instructions_per_decision": round(total / decisions)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['instructions_per_decision']:,} instructions per decision "
              f"({decisions} decisions in batches of {args.size}, {total:,} in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The servers under test, as subprocesses: start, wait until ready, read their CPU, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Server", "busy_seconds", "free_port", "gateway_targets", "init_datadir",
           "machine_busy_seconds", "postgres_database", "serve_has_db_option", "start_server"]

#: The local PostgreSQL server that ``--db auto`` uses (trust authentication).
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432"

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_datadir(python: str, data: Path, db: str | None = None,
                 timeout: float = 60.0) -> str:
    """Run ``execguard init`` (on ``db`` if given) and return the API key it printed last."""
    argv = [python, "-m", "execguard", "init", "--data", str(data)]
    out = subprocess.run([*argv, *(["--db", db] if db else [])],
                         capture_output=True, text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not lines[-1].startswith("EXECGUARD_API_KEY="):
        raise RuntimeError(f"execguard init failed ({out.returncode}): "
                           f"{out.stderr.strip() or out.stdout.strip()}")
    return lines[-1].split("=", 1)[1]


def _stat_cpu(path: Path) -> float | None:
    """utime + stime of a /proc ``stat`` file (a process or one of its threads), in seconds."""
    try:
        stat = path.read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def busy_seconds(stat_line: str, ticks: int = _CLOCK_TICKS) -> float:
    """CPU time all CPUs spent busy, from the ``cpu`` line of ``/proc/stat``: user, nice,
    system, irq, softirq and steal (not idle or iowait; guest time is already in user)."""
    name, *fields = stat_line.split()
    if name != "cpu" or len(fields) < 8:
        raise ValueError(f"not the total cpu line of /proc/stat: {stat_line!r}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / ticks


def machine_busy_seconds() -> float | None:
    """:func:`busy_seconds` of this machine now, if /proc tells (every process, the load
    generator's and the database's included)."""
    try:
        with open("/proc/stat") as stat:
            return busy_seconds(stat.readline())
    except (OSError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    """The running child processes of ``pid`` (Linux: ``/proc/<pid>/task/*/children``)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.extend(int(c) for c in children.read_text().split())
        except OSError:
            continue
    return found


@dataclass
class Server:
    """One server subprocess listening on ``port``; its output goes to ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time of the process (all its threads) and of its child
        processes (the gateway's decision process), if /proc tells."""
        total = 0.0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            cpu = _stat_cpu(Path(f"/proc/{pid}/stat"))
            if cpu is None:
                return None
            total += cpu
        return total

    def main_thread_cpu_seconds(self) -> float | None:
        """The same for its main thread alone: the event loop, for an asyncio server."""
        return _stat_cpu(Path(f"/proc/{self.process.pid}/task/{self.process.pid}/stat"))

    def wait_ready(self, timeout: float) -> None:
        """Poll ``GET /readyz`` until it answers 200; fail if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/readyz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM (graceful: the gateway drains its ledger), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(name: str, argv: list[str], port: int, log: Path, cwd: Path,
                 ready_timeout: float = 60.0) -> Server:
    """Start ``argv`` in its own session (a Ctrl-C reaches only us) and wait until ready."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, process, port, log)
    try:
        server.wait_ready(ready_timeout)
    except BaseException:
        server.stop(timeout=10)
        raise
    return server


def serve_has_db_option(python: str) -> bool:
    """Whether this ExecGuard's ``serve`` takes ``--db`` (a PostgreSQL store)."""
    out = subprocess.run([python, "-m", "execguard", "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    return out.returncode == 0 and "--db" in out.stdout


@contextmanager
def postgres_database(server: str = LOCAL_POSTGRES) -> Iterator[str]:
    """A fresh database of our own on ``server``, dropped afterwards; yields its URL."""
    import psycopg  # only when PostgreSQL is measured

    name = f"execguard_bench_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def gateway_targets(stack: ExitStack, python: str, dbs: list[str]) -> list[tuple[str, str | None]]:
    """The gateways to measure: SQLite always, then one per ``--db`` (``auto``: local PostgreSQL).

    ``auto`` is skipped, with a note on stderr, when ``serve`` has no ``--db`` option
    or no PostgreSQL server answers.
    """
    targets: list[tuple[str, str | None]] = [("gateway", None)]
    if not dbs:
        return targets
    if not serve_has_db_option(python):
        print("no PostgreSQL figures: 'execguard serve' has no --db option", file=sys.stderr)
        return targets
    for db in dbs:
        if db == "auto":
            try:
                db = stack.enter_context(postgres_database())
            except Exception as exc:  # no server, no driver: measure what we can
                print(f"no PostgreSQL figures: {exc}", file=sys.stderr)
                continue
        targets.append(("gateway-pg" if len(targets) == 1 else f"gateway-db{len(targets)}", db))
    return targets

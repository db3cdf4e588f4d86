"""Latency of enforcement: a decision alone, the gate SDK around a call, the proxy in front of one.

Initialises a temporary data directory with ``execguard init``, starts ``execguard serve``
(one uvicorn worker) and a small local upstream service (stdlib HTTP/1.1, keep-alive, in its
own process), and, when ``execguard.gate.proxy`` exists, ``execguard proxy`` in front of that
upstream. Then, from this process, one client, strictly sequential (one call at a time, the
next as soon as the previous returned), N calls per measure after a warm-up, split into R
rounds that interleave the measures (so a noisy moment on a shared machine is shared):

  upstream direct      httpx POST /payments on the upstream: the floor the others add to
  POST /execute        httpx POST /execute: the decision alone (PERMIT, signed, durable)
  gate.acquire         Gate.acquire: decision + receipt and token checked offline + consume
  @gate.guard no-op    the decorator around a function doing nothing: acquire + outcome
  @gate.guard upstream the decorator around the upstream call
  proxy -> upstream    POST /payments through ``execguard proxy`` (decision, checks, consume,
                       forwarding, outcome)

Every call is a distinct request (its own actor), so none is an idempotent replay, and every
call must succeed (a PERMIT, a consumed permit, a 200): one failure fails the run.

Run: ``.venv/bin/python bench/gate.py [--requests 500] [--warmup 50] [--rounds 5]
[--no-proxy] [--json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from loadgen import percentile
from report import machine
from servers import Server, free_port, init_datadir, start_server

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PROXY_MODULE = "execguard.gate.proxy"

console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


def payment(amount: int = 1) -> dict[str, Any]:
    # 1 EUR: thousands of calls stay far below any per-actor spending limit of the demo policy.
    return {"amount": amount, "currency": "EUR", "beneficiary": "Acme Office Supplies"}


# -- the upstream (``--serve-upstream PORT`` runs it in its own process) ------------------


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: without TCP_NODELAY, Nagle and delayed ACKs
    # hold the body back for ~40 ms on keep-alive connections.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(b'{"status":"ready"}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(b'{"id":"pay_1","status":"accepted"}')


def serve_upstream(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _UpstreamHandler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


# -- processes -------------------------------------------------------------------------


def start_polled(name: str, argv: list[str], port: int, log: Path, ready_path: str,
                 env: dict[str, str], timeout: float = 60.0) -> Server:
    """Like ``servers.start_server``, for a process with another readiness path and env."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **env})
    server = Server(name, process, port, log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                                   f"{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}",
                                            timeout=1.0) as response:
                    if response.status == 200:
                        return server
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {timeout:.0f} s:\n{server.log_tail()}")
    except BaseException:
        server.stop(timeout=10)
        raise


#: ``execguard proxy``, with its command module imported first (importing it registers the
#: command, whether or not ``execguard.cli`` lists it).
_PROXY_CLI = "import execguard.cli.proxy; from execguard.cli import main; main()"
#: Without the command module: the ASGI app under the gateway's own uvicorn runner.
_PROXY_APP = ("import sys; from pathlib import Path; "
              "from execguard.gate.proxy import create_proxy_app, load_proxy_config; "
              "from execguard.server.run import serve_until_signalled; "
              "serve_until_signalled(create_proxy_app(load_proxy_config(Path(sys.argv[1]))),"
              " '127.0.0.1', int(sys.argv[2]))")


def proxy_argv(config: Path, port: int) -> tuple[list[str], str]:
    """How to start the proxy in this tree, and a label saying how it was started."""
    if importlib.util.find_spec("execguard.cli.proxy") is not None:
        return ([sys.executable, "-c", _PROXY_CLI, "proxy", "--config", str(config),
                 "--port", str(port)], "execguard proxy --config FILE")
    return ([sys.executable, "-c", _PROXY_APP, str(config), str(port)],
            "create_proxy_app() under uvicorn (no execguard.cli.proxy in this tree)")


PROXY_CONFIG = """\
[gateway]
url = "{gateway}"
api_key_env = "EXECGUARD_API_KEY"
timeout_seconds = 5

[upstream]
url = "{upstream}"

[[routes]]
method = "POST"
path = "/payments"
surface = "payment.execute"
actor = "header:X-Agent-Id"
[routes.context]
amount = "json:amount"
currency = "json:currency"
beneficiary = "json:beneficiary"
"""


# -- measuring -------------------------------------------------------------------------


@dataclass
class Figures:
    """One measure: ``requests`` sequential calls after ``warmup`` discarded ones."""

    name: str
    includes: str
    requests: int
    seconds: float
    calls_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


@dataclass
class Series:
    """The calls of one measure; ``call(i)`` gets a fresh ``i`` every time."""

    name: str
    includes: str
    call: Callable[[int], None]
    latencies_ns: list[int] = field(default_factory=list)
    seconds: float = 0.0
    calls: int = 0

    def run(self, count: int, timed: bool = True) -> None:
        started = time.perf_counter()
        for _ in range(count):
            begin = time.perf_counter_ns()
            self.call(self.calls)
            elapsed = time.perf_counter_ns() - begin
            self.calls += 1
            if timed:
                self.latencies_ns.append(elapsed)
        if timed:
            self.seconds += time.perf_counter() - started

    def figures(self) -> Figures:
        ordered = sorted(self.latencies_ns)

        def ms(value_ns: float) -> float:
            return round(value_ns / 1e6, 3)

        return Figures(self.name, self.includes, len(ordered), round(self.seconds, 3),
                       round(len(ordered) / self.seconds, 1), ms(percentile(ordered, 0.50)),
                       ms(percentile(ordered, 0.90)), ms(percentile(ordered, 0.99)),
                       ms(ordered[-1]), ms(sum(ordered) / len(ordered)))


def measure_all(plan: list[Series], requests: int, warmup: int, rounds: int) -> list[Figures]:
    """Warm every measure up, then run them in ``rounds`` interleaved blocks (the order
    rotating), so that a noisy moment on the machine is shared rather than hitting one."""
    for series in plan:
        series.run(warmup, timed=False)
    sizes = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
    for r, size in enumerate(sizes):
        for series in plan[r % len(plan):] + plan[:r % len(plan)]:
            series.run(size)
        console.print(f"round {r + 1}/{rounds} done")
    results = [series.figures() for series in plan]
    for f in results:
        console.print(f"{f.name:22} p50 {f.p50_ms:7.2f} ms  p99 {f.p99_ms:7.2f} ms  "
                      f"{f.calls_per_s:8,.0f} calls/s")
    return results


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"a call did not succeed: {what}")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from execguard.gate import ExecutionBlocked, Gate

    key = init_datadir(sys.executable, workdir / "data")
    servers: list[Server] = []
    notes: list[str] = []
    n, warm = args.requests, args.warmup
    try:
        port = free_port()
        servers.append(start_server("gateway", [sys.executable, "-m", "execguard", "serve",
                                                "--data", str(workdir / "data"),
                                                "--port", str(port)],
                                    port, workdir / "gateway.log", ROOT))
        gateway_url = f"http://127.0.0.1:{port}"
        up_port = free_port()
        servers.append(start_server("upstream", [sys.executable, str(BENCH / "gate.py"),
                                                 "--serve-upstream", str(up_port)],
                                    up_port, workdir / "upstream.log", ROOT))
        upstream_url = f"http://127.0.0.1:{up_port}"
        proxy_url = None
        if importlib.util.find_spec(PROXY_MODULE) is None:
            notes.append(f"proxy not measured: {PROXY_MODULE} does not exist in this tree")
        elif not args.no_proxy:
            config = workdir / "proxy.toml"
            config.write_text(PROXY_CONFIG.format(gateway=gateway_url, upstream=upstream_url))
            proxy_port = free_port()
            argv, label = proxy_argv(config, proxy_port)
            servers.append(start_polled("proxy", argv, proxy_port, workdir / "proxy.log",
                                        "/healthz", {"EXECGUARD_API_KEY": key}))
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            notes.append(f"proxy started as: {label}")

        with httpx.Client(timeout=10) as plain, \
                httpx.Client(base_url=gateway_url, timeout=10,
                             headers={"Authorization": f"Bearer {key}"}) as client, \
                Gate(gateway_url, key) as gate:

            def direct(i: int) -> None:
                response = plain.post(f"{upstream_url}/payments",
                                      json={**payment(), "n": i})
                _expect(response.status_code == 200, f"upstream HTTP {response.status_code}")

            def execute(i: int) -> None:
                response = client.post("/execute", json={
                    "surface": "payment.execute", "actorId": f"bench-execute-{i}",
                    "context": payment()})
                _expect(response.status_code == 200 and
                        response.json().get("decision") == "PERMIT", response.text[:300])

            def acquire(i: int) -> None:
                gate.acquire("payment.execute", payment(), actor=f"bench-acquire-{i}")

            @gate.guard(surface="payment.execute", context=lambda i: payment(),
                        actor=lambda i: f"bench-guard-{i}")
            def noop(i: int) -> None:
                return None

            @gate.guard(surface="payment.execute", context=lambda i: payment(),
                        actor=lambda i: f"bench-guard-upstream-{i}")
            def guarded_direct(i: int) -> None:
                direct(i)

            def via_proxy(i: int) -> None:
                response = plain.post(f"{proxy_url}/payments", json=payment(),
                                      headers={"X-Agent-Id": f"bench-proxy-{i}"})
                _expect(response.status_code == 200,
                        f"proxy HTTP {response.status_code}: {response.text[:300]}")

            plan = [
                Series("upstream direct", "httpx POST to the upstream, no governance", direct),
                Series("POST /execute", "the decision alone (httpx)", execute),
                Series("gate.acquire", "decision + offline checks + consume", acquire),
                Series("@gate.guard no-op", "acquire + the function + outcome", noop),
                Series("@gate.guard upstream", "the same around the upstream call",
                       guarded_direct),
            ]
            if proxy_url is not None:
                plan.append(Series("proxy -> upstream",
                                   "execguard proxy in front of the upstream", via_proxy))
            try:
                results = measure_all(plan, n, warm, args.rounds)
            except ExecutionBlocked as blocked:
                raise RuntimeError(f"a guarded call was blocked: {blocked}") from blocked
    finally:
        for server in reversed(servers):
            server.stop()
    direct_p50 = results[0].p50_ms
    direct_p99 = results[0].p99_ms
    added = {f.name: {"p50_ms": round(f.p50_ms - direct_p50, 3),
                      "p99_ms": round(f.p99_ms - direct_p99, 3)}
             for f in results if f.name in ("@gate.guard upstream", "proxy -> upstream")}
    return {"machine": machine(), "requests": n, "warmup": warm, "rounds": args.rounds,
            "results": [asdict(f) for f in results], "added_vs_direct": added, "notes": notes}


def print_table(report: dict[str, Any]) -> None:
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
    info = report["machine"]
    out.print(f"{report['requests']} sequential calls per measure after {report['warmup']} "
              f"warm-up calls, in {report['rounds']} interleaved rounds, one client; "
              f"{info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}")
    table = Table("measure", "includes", "p50 ms", "p90 ms", "p99 ms", "max ms", "calls/s",
                  "added p50 / p99 ms", caption="added: versus calling the upstream directly")
    for fig in report["results"]:
        added = report["added_vs_direct"].get(fig["name"])
        table.add_row(fig["name"], fig["includes"], f"{fig['p50_ms']:.2f}",
                      f"{fig['p90_ms']:.2f}", f"{fig['p99_ms']:.2f}", f"{fig['max_ms']:.2f}",
                      f"{fig['calls_per_s']:,.0f}",
                      f"+{added['p50_ms']:.2f} / +{added['p99_ms']:.2f}" if added else "")
    out.print(table)
    for note in report["notes"]:
        out.print(f"note: {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Latency of the gate SDK and the proxy.")
    parser.add_argument("--requests", type=int, default=500, help="timed calls per measure")
    parser.add_argument("--warmup", type=int, default=50, help="discarded calls first")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved blocks the timed calls are split into")
    parser.add_argument("--no-proxy", action="store_true", help="skip the proxy measure")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or not 1 <= args.rounds <= args.requests:
        parser.error("--requests must be positive, --warmup not negative, and --rounds "
                     "between 1 and --requests")
    return args


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("the benchmark overran its time budget")


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # stop like Ctrl-C: the finally blocks clean up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream)
        return 0
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(180 + 6 * (args.requests + args.warmup) // 10)  # ≥ 100 ms per call
    workdir = Path(tempfile.mkdtemp(prefix="execguard-bench-gate-"))
    try:
        report = run(args, workdir)
    except KeyboardInterrupt:
        console.print("interrupted: servers stopped, temporary files removed")
        return 130
    except (TimeoutError, RuntimeError, OSError, subprocess.SubprocessError,
            httpx.HTTPError) as exc:
        console.print(f"benchmark failed: {exc}", style="red")
        return 1
    finally:
        signal.alarm(0)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A closed-loop HTTP/1.1 load generator on raw asyncio streams (used when wrk is absent).

Each of ``connections`` clients holds one keep-alive connection and sends the same
hand-written request again as soon as the previous response has been read
(Content-Length delimited), like wrk. Nothing is parsed beyond the status code and
Content-Length, so the generator costs as little CPU as Python allows; it runs in
its own process, apart from the servers it measures.

Run: ``python bench/loadgen.py '<spec as JSON>'``; prints one JSON result on stdout.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LoadResult", "LoadSpec", "percentile", "run_load"]


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, how hard and for how long."""

    port: int
    body: str
    headers: dict[str, str]
    connections: int
    duration: float
    host: str = "127.0.0.1"
    path: str = "/execute"
    #: A 200 response must contain this text, or it is counted as a wrong answer.
    expect: str = ""
    #: In-flight requests still unanswered this long after the end count as errors.
    grace: float = 10.0

    def request_bytes(self) -> bytes:
        body = self.body.encode()
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 *(f"{name}: {value}" for name, value in self.headers.items()),
                 "Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
        return "\r\n".join(lines).encode() + body


@dataclass
class LoadResult:
    """What one run measured, in the same shape for every load generator."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    #: Responses whose status was not 200.
    non_200: int
    #: 200 responses without the expected text.
    wrong_body: int
    #: Connection errors, resets, malformed responses and timeouts.
    errors: int

    @property
    def failures(self) -> int:
        return self.non_200 + self.wrong_body + self.errors


@dataclass
class _Tally:
    latencies_ns: list[int] = field(default_factory=list)
    non_200: int = 0
    wrong_body: int = 0
    errors: int = 0


def percentile(ordered: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not ordered:
        return 0
    rank = min(max(1, math.ceil(fraction * len(ordered))), len(ordered))
    return ordered[rank - 1]


def _content_length(head: bytes) -> int:
    lowered = head.lower()
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0:
        raise ValueError("response without Content-Length")
    start += len(b"\r\ncontent-length:")
    return int(lowered[start:lowered.index(b"\r\n", start)])


async def _client(spec: LoadSpec, request: bytes, stop_at: float, tally: _Tally) -> None:
    expect = spec.expect.encode()
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    latencies = tally.latencies_ns
    try:
        while time.perf_counter() < stop_at:
            if writer is None or reader is None:
                try:
                    reader, writer = await asyncio.open_connection(spec.host, spec.port)
                except OSError:
                    tally.errors += 1
                    await asyncio.sleep(0.01)
                    continue
            start = time.perf_counter_ns()
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(_content_length(head))
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                tally.errors += 1
                writer.close()
                writer = reader = None
                continue
            latencies.append(time.perf_counter_ns() - start)
            if head[9:12] != b"200":
                tally.non_200 += 1
            elif expect and expect not in body:
                tally.wrong_body += 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = reader = None
    finally:
        if writer is not None:
            writer.close()


async def _run(spec: LoadSpec) -> LoadResult:
    tally = _Tally()
    request = spec.request_bytes()
    started = time.perf_counter()
    stop_at = started + spec.duration
    tasks = [asyncio.create_task(_client(spec, request, stop_at, tally))
             for _ in range(spec.connections)]
    _, pending = await asyncio.wait(tasks, timeout=spec.duration + spec.grace)
    for task in pending:  # unanswered past the grace period: timeouts
        task.cancel()
        tally.errors += 1
    await asyncio.gather(*pending, return_exceptions=True)
    seconds = time.perf_counter() - started
    ordered = sorted(tally.latencies_ns)

    def ms(value_ns: int) -> float:
        return round(value_ns / 1e6, 3)

    return LoadResult(
        requests=len(ordered), seconds=round(seconds, 3), rps=round(len(ordered) / seconds, 1),
        p50_ms=ms(percentile(ordered, 0.50)), p90_ms=ms(percentile(ordered, 0.90)),
        p99_ms=ms(percentile(ordered, 0.99)), max_ms=ms(ordered[-1] if ordered else 0),
        non_200=tally.non_200, wrong_body=tally.wrong_body, errors=tally.errors)


def run_load(spec: LoadSpec) -> LoadResult:
    """Drive the server for ``spec.duration`` seconds and summarise."""
    return asyncio.run(_run(spec))


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: loadgen.py '<spec as JSON>'")
    fields: dict[str, Any] = json.loads(argv[0])
    print(json.dumps(asdict(run_load(LoadSpec(**fields)))))


if __name__ == "__main__":
    main(sys.argv[1:])

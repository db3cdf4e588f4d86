"""An HTTP/1.1 load generator on raw asyncio streams: closed loop, or open loop at a rate.

Closed loop (``rate == 0``, like wrk): each of ``connections`` clients holds one
keep-alive connection and sends the next request as soon as the previous response
has been read (Content-Length delimited). Open loop (``rate > 0``, like wrk2):
requests are due at fixed intervals whatever the answers; each due request takes
an idle connection of the pool, and its latency counts from the moment it was
due, so a server that falls behind is charged for the wait (no coordinated
omission). Nothing is parsed beyond the status code and Content-Length, so the
generator costs as little CPU as Python allows; it runs in its own process, apart
from the servers it measures.

Every request is distinct: ``{seq}`` in the body or a header value becomes a
sequence number unique to the run (with ``{run}``, a random prefix unique to
the run, it makes fresh idempotency keys), ``{actor}`` becomes ``seq % actors``.

Run: ``python bench/loadgen.py '<spec as JSON>'``; prints one JSON result on stdout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LoadResult", "LoadSpec", "Stalls", "find_stalls", "percentile", "run_load"]


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
    #: Requests per second, open loop; 0 for a closed loop.
    rate: float = 0.0
    #: ``{actor}`` takes this many values.
    actors: int = 1
    #: A request slower than this is slow (see :func:`find_stalls`).
    slow_ms: float = 10.0

    def request_maker(self, run: str) -> Callable[[int], bytes]:
        """A function from a sequence number to the bytes of that request."""
        head = "\r\n".join([f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                             *(f"{name}: {value}" for name, value in self.headers.items()),
                             "Content-Type: application/json"])
        templated = "{seq}" in self.body + head or "{actor}" in self.body + head
        if not templated:
            fixed = self.body.encode()
            whole = f"{head}\r\nContent-Length: {len(fixed)}\r\n\r\n".encode() + fixed
            return lambda seq: whole
        head, body = head.replace("{run}", run), self.body.replace("{run}", run)

        def make(seq: int) -> bytes:
            actor = seq % self.actors
            data = body.replace("{seq}", str(seq)).replace("{actor}", str(actor)).encode()
            top = head.replace("{seq}", str(seq)).replace("{actor}", str(actor))
            return f"{top}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data

        return make


#: The windows that :func:`find_stalls` sorts requests into, by when each started.
STALL_WINDOW_NS = 100_000_000


@dataclass(frozen=True)
class Stalls:
    """Where a run's slow requests fell (see :func:`find_stalls`)."""

    slow: int
    #: Stalls: runs of consecutive stalled windows.
    count: int
    slow_in_stalls: int
    #: The median time from one stall's start to the next one's; None for fewer than two.
    interval_s: float | None


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
    #: Where the answers slower than ``LoadSpec.slow_ms`` fell (:func:`find_stalls`);
    #: None where the generator cannot tell.
    stalls: Stalls | None = None

    @property
    def failures(self) -> int:
        return self.non_200 + self.wrong_body + self.errors

    @classmethod
    def from_json(cls, text: str) -> LoadResult:
        """The result that :func:`main` printed."""
        fields = json.loads(text)
        if fields.get("stalls") is not None:
            fields["stalls"] = Stalls(**fields["stalls"])
        return cls(**fields)


@dataclass
class _Tally:
    latencies_ns: list[int] = field(default_factory=list)
    #: When each answered request started (was due, in an open loop), in the same order.
    starts_ns: list[int] = field(default_factory=list)
    non_200: int = 0
    wrong_body: int = 0
    errors: int = 0


def percentile(ordered: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not ordered:
        return 0
    rank = min(max(1, math.ceil(fraction * len(ordered))), len(ordered))
    return ordered[rank - 1]


def find_stalls(starts_ns: list[int], latencies_ns: list[int], slow_ns: int) -> Stalls:
    """The slow requests (over ``slow_ns``) and the stalls that hold them.

    A window is a ``STALL_WINDOW_NS`` stretch of the run; it is stalled when most
    of the requests that started in it were slow, and consecutive stalled windows
    make one stall. When most slow requests fall in a few stalls, the tail is a
    standstill of a moment (of the server, or of the whole machine: a baseline
    measured in the same run tells which), not a queue that is always long.
    """
    windows: dict[int, list[int]] = {}
    for start, latency in zip(starts_ns, latencies_ns, strict=True):
        counts = windows.setdefault(start // STALL_WINDOW_NS, [0, 0])
        counts[0] += 1
        counts[1] += latency > slow_ns
    stalled = sorted(w for w, (total, slow) in windows.items() if 2 * slow > total)
    stalled_set = set(stalled)
    starts = [w for w in stalled if w - 1 not in stalled_set]
    gaps = sorted(b - a for a, b in itertools.pairwise(starts))
    return Stalls(slow=sum(slow for _, slow in windows.values()), count=len(starts),
                  slow_in_stalls=sum(windows[w][1] for w in stalled),
                  interval_s=gaps[len(gaps) // 2] * STALL_WINDOW_NS / 1e9 if gaps else None)


def _content_length(head: bytes) -> int:
    lowered = head.lower()
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0:
        raise ValueError("response without Content-Length")
    start += len(b"\r\ncontent-length:")
    return int(lowered[start:lowered.index(b"\r\n", start)])


class _Connection:
    """One keep-alive connection, reopened after an error."""

    def __init__(self, spec: LoadSpec, tally: _Tally) -> None:
        self.spec, self.tally = spec, tally
        self.expect = spec.expect.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes, start_ns: int) -> bool:
        """Send one request, read its answer, count it; False if the connection failed."""
        tally = self.tally
        if self.writer is None or self.reader is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(self.spec.host,
                                                                         self.spec.port)
            except OSError:
                tally.errors += 1
                await asyncio.sleep(0.01)
                return False
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            body = await self.reader.readexactly(_content_length(head))
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            tally.errors += 1
            self.close()
            return False
        tally.latencies_ns.append(time.perf_counter_ns() - start_ns)
        tally.starts_ns.append(start_ns)
        if head[9:12] != b"200":
            tally.non_200 += 1
        elif self.expect and self.expect not in body:
            tally.wrong_body += 1
        if b"connection: close" in head.lower():
            self.close()
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = self.reader = None


class _Sequence:
    """Run-unique sequence numbers, shared by the clients of one run."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next


async def _client(spec: LoadSpec, make: Callable[[int], bytes], seq: _Sequence,
                  stop_at: float, tally: _Tally) -> None:
    conn = _Connection(spec, tally)
    try:
        while time.perf_counter() < stop_at:
            await conn.exchange(make(seq.take()), time.perf_counter_ns())
    finally:
        conn.close()


async def _open_loop(spec: LoadSpec, make: Callable[[int], bytes], stop_at: float,
                     tally: _Tally) -> None:
    """Requests due every 1/rate s, each on an idle connection, timed from when it was due."""
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(spec.connections):
        idle.put_nowait(_Connection(spec, tally))
    running: set[asyncio.Task[None]] = set()

    async def one(due_ns: int, request: bytes) -> None:
        conn = await idle.get()
        try:
            await conn.exchange(request, due_ns)
        finally:
            idle.put_nowait(conn)

    interval_ns = round(1e9 / spec.rate)
    start_ns = time.perf_counter_ns()
    sent = 0
    while time.perf_counter() < stop_at:
        now_ns = time.perf_counter_ns()
        while start_ns + sent * interval_ns <= now_ns:
            sent += 1
            task = asyncio.create_task(one(start_ns + (sent - 1) * interval_ns, make(sent)))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.sleep(min(0.0005, interval_ns / 2e9))
    if running:
        await asyncio.wait(running, timeout=spec.grace)
    for task in list(running):  # unanswered past the grace period: timeouts
        task.cancel()
        tally.errors += 1
    while not idle.empty():
        idle.get_nowait().close()


async def _run(spec: LoadSpec) -> LoadResult:
    tally = _Tally()
    make = spec.request_maker(os.urandom(6).hex())
    started = time.perf_counter()
    stop_at = started + spec.duration
    if spec.rate > 0:
        await _open_loop(spec, make, stop_at, tally)
    else:
        seq = _Sequence()
        tasks = [asyncio.create_task(_client(spec, make, seq, stop_at, tally))
                 for _ in range(spec.connections)]
        _, pending = await asyncio.wait(tasks, timeout=spec.duration + spec.grace)
        for task in pending:  # unanswered past the grace period: timeouts
            task.cancel()
            tally.errors += 1
        await asyncio.gather(*pending, return_exceptions=True)
    seconds = time.perf_counter() - started
    ordered = sorted(tally.latencies_ns)
    stalls = find_stalls(tally.starts_ns, tally.latencies_ns, round(spec.slow_ms * 1e6))

    def ms(value_ns: int) -> float:
        return round(value_ns / 1e6, 3)

    return LoadResult(
        requests=len(ordered), seconds=round(seconds, 3), rps=round(len(ordered) / seconds, 1),
        p50_ms=ms(percentile(ordered, 0.50)), p90_ms=ms(percentile(ordered, 0.90)),
        p99_ms=ms(percentile(ordered, 0.99)), max_ms=ms(ordered[-1] if ordered else 0),
        non_200=tally.non_200, wrong_body=tally.wrong_body, errors=tally.errors,
        stalls=stalls)


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

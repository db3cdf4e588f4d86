"""Log lines reach stderr in writes a pipe keeps whole (the server and its decision
process share it)."""

from __future__ import annotations

import io
import json
import logging
import queue
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from execguard.server.logs import LOG_WINDOW_SECONDS, _BatchingListener, _whole_lines


@given(st.lists(st.text(max_size=3000).map(lambda text: text.replace("\n", "") + "\n"),
                max_size=30), st.integers(min_value=64, max_value=4096))
def test_lines_are_grouped_whole_within_the_limit(lines: list[str], limit: int) -> None:
    chunks = list(_whole_lines(lines, limit))
    assert "".join(chunks) == "".join(lines)
    for chunk in chunks:
        assert chunk.endswith("\n")
        # Over the limit only when a single line is: it goes alone, never split.
        assert len(chunk.encode("utf-8")) <= limit or chunk.count("\n") == 1


class _CountingStream(io.StringIO):
    """Counts the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _burst(window: float, lines: int) -> _CountingStream:
    """``lines`` log lines queued 0.2 ms apart, written by a listener with ``window``."""
    stream = _CountingStream()
    handler = logging.StreamHandler(stream)
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    listener = _BatchingListener(records, handler, window=window)
    listener.start()
    for n in range(lines):
        records.put_nowait((time.time(), "INFO", "execguard.access", f"line {n}",
                            {"request_id": f"r{n}"}))
        time.sleep(0.0002)
    listener.stop()
    return stream


def test_a_burst_of_lines_is_written_in_a_few_writes() -> None:
    """Each line woke the writing thread and cost a write of its own: under load, two
    wake-ups (each taking the interpreter lock from the event loop) per decision."""
    stream = _burst(LOG_WINDOW_SECONDS, 50)
    written = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in written] == [f"line {n}" for n in range(50)]
    assert written[7]["request_id"] == "r7"
    assert stream.writes <= 25  # 50 lines over ~10 ms: a few windows of 5 ms

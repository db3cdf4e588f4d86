"""The access and decision lines: written directly when only our JSON handler would see
them, and then exactly as the logging path writes them."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pytest

from execguard.server import logs

DECISION = {"execution_id": "0199f0e1-7d1c-7000-8000-000000000001", "surface": "payment.execute",
            "decision": "PERMIT", "reason_code": "WITHIN_LIMIT", "mode": "enforce"}


class Counting(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    logs.configure_logging("json", stream=out)
    try:
        yield out
    finally:
        logs._stop_listener()
        logs._direct.clear()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@contextmanager
def alone() -> Iterator[None]:
    """Only our handler on the root logger (pytest adds its own for each test's call)."""
    root = logging.getLogger()
    others = [h for h in root.handlers if h not in logs._direct]
    for handler in others:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in others:
            root.addHandler(handler)


def lines_of(out: io.StringIO) -> list[dict[str, object]]:
    for _ in range(100):  # the logging thread writes them
        text = out.getvalue()
        if text.count("\n") >= 4:
            break
        time.sleep(0.02)
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def write_both() -> None:
    logs.begin_request("req-1")
    logs.log_decision(dict(DECISION))
    logs.log_access("POST", "/execute", 200, 0.0123)


def test_direct_lines_are_the_logging_paths_lines(stream: io.StringIO) -> None:
    with alone():
        assert logs._only_ours(logs.access_log)
        write_both()  # directly: nothing else would see the records
    seen = Counting()
    logging.getLogger().addHandler(seen)  # another handler: through logging, for both
    assert not logs._only_ours(logs.access_log)
    write_both()
    assert len(seen.records) == 2
    direct, logged = (lines_of(stream)[:2], lines_of(stream)[2:])
    for line in direct + logged:
        assert str(line.pop("ts")).endswith("Z")
    assert direct == logged
    assert direct[0] == {"level": "INFO", "logger": "execguard.decisions",
                         "msg": f"PERMIT payment.execute WITHIN_LIMIT execution "
                                f"{DECISION['execution_id']}", "request_id": "req-1",
                         **DECISION}
    assert direct[1]["msg"] == "POST /execute 200 12.3ms"
    assert (direct[1]["status"], direct[1]["latency_ms"]) == (200, 12.3)


def test_a_filter_or_a_level_is_honoured(stream: io.StringIO) -> None:
    with alone():
        logs.access_log.addFilter(lambda record: False)
        try:
            assert not logs._only_ours(logs.access_log)
            logs.log_access("POST", "/execute", 200, 0.001)  # filtered out
        finally:
            logs.access_log.filters.clear()
        assert logs._only_ours(logs.access_log)
        logs._direct[0].setLevel(logging.WARNING)  # our handler's own level
        try:
            logs.log_access("POST", "/execute", 200, 0.001)
        finally:
            logs._direct[0].setLevel(logging.NOTSET)
        logs.log_access("GET", "/healthz", 200, 0.001)  # a probe: DEBUG, below INFO
        logs.log_decision(dict(DECISION))
        logs.log_access("POST", "/execute", 200, 0.001)
    time.sleep(0.2)
    assert [line["logger"] for line in lines_of(stream)] == [
        "execguard.decisions", "execguard.access"]

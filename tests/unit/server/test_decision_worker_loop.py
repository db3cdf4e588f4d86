"""The decision process's loop (``decision_worker._serve``): what its writer is given, when.

A fake worker stands in for the gateway and the ledger, so that the test decides when
appending and answering end; the loop, its writer thread and the frames are the real ones.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from execguard.server import decision_worker
from execguard.server.decision_worker import Batch, Frame
from execguard.server.frames import FrameBuffer, encode_frame

WAIT_S = 10.0


class _Checkpoints:
    """None are ever due."""

    def due_now(self) -> bool:
        return False

    def wait(self) -> float | None:
        return None

    def run_if_due(self, force: bool = False) -> None:
        return None


class _Worker:
    """Plans, commits and answers frames by their ids; a test can hold a commit or an answer."""

    def __init__(self) -> None:
        self.committed: list[list[int]] = []
        self.hold_commit: dict[int, threading.Event] = {}
        self.hold_answer: dict[int, threading.Event] = {}
        self.commit_started: dict[int, threading.Event] = {}
        self.commit_ended: dict[int, threading.Event] = {}
        #: What the loop did, in order: ("plan", id) and ("give", id) to the writer.
        self.steps: list[tuple[str, int]] = []

    def plan(self, frames: Sequence[Frame]) -> tuple[list[Frame], list[Any]]:
        self.steps += [("plan", header["id"]) for header, _ in frames]
        return [], [(header, None, None) for header, _ in frames]

    def commit(self, planned: list[Any]) -> Batch:
        idents = [header["id"] for header, _, _ in planned]
        self.committed.append(idents)
        for ident in idents:
            _event(self.commit_started, ident).set()
            if ident in self.hold_commit:
                assert self.hold_commit[ident].wait(WAIT_S)
            _event(self.commit_ended, ident).set()
        return Batch([], planned, ["ok"] * len(planned))

    def answer(self, batch: Batch) -> list[Frame]:
        for header, _, _ in batch.planned:
            if header["id"] in self.hold_answer:
                assert self.hold_answer[header["id"]].wait(WAIT_S)
        return [({"id": header["id"]}, b"") for header, _, _ in batch.planned]


def _event(events: dict[int, threading.Event], ident: int) -> threading.Event:
    return events.setdefault(ident, threading.Event())


def _answers(sock: socket.socket) -> list[int]:
    """The ids answered until the loop closes its end."""
    buffer, idents = FrameBuffer(), []
    sock.settimeout(WAIT_S)
    while data := sock.recv(65536):
        buffer.feed(data)
        idents += [header["id"] for header, _ in buffer.frames(100)]
    return idents


def test_the_writer_takes_what_is_planned_before_new_requests_are_planned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """When a transaction ends, what was planned while it ran goes to the writer before
    the requests that arrived meanwhile are planned: the writer does not wait for them.

    One request per transaction (``MAX_BATCH = 1``) keeps planned requests waiting: 1
    runs while 2 and 3 wait. The loop is held in answering 1 while 2 commits and 4
    arrives; then, with 2 done, 3 planned and 4 new, 3 must start before 4 is planned.
    """
    monkeypatch.setattr(decision_worker, "MAX_BATCH", 1)
    worker = _Worker()
    give = decision_worker._Writer.start

    def giving(writer: Any, work: Any, batch: list[Any]) -> None:
        worker.steps += [("give", header["id"]) for header, _, _ in batch]
        give(writer, work, batch)

    monkeypatch.setattr(decision_worker._Writer, "start", giving)
    worker.hold_commit[1] = threading.Event()
    worker.hold_answer[1] = threading.Event()
    server, ours = socket.socketpair()
    loop = threading.Thread(target=_run, args=(ours, worker), daemon=True)
    loop.start()
    try:
        server.sendall(b"".join(encode_frame({"id": ident}) for ident in (1, 2, 3)))
        assert _event(worker.commit_started, 1).wait(WAIT_S)
        worker.hold_commit[1].set()  # 2 starts; the loop is held in answering 1
        assert _event(worker.commit_ended, 2).wait(WAIT_S)
        server.sendall(encode_frame({"id": 4}))
        time.sleep(0.5)  # the writer's job is marked done just after its commit returns
        worker.hold_answer[1].set()
        assert _event(worker.commit_ended, 4).wait(WAIT_S)
        server.shutdown(socket.SHUT_WR)
        assert sorted(_answers(server)) == [1, 2, 3, 4]
    finally:
        for held in (*worker.hold_commit.values(), *worker.hold_answer.values()):
            held.set()
        server.close()
        loop.join(WAIT_S)
    assert worker.committed == [[1], [2], [3], [4]]
    assert worker.steps.index(("give", 3)) < worker.steps.index(("plan", 4)), worker.steps


def _run(sock: socket.socket, worker: _Worker) -> None:
    with sock:
        decision_worker._serve(sock, worker, _Checkpoints())  # type: ignore[arg-type]

"""The server's side of its decision process (``decision_worker.py``): start, ask, supervise.

The server authenticates a ``POST /execute`` request, reads its body, and hands
both to its decision process, which parses, decides, appends and answers
(``decision_worker.py`` says why it is a process of its own). This module
keeps that process running and fails closed around it:

- Nothing is answered that the worker did not answer, and the worker answers a
  decision only after its transaction committed.
- While the worker is not running (starting, restarting) requests get 503 at once.
- A worker that exits is restarted (after 0.1 s, doubling to 5 s while it keeps
  failing); the requests it had not answered get 503: they may or may not have
  been recorded, and a retry with the same ``Idempotency-Key`` tells which.
- The worker answers 503 itself when a write takes longer than
  ``COMMIT_TIMEOUT_SECONDS`` (a database that stopped answering), as the group
  commit does. A request it has not answered within ``answer_timeout`` (2 s
  more) gets 503 here, and the worker will not write it. While the worker has
  answered nothing for that long and requests wait, new ones get 503 at once; and
  the worker, stuck itself, is killed and restarted.
- A worker not ready within ``START_TIMEOUT_SECONDS`` is killed and restarted.
- Requests reach the worker in one write per turn of the event loop, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from execguard.ledger.group_commit import COMMIT_TIMEOUT_SECONDS, recent_failure
from execguard.protocol.errors import ServiceUnavailable, StorageUnavailable
from execguard.protocol.request import parse_execution_request
from execguard.server.frames import encode_frame, encode_request, read_frame
from execguard.server.gateway import Caller
from execguard.server.metrics import BatchSummary, Metrics
from execguard.server.settings import Settings

__all__ = ["Decided", "DecisionProcess", "RelayedError"]

log = logging.getLogger("execguard.server")

#: How long the server waits for the worker to open the ledger at start.
START_TIMEOUT_SECONDS = 60.0
#: ``storage_problem``: how long its answer is used, and how long one check may take.
CHECK_CACHE_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 2.0
RESTART_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class Decided:
    """A decision the worker recorded: its answer (JSON bytes) and its log line's fields."""

    answer: bytes
    log_fields: dict[str, str]


class RelayedError(Exception):
    """An error the worker answered, in the one error shape, without its request id."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(body.get("message"))
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def code(self) -> str:
        return str(self.body.get("error"))


class _Worker:
    """One running worker process and its socket."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.killed = False  # by us: once is enough
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "execguard.server.decision_worker",
                 "--fd", str(theirs.fileno()), "--parent", str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.sendall(encode_frame({"config": config}))
        self.socket = ours

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)


class DecisionProcess:
    """Runs the decision worker for one server and relays its requests (see module doc)."""

    def __init__(self, settings: Settings, database: str | None, log_format: str, *,
                 ledger_file: Path | None = None,
                 answer_timeout: float = COMMIT_TIMEOUT_SECONDS + 2.0) -> None:
        """``ledger_file``: the SQLite file the server has opened. Every worker, restarts
        included, opens that very file (not whatever is at its path by then: a file moved
        away and a new one created in its place would split the log in two)."""
        self.answer_timeout = answer_timeout
        self.metrics: Metrics | None = None
        #: ``notify(tenant, event, payload)``: the events (webhooks) the worker raised.
        self.notify: Callable[[str, str, Mapping[str, Any]], None] = lambda *_: None
        identity = None
        if ledger_file is not None:
            found = os.stat(ledger_file)
            identity = [found.st_dev, found.st_ino]
        self._config = {"settings": {**dataclasses.asdict(settings),
                                     "data_dir": str(settings.data_dir)},
                        "database": database, "logFormat": log_format,
                        "ledgerFile": identity}
        self._worker: _Worker | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outgoing: list[bytes] = []
        self._ready = asyncio.Event()
        self._ended_once = asyncio.Event()  # a worker has gone away (at start: it failed)
        self._waiting: dict[int, tuple[asyncio.Future[tuple[dict[str, Any], bytes]], float]] = {}
        self._next_id = 0
        self._heard_at = time.monotonic()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        #: The worker's process id while it runs (for operators and tests).
        self.pid: int | None = None
        self.restarts = 0
        self.last_failure: str | None = None
        self.last_failure_at: float | None = None
        self.last_success_at: float | None = None
        #: ``time.monotonic()`` when the worker last said a write of its has not finished.
        self.stalled_at: float | None = None
        self._checked: tuple[float, str | None] | None = None  # (when, problem)

    # -- lifecycle ---------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the worker now (before the server's own start-up, to overlap the two)."""
        if self._worker is None:
            self._worker = _Worker(self._config)

    async def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Supervise the worker; wait (up to ``timeout``) until it has opened the ledger.

        If it is not ready by then, or its first start failed, the server starts anyway:
        decisions get 503 and ``/readyz`` says why, until a worker is ready.
        """
        self._supervisor = asyncio.create_task(self._supervise())
        waits = {asyncio.create_task(self._ready.wait()),
                 asyncio.create_task(self._ended_once.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not self._ready.is_set():
            log.error("the decision process is not ready: decisions fail closed (503) "
                      "until it is")

    async def stop(self, timeout: float = 30.0) -> None:
        """Let the worker answer what it has, commit and checkpoint, and exit."""
        self._stopping = True
        worker, writer = self._worker, self._writer
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.write_eof()  # "no more requests"
        elif worker is not None:
            worker.kill()  # still starting (or restarting): it has nothing to finish
        if worker is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(worker.process.wait), timeout)
            except TimeoutError:
                log.error("the decision process did not stop within %.0f s: killed", timeout)
                worker.kill()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            if self._worker is None:
                try:
                    self._worker = _Worker(self._config)
                except OSError as exc:
                    log.error("could not start the decision process: %s", exc)
                    self._ended_once.set()
            worker = self._worker
            if worker is not None:
                ready = await self._serve(worker)
                failures = 0 if ready else failures + 1
                self._worker = None
                if self._stopping:
                    return
                code = await asyncio.to_thread(_reap, worker)
                log.error("the decision process exited (%s): restarting it", code)
                self.restarts += 1
            await asyncio.sleep(RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)])

    async def _serve(self, worker: _Worker) -> bool:
        """Relay frames from one worker until it goes away; whether it became ready."""
        ready = False
        reader, writer = await asyncio.open_connection(sock=worker.socket)
        try:
            try:
                first = await asyncio.wait_for(read_frame(reader), START_TIMEOUT_SECONDS)
            except TimeoutError:
                log.error("the decision process was not ready within %.0f s: replacing it",
                          START_TIMEOUT_SECONDS)
                worker.kill()
                return False
            if first is None or "ready" not in first[0]:
                return False
            ready = True
            self.pid = int(first[0]["ready"])
            self._heard_at = time.monotonic()
            self._writer = writer
            self._ready.set()
            while (frame := await read_frame(reader)) is not None:
                self._heard_at = time.monotonic()
                self._dispatch(*frame)
        except (OSError, ValueError) as exc:  # a broken frame: the worker is replaced
            # Unless it ended (its socket breaks a moment before it can be reaped):
            # _supervise then says how, and restarts it.
            if not await asyncio.to_thread(_ends_within, worker, 1.0):
                log.error("the decision process sent something unreadable (%s): replacing "
                          "it", exc)
                worker.kill()
        finally:
            self._ready.clear()
            self._ended_once.set()
            self._writer = None
            self.pid = None
            writer.close()
            self._fail_waiting(ServiceUnavailable(
                "the decision process stopped before answering: the request may or may "
                "not have been recorded; retry it with the same Idempotency-Key to know"))
        return ready

    def _dispatch(self, header: dict[str, Any], body: bytes) -> None:
        if "batch" in header:
            if self.metrics is not None:
                self.metrics.observe_summary(BatchSummary(*header["batch"]))
            return
        waiting = self._waiting.pop(header["id"], None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result((header, body))

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(error)

    # -- state, for readiness ----------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a worker is ready to take requests."""
        return self._writer is not None

    def stalled_for(self) -> float:
        """How long the oldest unanswered request has waited while the worker said nothing."""
        if not self._waiting:
            return 0.0
        _, oldest = next(iter(self._waiting.values()))  # sent in order, and dicts keep it
        return max(0.0, time.monotonic() - max(oldest, self._heard_at))

    def failing(self, within: float) -> str | None:
        """Why the last append failed, if it did less than ``within`` s ago and none has
        committed since (as :meth:`GroupCommitter.failing`)."""
        return recent_failure(self.last_failure, self.last_failure_at, self.last_success_at,
                              within)

    def database_stalled(self) -> str | None:
        """Why the server's own writes should be refused at once: the worker's write to the
        same database has not finished in time, said less than ``COMMIT_TIMEOUT_SECONDS``
        ago, and nothing has committed since. A write that started now would hang the
        same way, and could commit after its client was answered 503."""
        if recent_failure("stalled", self.stalled_at, self.last_success_at,
                          COMMIT_TIMEOUT_SECONDS) is None:
            return None
        return ("the database is not responding: a write to the log by the decision process "
                "has not finished; nothing was acknowledged")

    # -- requests ----------------------------------------------------------------------

    async def decide(self, caller: Caller, body: bytes, idempotency_key: str | None) -> Decided:
        """The worker's answer to one ``POST /execute``; raises :class:`MalformedRequest`
        (here: the body is validated before it is sent), :class:`RelayedError` or
        :class:`ServiceUnavailable`."""
        request = parse_execution_request(body, idempotency_header=idempotency_key)
        writer = self._writer
        if writer is None:
            raise ServiceUnavailable("the decision process is not running (starting or "
                                     "restarting): no decision was taken")
        stalled = self.stalled_for()
        if stalled > self.answer_timeout:
            raise StorageUnavailable(f"the decision process has not answered for "
                                     f"{stalled:.0f} s: no decision was taken")
        header, answer = await self._ask({
            "tenant": caller.tenant, "role": caller.role, "keyHash": caller.key_hash,
            "label": caller.label, "groups": caller.groups}, encode_request(request))
        if "error" in header:
            error = RelayedError(header["status"], header["error"], header["headers"])
            if error.status >= 500:  # logged here, where the line gets the request's id
                log.warning("failing closed: %s", error)
            if error.status == 503 and error.code == "storage_unavailable":
                self.last_failure = str(error)
                self.last_failure_at = time.monotonic()
                if header.get("stalled"):
                    self.stalled_at = self.last_failure_at
            raise error
        self.last_success_at = time.monotonic()
        for tenant, event, payload in header["events"]:
            self.notify(tenant, event, payload)
        return Decided(answer, header["log"])

    async def _ask(self, header: dict[str, Any], body: bytes = b"",
                   timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        """Send one frame (its id and deadline added) and wait for its answer."""
        writer = self._writer
        if writer is None:
            raise ServiceUnavailable("the decision process is not running (starting or "
                                     "restarting): no decision was taken")
        timeout = self.answer_timeout if timeout is None else timeout
        self._next_id += 1
        ident = self._next_id
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[dict[str, Any], bytes]] = loop.create_future()
        sent = time.monotonic()
        self._waiting[ident] = (future, sent)
        timer = loop.call_later(timeout, self._time_out, ident)
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(encode_frame({**header, "id": ident, "deadline": sent + timeout},
                                           body))
        try:
            return await future
        finally:
            timer.cancel()
            self._waiting.pop(ident, None)

    async def storage_problem(self) -> str | None:
        """None when the worker has just made a small durable write (``check_writable``,
        on its writer, between two batches); else what is wrong. At most one check a
        second; one that takes longer than ``CHECK_TIMEOUT_SECONDS`` is the answer.

        The server's own readiness check says nothing of the worker's connections: on
        PostgreSQL its pool may still be waiting to reconnect after an outage when the
        server's has.
        """
        now = time.monotonic()
        if self._checked is not None and now - self._checked[0] < CHECK_CACHE_SECONDS:
            return self._checked[1]
        try:
            header, _ = await self._ask({"check": True}, timeout=CHECK_TIMEOUT_SECONDS)
            # An error answer (the worker refuses everything while a write hangs) is one.
            problem = header["error"]["message"] if "error" in header else header["problem"]
        except StorageUnavailable:  # timed out: its writer is busy with a write that hangs
            problem = (f"the database is not responding: a write check did not finish "
                       f"within {CHECK_TIMEOUT_SECONDS:g} s")
        except ServiceUnavailable as exc:  # the worker went away meanwhile
            problem = str(exc)
        self._checked = (time.monotonic(), problem)
        return problem

    def _flush(self) -> None:
        frames, self._outgoing = self._outgoing, []
        writer = self._writer
        if writer is not None:  # else the worker went away: their waiters have been told
            writer.write(b"".join(frames))

    def _time_out(self, ident: int) -> None:
        waiting = self._waiting.pop(ident, None)
        if waiting is None or waiting[0].done():
            return
        waiting[0].set_exception(StorageUnavailable(
            f"the decision process did not answer within {self.answer_timeout:g} s: the "
            f"request may or may not have been recorded; retry it with the same "
            f"Idempotency-Key to know"))
        silent = time.monotonic() - self._heard_at
        worker = self._worker
        # Once per worker: every request it left waiting times out about together, and
        # each logged this and killed it again (thousands of lines under load).
        if silent >= self.answer_timeout and worker is not None and not worker.killed:
            log.error("the decision process has answered nothing for %.0f s while requests "
                      "waited: replacing it", silent)
            worker.kill()


def _ends_within(worker: _Worker, seconds: float) -> bool:
    try:
        worker.process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def _reap(worker: _Worker) -> int:
    try:
        return worker.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        worker.kill()
        return worker.process.wait()

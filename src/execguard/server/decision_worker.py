"""The decision process: decides and durably appends the server's ``POST /execute`` requests.

Why a process of its own: one Python process runs its Python under one lock
(the GIL), so in one process the HTTP side (parsing, answering, logging) and
the decision side (Cedar, signatures, canonical JSON, the log append) take
turns on one core, however many cores the machine has. Here they run side by
side. Nothing else changes: the same :class:`Gateway` plans each decision, the
store appends them in group commits, and an answer leaves only after its
transaction committed.

Two threads. The main one reads requests from a blocking socket, parses and
plans them (``Gateway.plan``), and sends answers; the writer thread appends one
batch at a time (``SQLStore.commit_batch``: stateful decisions are taken there,
under the database's write lock) in one fsync'd transaction. While the writer
appends a batch (SQLite, the fsync and libsodium run without the GIL), the main
thread plans the next one and answers the last, so batches grow with the load
and nothing waits for a timer. On SQLite the writer also signs the checkpoints
of the logs it grew, between two batches. A write that does not finish within
``COMMIT_TIMEOUT_SECONDS`` is answered 503 (so is every request until it does):
see :func:`_serve`. A worker that stops answering at all is replaced by the server
(``decision_process.py``).

Started by the server (:class:`~execguard.server.decision_process.DecisionProcess`),
never by hand::

    python -m execguard.server.decision_worker --fd N --parent PID

It talks to the server over the inherited socket ``N`` in frames (``frames.py``):

- server → worker: ``{"config": ...}`` first (settings, database URL, log format;
  never on the command line, which other users can read); then one frame per request,
  ``{"id", "tenant", "role", "keyHash", "label", "groups", "deadline"}`` and the
  request (``frames.encode_request``). The server has authenticated the caller and
  validated the body; the worker reads it back. ``deadline`` (``time.monotonic()``,
  one clock for the machine) is when the server stops waiting: a request still
  unwritten then is not written (its client was told nothing was decided).
- worker → server: ``{"ready": pid}`` once the ledger is open; for each request
  ``{"id", "log", "events"}`` and the answer's JSON (200), or ``{"id", "status",
  "error", "headers", "stalled"?}`` (an error, in the one error shape; ``stalled``:
  a write has not finished in time); before the answers of each committed
  transaction ``{"batch": ...}`` (the metrics' summary of it).

It stops when the server closes the socket: it answers what it was given,
checkpoints, and exits. It dies with the server (``PR_SET_PDEATHSIG`` on Linux):
a server killed outright leaves no worker behind, and the crash is the one the
ledger is built to survive.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from execguard.ledger import CommitResult, PendingEntry, SQLStore
from execguard.ledger.group_commit import COMMIT_TIMEOUT_SECONDS, commit_failure
from execguard.protocol.errors import ExecGuardError, StorageUnavailable
from execguard.protocol.request import ExecutionRequest
from execguard.server.datadir import DataDir
from execguard.server.errors import error_parts, execguard_error_parts
from execguard.server.frames import FrameBuffer, decode_request, encode_frame
from execguard.server.gateway import Caller, Gateway
from execguard.server.heap import freeze_startup_objects
from execguard.server.logs import configure_logging, decision_fields
from execguard.server.metrics import summarize_batch
from execguard.server.settings import Settings
from execguard.server.transparency import Transparency

__all__ = ["MAX_BATCH", "Batch", "DecisionWorker", "main"]

log = logging.getLogger("execguard.decisions.worker")

#: Most requests decided in one transaction.
MAX_BATCH = 256
_PR_SET_PDEATHSIG = 1
_RECEIVE_BYTES = 1 << 20

Frame = tuple[dict[str, Any], bytes]
#: A request ready to append: its frame header, the parsed request, its log entry.
Planned = tuple[dict[str, Any], ExecutionRequest, PendingEntry]


@dataclass
class Batch:
    """One transaction's outcome: answers already known, the entries, and their results
    (or why the transaction failed)."""

    refused: list[Frame]
    planned: list[Planned]
    results: list[CommitResult] | Exception


class DecisionWorker:
    """Decides request frames in batches and answers them: no I/O but the store's."""

    def __init__(self, gateway: Gateway, store: SQLStore, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.gateway = gateway
        self.store = store
        self._monotonic = monotonic
        #: Tenants whose logs grew since the last checkpoint.
        self.grown: set[str] = set()
        self._events: list[list[Any]] = []
        gateway.notify = self._note_event

    def _note_event(self, tenant: str, event: str, payload: Any) -> None:
        self._events.append([tenant, event, dict(payload)])

    def decide_batch(self, frames: Sequence[Frame]) -> list[Frame]:
        """The answer frames (and a metrics frame) for request frames, after one append."""
        refused, planned = self.plan(frames)
        return refused + self.answer(self.commit(planned))

    def plan(self, frames: Sequence[Frame]) -> tuple[list[Frame], list[Planned]]:
        """Parse and plan each request: error answers, and the entries to append."""
        refused: list[Frame] = []
        planned: list[Planned] = []
        for header, body in frames:
            try:
                caller = Caller(header["tenant"], header["role"], header["keyHash"],
                                header.get("label"), tuple(header.get("groups") or ()))
                request = decode_request(body)
                planned.append((header, request, self.gateway.plan(caller, request)))
            except Exception as exc:
                refused.append(_error(header["id"], exc))
        return refused, planned

    def commit(self, planned: list[Planned]) -> Batch:
        """Append the planned entries in one durable transaction (the writer's part)."""
        now = self._monotonic()
        late = [p for p in planned if p[0].get("deadline", now) < now]
        planned = [p for p in planned if p[0].get("deadline", now) >= now]
        # The server has answered these 503 already: never written.
        refused = [_error(header["id"], StorageUnavailable(
            "the request waited too long to be written; nothing was decided"))
            for header, _, _ in late]
        if not planned:
            return Batch(refused, planned, [])
        entries = [entry for _, _, entry in planned]
        try:
            results = self.store.commit_batch(entries, self.gateway.clock())
        except Exception as error:  # every request of the batch hears of it
            return Batch(refused, planned, commit_failure(error, len(entries)))
        self.grown.update(entry.tenant for entry in entries)
        return Batch(refused, planned, results)

    def answer(self, batch: Batch) -> list[Frame]:
        """The answers of a committed (or failed) batch, after its metrics summary."""
        replies = batch.refused
        if isinstance(batch.results, Exception):
            error = batch.results
            return replies + [_error(header["id"], error) for header, _, _ in batch.planned]
        if not batch.planned:
            return replies
        entries = [entry for _, _, entry in batch.planned]
        replies.append(({"batch": list(summarize_batch(entries, batch.results))}, b""))
        for (header, request, entry), result in zip(batch.planned, batch.results, strict=True):
            self._events = []
            try:
                answer = self.gateway.answer(entry.tenant, request, result)
            except Exception as exc:
                replies.append(_error(header["id"], exc))
                continue
            replies.append(({"id": header["id"], "log": decision_fields(answer),
                             "events": self._events}, orjson.dumps(answer)))
        return replies


def _error(ident: int, exc: Exception, *, stalled: bool = False) -> Frame:
    """An error answer, in the one error shape (the server adds the request id).
    ``stalled``: a write to the database has not finished in time (the server then
    refuses its own writes at once too)."""
    if isinstance(exc, ExecGuardError):
        status, body, headers = execguard_error_parts(None, exc, logged=False)
    else:
        log.error("unexpected error; answering 500 (no decision was issued)", exc_info=exc)
        status = 500
        body, headers = error_parts(None, 500, "internal_error",
                                    "an unexpected error occurred; no decision was issued")
    header = {"id": ident, "status": status, "error": body, "headers": headers}
    if stalled:
        header["stalled"] = True
    return header, b""


class _Checkpoints:
    """Signs checkpoints of the logs the worker grew, at most every interval.

    On SQLite the writer thread signs them between two transactions (one file lock: on a
    thread of their own they would wait for it while a batch does, see
    ``SQLStore.maintenance_on_writer``). On PostgreSQL a thread of their own does, so
    that a pooled connection that stopped answering (after a network cut) can hang a
    checkpoint but never the appends.
    """

    def __init__(self, transparency: Transparency, worker: DecisionWorker,
                 interval: float, *, on_writer: bool) -> None:
        self.transparency = transparency
        self.worker = worker
        self.interval = interval
        self.on_writer = on_writer
        self.due = time.monotonic() + interval
        if not on_writer:
            threading.Thread(target=self._run, name="execguard-checkpoints",
                             daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.run_if_due()

    def wait(self) -> float | None:
        """Seconds until the writer has checkpoints to sign; None while it has none."""
        if not self.on_writer or not self.worker.grown:
            return None
        return max(0.0, self.due - time.monotonic())

    def due_now(self) -> bool:
        """Whether the writer should sign checkpoints now."""
        return self.on_writer and bool(self.worker.grown) and time.monotonic() >= self.due

    def run_if_due(self, force: bool = False) -> None:
        if not self.worker.grown or (not force and time.monotonic() < self.due):
            return
        grown, self.worker.grown = self.worker.grown, set()
        # Retried next time: otherwise a log that stops growing during a fault would keep
        # its last entries out of any checkpoint.
        self.worker.grown |= self.transparency.checkpoint_tenants(grown)
        self.due = time.monotonic() + self.interval


class _Writer:
    """The writer thread and the one job it runs (a transaction, or checkpoints)."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="execguard-writer")
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self.job: concurrent.futures.Future[Batch] | None = None
        self.batch: list[Planned] = []
        self.since = 0.0
        #: The job's requests were answered 503 (it took too long): drop its answers.
        self.answered = False

    @property
    def wake(self) -> int:
        """Readable once the job has finished."""
        return self._wake_read

    def start(self, work: Callable[[], Batch], batch: list[Planned]) -> None:
        self.job = self._pool.submit(work)
        self.job.add_done_callback(lambda _: os.write(self._wake_write, b"."))
        self.batch, self.since, self.answered = batch, time.monotonic(), False

    def finished(self) -> Batch | None:
        """The job's outcome once it has finished (and the writer is free again)."""
        if self.job is None or not self.job.done():
            return None
        outcome, self.job = self.job.result(), None
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 4096)
        return outcome

    def stalled_for(self) -> float:
        return 0.0 if self.job is None else time.monotonic() - self.since

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self._wake_read)
        os.close(self._wake_write)


def _serve(sock: socket.socket, worker: DecisionWorker, checkpoints: _Checkpoints) -> None:
    """Read, plan and answer on this thread; append on the writer thread, one transaction
    at a time. While the writer appends a batch (SQLite, the fsync and the signatures run
    without the GIL), this thread plans the next one and answers the last.

    A transaction still running after ``COMMIT_TIMEOUT_SECONDS`` (a database that stopped
    answering) fails closed without stopping this thread: its requests are answered 503,
    and so is every request that arrives until it ends. If it commits later, its requests
    are in the log, and a retry with the same ``Idempotency-Key`` answers from it.
    """
    writer = _Writer()
    buffer = FrameBuffer()
    replies: list[Frame] = []
    planned: list[Planned] = []
    checks: list[int] = []  # the server asks whether this process can write
    open_ = True

    def checkpoint() -> Batch:
        checkpoints.run_if_due()
        return Batch([], [], [])

    def check(idents: list[int]) -> Batch:  # for the server's readiness
        try:
            worker.store.check_writable()
            problem = None
        except Exception as exc:
            problem = str(exc)
        return Batch([({"id": ident, "problem": problem}, b"") for ident in idents], [], [])

    def start_next() -> None:
        """Give the writer its next job if it is free: a readiness check, the planned
        requests (up to ``MAX_BATCH``), or checkpoints that are due."""
        nonlocal checks, planned
        if writer.job is not None:
            return
        if checks:
            writer.start(partial(check, checks), [])
            checks = []
        elif planned:
            batch, planned = planned[:MAX_BATCH], planned[MAX_BATCH:]
            writer.start(partial(worker.commit, batch), batch)
        elif checkpoints.due_now():
            writer.start(checkpoint, [])

    try:
        while True:
            frames = to_plan = buffer.frames(MAX_BATCH * 4)
            stalled = writer.stalled_for()
            if stalled > COMMIT_TIMEOUT_SECONDS:
                waiting = [frame[0] for frame in frames] + [p[0] for p in planned]
                if not writer.answered:
                    waiting += [p[0] for p in writer.batch]
                    writer.answered = True
                    log.warning("a write to the log has not finished within %g s: "
                                "answering 503 until it does", COMMIT_TIMEOUT_SECONDS)
                planned = []
                error = StorageUnavailable(
                    f"the database is not responding: a write to the log has been waiting "
                    f"for {stalled:.0f} s, and nothing was acknowledged")
                replies += [_error(header["id"], error, stalled=True) for header in waiting]
                to_plan = []
            answered = writer.answered
            finished = writer.finished()
            # The next transaction starts before this thread plans what has arrived and
            # answers the last one: the writer never waits for either.
            if planned:
                start_next()
            if to_plan:
                checks += [header["id"] for header, _ in to_plan if "check" in header]
                refused, more = worker.plan([f for f in to_plan if "check" not in f[0]])
                replies += refused
                planned += more
            start_next()
            if finished is not None:
                answers = worker.answer(finished)
                replies += [a for a in answers if "id" not in a[0]] if answered else answers
            if replies:
                sock.sendall(b"".join(encode_frame(header, body) for header, body in replies))
                replies = []
            if not open_ and writer.job is None and not planned and not frames:
                return  # the server is done and so is everything whole it sent
            if buffer.pending and frames:
                continue  # more whole frames may be waiting
            if writer.job is not None:
                left = COMMIT_TIMEOUT_SECONDS - writer.stalled_for()
                timeout = max(0.0, left) if not writer.answered else None
            else:
                timeout = checkpoints.wait()
            ready, _, _ = select.select([sock, writer.wake] if open_ else [writer.wake], [],
                                        [], timeout)
            if sock in ready:
                open_ = _read(sock, buffer)  # False: the server is done
    finally:
        writer.close()
        checkpoints.run_if_due(force=True)


def _receive(sock: socket.socket, buffer: FrameBuffer, timeout: float | None) -> bool:
    """Add what arrives within ``timeout`` (None: wait) to ``buffer``; False at EOF."""
    readable, _, _ = select.select([sock], [], [], timeout)
    return _read(sock, buffer) if readable else True


def _read(sock: socket.socket, buffer: FrameBuffer) -> bool:
    """Add what has arrived (the socket is readable) to ``buffer``; False at EOF."""
    data = sock.recv(_RECEIVE_BYTES)
    buffer.feed(data)
    return bool(data)


def _die_with(parent: int) -> None:
    """Be killed when the server dies, however it dies (Linux; elsewhere, at EOF)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)


def _read_config(sock: socket.socket) -> dict[str, Any] | None:
    buffer = FrameBuffer()
    while not (frames := buffer.frames(1)):
        if not _receive(sock, buffer, None):
            return None
    header, _ = frames[0]
    return header.get("config")


def _same_file(path: Path, identity: list[int] | None) -> None:
    """Refuse a SQLite file other than the server's (moved away, replaced, deleted: opening
    the path would create a new, empty log there)."""
    if identity is None:
        return
    try:
        found = os.stat(path)
    except FileNotFoundError:
        found = None
    if found is None or [found.st_dev, found.st_ino] != identity:
        raise StorageUnavailable(
            f"{path} is not the database the server opened (moved, deleted or replaced "
            "while in use): not opening it")


def run(sock: socket.socket) -> int:
    """Read the configuration, open the ledger, say ready, serve until the server closes."""
    config = _read_config(sock)
    if config is None:
        return 1  # the server went away before it said anything
    configure_logging(config["logFormat"])
    given = config["settings"]
    settings = Settings(**{**given, "data_dir": Path(given["data_dir"])})
    directory = DataDir(settings.data_dir, config.get("database"))
    try:
        _same_file(directory.db_path, config.get("ledgerFile"))
        store = directory.open_store()
    except ExecGuardError as exc:  # the server restarts it, with back-off, and says why
        log.error("the decision process could not open the ledger: %s", exc)
        return 1
    try:
        signers = directory.signer_source(store)
        worker = DecisionWorker(Gateway(settings, store, signers), store)
        checkpoints = _Checkpoints(Transparency(settings, store, signers), worker,
                                   settings.checkpoint_interval_seconds,
                                   on_writer=store.maintenance_on_writer)
        freeze_startup_objects()
        sock.sendall(encode_frame({"ready": os.getpid()}))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            _serve(sock, worker, checkpoints)
    finally:
        store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="execguard.server.decision_worker",
                                     description="ExecGuard's decision process (started by "
                                                 "'execguard serve', not by hand).")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the server")
    parser.add_argument("--parent", type=int, required=True, help="the server's pid")
    args = parser.parse_args(argv)
    _die_with(args.parent)
    # Ctrl-C, and a SIGTERM to the process group (systemd's default, timeout(1)), reach
    # this process too: the server decides when it stops (it closes the socket once its
    # requests are answered), so neither may stop it first.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    return run(socket.socket(fileno=args.fd))


if __name__ == "__main__":
    sys.exit(main())

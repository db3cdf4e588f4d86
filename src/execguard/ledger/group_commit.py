"""Group commit: many concurrent decisions share one durable transaction.

One writer thread owns the appends. Requests put a :class:`PendingEntry` on a
queue and await their result; the writer takes everything queued, commits it
in one fsync'd transaction and wakes each waiter. While the previous batch
held more than one entry (the service is busy), it waits up to ``max_delay``
for more entries first: a bigger batch per fsync, with no added latency when
idle. Nothing is acknowledged before its transaction has committed.

Failures fail closed and do not stop the writer. A batch whose transaction
fails wakes each of its waiters with :class:`StorageUnavailable` (503), and the
next batch tries again, so the service recovers by itself once the fault
clears. A database that stops answering (a frozen disk, a hung connection)
cannot keep clients waiting: a waiter not answered within ``commit_timeout``
gets :class:`StorageUnavailable`, an entry whose waiter has already been
answered that way is not written, and while one transaction has been running
for longer than ``commit_timeout`` new entries are refused at once.

Other writes that must not contend with the appends (checkpoints, on SQLite: see
``SQLStore.maintenance_on_writer``) can run on the writer thread too, between two
batches (:meth:`GroupCommitter.run_between_batches`):
on a thread of their own they would take the database's write lock while a
batch waits for it, and hand the GIL back and forth with the writer and the
event loop; both showed in the tail latency of decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from execguard.ledger.records import CommitResult, PendingEntry
from execguard.ledger.store import LedgerStore
from execguard.protocol.errors import ServiceUnavailable, StorageUnavailable

__all__ = ["GroupCommitter", "commit_failure", "recent_failure"]

log = logging.getLogger(__name__)

#: Sees each committed batch: its entries and their results, in order.
BatchObserver = Callable[[list[PendingEntry], list[CommitResult]], None]
_Waiter = tuple[PendingEntry, asyncio.AbstractEventLoop, "asyncio.Future[CommitResult]"]


@dataclass
class _Job:
    """Work for the writer thread between two batches, and who waits for its result."""

    work: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

#: How long a request waits for its transaction before it is answered 503. Well
#: below the clients' own timeouts, so they hear "storage unavailable", not silence;
#: far above a healthy commit (milliseconds), so load alone never trips it.
COMMIT_TIMEOUT_SECONDS = 5.0


class GroupCommitter:
    """Batches appends from an asyncio server into durable transactions."""

    def __init__(self, store: LedgerStore, *, max_batch: int = 256, max_delay: float = 0.001,
                 clock: Callable[[], float] = time.time,
                 commit_timeout: float = COMMIT_TIMEOUT_SECONDS) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.commit_timeout = commit_timeout
        self._clock = clock
        self._queue: queue.SimpleQueue[_Waiter | _Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Counters, for metrics and tests.
        self.batches_committed = 0
        self.entries_committed = 0
        self.batches_failed = 0
        #: ``time.monotonic()`` of the last failed transaction (readiness rechecks after it).
        self.last_failure_at: float | None = None
        #: Why it failed, and ``time.monotonic()`` of the last transaction that committed.
        self.last_failure: str | None = None
        self.last_success_at: float | None = None
        #: ``time.monotonic()`` when the transaction now running began; None when idle.
        self._busy_since: float | None = None
        #: Called on the writer thread after each commit, before any waiter wakes (metrics).
        self.on_batch: BatchObserver | None = None
        #: Why another writer's transaction on the same database is stuck, if it is: new
        #: entries are then refused at once, as when this writer's own is.
        self.stalled_elsewhere: Callable[[], str | None] | None = None
        self._grown: set[str] = set()
        self._grown_lock = threading.Lock()

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="execguard-writer",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Commit whatever is queued, then stop the writer thread."""
        if self._thread is not None:
            self._stopping = True
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        """Whether the writer thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the transaction now running has taken so far (0.0 when idle)."""
        started = self._busy_since
        return 0.0 if started is None else max(0.0, time.monotonic() - started)

    def failing(self, within: float) -> str | None:
        """Why the last transaction failed, if it did less than ``within`` s ago and
        none has committed since; else None.

        For readiness: a test write can go through while appends cannot (a full
        disk leaves room in pages already allocated to a small table, not in the
        log's), so a failed append is reported as it is. Only for ``within``
        seconds: with no traffic (a load balancer that stopped sending any) nothing
        else would ever show that the fault has cleared.
        """
        return recent_failure(self.last_failure, self.last_failure_at, self.last_success_at,
                              within)

    def take_grown_tenants(self) -> set[str]:
        """Tenants whose logs grew since the last call (for the checkpoint schedule)."""
        with self._grown_lock:
            grown, self._grown = self._grown, set()
        return grown

    def note_grown(self, tenant: str) -> None:
        """Put a tenant back among the grown ones (its checkpoint failed: try again later)."""
        with self._grown_lock:
            self._grown.add(tenant)

    async def submit(self, entry: PendingEntry) -> CommitResult:
        """Queue an entry and wait until it is durable (or refused)."""
        if self._stopping or not self.running:
            raise ServiceUnavailable("the ledger writer is not running")
        stalled = self.stalled_for()
        if stalled > self.commit_timeout:
            # Queueing behind a write that does not finish would only make the client wait.
            raise StorageUnavailable(
                f"the database is not responding: a write to the log has been waiting for "
                f"{stalled:.0f} s")
        elsewhere = self.stalled_elsewhere() if self.stalled_elsewhere is not None else None
        if elsewhere is not None:
            raise StorageUnavailable(elsewhere)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CommitResult] = loop.create_future()
        # A timer rather than asyncio.wait_for: one heap entry, nothing on the fast path.
        timer = loop.call_later(self.commit_timeout, _time_out, future, self.commit_timeout)
        self._queue.put((entry, loop, future))
        try:
            # Shielded: a client that disconnects must not leave its entry half-acknowledged.
            return await asyncio.shield(future)
        finally:
            timer.cancel()

    async def run_between_batches(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on the writer thread after the batch being gathered; its result.

        For writes that would otherwise contend with the appends (see the module doc).
        ``work`` must not append through this committer (it would wait for itself).
        """
        if self._stopping or not self.running:
            raise ServiceUnavailable("the ledger writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(work, loop, future))
        return await future

    def _run(self) -> None:
        previous_size = 0
        while True:
            try:
                previous_size, stop = self._run_once(previous_size)
            except Exception:  # the writer must outlive any one bad batch
                log.exception("ledger writer: unexpected error; carrying on")
                previous_size, stop = 0, self._stopping
            if stop and self._queue.empty():
                return

    def _run_once(self, previous_size: int) -> tuple[int, bool]:
        """Take one batch from the queue and commit it, then run the jobs that came with
        it; return the batch's size and "stop"."""
        batch: list[_Waiter] = []
        jobs: list[_Job] = []
        stop = False

        def take(item: _Waiter | _Job | None) -> None:
            nonlocal stop
            if item is None:
                stop = True
            elif isinstance(item, _Job):
                jobs.append(item)
            else:
                batch.append(item)

        take(self._queue.get())
        deadline = time.monotonic() + (self.max_delay if previous_size > 1 else 0.0)
        while len(batch) < self.max_batch and batch:
            try:
                timeout = deadline - time.monotonic()
                take(self._queue.get(timeout=timeout) if timeout > 0 else
                     self._queue.get_nowait())
            except queue.Empty:
                break
        # Waiters already answered 503 (timed out) are not written: their clients were
        # told nothing was recorded, so recording it now would only surprise them.
        batch = [w for w in batch if not w[2].done()]
        if batch:
            self._commit(batch)
        for job in jobs:
            self._run_job(job)
        return len(batch), stop

    def _run_job(self, job: _Job) -> None:
        self._busy_since = time.monotonic()  # a job that hangs is a stalled writer too
        try:
            result, error = job.work(), None
        except Exception as exc:  # the job's caller hears of it; the writer carries on
            result, error = None, exc
        finally:
            self._busy_since = None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def _commit(self, batch: list[_Waiter]) -> None:
        self._busy_since = time.monotonic()
        try:
            results = self.store.commit_batch([entry for entry, _, _ in batch], self._clock())
        except Exception as error:  # every failure must reach every waiter
            self.batches_failed += 1
            exc = commit_failure(error, len(batch))
            self.last_failure = str(exc)
            self.last_failure_at = time.monotonic()
            _wake_all([(loop, future, None, exc) for _, loop, future in batch])
            return
        finally:
            self._busy_since = None
        self.last_success_at = time.monotonic()
        self.batches_committed += 1
        self.entries_committed += len(batch)
        with self._grown_lock:
            self._grown.update(entry.tenant for entry, _, _ in batch)
        if self.on_batch is not None:
            try:
                self.on_batch([entry for entry, _, _ in batch], results)
            except Exception:  # observing must never fail a commit
                log.exception("batch observer failed")
        _wake_all([(loop, future, result, None)
                   for (_, loop, future), result in zip(batch, results, strict=True)])


def commit_failure(error: Exception, waiting: int) -> StorageUnavailable:
    """What the requests of a batch whose transaction failed are answered (logged once)."""
    if isinstance(error, StorageUnavailable):
        log.warning("ledger commit failed, %d waiting request(s) answered 503: %s",
                    waiting, error)
        return error
    log.error("ledger commit failed", exc_info=error)
    return StorageUnavailable(f"appending to the log failed: {error}")


def recent_failure(failure: str | None, failed_at: float | None, succeeded_at: float | None,
                   within: float) -> str | None:
    """``failure`` if it happened (``time.monotonic()``) less than ``within`` s ago and
    nothing has succeeded since; else None."""
    if failed_at is None or failure is None or time.monotonic() - failed_at >= within:
        return None
    if succeeded_at is not None and succeeded_at > failed_at:
        return None
    return failure


_Answer = tuple[asyncio.AbstractEventLoop, "asyncio.Future[CommitResult]",
                CommitResult | None, BaseException | None]


def _wake_all(answers: list[_Answer]) -> None:
    """Answer a batch's waiters: one wake-up per event loop, not one per waiter.

    Each ``call_soon_threadsafe`` writes to the loop's self-pipe (a system call
    here, a read and a GIL hand-over there); a batch usually has one loop.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
    for answer in answers:
        by_loop.setdefault(answer[0], []).append(answer)
    for loop, group in by_loop.items():
        # RuntimeError: the loop has closed (shutdown), so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_all, group)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Give a waiter its answer, on its event loop; one that already has one (timed out,
    cancelled at shutdown) keeps it."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _resolve_all(answers: list[_Answer]) -> None:
    for _, future, result, error in answers:
        _settle(future, result, error)


def _time_out(future: asyncio.Future[CommitResult], seconds: float) -> None:
    """Answer a waiter whose transaction has not finished in time (on the event loop)."""
    if not future.done():
        future.set_exception(StorageUnavailable(
            f"the database is not responding: the write to the log did not finish within "
            f"{seconds:g} s, and nothing was acknowledged"))
        # Nobody may be left to retrieve it (a client that went away): no "never retrieved".
        future.exception()


"""Group commit: many concurrent decisions share one durable transaction.

One writer thread owns the appends. Requests put a :class:`PendingEntry` on a
queue and await their result; the writer takes everything queued, commits it
in one fsync'd transaction and wakes each waiter. While the previous batch
held more than one entry (the service is busy), it waits up to ``max_delay``
for more entries first: a bigger batch per fsync, with no added latency when
idle. Nothing is acknowledged before its transaction has committed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

from execguard.ledger.records import CommitResult, PendingEntry
from execguard.ledger.store import LedgerStore
from execguard.protocol.errors import ServiceUnavailable, StorageUnavailable

__all__ = ["GroupCommitter"]

log = logging.getLogger(__name__)

#: Sees each committed batch: its entries and their results, in order.
BatchObserver = Callable[[list[PendingEntry], list[CommitResult]], None]
_Waiter = tuple[PendingEntry, asyncio.AbstractEventLoop, "asyncio.Future[CommitResult]"]


class GroupCommitter:
    """Batches appends from an asyncio server into durable transactions."""

    def __init__(self, store: LedgerStore, *, max_batch: int = 256, max_delay: float = 0.001,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._clock = clock
        self._queue: queue.SimpleQueue[_Waiter | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Counters, for metrics and tests.
        self.batches_committed = 0
        self.entries_committed = 0
        #: Called on the writer thread after each commit, before any waiter wakes (metrics).
        self.on_batch: BatchObserver | None = None
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

    def take_grown_tenants(self) -> set[str]:
        """Tenants whose logs grew since the last call (for the checkpoint schedule)."""
        with self._grown_lock:
            grown, self._grown = self._grown, set()
        return grown

    async def submit(self, entry: PendingEntry) -> CommitResult:
        """Queue an entry and wait until it is durable (or refused)."""
        if self._stopping or not self.running:
            raise ServiceUnavailable("the ledger writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CommitResult] = loop.create_future()
        self._queue.put((entry, loop, future))
        # Shielded: a client that disconnects must not leave its entry half-acknowledged.
        return await asyncio.shield(future)

    def _run(self) -> None:
        previous_size = 0
        while True:
            first = self._queue.get()
            batch: list[_Waiter] = [] if first is None else [first]
            stop = first is None
            deadline = time.monotonic() + (self.max_delay if previous_size > 1 else 0.0)
            while len(batch) < self.max_batch:
                try:
                    timeout = deadline - time.monotonic()
                    item = self._queue.get(timeout=timeout) if timeout > 0 else \
                        self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    continue
                batch.append(item)
            if batch:
                self._commit(batch)
            previous_size = len(batch)
            if stop and self._queue.empty():
                return

    def _commit(self, batch: list[_Waiter]) -> None:
        try:
            results = self.store.commit_batch([entry for entry, _, _ in batch], self._clock())
        except Exception as exc:  # every failure must reach every waiter
            if not isinstance(exc, StorageUnavailable):
                log.exception("ledger commit failed")
                exc = StorageUnavailable(f"appending to the log failed: {exc}")
            for _, loop, future in batch:
                loop.call_soon_threadsafe(_resolve, future, None, exc)
            return
        self.batches_committed += 1
        self.entries_committed += len(batch)
        with self._grown_lock:
            self._grown.update(entry.tenant for entry, _, _ in batch)
        if self.on_batch is not None:
            try:
                self.on_batch([entry for entry, _, _ in batch], results)
            except Exception:  # observing must never fail a commit
                log.exception("batch observer failed")
        for (_, loop, future), result in zip(batch, results, strict=True):
            loop.call_soon_threadsafe(_resolve, future, result, None)


def _resolve(future: asyncio.Future[CommitResult], result: CommitResult | None,
             error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)

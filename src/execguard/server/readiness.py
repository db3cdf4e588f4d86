"""Readiness of the ledger: can a durable write go through right now?

``/readyz`` must notice a database that refuses writes (read-only, disk full)
or has stopped answering (a frozen disk, a cut connection), yet a readiness
probe must never become load nor hang. So :class:`StorageProbe` runs the
store's ``check_writable`` (one small durable write) on a thread of its own,
one check at a time, keeps the answer for ``cache_seconds``, and waits for a
check at most ``timeout`` seconds: a check still running after that is itself
the answer ("not responding"), and later probes report it without starting
another one until it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable

from execguard.ledger.store import LedgerStore
from execguard.protocol.errors import ServiceUnavailable

__all__ = ["StorageProbe"]

log = logging.getLogger("execguard.server")


class StorageProbe:
    """Whether the ledger takes durable writes now; checked at most once per ``cache_seconds``."""

    def __init__(self, store: LedgerStore, *, cache_seconds: float = 1.0, timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self._clock = clock
        # One worker: a check that hangs holds it, so hanging checks cannot pile up.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="execguard-readiness")
        self._running: concurrent.futures.Future[str | None] | None = None
        self._started = 0.0
        self._answer: tuple[float, str | None] | None = None  # (checked at, problem)

    async def problem(self, stale_before: float | None = None) -> str | None:
        """None when a durable write just went through; else what is wrong, for people.

        A cached answer older than ``stale_before`` (a failure seen elsewhere since,
        on the same clock) is not used: readiness must not say "ready" after a write
        has just failed.
        """
        now = self._clock()
        if self._answer is not None and now - self._answer[0] < self.cache_seconds and \
                (stale_before is None or self._answer[0] > stale_before):
            return self._answer[1]
        if self._running is None:
            self._running = self._executor.submit(self._check)
            self._started = now
        running = self._running
        remaining = self.timeout - (now - self._started)
        if remaining > 0:
            # asyncio.wait, not wait_for: a check that runs late is left running, not cancelled.
            await asyncio.wait([asyncio.wrap_future(running)], timeout=remaining)
        if not running.done():
            return (f"the database is not responding: a test write has been waiting for "
                    f"{self._clock() - self._started:.0f} s")
        if self._running is running:
            self._running = None
        problem = running.result()
        self._answer = (self._clock(), problem)
        return problem

    def _check(self) -> str | None:
        try:
            self.store.check_writable()
        except ServiceUnavailable as exc:
            return str(exc)
        except Exception as exc:  # a readiness check reports; it never raises
            log.exception("the storage readiness check failed unexpectedly")
            return f"checking that the database is writable failed: {exc}"
        return None

    def close(self) -> None:
        """Stop the worker (a hung check is abandoned, not waited for)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

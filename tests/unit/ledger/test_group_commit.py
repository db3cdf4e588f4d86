"""The group committer under storage faults: fail closed, keep running, recover.

A scripted store stands in for the database so each fault is exact: a commit
that raises (read-only, disk full) or one that hangs (a database that stopped
answering) until the test lets it go.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from execguard.ledger import Committed, GroupCommitter, PendingEntry
from execguard.ledger.records import CommitResult
from execguard.protocol.errors import ServiceUnavailable, StorageUnavailable
from execguard.server.readiness import StorageProbe


class ScriptedStore:
    """``commit_batch`` appends, raises ``failure`` or blocks on ``gate``, as told."""

    def __init__(self) -> None:
        self.committed: list[str] = []
        self.failure: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.writable_checks = 0

    def commit_batch(self, entries: Sequence[PendingEntry],
                     now_epoch: float) -> list[CommitResult]:
        self.entered.set()
        assert self.gate.wait(timeout=30), "the test never released the hung commit"
        if self.failure is not None:
            raise self.failure
        results: list[CommitResult] = []
        for entry in entries:
            self.committed.append(entry.execution_id)
            results.append(Committed(len(self.committed) - 1, {}))
        return results

    def check_writable(self) -> None:
        self.writable_checks += 1
        assert self.gate.wait(timeout=30), "the test never released the hung check"
        if self.failure is not None:
            raise self.failure


def entry(execution_id: str) -> PendingEntry:
    def seal(index: int) -> dict[str, Any]:  # never called: the scripted store does not seal
        raise AssertionError
    return PendingEntry(tenant="acme", kind="decision", execution_id=execution_id, seal=seal)


@pytest.fixture
def store() -> ScriptedStore:
    return ScriptedStore()


@pytest.fixture
def committer(store: ScriptedStore) -> Any:
    committer = GroupCommitter(store, commit_timeout=0.3)  # type: ignore[arg-type]
    committer.start()
    yield committer
    store.gate.set()
    committer.stop()


def test_a_failed_batch_answers_503_and_the_writer_recovers(
        store: ScriptedStore, committer: GroupCommitter) -> None:
    async def scenario() -> None:
        store.failure = StorageUnavailable("appending to the log failed: database or disk is full")
        results = await asyncio.gather(*(committer.submit(entry(f"bad{i}")) for i in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, StorageUnavailable) and "disk is full" in str(r)
                   for r in results), results
        assert committer.running and committer.batches_failed >= 1
        store.failure = None
        ok = await committer.submit(entry("good"))
        assert isinstance(ok, Committed)

    asyncio.run(scenario())
    assert store.committed == ["good"]  # nothing of the failed batches was kept


def test_a_failed_append_is_reported_until_one_commits_or_for_a_while(
        store: ScriptedStore, committer: GroupCommitter) -> None:
    async def scenario() -> None:
        assert committer.failing(within=60) is None
        store.failure = StorageUnavailable("appending to the log failed: No space left")
        with pytest.raises(StorageUnavailable):
            await committer.submit(entry("bad"))
        assert committer.failing(within=60) == "appending to the log failed: No space left"
        time.sleep(0.05)
        assert committer.failing(within=0.01) is None  # no traffic: not reported forever
        store.failure = None
        await committer.submit(entry("good"))
        assert committer.failing(within=60) is None  # an append went through since

    asyncio.run(scenario())


def test_jobs_run_on_the_writer_thread_after_the_entries_queued_before_them(
        store: ScriptedStore, committer: GroupCommitter) -> None:
    async def scenario() -> None:
        store.gate.clear()  # hold the writer in a commit while more work is queued
        first = asyncio.ensure_future(committer.submit(entry("e0")))
        await asyncio.to_thread(store.entered.wait, 5)
        queued = [asyncio.ensure_future(committer.submit(entry(f"e{i}"))) for i in (1, 2)]
        await asyncio.sleep(0.05)  # the submissions reach the queue before the job

        def job() -> tuple[str, list[str]]:
            return threading.current_thread().name, list(store.committed)

        ran = asyncio.ensure_future(committer.run_between_batches(job))
        await asyncio.sleep(0.05)
        store.gate.set()
        thread, seen = await ran
        assert thread == "execguard-writer"
        assert seen == ["e0", "e1", "e2"]  # everything queued before it was committed
        await asyncio.gather(first, *queued)

        def broken() -> None:
            raise ValueError("checkpoint went wrong")
        with pytest.raises(ValueError, match="checkpoint went wrong"):
            await committer.run_between_batches(broken)
        assert isinstance(await committer.submit(entry("after")), Committed)  # carries on

    asyncio.run(scenario())
    committer.stop()

    async def stopped() -> None:
        with pytest.raises(ServiceUnavailable):
            await committer.run_between_batches(lambda: None)
    asyncio.run(stopped())


def test_an_unexpected_error_is_a_503_too(store: ScriptedStore,
                                         committer: GroupCommitter) -> None:
    async def scenario() -> None:
        store.failure = OSError(30, "Read-only file system")
        with pytest.raises(StorageUnavailable, match="Read-only file system"):
            await committer.submit(entry("x"))
        store.failure = None
        assert isinstance(await committer.submit(entry("y")), Committed)

    asyncio.run(scenario())


def test_a_hung_database_answers_503_in_bounded_time_and_drops_what_it_answered(
        store: ScriptedStore, committer: GroupCommitter) -> None:
    async def scenario() -> None:
        store.gate.clear()
        first = asyncio.ensure_future(committer.submit(entry("stuck")))
        await asyncio.to_thread(store.entered.wait, 5)
        queued = asyncio.ensure_future(committer.submit(entry("queued")))
        for waiter in (first, queued):
            with pytest.raises(StorageUnavailable, match="not responding"):
                await asyncio.wait_for(waiter, 10)  # bounded by commit_timeout, not by 10 s
        # While the write hangs, new entries are refused at once instead of queueing.
        while committer.stalled_for() <= committer.commit_timeout:
            await asyncio.sleep(0.05)
        with pytest.raises(StorageUnavailable, match="has been waiting"):
            await committer.submit(entry("refused"))
        store.gate.set()  # the database answers again
        while committer.stalled_for() > 0:
            await asyncio.sleep(0.01)
        assert isinstance(await committer.submit(entry("after")), Committed)

    asyncio.run(scenario())
    # "stuck" was already in the transaction when it hung; "queued" and "refused" were
    # answered 503 before any transaction took them, so they were never written.
    assert store.committed == ["stuck", "after"]


def test_the_storage_probe_reports_faults_caches_and_never_hangs(store: ScriptedStore) -> None:
    probe = StorageProbe(store, cache_seconds=0.2, timeout=0.2)  # type: ignore[arg-type]

    async def scenario() -> None:
        assert await probe.problem() is None
        checks = store.writable_checks
        assert await probe.problem() is None
        assert store.writable_checks == checks  # cached: a probe storm is not a load
        await asyncio.sleep(0.25)
        store.failure = StorageUnavailable("checking failed: attempt to write a readonly db")
        assert "readonly" in (await probe.problem() or "")
        await asyncio.sleep(0.25)
        store.gate.clear()
        assert "not responding" in (await asyncio.wait_for(probe.problem(), 5) or "")
        assert "not responding" in (await asyncio.wait_for(probe.problem(), 5) or "")
        store.failure = None
        store.gate.set()
        await asyncio.sleep(0.25)
        assert await probe.problem() is None

    try:
        asyncio.run(scenario())
    finally:
        store.gate.set()
        probe.close()

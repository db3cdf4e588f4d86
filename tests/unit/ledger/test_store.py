"""The ledger's contract, run against every backend (SQLite file and PostgreSQL)."""

import asyncio
import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from execguard.ledger import (
    ApiKeyRecord,
    Committed,
    Conflicted,
    FactQuery,
    FactRead,
    FactReader,
    GroupCommitter,
    IdempotencyClaim,
    PendingEntry,
    PreparedDecision,
    Replayed,
    Reservation,
    SQLiteStore,
    SQLStore,
    open_ledger,
)
from execguard.ledger._sql_batch import BatchRows
from execguard.ledger._sql_facts import TxnFacts, read_facts_ahead
from execguard.ledger.sqlite import WAL_RESTART_PAGES, sqlite_errors
from execguard.protocol.chain import entry_hash
from execguard.protocol.errors import ConfigError, NotFound, StorageUnavailable
from execguard.protocol.receipt import seal_receipt
from execguard.protocol.signing import Signer

SIGNER = Signer.generate()


def decision(tenant: str, execution_id: str, claim: IdempotencyClaim | None = None,
             **extra: Any) -> PendingEntry:
    fields = {"receiptType": "decision", "executionId": execution_id, "decision": "PERMIT",
              "surface": "payment.execute", "timestamp": "2026-11-26T22:30:00.000Z", **extra}
    return PendingEntry(
        tenant=tenant, kind="decision", execution_id=execution_id,
        seal=lambda index: seal_receipt({**fields, "logIndex": index}, SIGNER),
        execution={"surface": "payment.execute", "actor_id": "a", "decision": "PERMIT",
                   "reason_code": "WITHIN_LIMIT", "policy_version": "v1",
                   "request_hash": claim.request_hash if claim else "h",
                   "request": {"tenant": tenant}},
        response={"decision": "PERMIT", "execution_id": execution_id}, idempotency=claim)


def outcome(tenant: str, execution_id: str) -> PendingEntry:
    return PendingEntry(tenant=tenant, kind="outcome", execution_id=execution_id,
                        seal=lambda index: seal_receipt(
                            {"receiptType": "outcome", "executionId": execution_id,
                             "logIndex": index}, SIGNER))


@pytest.fixture
def store(tmp_path: Path, database: str | None) -> Iterator[SQLStore]:
    s = open_ledger(database or str(tmp_path / "ledger.db"), migrate=True)
    s.create_tenant("acme", "t0")
    s.create_tenant("other", "t0")
    yield s
    s.close()


def test_indexes_are_gapless_per_tenant_and_chained(store: SQLStore) -> None:
    results = store.commit_batch([decision("acme", "e1"), decision("other", "o1"),
                                  decision("acme", "e2")], 0)
    results += store.commit_batch([decision("acme", "e3")], 0)
    assert [r.log_index for r in results if isinstance(r, Committed)] == [0, 0, 1, 2]
    entries = store.log_entries("acme", 0, 10)
    assert [e.index for e in entries] == [0, 1, 2]
    prev = None
    for entry in entries:
        assert entry.receipt["logIndex"] == entry.index
        assert entry.prev_hash == prev
        assert entry.entry_hash == entry_hash(entry.index, prev, entry.receipt_hash)
        prev = entry.entry_hash
    assert store.log_size("acme") == 3 and store.log_size("other") == 1


def driver_error(store: SQLStore) -> type[Exception]:
    """The error class the store's own database driver raises."""
    return sqlite3.OperationalError if store.location.endswith(".db") else \
        psycopg.errors.IoError


def run_sql_directly(store: SQLStore, sql: str) -> None:
    """As an operator with a database shell would: outside ExecGuard."""
    if store.location.endswith(".db"):
        with sqlite3.connect(store.location) as conn:
            conn.execute(sql)
    else:
        with psycopg.connect(store.url, autocommit=True) as conn:  # type: ignore[attr-defined]
            conn.execute(sql)


@pytest.mark.parametrize("sql", ["UPDATE log SET receipt = '{}'", "DELETE FROM log",
                                 "DELETE FROM merkle_nodes"])
def test_log_is_append_only_even_through_sql(store: SQLStore, sql: str) -> None:
    store.commit_batch([decision("acme", "e1")], 0)
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only"):
        run_sql_directly(store, sql)
    assert store.log_entries("acme", 0, 1)[0].receipt["executionId"] == "e1"


def test_idempotency_replays_same_request_and_refuses_another(store: SQLStore) -> None:
    claim = IdempotencyClaim("k", "hash-1", "enforce", expires_at=100)
    first = store.commit_batch([decision("acme", "e1", claim)], now_epoch=0)[0]
    assert isinstance(first, Committed)
    again = store.commit_batch([decision("acme", "e2", claim)], now_epoch=1)[0]
    assert isinstance(again, Replayed) and again.record.execution_id == "e1"
    other = IdempotencyClaim("k", "hash-2", "enforce", expires_at=100)
    assert store.commit_batch([decision("acme", "e3", other)], 1)[0] == \
        Conflicted("idempotency_key_reuse")
    observe = IdempotencyClaim("k", "hash-1", "observe", expires_at=100)
    assert store.commit_batch([decision("acme", "e4", observe)], 1)[0] == \
        Conflicted("idempotency_key_reuse")
    # Keys are per tenant, and forgotten after they expire.
    assert isinstance(store.commit_batch([decision("other", "o1", other)], 1)[0], Committed)
    later = IdempotencyClaim("k", "hash-2", "enforce", expires_at=200)
    assert isinstance(store.commit_batch([decision("acme", "e5", later)], 101)[0], Committed)
    assert store.log_size("acme") == 2
    found = store.find_idempotent("acme", "k", 102)
    assert found is not None and found[2].execution_id == "e5"
    assert store.purge_idempotency(10**9) == 2
    assert store.find_idempotent("acme", "k", 102) is None


def test_idempotency_holds_within_one_batch(store: SQLStore) -> None:
    """The batch reads its keys once: a key claimed earlier in the same batch still counts."""
    first = IdempotencyClaim("k1", "hash-1", "enforce", expires_at=100)
    other = IdempotencyClaim("k1", "hash-2", "enforce", expires_at=100)
    fresh = IdempotencyClaim("k2", "hash-3", "enforce", expires_at=100)
    results = store.commit_batch([decision("acme", "e1", first), decision("acme", "e2", first),
                                  decision("acme", "e3", other), decision("acme", "e4", fresh),
                                  decision("other", "o1", first)], 0)
    assert isinstance(results[0], Committed)
    assert isinstance(results[1], Replayed) and results[1].record.execution_id == "e1"
    assert results[2] == Conflicted("idempotency_key_reuse")
    assert isinstance(results[3], Committed) and isinstance(results[4], Committed)
    assert store.log_size("acme") == 2 and store.log_size("other") == 1
    # And the next batch sees what this one claimed.
    again = store.commit_batch([decision("acme", "e5", fresh)], 1)[0]
    assert isinstance(again, Replayed) and again.record.execution_id == "e4"


def test_limits_count_the_reservations_of_the_same_batch(store: SQLStore) -> None:
    """Stateful decisions in one batch see each other's reservations (not yet inserted)."""
    seen: list[tuple[int, int, int, int]] = []

    def stateful(execution_id: str, actor: str, units: int) -> PendingEntry:
        plain = decision("acme", execution_id)

        def decide(reader: FactReader) -> PreparedDecision:
            queries = [FactQuery(0.0), FactQuery(0.0, "amount")]
            mine = reader.measure("payment.execute", actor, queries, 100.0)
            everyone = reader.measure("payment.execute", None, queries, 100.0)
            seen.append((mine[0], mine[1], everyone[0], everyone[1]))
            return PreparedDecision(
                plain.seal, {**(plain.execution or {}), "actor_id": actor}, plain.response or {},
                Reservation("payment.execute", actor, {"amount": units}, 50.0, 200.0))
        return PendingEntry(tenant="acme", kind="decision", execution_id=execution_id,
                            seal=plain.seal, decide=decide)

    store.commit_batch([stateful("s1", "ann", 10)], 60.0)
    results = store.commit_batch([stateful("s2", "ann", 20), stateful("s3", "bob", 5),
                                  stateful("s4", "ann", 30)], 60.0)
    assert all(isinstance(r, Committed) for r in results)
    # Per actor and for everyone, before each decision: stored ones plus the batch's own.
    assert seen == [(0, 0, 0, 0), (1, 10, 1, 10), (0, 0, 2, 30), (2, 30, 3, 35)]
    store.commit_batch([stateful("s5", "ann", 1)], 60.0)  # and all of them were stored
    assert seen[-1] == (3, 60, 4, 65)


def consume(tenant: str, execution_id: str) -> PendingEntry:
    def sealed(result: str, reason: str | None) -> Any:
        return lambda index: seal_receipt({"receiptType": "consume", "executionId": execution_id,
                                           "consumeResult": result, "refusalReason": reason,
                                           "logIndex": index}, SIGNER)
    return PendingEntry(tenant=tenant, kind="consume", execution_id=execution_id,
                        seal=sealed("CONSUMED", None),
                        refuse=lambda reason: sealed("REFUSED", reason))


def test_a_permit_is_consumed_once_and_never_after_its_execution_ended(
        store: SQLStore) -> None:
    """Both decided inside the lock, so also within one batch: a second consumption is
    refused, and so is a first one after an outcome (a FAILURE freed its limits)."""
    store.commit_batch([decision("acme", "e1"), decision("acme", "e2")], 0)
    results = store.commit_batch([consume("acme", "e1"), consume("acme", "e1"),
                                  outcome("acme", "e2"), consume("acme", "e2")], 1)
    receipts = [r.receipt for r in results if isinstance(r, Committed)]
    assert [(r["receiptType"], r.get("consumeResult"), r.get("refusalReason"))
            for r in receipts] == [("consume", "CONSUMED", None),
                                   ("consume", "REFUSED", "ALREADY_CONSUMED"),
                                   ("outcome", None, None),
                                   ("consume", "REFUSED", "OUTCOME_RECORDED")]
    kinds = [e.kind for e in store.execution_log("acme", "e2")]
    assert kinds == ["decision", "outcome", "consume-refused"]


def test_a_permit_whose_share_of_the_limits_expired_is_not_consumed(store: SQLStore) -> None:
    """Expiry is decided inside the lock too, at the transaction's time: a consume queued
    just before the permit expired could otherwise take back a share that a decision of
    another replica had already given away (the limits count it from its expiry on)."""
    share = Reservation("payment.execute", "ann", {"amount": 10}, 50.0, 200.0)
    store.commit_batch([dataclasses.replace(decision("acme", e), reservation=share)
                        for e in ("early", "late")], 60.0)
    (early,) = store.commit_batch([consume("acme", "early")], 199.9)
    (late,) = store.commit_batch([consume("acme", "late")], 200.0)
    assert isinstance(early, Committed) and isinstance(late, Committed)
    assert (early.receipt["consumeResult"], early.receipt["refusalReason"]) == \
        ("CONSUMED", None)
    assert (late.receipt["consumeResult"], late.receipt["refusalReason"]) == \
        ("REFUSED", "EXPIRED")
    assert [e.kind for e in store.execution_log("acme", "late")] == \
        ["decision", "consume-refused"]


def test_an_outcome_names_the_consumption_committed_before_it(store: SQLStore) -> None:
    """Which consumption an outcome follows is read inside the lock: read before, a
    consumption committed meanwhile (even in the same batch) was named as none."""
    def reporting(execution_id: str) -> PendingEntry:
        def sealed(consumed: str | None) -> Any:
            return lambda index: seal_receipt(
                {"receiptType": "outcome", "executionId": execution_id,
                 "consumeReceiptHash": consumed, "logIndex": index}, SIGNER)
        return dataclasses.replace(outcome("acme", execution_id), seal=sealed(None),
                                   seal_outcome=sealed)

    store.commit_batch([decision("acme", e) for e in ("same", "next", "never")], 0)
    same = store.commit_batch([consume("acme", "same"), reporting("same")], 1)
    (used,) = store.commit_batch([consume("acme", "next")], 1)
    (after,) = store.commit_batch([reporting("next")], 1)
    (unused,) = store.commit_batch([reporting("never")], 1)
    assert isinstance(same[0], Committed) and isinstance(same[1], Committed)
    assert same[1].receipt["consumeReceiptHash"] == same[0].receipt["receiptHash"]
    assert isinstance(used, Committed) and isinstance(after, Committed)
    assert after.receipt["consumeReceiptHash"] == used.receipt["receiptHash"]
    assert isinstance(unused, Committed) and unused.receipt["consumeReceiptHash"] is None


def test_an_outcome_is_recorded_once(store: SQLStore) -> None:
    store.commit_batch([decision("acme", "e1")], 0)
    assert isinstance(store.commit_batch([outcome("acme", "e1")], 0)[0], Committed)
    assert store.commit_batch([outcome("acme", "e1")], 0)[0] == Conflicted("outcome_exists")
    record = store.get_execution("acme", "e1")
    assert record is not None and record.outcome_receipt is not None
    assert record.outcome_receipt["logIndex"] == 1


def test_executions_are_tenant_scoped(store: SQLStore) -> None:
    store.commit_batch([decision("acme", "e1"), decision("other", "o1")], 0)
    assert store.get_execution("other", "e1") is None
    assert [r.execution_id for r in store.query_executions("acme")] == ["e1"]
    assert store.query_executions("acme", surface="data.export") == []


def test_a_failed_batch_stores_nothing(store: SQLStore) -> None:
    def explode(index: int) -> dict[str, Any]:
        raise driver_error(store)("disk I/O error")

    bad = PendingEntry(tenant="acme", kind="decision", execution_id="boom", seal=explode)
    with pytest.raises(StorageUnavailable):
        store.commit_batch([decision("acme", "e1"), bad], 0)
    assert store.log_size("acme") == 0 and store.get_execution("acme", "e1") is None


def test_bundles_are_immutable_and_one_is_active(store: SQLStore) -> None:
    assert store.put_bundle("acme", "v1", {"a.cedar": b"x"}, "t1")
    assert not store.put_bundle("acme", "v1", {"a.cedar": b"changed"}, "t2")
    assert store.get_bundle("acme", "v1").files == {"a.cedar": b"x"}
    store.put_bundle("acme", "v2", {"a.cedar": b"y"}, "t2")
    store.activate_bundle("acme", "v1", "t3")
    store.activate_bundle("acme", "v2", "t4")
    assert store.active_bundle_version("acme") == "v2"
    assert [b.active for b in store.list_bundles("acme")] == [False, True]
    with pytest.raises(NotFound):
        store.activate_bundle("other", "v1", "t5")
    assert store.active_bundle_version("other") is None


def test_a_revoked_api_key_is_found_by_no_lookup_and_listed_as_revoked(
        store: SQLStore) -> None:
    for key_hash, tenant in (("a" * 64, "acme"), ("b" * 64, "acme"), ("c" * 64, "other")):
        store.add_api_key(ApiKeyRecord(key_hash, tenant, "approver", "ann", "t1", ("ops",)))
    assert store.revoke_api_key("a" * 64, "t2")
    assert not store.revoke_api_key("a" * 64, "t3")  # once, and the first time stays
    assert not store.revoke_api_key("d" * 64, "t3")
    assert store.lookup_api_key("a" * 64) is None
    assert store.lookup_api_key("b" * 64) == ApiKeyRecord("b" * 64, "acme", "approver", "ann",
                                                          "t1", ("ops",))
    assert [(k.key_hash[0], k.revoked_at) for k in store.api_keys("acme")] == [
        ("a", "t2"), ("b", None)]


def test_a_version_5_database_gets_revocable_api_keys(tmp_path: Path) -> None:
    from execguard.ledger.sqlite import SCHEMA_VERSION

    path = tmp_path / "v5.db"
    old = SQLiteStore(path)
    old.create_tenant("acme", "t0")
    old.add_api_key(ApiKeyRecord("a" * 64, "acme", "agent", None, "t1"))
    old.close()
    with sqlite3.connect(path) as conn:  # the version 5 table, as it was
        conn.executescript("ALTER TABLE api_keys DROP COLUMN revoked_at;"
                           "UPDATE meta SET value = '5' WHERE key = 'schema_version';")
    upgraded = SQLiteStore(path)
    try:
        assert upgraded.schema_version() == SCHEMA_VERSION
        assert upgraded.lookup_api_key("a" * 64) == ApiKeyRecord("a" * 64, "acme", "agent",
                                                                 None, "t1")
        assert upgraded.revoke_api_key("a" * 64, "t2")
        assert upgraded.lookup_api_key("a" * 64) is None
    finally:
        upgraded.close()


def test_every_sqlite_error_class_is_translated() -> None:
    classes = [getattr(sqlite3, name) for name in dir(sqlite3)
               if isinstance(getattr(sqlite3, name), type)
               and issubclass(getattr(sqlite3, name), sqlite3.Error)]
    assert len(classes) >= 8
    for cls in classes:
        with pytest.raises(StorageUnavailable), sqlite_errors("testing"):
            raise cls("boom")


def test_group_commit_shares_transactions_and_acknowledges_after_commit(
        store: SQLStore) -> None:
    committer = GroupCommitter(store, max_delay=0.005)
    committer.start()

    async def many() -> list[Any]:
        return await asyncio.gather(*(committer.submit(decision("acme", f"e{i}"))
                                      for i in range(200)))

    try:
        results = asyncio.run(many())
    finally:
        committer.stop()
    assert sorted(r.log_index for r in results) == list(range(200))
    assert committer.entries_committed == 200
    assert committer.batches_committed < 200  # several requests per fsync'd transaction
    assert store.log_size("acme") == 200


def test_group_commit_failure_reaches_every_waiter(store: SQLStore, tmp_path: Path) -> None:
    committer = GroupCommitter(store)
    committer.start()

    def explode(index: int) -> dict[str, Any]:
        raise OSError("No space left on device")

    async def attempt() -> list[Any]:
        good = committer.submit(decision("acme", "e1"))
        bad = committer.submit(PendingEntry(tenant="acme", kind="decision",
                                            execution_id="x", seal=explode))
        return await asyncio.gather(good, bad, return_exceptions=True)

    try:
        results = asyncio.run(attempt())
    finally:
        committer.stop()
    # Whether they shared a batch or not, the failing one never succeeds silently.
    assert isinstance(results[1], StorageUnavailable)
    if isinstance(results[0], StorageUnavailable):
        assert store.log_size("acme") == 0
    else:
        assert store.log_size("acme") == 1


def test_the_tree_is_stored_and_a_forked_checkpoint_is_refused(store: SQLStore) -> None:
    from execguard.ledger import CheckpointRecord
    from execguard.protocol.merkle import MemoryTree, verify_consistency, verify_inclusion

    store.commit_batch([decision("acme", f"e{i}") for i in range(11)], 0)
    tree = MemoryTree(e.leaf_hash for e in store.log_entries("acme", 0, 11))
    for size in range(1, 12):
        assert store.tree_root("acme", size) == tree.root(size)
    verify_inclusion(tree.read(0, 4), 4, 11, store.inclusion_proof("acme", 4, 11), tree.root())
    verify_consistency(3, 11, store.consistency_proof("acme", 3, 11), tree.root(3), tree.root())

    good = CheckpointRecord("acme", 11, tree.root(), "note", "k", "t")
    assert store.add_checkpoint(good) == good
    assert store.add_checkpoint(CheckpointRecord("acme", 11, tree.root(), "other note", "k",
                                                 "t2")) == good  # same root: the stored one
    with pytest.raises(StorageUnavailable, match="fork"):
        store.add_checkpoint(CheckpointRecord("acme", 11, bytes(32), "forged", "k", "t3"))
    assert [c.root for c in store.checkpoints("acme")] == [tree.root()]
    # A smaller one signed a moment before the larger was stored (another replica): the
    # larger is the latest, and checkpoints stay in the order of their sizes and times.
    late = CheckpointRecord("acme", 5, tree.root(5), "note 5", "k", "t4")
    assert store.add_checkpoint(late) == good
    assert [c.size for c in store.checkpoints("acme")] == [11]


def test_two_writers_on_one_database_keep_one_tree(store: SQLStore, tmp_path: Path,
                                                   database: str | None) -> None:
    """Each store resumes the tree from its last batch only if nobody appended since."""
    from execguard.protocol.merkle import MemoryTree

    other = open_ledger(database or str(tmp_path / "ledger.db"))
    try:
        for round_ in range(6):
            writer = store if round_ % 2 == 0 else other
            writer.commit_batch([decision("acme", f"r{round_}-{i}")
                                 for i in range(round_ + 1)], 0)
            if round_ == 3:  # twice in a row: the cached edge is still the head
                writer.commit_batch([decision("acme", "again")], 0)
    finally:
        other.close()
    size = store.log_size("acme")
    assert size == sum(range(1, 7)) + 1
    tree = MemoryTree(e.leaf_hash for e in store.log_entries("acme", 0, size))
    for n in range(1, size + 1):
        assert store.tree_root("acme", n) == tree.root(n)


def test_new_sqlite_files_use_8k_pages_and_older_4k_files_keep_working(tmp_path: Path) -> None:
    fresh = SQLiteStore(tmp_path / "new.db")
    older_path = tmp_path / "older.db"
    with sqlite3.connect(older_path) as conn:  # as files made before the page size was set
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA journal_mode=WAL")
    older = SQLiteStore(older_path)
    try:
        for store, size in ((fresh, 8192), (older, 4096)):
            store.create_tenant("acme", "t0")
            assert isinstance(store.commit_batch([decision("acme", "e1")], 1.0)[0], Committed)
            with store._read("test") as conn:
                assert conn.execute("PRAGMA page_size").fetchone()[0] == size
    finally:
        fresh.close()
        older.close()


def stored_nodes_in_key_order(store: SQLStore, tenant: str) -> list[tuple[int, int]]:
    """(level, index) of the tenant's stored Merkle nodes, in the table's key order."""
    with store._read("test") as conn:
        return [(level, idx) for level, idx in conn.execute(
            "SELECT level, idx FROM merkle_nodes WHERE tenant = ? ORDER BY last_leaf, level",
            (tenant,)).fetchall()]


def merkle_key(store: SQLStore) -> list[str]:
    """The columns of ``merkle_nodes``' primary key, in order (the table's physical order
    on SQLite, the index's on PostgreSQL)."""
    with store._read("test") as conn:
        if store.location.endswith(".db"):
            columns = conn.execute("PRAGMA table_info(merkle_nodes)").fetchall()
            return [c[1] for c in sorted((c for c in columns if c[5]), key=lambda c: c[5])]
        definition = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname ="
            " 'merkle_nodes_pkey' AND connamespace = current_schema()::regnamespace"
        ).fetchone()[0]
        return definition.removeprefix("PRIMARY KEY (").removesuffix(")").split(", ")


def test_an_append_s_merkle_nodes_are_neighbours_in_the_key(store: SQLStore) -> None:
    """Keyed by the last leaf they cover, the nodes of one append sit together at the end
    of the table, in the order the tree creates them (not one place per tree level)."""
    from execguard.protocol.merkle import CompactRange

    for batch in range(4):
        store.commit_batch([decision("acme", f"n{batch}-{i}") for i in range(5)], 0)
    created: list[tuple[int, int]] = []
    tree = CompactRange()
    for entry in store.log_entries("acme", 0, 20):
        created += [(level, index) for level, index, _ in tree.append(entry.leaf_hash)]
    assert merkle_key(store) == ["tenant", "last_leaf", "level"]
    assert stored_nodes_in_key_order(store, "acme") == created
    assert created[-3:] == [(0, 19), (1, 9), (2, 4)]  # leaf 19 completes two nodes above it
    assert store.tree_root("acme", 20) == tree.root()


def test_a_version_4_database_gets_its_merkle_nodes_keyed_by_their_last_leaf(
        tmp_path: Path) -> None:
    """The upgrade rebuilds the table once; the tree, its proofs and the append-only rule
    are what they were, and appends go on."""
    from execguard.ledger.sqlite import SCHEMA_VERSION

    path = tmp_path / "v4.db"
    old = SQLiteStore(path)
    old.create_tenant("acme", "t0")
    old.commit_batch([decision("acme", f"e{i}") for i in range(13)], 0)
    root, proof = old.tree_root("acme", 13), old.inclusion_proof("acme", 5, 13)
    consistency = old.consistency_proof("acme", 6, 13)
    old.close()
    with sqlite3.connect(path) as conn:  # the version 4 table, as it was
        conn.executescript(
            "DROP TRIGGER merkle_nodes_no_update; DROP TRIGGER merkle_nodes_no_delete;"
            "ALTER TABLE merkle_nodes RENAME TO v5;"
            "CREATE TABLE merkle_nodes (tenant TEXT NOT NULL, level INTEGER NOT NULL,"
            " idx INTEGER NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (tenant, level, idx))"
            " WITHOUT ROWID;"
            "INSERT INTO merkle_nodes SELECT tenant, level, idx, hash FROM v5; DROP TABLE v5;"
            "CREATE TRIGGER merkle_nodes_no_delete BEFORE DELETE ON merkle_nodes"
            " BEGIN SELECT RAISE(ABORT, 'the log is append-only'); END;"
            "UPDATE meta SET value = '4' WHERE key = 'schema_version';")
        nodes = conn.execute("SELECT COUNT(*) FROM merkle_nodes").fetchone()[0]

    upgraded = SQLiteStore(path)
    try:
        assert upgraded.schema_version() == SCHEMA_VERSION
        assert upgraded.tree_root("acme", 13) == root
        assert upgraded.inclusion_proof("acme", 5, 13) == proof
        assert upgraded.consistency_proof("acme", 6, 13) == consistency
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM merkle_nodes").fetchone()[0] == nodes
            assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'v5'"
                                    " OR name = 'merkle_nodes_v4'").fetchall()
            for sql in ("DELETE FROM merkle_nodes", "UPDATE merkle_nodes SET level = 0"):
                with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                    conn.execute(sql)
        assert isinstance(upgraded.commit_batch([decision("acme", "e13")], 0)[0], Committed)
        assert stored_nodes_in_key_order(upgraded, "acme")[-2:] == [(0, 13), (1, 6)]
    finally:
        upgraded.close()


def test_a_version_1_database_is_upgraded_with_its_tree(tmp_path: Path) -> None:
    """Databases from before the Merkle tree get leaves and nodes computed for their log."""
    from execguard.ledger.sqlite import SCHEMA_VERSION
    from execguard.protocol.logentry import receipt_leaf_hash
    from execguard.protocol.merkle import MemoryTree

    path = tmp_path / "v1.db"
    old = SQLiteStore(path)
    old.create_tenant("acme", "t0")
    old.commit_batch([decision("acme", f"e{i}") for i in range(5)], 0)
    receipts = [e.receipt for e in old.log_entries("acme", 0, 5)]
    old.close()
    conn = sqlite3.connect(path)
    for trigger in ("log_no_update", "log_no_delete", "merkle_nodes_no_delete"):
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.executescript("DROP TABLE merkle_nodes; DROP TABLE checkpoints;"
                       "ALTER TABLE log DROP COLUMN leaf_hash;"
                       "UPDATE meta SET value = '1' WHERE key = 'schema_version';")
    conn.close()

    upgraded = SQLiteStore(path)
    expected = MemoryTree(receipt_leaf_hash("acme", r) for r in receipts)
    assert upgraded.tree_root("acme", 5) == expected.root()
    assert isinstance(upgraded.commit_batch([decision("acme", "e5")], 0)[0], Committed)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE log SET receipt = '{}'")
    upgraded.close()


LIVE_COUNT = ("SELECT COUNT(*) FROM reservations r WHERE r.tenant = 'acme' AND r.surface = 's'"
              " AND r.reserved_at > 0 AND r.released = 0"
              " AND (r.consumed = 1 OR r.expires_at > 0) AND r.actor = 'ann'")


def test_a_sqlite_too_old_to_decide_is_refused_by_name_but_an_audit_may_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    existing = tmp_path / "existing.db"
    SQLiteStore(existing).close()
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 26, 0))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.26.0")
    with pytest.raises(ConfigError, match=r"SQLite 3\.30\.0 or newer.*uses SQLite 3\.26\.0"):
        SQLiteStore(tmp_path / "ledger.db")
    assert not (tmp_path / "ledger.db").exists()  # refused before any file was made
    reader = SQLiteStore(existing, readonly=True)
    try:
        assert reader.schema_version() > 0
    finally:
        reader.close()


def test_a_version_3_database_gets_the_covering_reservation_index(tmp_path: Path) -> None:
    """The limit facts read an actor's live reservations from one index, not row by row."""
    from execguard.ledger.sqlite import SCHEMA_VERSION

    path = tmp_path / "v3.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + LIVE_COUNT))
        assert "COVERING INDEX reservations_live_by_actor" in plan
        conn.executescript(
            "DROP INDEX reservations_live_by_actor;"
            "CREATE INDEX reservations_by_actor ON reservations"
            " (tenant, surface, actor, reserved_at);"
            "UPDATE meta SET value = '3' WHERE key = 'schema_version';")
    conn.close()
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        indexes = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'reservations'")}
        assert "reservations_live_by_actor" in indexes
        assert "reservations_by_actor" not in indexes
        assert conn.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    conn.close()


def _rows_in_database_file(path: Path, table: str) -> int:
    """Rows of ``table`` in the database file alone: a copy without the WAL beside it."""
    copy = path.with_name("file-only.db")
    copy.write_bytes(path.read_bytes())
    try:
        with sqlite3.connect(copy) as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?",
                                (table,)).fetchone():
                return 0  # even the schema is only in the WAL
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        copy.unlink()


def test_sqlite_commits_leave_wal_checkpoints_to_a_thread(tmp_path: Path) -> None:
    """A commit never copies the WAL into the database file itself (SQLite's default
    at 1000 pages, which held that commit for tens of milliseconds); a thread does, soon."""
    path = tmp_path / "ledger.db"
    store = SQLiteStore(path)
    try:
        store.create_tenant("acme", "t0")
        with store._write("test") as conn:
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == \
                WAL_RESTART_PAGES
            assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # memory
        for batch in range(20):
            store.commit_batch([decision("acme", f"e{batch}-{n}") for n in range(5)], 1.0)
        deadline = time.monotonic() + 10
        while _rows_in_database_file(path, "log") < 100:
            assert time.monotonic() < deadline, "the WAL was not checkpointed in 10 s"
            time.sleep(0.05)
        threads = [t for t in threading.enumerate() if t.name == "execguard-wal-checkpoint"]
        assert len(threads) == 1
    finally:
        store.close()
    assert not threads[0].is_alive()


def test_the_sqlite_checkpointer_never_creates_a_database_that_was_removed(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = SQLiteStore(path)
    try:
        store.create_tenant("acme", "t0")
        store._checkpointer.stop()  # type: ignore[union-attr]
        store._checkpointer = None
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").rename(tmp_path / f"moved{suffix}")
        store._wal_grew()  # a new checkpointer, whose first connection finds no file
        time.sleep(0.3)
        assert not path.exists()
    finally:
        store.close()


def test_a_batch_s_own_reservations_count_by_tenant_surface_actor_and_window(
        store: SQLStore) -> None:
    """The reservations a batch has not inserted yet count only where stored ones would."""
    rows = BatchRows()
    for n, (tenant, surface, actor, at, expires, units) in enumerate([
            ("acme", "pay", "ann", 50.0, 200.0, 1),
            ("acme", "pay", "ann", 10.0, 200.0, 2),  # before the window
            ("acme", "pay", "ann", 50.0, 70.0, 4),  # expired by now (100)
            ("acme", "pay", "bob", 50.0, 200.0, 8),
            ("acme", "ship", "ann", 50.0, 200.0, 16),  # another surface
            ("other", "pay", "ann", 50.0, 200.0, 32)]):  # another tenant
        rows.reserve(tenant, f"r{n}", Reservation(surface, actor, {"amount": units}, at,
                                                  expires))
    count, amount = FactQuery(20.0), FactQuery(20.0, "amount")
    with store._write("test") as conn:
        facts = TxnFacts(conn, "acme", rows.reservations)
        assert facts.measure("pay", "ann", [count, amount], 100.0) == [1, 1]
        assert facts.measure("pay", None, [count, amount], 100.0) == [2, 9]
        assert facts.measure("pay", "carl", [count], 100.0) == [0]
        assert facts.measure("ship", None, [amount], 100.0) == [16]
        assert facts.measure("pay", "ann", [FactQuery(0.0)], 100.0) == [2]
        assert facts.measure("pay", "ann", [], 100.0) == []


def test_a_scope_s_fact_queries_are_read_in_one_statement(store: SQLStore) -> None:
    """On PostgreSQL every statement inside the lock is a round trip: a decision's facts
    of one scope, however many, are one."""
    statements: list[str] = []
    queries = [FactQuery(10.0), FactQuery(20.0, "amount"), FactQuery(30.0, "fee"),
               FactQuery(40.0, "amount")]
    with store._write("test") as conn:
        assert TxnFacts(Counting(conn, statements), "acme").measure(
            "pay", "ann", queries, 100.0) == [0, 0, 0, 0]
    assert len(statements) == 1 and statements[0].count("LEFT JOIN") == 2


STORED = [  # id, surface, actor, reserved_at, expires_at, consumed, released, amounts
    ("s1", "pay", "ann", 90.0, 200.0, 0, 0, {"amount": 1, "fee": 100}),
    ("s2", "pay", "ann", 50.0, 200.0, 0, 0, {"amount": 2}),  # no fee; at a window's start
    ("s3", "pay", "ann", 30.0, 200.0, 0, 0, {"amount": 4, "fee": 400}),
    ("s4", "pay", "ann", 95.0, 200.0, 0, 1, {"amount": 8, "fee": 800}),  # released
    ("s5", "pay", "ann", 80.0, 99.0, 0, 0, {"amount": 16, "fee": 1600}),  # expired
    ("s6", "pay", "ann", 85.0, 99.0, 1, 0, {"amount": 32, "fee": 3200}),  # expired, used
    ("s7", "pay", "bob", 90.0, 200.0, 0, 0, {"amount": 64, "fee": 6400}),
    ("s8", "ship", "ann", 90.0, 200.0, 0, 0, {"amount": 128}),
    ("s9", "pay", "ann", 10.0, 200.0, 0, 0, {"amount": 256}),  # before every window
]
QUERIES = (FactQuery(50.0), FactQuery(20.0, "amount"), FactQuery(70.0, "fee"),
           FactQuery(20.0), FactQuery(50.0, "amount"))


def insert_reservations(conn: Any, tenant: str, stored: list[Any]) -> None:
    for ident, surface, actor, at, expires, consumed, released, amounts in stored:
        conn.execute("INSERT INTO reservations (execution_id, tenant, surface, actor,"
                     " reserved_at, expires_at, consumed, released)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (f"{tenant}-{ident}", tenant, surface, actor, at, expires, consumed,
                      released))
        for name, units in amounts.items():
            conn.execute("INSERT INTO reservation_amounts VALUES (?, ?, ?)",
                         (f"{tenant}-{ident}", name, units))


class Counting:
    """A connection that notes every statement it runs."""

    def __init__(self, conn: Any, statements: list[str]) -> None:
        self.conn = conn
        self.statements = statements

    def execute(self, sql: str, params: Any = ()) -> Any:
        self.statements.append(sql)
        return self.conn.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_one_statement_answers_every_fact_query_of_a_scope(store: SQLStore) -> None:
    """Counts and totals of several fields over several windows, read at once, each over
    exactly the live stored reservations (and the batch's own) its query asks about."""
    stored, queries = STORED, list(QUERIES)
    rows = BatchRows()  # this batch's own, not inserted yet
    rows.reserve("acme", "p1", Reservation("pay", "ann", {"amount": 512, "fee": 5000}, 70.0,
                                           300.0))
    with store._write("test") as conn:
        insert_reservations(conn, "acme", stored)
        facts = TxnFacts(conn, "acme", rows.reservations)
        # ann's live ones: s1 (90), s2 (50), s3 (30), s6 (85, used), and p1 (70) pending.
        # A window holds what was reserved after its start: s2 is not in the one from 50,
        # nor p1 in the one from 70.
        assert facts.measure("pay", "ann", queries, 100.0) == [
            3,  # since 50: s1, s6, p1
            1 + 2 + 4 + 32 + 512,  # amount since 20: s1, s2, s3, s6, p1
            100 + 3200,  # fee since 70: s1, s6
            5,  # since 20: s1, s2, s3, s6, p1
            1 + 32 + 512]  # amount since 50: s1, s6, p1
        # Everyone's adds bob's s7.
        assert facts.measure("pay", None, queries, 100.0) == [4, 615, 9700, 6, 609]


def test_totals_past_64_bits_are_exact(store: SQLStore) -> None:
    """Each amount fits 64 bits; their total need not (SQLite's SUM() refuses it with
    "integer overflow"), nor a running total on the way to one that does."""
    largest = 2**63 - 1
    stored = [(f"b{n}", "pay", "ann", 90.0, 200.0, 0, 0, {"amount": units})
              for n, units in enumerate([largest, largest, -largest, -5, largest, 3])]
    queries = (FactQuery(20.0, "amount"), FactQuery(20.0))
    with store._write("test") as conn:
        insert_reservations(conn, "acme", stored)
        answer = [2 * largest - 2, 6]
        assert TxnFacts(conn, "acme").measure("pay", "ann", queries, 100.0) == answer
        read = FactRead("pay", "ann", queries, 100.0)
        assert read_facts_ahead(conn, [reading("acme", read)]) == {("acme", read): answer}


def reading(tenant: str, *reads: FactRead) -> PendingEntry:
    return dataclasses.replace(decision(tenant, f"{tenant}-{len(reads)}"), reads=reads)


def test_a_batch_s_fact_reads_are_made_ahead_one_statement_per_shape(store: SQLStore) -> None:
    """``read_facts_ahead`` gives every read the answer ``measure`` would, over the stored
    rows, in one statement per shape of read (fields, per actor or not), not per read."""
    few = (FactQuery(20.0, "amount"),)
    reads = {  # shapes: QUERIES per actor (3 reads), QUERIES for everyone, one sum per actor
        "acme": [FactRead("pay", "ann", QUERIES, 100.0), FactRead("pay", None, QUERIES, 100.0),
                 FactRead("pay", "bob", QUERIES, 100.0), FactRead("ship", "ann", few, 100.0),
                 FactRead("pay", "ann", QUERIES, 98.5)],  # s5 not yet expired at 98.5
        "other": [FactRead("pay", "ann", QUERIES, 100.0)],
    }
    statements: list[str] = []
    with store._write("test") as conn:
        insert_reservations(conn, "acme", STORED)
        insert_reservations(conn, "other", STORED[6:7])  # bob's, in another tenant
        entries = [reading(tenant, *tenant_reads) for tenant, tenant_reads in reads.items()]
        ahead = read_facts_ahead(Counting(conn, statements), entries)
        assert len(statements) == 3
        assert ahead[("acme", reads["acme"][0])] == [2, 39, 3300, 4, 33]  # s1 s2 s3 s6
        assert ahead[("acme", reads["acme"][4])] == [3, 55, 4900, 5, 49]  # and s5
        assert ahead[("other", reads["other"][0])] == [0, 0, 0, 0, 0]
        for tenant, tenant_reads in reads.items():
            for read in tenant_reads:
                assert ahead[(tenant, read)] == TxnFacts(conn, tenant).measure(*read)
        assert len(ahead) == 6


def test_many_reads_ahead_are_split_within_the_parameter_limit(store: SQLStore) -> None:
    statements: list[str] = []
    reads = [FactRead("pay", "ann", QUERIES, 100.0 + n / 1000) for n in range(200)]
    with store._write("test") as conn:
        insert_reservations(conn, "acme", STORED)
        ahead = read_facts_ahead(Counting(conn, statements), [reading("acme", *reads)])
    assert len(statements) == 4  # 15 parameters a read (a sum two): 66 reads a statement
    assert all(ahead[("acme", read)] == [2, 39, 3300, 4, 33] for read in reads)


def stateful(store: SQLStore, execution_id: str, actor: str, units: int,
             seen: list[list[int]], *, ahead: bool) -> PendingEntry:
    """A decision that reads its actor's count and sum, and reserves ``units``."""
    plain = decision("acme", execution_id)
    read = FactRead("payment.execute", actor, (FactQuery(0.0), FactQuery(0.0, "amount")), 100.0)

    def decide(reader: FactReader) -> PreparedDecision:
        seen.append(reader.measure(*read))
        return PreparedDecision(
            plain.seal, {**(plain.execution or {}), "actor_id": actor}, plain.response or {},
            Reservation("payment.execute", actor, {"amount": units}, 50.0, 200.0))
    return PendingEntry(tenant="acme", kind="decision", execution_id=execution_id,
                        seal=plain.seal, decide=decide, reads=(read,) if ahead else ())


@pytest.mark.parametrize("ahead", [True, False])
def test_a_batch_reads_its_decisions_facts_once_and_they_stay_live(
        store: SQLStore, ahead: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With their reads known, a batch's decisions read the stored facts in one statement;
    each still sees the batch's earlier reservations, also after a replay in the batch
    stored them (and made what was read ahead stale)."""
    statements: list[str] = []
    transaction = store._append_transaction

    @contextlib.contextmanager
    def counted() -> Iterator[Any]:
        with transaction() as conn:
            yield Counting(conn, statements)
    monkeypatch.setattr(store, "_append_transaction", counted)
    seen: list[list[int]] = []
    store.commit_batch([stateful(store, "p0", "ann", 1, seen, ahead=ahead)], 60.0)
    key = IdempotencyClaim("k", "h", "enforce", expires_at=1000.0)
    statements.clear()
    results = store.commit_batch([
        stateful(store, "p1", "ann", 2, seen, ahead=ahead),
        stateful(store, "p2", "bob", 4, seen, ahead=ahead),
        stateful(store, "p3", "ann", 8, seen, ahead=ahead)], 60.0)
    assert all(isinstance(r, Committed) for r in results)
    assert sum("FROM reservations r" in sql for sql in statements) == \
        (1 if ahead and store.reads_facts_ahead else 3)
    results = store.commit_batch([
        stateful(store, "p4", "ann", 16, seen, ahead=ahead),
        decision("acme", "d1", key), decision("acme", "d2", key),  # a replay: rows stored
        stateful(store, "p5", "ann", 32, seen, ahead=ahead)], 60.0)
    assert isinstance(results[2], Replayed)
    assert seen == [[0, 0], [1, 1], [0, 0], [2, 3], [3, 11], [4, 27]]

"""What only the PostgreSQL ledger has: versioned migrations and writers in several processes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from execguard.ledger import Committed, open_ledger
from execguard.ledger._postgres_schema import SCHEMA_VERSION
from execguard.ledger.postgres import PostgresStore
from execguard.protocol.errors import ConfigError, StorageUnavailable
from tests.conftest import BACKENDS, PostgresSession
from tests.unit.ledger.test_store import decision

pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS,
                                reason="EXECGUARD_TEST_BACKENDS excludes postgresql")


@pytest.fixture
def url(postgres: PostgresSession) -> str:
    return postgres.new_url()


@pytest.fixture
def migrated(url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(url, migrate=True)
    store.create_tenant("acme", "t0")
    yield store
    store.close()


def test_an_unmigrated_database_is_refused_with_the_command_to_run(url: str) -> None:
    with pytest.raises(ConfigError, match=r"schema version 0; .* needs "
                                          rf"{SCHEMA_VERSION}: run 'execguard db migrate'"):
        PostgresStore(url)


def test_migrate_is_idempotent_and_records_each_version(url: str) -> None:
    first = PostgresStore(url, migrate=True)
    assert first.schema_version() == SCHEMA_VERSION
    first.close()
    again = PostgresStore(url, migrate=True)
    assert again.migrate() == []
    again.close()
    with psycopg.connect(url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_a_newer_schema_is_refused(migrated: PostgresStore, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)",
                     (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="upgrade ExecGuard"):
        PostgresStore(url)


def test_a_password_never_appears_in_errors() -> None:
    with pytest.raises(StorageUnavailable) as caught:
        store = PostgresStore("postgresql://someone:s3cret@127.0.0.1:1/nowhere", timeout=1)
        store.close()
    assert "s3cret" not in str(caught.value)


def test_writers_in_several_stores_share_one_gapless_log(migrated: PostgresStore,
                                                         url: str) -> None:
    """Like replicas: each store has its own pool, all append to one tenant at once."""
    stores = [open_ledger(url) for _ in range(3)]
    errors: list[BaseException] = []

    def append(store_index: int) -> None:
        try:
            for batch in range(10):
                store = stores[store_index]
                store.commit_batch([decision("acme", f"r{store_index}-{batch}-{i}")
                                    for i in range(5)], 0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == []
    entries = migrated.log_entries("acme", 0, 1000)
    assert [e.index for e in entries] == list(range(150))
    prev = None
    for entry in entries:
        assert entry.prev_hash == prev
        prev = entry.entry_hash
    assert len({e.execution_id for e in entries}) == 150


def test_a_read_only_store_cannot_write(migrated: PostgresStore, url: str) -> None:
    assert isinstance(migrated.commit_batch([decision("acme", "e1")], 0)[0], Committed)
    reader = PostgresStore(url, readonly=True)
    try:
        assert reader.log_size("acme") == 1
        with pytest.raises(StorageUnavailable, match="read-only"):
            reader.create_tenant("other", "t1")
    finally:
        reader.close()


def test_reads_fail_at_once_while_the_database_is_unreachable(url: str) -> None:
    """Reads run on the event loop: after a failed connection they must not each wait."""
    import time
    from urllib.parse import urlsplit, urlunsplit

    from tests.tcp_proxy import TcpProxy

    PostgresStore(url, migrate=True).close()
    parts = urlsplit(url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = urlunsplit(parts._replace(
            netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        store = PostgresStore(proxied, timeout=2)
        try:
            assert store.tenants() == []
            proxy.cut()
            with pytest.raises(StorageUnavailable) as first:
                store.tenants()
            assert "cannot be reached" not in str(first.value)  # this one tried
            with pytest.raises(StorageUnavailable, match="cannot be reached"):
                store.tenants()  # this one did not: it failed at once
            proxy.restore()
            store.create_tenant("acme", "t0")  # a write always tries: it ends the outage
            assert store.tenants() == ["acme"]
            proxy.cut()
            with pytest.raises(StorageUnavailable):
                store.tenants()
            proxy.restore()
            time.sleep(1.1)  # a second later, a read tries again by itself
            assert store.tenants() == ["acme"]
        finally:
            proxy.restore()
            store.close()


@pytest.mark.parametrize(("error", "lost"), [
    (psycopg.OperationalError("connection failed: Connection refused"), True),
    (PoolTimeout("couldn't get a connection"), True),
    (psycopg.errors.AdminShutdown("terminating connection"), True),
    (psycopg.errors.ConnectionFailure("connection failure"), True),
    (psycopg.errors.LockNotAvailable("lock timeout"), False),
    (psycopg.errors.DiskFull("could not extend file"), False),
    (psycopg.errors.QueryCanceled("statement timeout"), False),
])
def test_only_a_lost_connection_counts_as_unreachable(error: psycopg.OperationalError,
                                                      lost: bool) -> None:
    from execguard.ledger.postgres import _lost_connection
    assert _lost_connection(error) is lost


def test_a_busy_pool_is_not_taken_for_an_unreachable_database(migrated: PostgresStore,
                                                              url: str) -> None:
    store = PostgresStore(url, pool_size=1, timeout=1)
    try:
        with store._read("holding the only connection"), \
                pytest.raises(StorageUnavailable, match="couldn't get a connection"):
            store.tenants()
        assert store.tenants() == ["acme"]  # at once: no outage was assumed
    finally:
        store.close()


def test_a_young_log_gets_planner_statistics(migrated: PostgresStore, url: str) -> None:
    """Without them the limit query reads every reservation of a surface (see _analyze)."""

    def analyzed() -> bool:
        # -1: never analyzed (nor vacuumed); ANALYZE sets the row count it found.
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT reltuples FROM pg_class WHERE oid ="
                               " to_regclass('reservations')").fetchone()
        assert row is not None
        return bool(row[0] >= 0)

    assert not analyzed()
    for batch in range(3):  # 750 entries: not yet
        migrated.commit_batch([decision("acme", f"young-{batch}-{i}") for i in range(250)], 0)
    assert not analyzed()
    migrated.commit_batch([decision("acme", f"young-3-{i}") for i in range(250)], 0)
    assert analyzed()


def test_migration_2_makes_the_reservation_index_covering(migrated: PostgresStore,
                                                          url: str) -> None:
    with psycopg.connect(url) as conn:
        indexes = dict(conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'reservations'"))
    assert "reservations_by_actor" not in indexes
    assert "INCLUDE (released, consumed, expires_at, execution_id)" \
        in indexes["reservations_live_by_actor"]


def test_migration_3_keys_merkle_nodes_by_their_last_leaf(migrated: PostgresStore,
                                                           url: str) -> None:
    """A version 2 database keeps its tree through the migration, and its append-only rule."""
    migrated.commit_batch([decision("acme", f"e{i}") for i in range(13)], 0)
    root, proof = migrated.tree_root("acme", 13), migrated.inclusion_proof("acme", 5, 13)
    consistency = migrated.consistency_proof("acme", 6, 13)
    with psycopg.connect(url, autocommit=True) as conn:  # back to the version 2 table
        conn.execute("ALTER TABLE merkle_nodes DROP CONSTRAINT merkle_nodes_pkey;"
                     "ALTER TABLE merkle_nodes DROP COLUMN last_leaf;"
                     "ALTER TABLE merkle_nodes ADD PRIMARY KEY (tenant, level, idx);"
                     "ALTER TABLE api_keys DROP COLUMN revoked_at;"  # and version 4's
                     "DELETE FROM schema_migrations WHERE version >= 3")
    with pytest.raises(ConfigError, match="run 'execguard db migrate'"):
        PostgresStore(url)

    assert migrated.migrate() == [3, 4]
    assert migrated.tree_root("acme", 13) == root
    assert migrated.inclusion_proof("acme", 5, 13) == proof
    assert migrated.consistency_proof("acme", 6, 13) == consistency
    with psycopg.connect(url) as conn:
        key = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                           " WHERE conname = 'merkle_nodes_pkey'"
                           " AND connamespace = current_schema()::regnamespace").fetchone()
        assert key == ("PRIMARY KEY (tenant, last_leaf, level)",)
    with pytest.raises(psycopg.Error, match="append-only"), \
            psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE merkle_nodes SET level = 0")
    assert isinstance(migrated.commit_batch([decision("acme", "e13")], 0)[0], Committed)
    assert migrated.tree_root("acme", 14) != root

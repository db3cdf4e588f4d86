"""The PostgreSQL ledger: several gateway replicas share one database.

Every write transaction first takes one transaction-scoped advisory lock, so
the replicas append to the log one batch at a time, exactly as SQLite's single
writer does: indexes stay gapless, an idempotency key is evaluated once, a
permit is consumed once and a limit holds across replicas. Group commit keeps
that serial section short: one transaction (and one WAL flush) per batch.

Durability: ``synchronous_commit`` is forced on for every connection, so a
transaction is flushed to PostgreSQL's WAL before ``COMMIT`` returns. The schema
is versioned (:mod:`._postgres_schema`); ``execguard db migrate`` applies it and
a store refuses to open a database whose version differs from its own.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from execguard.ledger._postgres_schema import MIGRATIONS, SCHEMA_VERSION
from execguard.ledger._sql_util import translate_errors
from execguard.ledger._urls import is_postgres_url, redact_url
from execguard.ledger.records import CommitResult, PendingEntry
from execguard.ledger.sql import SQLStore
from execguard.protocol.errors import ConfigError, StorageUnavailable

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

#: First key of the advisory lock that serialises writers (the second is the schema).
_WRITE_LOCK = 0x45474C47  # "EGLG"
_MIGRATE_LOCK = 0x45474D47  # "EGMG"
#: While the database is unreachable, one read in this many seconds tries again...
_READ_RETRY_SECONDS = 1.0
#: ...waiting at most this long for a connection (the others fail at once).
_READ_PROBE_TIMEOUT = 1.0
#: Statistics are refreshed after this many appended entries, then at each doubling
#: up to the second number; autovacuum keeps them current from then on.
_ANALYZE_FIRST, _ANALYZE_UNTIL = 1_000, 1_000_000

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=512)
def _parameter_markers(sql: str) -> str:
    """The shared SQL uses sqlite3's ``?``; psycopg wants ``%s`` (and ``%%`` for ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Connection:
    """A psycopg connection that speaks the shared SQL's dialect of parameter markers."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Any = (), /) -> psycopg.Cursor[Any]:
        return self._conn.execute(_parameter_markers(sql), parameters)

    def executemany(self, sql: str, rows: Any, /) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(_parameter_markers(sql), rows)


def _lost_connection(exc: psycopg.OperationalError) -> bool:
    """Whether the error says the server cannot be reached (not: a query failed there).

    Failures to connect, or a connection dropped, come from the client without an
    SQLSTATE; the server's own are class 08 (connection) and 57P01-57P03 (shutting
    down, starting up). A lock timeout or a full disk on the server is not one.
    """
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def _errors(what: str) -> Any:
    return translate_errors(what, (psycopg.Error,))


class PostgresStore(SQLStore):
    """The ledger in a PostgreSQL database, through a connection pool. Thread-safe."""

    reads_facts_ahead = True  # a statement inside the write lock is a round trip

    def __init__(self, url: str, *, readonly: bool = False, migrate: bool = False,
                 pool_size: int = 16, timeout: float = 5.0) -> None:
        super().__init__()
        if not is_postgres_url(url):
            raise ConfigError(f"database URL {redact_url(url)!r} is not postgresql://...")
        self.url = url
        self.location = redact_url(url)
        self.readonly = readonly
        # Entries this process appended, and when to refresh statistics next (_analyze).
        self._appended = 0
        self._analyze_at: float = _ANALYZE_FIRST
        # Set when an operation could not reach the database; cleared by the next success.
        self._unreachable: str | None = None
        self._next_read_probe = 0.0
        # Connections handed out now: a pool timeout with all of them busy is load, not an
        # unreachable database.
        self._in_use = 0
        self._in_use_lock = threading.Lock()
        settings = ["SET synchronous_commit = on", "SET lock_timeout = '10s'",
                    "SET idle_in_transaction_session_timeout = '60s'"]
        if readonly:
            # Auditors read through a read-only session: an audit can never change the evidence.
            settings.append("SET default_transaction_read_only = on")

        def configure(conn: psycopg.Connection[Any]) -> None:
            for statement in settings:
                conn.execute(statement)

        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=timeout, open=False,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))},
            configure=configure, check=ConnectionPool.check_connection,
            name="execguard-ledger")
        try:
            self._pool.open(wait=False)
            if migrate:
                self.migrate()
            self._check_version()
        except StorageUnavailable as exc:
            self._pool.close()
            # The pool says only that it got no connection; one attempt says why.
            raise StorageUnavailable(f"{exc} ({self.location}: {_why_unreachable(url, timeout)})"
                                     ) from None
        except BaseException:
            self._pool.close()
            raise

    # -- connections -------------------------------------------------------------------

    @contextmanager
    def _reachability(self) -> Iterator[None]:
        """Note whether the database answered (connection errors are OperationalError)."""
        try:
            yield
        except psycopg.OperationalError as exc:
            busy = isinstance(exc, PoolTimeout) and self._in_use >= self._pool.max_size
            if _lost_connection(exc) and not busy:
                self._unreachable = str(exc) or type(exc).__name__
                self._next_read_probe = time.monotonic() + _READ_RETRY_SECONDS
            raise
        else:
            self._unreachable = None

    @contextmanager
    def _connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        """A connection from the pool, counted while it is out."""
        with self._pool.connection(timeout=timeout) as conn:
            with self._in_use_lock:
                self._in_use += 1
            try:
                yield conn
            finally:
                with self._in_use_lock:
                    self._in_use -= 1

    @contextmanager
    def _read(self, what: str) -> Iterator[_Connection]:
        """A pooled connection in autocommit: each statement sees every committed write.

        Reads run on the gateway's event loop (cached policy versions, API keys), so
        while the database is unreachable they fail at once instead of each waiting
        out the pool's timeout, which would stall every request, ``/healthz`` included.
        One read a second still tries (briefly); writes and the readiness probe, which
        run on threads of their own, always try, and the first success ends it.
        """
        timeout = None
        if self._unreachable is not None:
            now = time.monotonic()
            if now < self._next_read_probe:
                raise StorageUnavailable(f"{what} failed: the database cannot be reached "
                                         f"({self._unreachable})")
            self._next_read_probe = now + _READ_RETRY_SECONDS
            timeout = _READ_PROBE_TIMEOUT
        with _errors(what), self._reachability(), \
                self._connection(timeout) as conn:
            yield _Connection(conn)

    @contextmanager
    def _renewing_read_only_sessions(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """After "read-only transaction", replace every pooled session (this one included).

        A session keeps the read-only state it started with (a demoted primary, a
        database set read-only): once the server is writable again, only new sessions
        are, so the pool must not keep handing out the old ones.
        """
        try:
            yield
        except psycopg.errors.ReadOnlySqlTransaction:
            conn.close()
            self._pool.drain()
            raise

    def commit_batch(self, entries: Sequence[PendingEntry],
                     now_epoch: float) -> list[CommitResult]:
        """Append (see SQLStore); refresh the planner's statistics while the log is young."""
        results = super().commit_batch(entries, now_epoch)
        self._appended += len(entries)
        if self._appended >= self._analyze_at:
            self._analyze_at = self._appended * 2 if self._appended < _ANALYZE_UNTIL else \
                float("inf")
            self._analyze()
        return results

    def _analyze(self) -> None:
        """``ANALYZE`` the tables the decision path queries inside the write lock.

        A new database has no statistics, and PostgreSQL then plans the per-actor
        limit query on the per-surface index: it reads every reservation of the
        surface (measured: 3.6 ms at 10,000, growing with them) instead of the
        actor's few (0.4 ms). Autovacuum analyzes only after its next round, a minute
        or more; until then a young log is slow. Analyzing at 1,000 appended entries,
        then at each doubling up to a million, costs a few milliseconds each time.
        """
        try:
            with _errors("analyzing tables"), self._connection() as conn:
                conn.execute("ANALYZE reservations, reservation_amounts, idempotency")
        except StorageUnavailable as exc:  # statistics are an optimisation: never fail for it
            log.warning("could not refresh the planner's statistics: %s", exc)

    def _write(self, what: str) -> AbstractContextManager[_Connection]:
        """One transaction holding the writers' advisory lock, committed or rolled back whole."""
        return self._locked_transaction(what, pipelined=False)

    def _append_transaction(self) -> AbstractContextManager[_Connection]:
        """The batch's transaction in pipeline mode: one round trip per read, not per row.

        Statements whose results are not read (the inserts) are sent without waiting;
        the next read, or the commit, collects them. An error in any of them aborts
        the transaction, so the batch is still stored whole or not at all.
        """
        return self._locked_transaction("appending to the log", pipelined=True)

    @contextmanager
    def _locked_transaction(self, what: str, *, pipelined: bool) -> Iterator[_Connection]:
        with _errors(what), self._reachability(), self._connection() as conn, \
                self._renewing_read_only_sessions(conn), \
                (conn.pipeline() if pipelined else nullcontext()), conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))",
                         (_WRITE_LOCK,))
            yield _Connection(conn)

    # -- the schema --------------------------------------------------------------------

    def schema_version(self) -> int:
        """The last migration applied to the database (0 for an empty database)."""
        with self._read("reading the schema version") as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0]
            if exists is None:
                return 0
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def migrate(self) -> list[int]:
        """Apply the migrations the database lacks, each in its own transaction; return them."""
        applied: list[int] = []
        with _errors("migrating the database"), self._pool.connection() as raw:
            for version, sql in MIGRATIONS:
                with raw.transaction():
                    # One migrator at a time, even with every replica starting at once.
                    raw.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))",
                                (_MIGRATE_LOCK,))
                    raw.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER"
                                " PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
                    done = raw.execute("SELECT 1 FROM schema_migrations WHERE version = %s",
                                       (version,)).fetchone()
                    if done is not None:
                        continue
                    raw.execute(sql)  # type: ignore[arg-type]
                    raw.execute("INSERT INTO schema_migrations (version) VALUES (%s)",
                                (version,))
                    applied.append(version)
        return applied

    def _check_version(self) -> None:
        version = self.schema_version()
        if version < SCHEMA_VERSION:
            raise ConfigError(
                f"the database {self.location} has schema version {version}; this ExecGuard "
                f"needs {SCHEMA_VERSION}: run 'execguard db migrate' first")
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the database {self.location} has schema version {version}; this ExecGuard "
                f"understands up to {SCHEMA_VERSION}: upgrade ExecGuard")

    def close(self) -> None:
        """Close the pool and its connections."""
        self._pool.close()


def _why_unreachable(url: str, timeout: float) -> str:
    """What connecting to ``url`` once says: the server's own words, e.g. that the
    database does not exist, or refuses connections."""
    try:
        psycopg.connect(url, connect_timeout=max(1, int(timeout))).close()
    except psycopg.Error as exc:
        said = str(exc).strip()
        return said.splitlines()[-1].strip() if said else type(exc).__name__
    return "a connection made now succeeds"

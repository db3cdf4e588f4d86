"""The embedded SQLite ledger (the default backend).

Durability: WAL journal with ``synchronous=FULL``, so a committed transaction
is fsync'd before ``commit()`` returns. The single write lock is SQLite's own,
taken by ``BEGIN IMMEDIATE`` before the last log index is read. Triggers refuse
any UPDATE or DELETE of log rows, so the log is append-only even for a careless
operator using the sqlite3 shell. The schema is created or upgraded at open.

Readers use one connection per thread; the write lock is retried with ~200 µs
sleeps (SQLite's own busy handler sleeps in millisecond steps and doubles p99).

WAL checkpoints (copying committed pages from the WAL into the database file) run on
a thread of their own, not in the commit that crosses SQLite's threshold: there a
checkpoint held that commit, and every request waiting on it, for the time it took to
write megabytes and fsync the database file (measured: 20 to 400 ms, about once a
second under light load). A checkpoint does not block writers or readers. A commit
still checkpoints once the WAL is large (``WAL_RESTART_PAGES``), copying only what the
thread has not, so that the WAL starts over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from execguard.ledger._sql_util import translate_errors
from execguard.ledger._sqlite_schema import SCHEMA, SCHEMA_VERSION, upgrade
from execguard.ledger.group_commit import COMMIT_TIMEOUT_SECONDS
from execguard.ledger.records import CommitResult, PendingEntry
from execguard.ledger.sql import SQLStore
from execguard.protocol.errors import ConfigError, StorageUnavailable

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "sqlite_errors"]

log = logging.getLogger(__name__)

_BUSY_RETRY_SECONDS = 10.0
#: How long an append waits for the write lock that another connection (another
#: process: the server and its decision process both write) holds: less than a client
#: waits for its answer (``COMMIT_TIMEOUT_SECONDS``).
APPEND_LOCK_WAIT_SECONDS = COMMIT_TIMEOUT_SECONDS - 1.0
#: Page size of a new database file (an existing one keeps its own). SQLite's default,
#: 4 KiB, is too small for this schema: a log row (its receipt, ~1 KiB) exceeds what a
#: WITHOUT ROWID table keeps in a 4 KiB page and spills into an overflow page of its
#: own, and an executions row (~2.5 KiB) leaves a 4 KiB page mostly empty. With 8 KiB
#: both fit: measured, the file is about a third smaller per decision.
PAGE_SIZE = 8192
#: Page cache of a connection that writes (SQLite's default is 2 MiB): the indexes an
#: append touches stay in memory instead of being read again from the file.
CACHE_KIB = 16384
#: The least time between two background WAL checkpoints (each ends in an fsync).
WAL_CHECKPOINT_INTERVAL_SECONDS = 0.1
#: WAL pages (64 MiB of 8 KiB pages) past which a commit checkpoints too, as SQLite does
#: by default past 1000. Under steady load the thread never finds the WAL fully copied
#: (commits land while it copies), and only a fully copied WAL starts over: without this
#: it grew without end. By then the thread has copied all but its last tenth of a second,
#: so the commit's checkpoint is small; the next commit starts the WAL over.
WAL_RESTART_PAGES = 8192


#: The oldest SQLite that serves decisions: the limit facts read several aggregates in
#: one statement with ``FILTER`` (3.30). Audits (read-only) do not need it.
MIN_SQLITE_VERSION = (3, 30, 0)


def _uri(path: str, mode: str) -> str:
    """The file's URI with an open ``mode`` (``ro``, ``rw``: neither creates a file)."""
    return f"{Path(path).resolve().as_uri()}?mode={mode}"


def sqlite_errors(what: str) -> AbstractContextManager[None]:
    """Turn every ``sqlite3`` error into :class:`StorageUnavailable`."""
    return translate_errors(what, (sqlite3.Error,))


class SQLiteStore(SQLStore):
    """The ledger in one SQLite file. Thread-safe; usable by several processes."""

    maintenance_on_writer = True  # one file lock: see SQLStore

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        if not readonly and sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise ConfigError(
                f"ExecGuard needs SQLite {'.'.join(map(str, MIN_SQLITE_VERSION))} or newer; "
                f"this Python uses SQLite {sqlite3.sqlite_version}: use a Python built with a "
                "newer one, or PostgreSQL (--db)")
        super().__init__()
        self.path = str(path)
        self.location = self.path
        self.readonly = readonly
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # The files this store writes, as (device, inode): see _check_files.
        self._files: dict[str, tuple[int, int]] = {}
        self._checkpointer: _WalCheckpointer | None = None
        if readonly:
            if not Path(self.path).exists():
                raise StorageUnavailable(f"no database at {self.path}")
        else:
            _create_private(self.path)
            self._migrate()

    # -- connections -------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        with sqlite_errors("opening the database"):
            if self.readonly:
                # Auditors open the file read-only: an audit can never change the evidence.
                conn = sqlite3.connect(_uri(self.path, "ro"), uri=True, isolation_level=None,
                                       check_same_thread=False, timeout=5.0)
            else:
                conn = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=0.0)
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before the file has one
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                # A batch's multi-row statements keep their statement journals in memory
                # (on disk: a temporary file created and deleted per transaction).
                conn.execute("PRAGMA temp_store=MEMORY")
                conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
                conn.execute(f"PRAGMA wal_autocheckpoint={WAL_RESTART_PAGES}")
        with self._lock:
            self._connections.append(conn)
        return conn

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
        return conn

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """This thread's connection (reads in autocommit see every committed write)."""
        with sqlite_errors(what):
            yield self._conn

    @contextmanager
    def _write(self, what: str,
               lock_wait: float = _BUSY_RETRY_SECONDS) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: taken with retries (for up to ``lock_wait`` s while
        another connection writes), committed or rolled back whole."""
        self._check_files(what)  # nothing is written into files that are gone...
        with sqlite_errors(what):
            conn = self._conn
            try:
                deadline = time.monotonic() + lock_wait
                while True:
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                        break
                    except sqlite3.OperationalError as exc:
                        if "locked" not in str(exc):
                            raise
                        if time.monotonic() > deadline:
                            raise StorageUnavailable(
                                f"{what} failed: the database is not responding: another "
                                f"writer has held its lock for over {lock_wait:g} s") from None
                        time.sleep(0.0002)
                try:
                    yield conn
                    conn.execute("COMMIT")
                    self._wal_grew()
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if "readonly" in str(exc):
                    # SQLite opens a file it cannot write read-only, silently, and such a
                    # connection stays read-only: the next write opens a new one.
                    self._forget_connection(conn)
                    self._local.replaced = True
                raise
        self._check_files(what)  # ...and a commit counts only if they are still there

    def _wal_grew(self) -> None:
        checkpointer = self._checkpointer
        if checkpointer is None:
            with self._lock:
                if self._checkpointer is None:
                    self._checkpointer = _WalCheckpointer(self.path)
                checkpointer = self._checkpointer
        checkpointer.wake()

    def _append_transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        # Waiting for the lock longer than a client waits for its answer would commit
        # entries whose clients were already told that nothing was recorded.
        return self._write("appending to the log", lock_wait=APPEND_LOCK_WAIT_SECONDS)

    def commit_batch(self, entries: Sequence[PendingEntry],
                     now_epoch: float) -> list[CommitResult]:
        """As :meth:`SQLStore.commit_batch`; tried once more on a new connection when this
        thread's was read-only (opened while the file was): the file may be writable now."""
        self._local.replaced = False
        try:
            return super().commit_batch(entries, now_epoch)
        except StorageUnavailable:
            if not getattr(self._local, "replaced", False):
                raise
        return super().commit_batch(entries, now_epoch)

    def _forget_connection(self, conn: sqlite3.Connection) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        conn.close()

    def _check_files(self, what: str) -> None:
        """After a commit: is it in the files at our path, or in ones nobody will open again?

        A database (or WAL) file deleted or replaced under a running process takes
        every later commit with it: the open descriptors still work, and a restart
        finds none of it. So a commit counts only if the path still names the files
        written: otherwise the write is refused (503), until the file is put back.
        """
        for path in (self.path, self.path + "-wal"):
            try:
                found = os.stat(path)
            except FileNotFoundError:
                found = None
            identity = None if found is None else (found.st_dev, found.st_ino)
            known = self._files.setdefault(path, identity) if identity else \
                self._files.get(path)
            if known is not None and identity != known:
                raise StorageUnavailable(
                    f"{what} failed: {path} was moved, deleted or replaced while in use; "
                    "what was written since is not in the database at that path")

    def _migrate(self) -> None:
        # Two processes creating one database at once can see "locked": retry.
        deadline = time.monotonic() + _BUSY_RETRY_SECONDS
        while True:
            try:
                with self._write("creating the schema") as conn:
                    self._upgrade(conn)
                return
            except StorageUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                                " AND name = 'meta'").fetchone()
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
            if has_meta else None
        version = int(row[0]) if row else None
        if version is not None and version > SCHEMA_VERSION:
            raise ConfigError(f"{self.path} has schema version {version}; this ExecGuard "
                              f"understands up to {SCHEMA_VERSION}: upgrade ExecGuard")
        if version is not None:
            upgrade(conn, version)
        for statement in SCHEMA.split(";\n"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key)"
                     " DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))

    def schema_version(self) -> int:
        """The schema version stored in the file."""
        with self._read("reading the schema version") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Close every connection this store opened."""
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        # With no connection left, SQLite removes the WAL; a later one starts a new file.
        self._files.clear()


def _create_private(path: str) -> None:
    """Create a new database file that only its owner can read: it holds every request
    stored and the webhooks' secrets. (SQLite gives the -wal and -shm files its mode.)"""
    # If it exists, or cannot be created (opening it will say why), there is nothing to do.
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class _WalCheckpointer:
    """Copies committed pages from the WAL into the database file, on a thread of its own.

    Woken by commits; checkpoints at most every ``WAL_CHECKPOINT_INTERVAL_SECONDS``.
    PASSIVE: it copies what no reader still needs and never waits for, nor blocks, a
    writer; once it has copied everything, the next commit starts the WAL from its
    beginning again. A failed checkpoint (a full disk) loses nothing, the pages stay in
    the WAL: it is logged and tried again at the next commit.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._wanted = threading.Event()
        self._stopping = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="execguard-wal-checkpoint",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wanted.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._wanted.wait()
                if self._stopping:
                    return
                self._wanted.clear()
                try:
                    if conn is None:
                        # mode=rw: never create a file where the database was (removed
                        # meanwhile). FULL: the database file is fsync'd before the WAL
                        # may start over.
                        conn = sqlite3.connect(_uri(self.path, "rw"), uri=True,
                                               isolation_level=None,
                                               check_same_thread=False, timeout=0.0)
                        conn.execute("PRAGMA synchronous=FULL")
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self._failing = False
                except sqlite3.Error as exc:
                    if not self._failing:  # once per fault, not once per commit
                        log.warning("a WAL checkpoint of %s failed (retried; nothing is "
                                    "lost, the pages stay in the WAL): %s", self.path, exc)
                    self._failing = True
                time.sleep(WAL_CHECKPOINT_INTERVAL_SECONDS)
        finally:
            if conn is not None:
                conn.close()

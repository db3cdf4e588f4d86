"""Shared fixtures: a real gateway process on a free loopback port, driven over HTTP.

Every test that takes the ``backend`` fixture (``gateway``, ``fresh_gateway``,
``database``, the ledger's ``store``) runs once per backend: the embedded
SQLite file and PostgreSQL. The PostgreSQL runs share one database created for
the test session and dropped at its end; each gateway or store gets a schema of
its own in it, so no test sees another's data. ``EXECGUARD_TEST_BACKENDS=sqlite``
narrows a local run; ``EXECGUARD_TEST_POSTGRES`` names another server.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
POSTGRES_ADMIN_URL = os.environ.get("EXECGUARD_TEST_POSTGRES",
                                    "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = [b for b in os.environ.get("EXECGUARD_TEST_BACKENDS",
                                      "sqlite,postgresql").split(",") if b]


class PostgresSession:
    """One database for the test session; :meth:`new_url` hands out an empty schema in it."""

    def __init__(self, admin_url: str) -> None:
        import psycopg
        self.admin_url = admin_url
        self.name = f"execguard_test_{os.getpid()}_{secrets.token_hex(3)}"
        self._counter = itertools.count(1)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        base = admin_url.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}"

    def new_url(self) -> str:
        """The URL of a new, empty schema of the session's database."""
        import psycopg
        schema = f"s{next(self._counter)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return f"{self.url}?options=-csearch_path%3D{schema}"

    def drop(self) -> None:
        import psycopg
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresSession]:
    """The session's PostgreSQL database, dropped at the end of the session."""
    session = PostgresSession(POSTGRES_ADMIN_URL)
    yield session
    session.drop()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The ledger backend under test: "sqlite" or "postgresql"."""
    return str(request.param)


def new_database(request: pytest.FixtureRequest, backend: str) -> str | None:
    """A fresh PostgreSQL URL for the postgresql backend; None (the SQLite default) else."""
    if backend == "sqlite":
        return None
    postgres: PostgresSession = request.getfixturevalue("postgres")
    return postgres.new_url()


@pytest.fixture
def database(request: pytest.FixtureRequest, backend: str) -> str | None:
    """For tests that set up their own gateway: ``--db`` for ``init``, or None for SQLite."""
    return new_database(request, backend)


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, data: Path | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``execguard`` command in a subprocess."""
    argv = [sys.executable, "-m", "execguard", *args]
    if data is not None:
        argv += ["--data", str(data)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"execguard {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def api_key_from(output: str) -> str:
    """The value of the last ``EXECGUARD_API_KEY=`` line."""
    lines = [ln for ln in output.splitlines() if ln.startswith("EXECGUARD_API_KEY=")]
    assert lines, f"no EXECGUARD_API_KEY line in:\n{output}"
    return lines[-1].split("=", 1)[1]


@dataclass
class Gateway:
    """A running ``execguard serve`` process and how to talk to it."""

    data: Path
    port: int
    api_key: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    env: dict[str, str] = field(default_factory=dict)
    #: The PostgreSQL URL of its ledger; None for the SQLite file in ``data``.
    database: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ledger(self) -> str:
        """What ``execguard audit --db`` takes for this gateway's ledger."""
        return self.database or str(self.data / "execguard.db")

    def sql(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Run SQL (``?`` parameter markers) on the ledger directly, as an operator would."""
        if self.database is None:
            with closing(sqlite3.connect(self.data / "execguard.db", timeout=30)) as conn, \
                    conn:
                return conn.execute(query, params).fetchall()
        import psycopg
        with psycopg.connect(self.database, autocommit=True) as pg:
            cursor = pg.execute(query.replace("?", "%s"), params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def remove_log_guards(self) -> None:
        """What an attacker with database access does first: drop the append-only triggers."""
        if self.database is None:
            for table in ("log", "merkle_nodes", "checkpoints"):
                for action in ("update", "delete"):
                    self.sql(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
        else:
            for table in ("log", "merkle_nodes", "checkpoints"):
                self.sql(f"ALTER TABLE {table} DISABLE TRIGGER USER")

    def stored_bytes(self) -> bytes:
        """Everything the ledger holds, as bytes (to look for what must never be stored)."""
        if self.database is None:
            return b"".join(p.read_bytes() for p in self.data.glob("execguard.db*"))
        tables = [row[0] for row in self.sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
        return b"".join(str(row[0]).encode() for table in tables
                        for row in self.sql(f"SELECT CAST(t AS text) FROM {table} t"))

    def client(self, api_key: str | None = None, **kwargs: object) -> httpx.Client:
        key = self.api_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0, **kwargs)

    def start(self, require_ready: bool = True) -> None:
        """Start ``execguard serve``; wait until /readyz says ready (or just answers)."""
        self.log_path = self.data.parent / f"server-{self.port}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "execguard", "serve", "--data", str(self.data),
             "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log_path.read_text()}")
            try:
                status = httpx.get(f"{self.url}/readyz", timeout=1.0).status_code
                if status == 200 or not require_ready:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"gateway did not become ready:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("gateway did not stop within 30 s of SIGTERM") from None


def init_args(database: str | None) -> tuple[str, ...]:
    """``execguard init`` arguments for a ledger: ``--db URL``, or none for SQLite."""
    return ("init", "--db", database) if database else ("init",)


def start_gateway(tmp: Path, database: str | None = None) -> Gateway:
    """Initialise a data directory with the real CLI and start a gateway on it."""
    data = tmp / "data"
    init = run_cli(*init_args(database), data=data)
    gateway = Gateway(data=data, port=free_port(), api_key=api_key_from(init.stdout),
                      database=database)
    gateway.start()
    return gateway


def start_gateway_with_broken_key(tmp: Path) -> Gateway:
    """A gateway whose signing key file is garbage: it must fail closed (503)."""
    data = tmp / "data"
    key = api_key_from(run_cli("init", data=data).stdout)
    for pem in (data / "keys").glob("*.pem"):
        pem.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    gateway = Gateway(data=data, port=free_port(), api_key=key)
    gateway.start(require_ready=False)
    return gateway


@pytest.fixture(scope="session")
def gateway(request: pytest.FixtureRequest, backend: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway per backend, shared by the tests that only add decisions of their own."""
    gw = start_gateway(tmp_path_factory.mktemp(f"gateway-{backend}"),
                       new_database(request, backend))
    yield gw
    gw.stop()


@pytest.fixture
def fresh_gateway(tmp_path: Path, database: str | None) -> Iterator[Gateway]:
    """A gateway of the test's own, for tests that change policy or count the log."""
    gw = start_gateway(tmp_path, database)
    yield gw
    if gw.process is not None and gw.process.poll() is None:
        gw.stop()


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c

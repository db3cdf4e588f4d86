"""Storage faults: no PERMIT, a clear 503, /readyz says why, and recovery by itself.

Each fault is made real, not mocked (we run as root, which ignores file modes):

SQLite
- read-only: ``chattr +i`` on the database and its WAL. Writes through the
  gateway's open files then fail (EPERM), as they do when storage turns
  read-only under a running process. The ``-shm`` file stays writable: SQLite
  maps it, and an immutable mapping kills the process with SIGBUS.
- disk full: the data directory is a small tmpfs. The WAL is truncated first
  (``wal_checkpoint(TRUNCATE)``), then a filler takes every free byte: the
  next commit must grow the WAL and fails. Without the truncation a commit can
  succeed on a full disk by reusing WAL frames, which would prove nothing.
- moved away: the database file is renamed under the running gateway (an operator's
  mistake, a restore script). Its open descriptors would still take commits that no
  restart finds again, so writes are refused until the file is back.
- the database stops: the data directory is an ext4 image, frozen with
  ``fsfreeze``. Every write blocks (a hung SAN or volume), so the gateway must
  answer 503 within its commit timeout instead of hanging.

PostgreSQL
- the database stops: the gateway reaches PostgreSQL through a TCP proxy,
  which is cut (every connection reset, new ones refused) and restored.
- read-only: ``default_transaction_read_only`` is set on the database and its
  sessions are terminated (what a demoted primary looks like), then reset.
- disk full: the database lives in a tablespace on a small tmpfs, and a filler
  takes every free byte. Rows that still fit in allocated pages go in; the
  first write that needs a new page fails ("No space left on device"), so the
  fault counts as injected once a decision has been refused. The server's own
  WAL is elsewhere: PostgreSQL itself stays up, as when one volume fills.

For each: every request during the fault is a 503 ``storage_unavailable``
naming the cause, with no token; a permit issued before cannot be consumed;
``/readyz`` is 503 with the cause; the fail-closed metric counts the refusals;
after the fault clears the gateway recovers without a restart, the entries
from before are unchanged, and ``execguard audit`` passes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.conftest import (
    POSTGRES_ADMIN_URL,
    Gateway,
    api_key_from,
    free_port,
    init_args,
    run_cli,
)
from tests.tcp_proxy import TcpProxy

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}
RECOVERY_SECONDS = 30


@dataclass
class Fault:
    """How to break the storage, how to mend it, and what the 503 must say."""

    inject: Callable[[], None]
    clear: Callable[[], None]
    cause: str  # a regular expression the error message and a /readyz problem must match


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def require(*argv: str, reason: str) -> None:
    """Run a set-up command; skip the test (saying why) if this machine does not allow it."""
    result = sh(*argv)
    if result.returncode != 0:
        pytest.skip(f"{reason}: '{' '.join(argv)}' failed: {result.stderr.strip()}")


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.1)


def fail_closed_count(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    found = re.search(r'^execguard_fail_closed_total\{cause="storage_unavailable"\} (\S+)$',
                      text, re.MULTILINE)
    assert found, "no storage_unavailable fail-closed counter in /metrics"
    return float(found.group(1))


def permit(client: httpx.Client) -> dict[str, Any]:
    response = client.post("/execute", json={"surface": "payment.execute", "context": PAY})
    assert response.status_code == 200 and response.json()["decision"] == "PERMIT", \
        response.text
    answer: dict[str, Any] = response.json()
    return answer


def consume(client: httpx.Client, answer: dict[str, Any]) -> httpx.Response:
    return client.post(f"/v1/permits/{answer['execution_id']}/consume",
                       json={"requestHash": answer["receipt"]["requestHash"]})


def log_entries(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get("/v1/log/entries", params={"start": 0, "end": 1000})
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["entries"]
    return entries


def assert_refused(response: httpx.Response, cause: str) -> None:
    """A 503 that names the storage fault, and nothing a caller could execute with."""
    assert response.status_code == 503, f"expected 503 during the fault: {response.text}"
    body = response.json()
    assert body["error"] == "storage_unavailable", body
    assert re.search(cause, body["message"], re.IGNORECASE), body["message"]
    assert "execution_token" not in response.text and "Traceback" not in response.text


def fails_closed_and_recovers(gateway: Gateway, fault: Fault) -> None:
    """The whole check, for any fault (see the module doc)."""
    with gateway.client() as client:
        for _ in range(3):
            permit(client)
        kept = permit(client)  # issued before the fault, consumed only after it
        before = log_entries(client)
        refusals = fail_closed_count(client)
        fault.inject()
        try:
            for i in range(2):  # the first may wait for the commit timeout (a hung disk)
                assert_refused(client.post(
                    "/execute", json={"surface": "payment.execute", "context": PAY},
                    headers={"Idempotency-Key": f"during-fault-{i}"}), fault.cause)
            assert_refused(consume(client, kept), fault.cause)
            wait_for(lambda: client.get("/readyz").status_code == 503, 10,
                     "/readyz did not report the fault")
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            problems = " | ".join(ready.json()["problems"])
            assert re.search(fault.cause, problems, re.IGNORECASE), problems
        finally:
            fault.clear()
        wait_for(lambda: client.get("/readyz").status_code == 200, RECOVERY_SECONDS,
                 "/readyz did not report ready again after the fault cleared")
        permit(client)
        consumed = consume(client, kept)
        assert consumed.status_code == 200, consumed.text  # never consumed during the fault
        assert log_entries(client)[:len(before)] == before
        assert fail_closed_count(client) >= refusals + 3
    audit = run_cli("audit", "--db", gateway.ledger, "--no-state", "--json", check=False)
    assert audit.returncode == 0, f"audit failed:\n{audit.stdout}\n{audit.stderr}"


def start(data: Path, database: str | None = None, **env: str) -> Gateway:
    """``init`` (unless done) and ``serve``; the server's own log file stays outside ``data``."""
    init = run_cli(*init_args(database), data=data)
    gateway = Gateway(data=data, port=free_port(), api_key=api_key_from(init.stdout),
                      database=database, env=env)
    gateway.start()
    return gateway


def stop(gateway: Gateway | None) -> None:
    if gateway is not None and gateway.process is not None and gateway.process.poll() is None:
        # stop() kills it if SIGTERM was not enough; the test's own failure matters more.
        with contextlib.suppress(AssertionError):
            gateway.stop()


def unmount(path: Path) -> None:
    if sh("umount", str(path)).returncode != 0:
        sh("umount", "-l", str(path))


# -- SQLite ------------------------------------------------------------------------------


def test_sqlite_database_turning_read_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    probe = data / "probe"
    probe.touch()
    require("chattr", "+i", str(probe), reason="the file system has no immutable flag")
    sh("chattr", "-i", str(probe))
    probe.unlink()
    gateway = None
    files = [str(data / "execguard.db"), str(data / "execguard.db-wal")]
    try:
        gateway = start(data)
        fails_closed_and_recovers(gateway, Fault(
            inject=lambda: require("chattr", "+i", *files, reason="chattr"),
            clear=lambda: sh("chattr", "-i", *files) and None,
            cause=r"I/O error|read-?only"))
    finally:
        sh("chattr", "-i", *files)
        stop(gateway)


def test_sqlite_database_file_moved_away(tmp_path: Path) -> None:
    """A file moved (or deleted) under a running gateway must not take commits with it."""
    data = tmp_path / "data"
    database, aside = data / "execguard.db", tmp_path / "execguard.db.aside"
    gateway = None
    try:
        gateway = start(data)
        fails_closed_and_recovers(gateway, Fault(
            inject=lambda: os.rename(database, aside),
            clear=lambda: os.rename(aside, database),
            cause=r"moved, deleted or replaced"))
    finally:
        if aside.exists():
            os.rename(aside, database)
        stop(gateway)


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    with path.open("wb", buffering=0) as filler:
        for chunk in (1 << 20, 4096, 512, 1):
            block = b"\0" * chunk
            try:
                while True:
                    filler.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise


def test_sqlite_disk_full(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    require("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(data),
            reason="mounting a small tmpfs is not permitted here")
    filler = data / "filler"
    gateway = None
    db = data / "execguard.db"

    def disk_full() -> None:
        # An empty WAL first: the next commit must grow it, and there is no room.
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            wait_for(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0,
                     10, "the WAL could not be truncated")
        assert (data / "execguard.db-wal").stat().st_size == 0
        fill(filler)

    try:
        gateway = start(data)
        fails_closed_and_recovers(gateway, Fault(
            inject=disk_full, clear=lambda: filler.unlink(missing_ok=True),
            cause=r"disk is full"))
    finally:
        filler.unlink(missing_ok=True)
        stop(gateway)
        unmount(data)


def test_sqlite_database_that_stops_answering(tmp_path: Path) -> None:
    for tool in ("mkfs.ext4", "fsfreeze"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image, data = tmp_path / "disk.img", tmp_path / "data"
    data.mkdir()
    with image.open("wb") as f:
        f.truncate(64 << 20)
    require("mkfs.ext4", "-q", str(image), reason="cannot make an ext4 image")
    require("mount", "-o", "loop", str(image), str(data),
            reason="mounting a loop device is not permitted here")
    gateway = None
    try:
        (data / "lost+found").rmdir()  # init wants its directory to itself
        gateway = start(data)
        fails_closed_and_recovers(gateway, Fault(
            inject=lambda: require("fsfreeze", "--freeze", str(data), reason="fsfreeze"),
            clear=lambda: sh("fsfreeze", "--unfreeze", str(data)) and None,
            cause=r"not responding"))
    finally:
        # Thaw before anything else: a process blocked on a frozen disk cannot even die.
        sh("fsfreeze", "--unfreeze", str(data))
        stop(gateway)
        unmount(data)


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.fixture
def own_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own: its faults touch no other test's data."""
    psycopg = pytest.importorskip("psycopg")
    name = f"execguard_faults_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {exc}")
    try:
        yield f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def admin(sql: str) -> None:
    import psycopg
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def through(proxy: TcpProxy, url: str) -> str:
    """The same database URL, by way of the proxy."""
    parts = urlsplit(url)
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else \
        f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def behind_a_proxy(tmp_path: Path, database: str) -> Iterator[tuple[Gateway, TcpProxy]]:
    """A gateway that reaches ``database`` only through a proxy the test can cut (``init``
    goes straight to the database)."""
    parts = urlsplit(database)
    gateway = None
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        try:
            gateway = start(tmp_path / "data", database, EXECGUARD_DB=through(proxy, database))
            yield gateway, proxy
        finally:
            proxy.restore()
            stop(gateway)


@pytest.mark.slow  # the pool backs off before it reconnects
def test_postgres_that_stops(tmp_path: Path, own_database: str) -> None:
    with behind_a_proxy(tmp_path, own_database) as (gateway, proxy):
        fails_closed_and_recovers(gateway, Fault(
            inject=proxy.cut, clear=proxy.restore,
            cause=r"connect|closed|terminat|not responding"))


def test_a_database_that_stops_holds_up_neither_readiness_nor_other_requests(
        tmp_path: Path, own_database: str) -> None:
    """/readyz read the signing keys from the database on the event loop: with PostgreSQL
    gone it held every request (/healthz too) until the pool gave up, 5 s, then waited
    for its other two checks in turn, 9 s in all. Its checks now run off the loop, at
    once, each for at most 2 s."""
    with behind_a_proxy(tmp_path, own_database) as (gateway, proxy):
        time.sleep(1.2)  # past the signing key's one-second cache
        proxy.cut()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            began = time.monotonic()
            ready = pool.submit(httpx.get, f"{gateway.url}/readyz", timeout=30)
            time.sleep(0.2)
            alive = httpx.get(f"{gateway.url}/healthz", timeout=30)
            alive_after = time.monotonic() - began
            answer = ready.result()
            ready_after = time.monotonic() - began
        assert alive.status_code == 200 and alive_after < 3, alive_after
        assert answer.status_code == 503 and ready_after < 6, ready_after
        assert answer.json()["problems"]


def test_a_database_that_stops_holds_up_no_other_request_while_one_reads_it(
        tmp_path: Path, own_database: str) -> None:
    """The API's asynchronous routes read the database on the event loop: looking up a
    key not in the cache, the approvals, a permit's execution, a dry run's facts. With
    PostgreSQL gone, each such request held every other one (/healthz too) for the pool's
    5 s. They read it off the loop now."""
    some_id = "exe_" + "0" * 32
    with behind_a_proxy(tmp_path, own_database) as (gateway, proxy):
        agent = {"Authorization": f"Bearer {gateway.api_key}"}
        stranger = {"Authorization": "Bearer egk_not-a-key-this-gateway-has-seen"}
        with httpx.Client(base_url=gateway.url, headers=agent, timeout=30) as client:
            assert client.get("/v1/approvals").status_code == 200  # the key is cached now
        readers: list[tuple[str, str, dict[str, str], Any]] = [
            ("POST", "/execute", stranger, {"surface": "payment.execute", "context": PAY}),
            ("GET", "/v1/approvals", agent, None),
            ("GET", f"/v1/approvals/{some_id}", agent, None),
            ("POST", "/v1/coach", agent, {"intent": "payment.execute", "context": PAY}),
            ("POST", f"/v1/permits/{some_id}/consume", agent, {"requestHash": "0" * 64}),
            ("POST", f"/executions/{some_id}/outcome", agent, {"result": "SUCCESS"}),
        ]
        proxy.cut()
        with concurrent.futures.ThreadPoolExecutor(len(readers)) as pool:
            began = time.monotonic()
            pending = [pool.submit(httpx.request, method, f"{gateway.url}{path}",
                                   headers=headers, json=body, timeout=60)
                       for method, path, headers, body in readers]
            time.sleep(0.3)
            alive = httpx.get(f"{gateway.url}/healthz", timeout=60)
            alive_after = time.monotonic() - began
            answers = [future.result() for future in pending]
        assert alive.status_code == 200 and alive_after < 3, alive_after
        for (method, path, _, _), answer in zip(readers, answers, strict=True):
            assert answer.status_code in (401, 503), (method, path, answer.text)


@pytest.fixture
def full_disk_database() -> Iterator[tuple[str, Path]]:
    """A database of this test's own in a tablespace on a 16 MB tmpfs; yields (URL, mount)."""
    psycopg = pytest.importorskip("psycopg")
    # Not under tmp_path: the server's user must reach the directory, and pytest's own
    # directories are private. The mount's root is the tablespace, owned by that user.
    space = Path(tempfile.mkdtemp(prefix="execguard-tablespace-"))
    require("mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(space),
            reason="mounting a small tmpfs is not permitted here")
    name = f"execguard_full_{os.getpid()}_{secrets.token_hex(3)}"
    created = []
    try:
        try:
            shutil.chown(space, "postgres", "postgres")
        except (LookupError, PermissionError) as exc:
            pytest.skip(f"the PostgreSQL server's user cannot own a local directory: {exc}")
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            # A server elsewhere cannot see this directory: nothing to test then.
            try:
                conn.execute(f"CREATE TABLESPACE \"{name}\" LOCATION '{space}'")
            except psycopg.Error as exc:
                pytest.skip(f"no tablespace on a local tmpfs: {exc}")
            created.append("tablespace")
            conn.execute(f'CREATE DATABASE "{name}" TABLESPACE "{name}"')
            created.append("database")
        yield f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}", space
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            if "database" in created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if "tablespace" in created:
                conn.execute(f'DROP TABLESPACE IF EXISTS "{name}"')
        unmount(space)
        space.rmdir()


def test_postgres_disk_full(tmp_path: Path, full_disk_database: tuple[str, Path]) -> None:
    database, space = full_disk_database
    filler = space / "filler"
    gateway = None

    def disk_full() -> None:
        fill(filler)
        # Pages allocated before the disk filled still take rows: decide until a write
        # needs a new one. Those decisions are durable (their commit went through).
        assert gateway is not None
        with gateway.client() as client:
            for i in range(500):
                answer = client.post("/execute", json={"surface": "payment.execute",
                                                       "context": PAY},
                                     headers={"Idempotency-Key": f"filling-{i}"})
                if answer.status_code == 503:
                    return
                assert answer.status_code == 200, answer.text
        raise AssertionError("500 decisions still fitted on a full disk")

    try:
        gateway = start(tmp_path / "data", database)
        fails_closed_and_recovers(gateway, Fault(
            inject=disk_full, clear=lambda: filler.unlink(missing_ok=True),
            cause=r"no space left on device"))
    finally:
        filler.unlink(missing_ok=True)
        stop(gateway)


def test_postgres_turning_read_only(tmp_path: Path, own_database: str) -> None:
    name = urlsplit(own_database).path.lstrip("/")
    # Sessions keep the setting they started with: end them, as a failover does. When
    # the database is writable again, the gateway must renew its read-only sessions.
    terminate = (f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                 f" WHERE datname = '{name}' AND pid <> pg_backend_pid()")

    def read_only() -> None:
        admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        admin(terminate)

    def writable() -> None:
        # No session is ended this time: the gateway must replace its read-only ones.
        admin(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')

    gateway = None
    try:
        gateway = start(tmp_path / "data", own_database)
        fails_closed_and_recovers(gateway, Fault(inject=read_only, clear=writable,
                                                 cause=r"read-only"))
    finally:
        admin(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        stop(gateway)

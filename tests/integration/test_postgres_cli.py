"""Setting up and running on PostgreSQL: init --db, db migrate, and the schema check at start."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from execguard.ledger._postgres_schema import SCHEMA_VERSION
from tests.conftest import (
    BACKENDS,
    POSTGRES_ADMIN_URL,
    Gateway,
    PostgresSession,
    api_key_from,
    free_port,
    run_cli,
)

pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS,
                                reason="EXECGUARD_TEST_BACKENDS excludes postgresql")


def test_init_saves_the_url_and_later_commands_find_it(tmp_path: Path,
                                                       postgres: PostgresSession) -> None:
    url = postgres.new_url()
    data = tmp_path / "data"
    init = run_cli("init", "--db", url, data=data)
    assert f"ledger         {url}" in init.stdout
    config = data / "execguard.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # the URL may carry a password
    assert url in config.read_text()
    assert not (data / "execguard.db").exists()
    listed = run_cli("policy", "list", "--tenant", "demo", data=data)
    assert re.search(r"\*\s+│ [0-9a-f]{64}", listed.stdout), listed.stdout
    migrated = run_cli("db", "migrate", data=data)
    assert f"schema version {SCHEMA_VERSION}" in migrated.stdout
    # A second data directory must not re-initialise a database that is in use.
    again = run_cli("init", "--db", url, data=tmp_path / "other", check=False)
    assert again.returncode == 1 and "already set up" in again.stderr


def test_serve_refuses_an_unmigrated_database_until_db_migrate(
        tmp_path: Path, postgres: PostgresSession) -> None:
    url = postgres.new_url()
    data = tmp_path / "data"
    key = api_key_from(run_cli("init", data=data).stdout)  # keys from a SQLite set-up
    refused = subprocess.run(
        [sys.executable, "-m", "execguard", "serve", "--data", str(data), "--db", url,
         "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "schema version 0" in refused.stderr and "execguard db migrate" in refused.stderr
    assert "Traceback" not in refused.stderr
    migrated = run_cli("db", "migrate", "--db", url, data=data)
    assert f"schema version {SCHEMA_VERSION}" in migrated.stdout
    gateway = Gateway(data=data, port=free_port(), api_key=key, database=url,
                      env={"EXECGUARD_DB": url})
    gateway.start(require_ready=False)
    try:
        with gateway.client() as client:
            # It runs on the new database, which has no signing key, tenant or API key yet.
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert "no active signing key" in " ".join(ready.json()["problems"])
            assert client.post("/execute", json={"surface": "payment.execute",
                                                 "context": {}}).status_code == 401
    finally:
        gateway.stop()


def test_a_bad_database_url_is_named(tmp_path: Path) -> None:
    result = run_cli("init", "--db", "mysql://localhost/x", data=tmp_path / "d", check=False)
    assert result.returncode == 1
    assert "'mysql://localhost/x' is not a PostgreSQL URL" in result.stderr
    unreachable = run_cli("init", "--db", "postgresql://who:s3cretpw@127.0.0.1:1/none",
                          data=tmp_path / "e", check=False)
    assert unreachable.returncode == 1
    assert "failed" in unreachable.stderr and "s3cretpw" not in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    # The server's own reason, not only the pool's "couldn't get a connection".
    missing = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/execguard_no_such_database"
    absent = run_cli("db", "migrate", "--db", missing, data=tmp_path / "f", check=False)
    assert absent.returncode == 1 and "Traceback" not in absent.stderr
    error = absent.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "does not exist" in error


def test_a_password_given_as_a_query_parameter_is_never_printed(
        tmp_path: Path, postgres: PostgresSession) -> None:
    # libpq reads ?password= too; init, db migrate and serve's first line showed it.
    url = postgres.new_url() + "&password=s3cretpw"
    data = tmp_path / "data"
    init = run_cli("init", "--db", url, data=data)
    assert "s3cretpw" not in init.stdout + init.stderr and "password=***" in init.stdout
    migrated = run_cli("db", "migrate", data=data)
    assert "s3cretpw" not in migrated.stdout + migrated.stderr
    assert "s3cretpw" in (data / "execguard.toml").read_text()  # what replicas connect with


def test_a_url_naming_several_hosts_is_accepted(tmp_path: Path,
                                                postgres: PostgresSession) -> None:
    """libpq takes a list of hosts (h1:5432,h2:5433), the way to name a primary and its
    standbys; a check of the URL's port refused it, so such a configuration stopped
    working. Here both hosts are the test server."""
    url = postgres.new_url()
    several = url.replace("127.0.0.1:5432", "127.0.0.1:5432,127.0.0.1:5432", 1)
    assert several != url
    init = run_cli("init", "--db", several, data=tmp_path / "data")
    assert "ledger" in init.stdout
    migrated = run_cli("db", "migrate", data=tmp_path / "data")
    assert f"schema version {SCHEMA_VERSION}" in migrated.stdout

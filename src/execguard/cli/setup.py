"""``execguard init``, ``serve`` and ``keys``: setting up and running the gateway."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from execguard.cli._common import (
    DEFAULT_DATA,
    DataOption,
    DbOption,
    JsonOption,
    TenantOption,
    app,
    datadir,
    db_app,
    keys_app,
    out,
)
from execguard.protocol.errors import ConfigError

#: A tenant names its log's checkpoint origin (``<authority>/<tenant>``), URLs and files.
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


@app.command()
def init(data: DataOption = DEFAULT_DATA, db: DbOption = None) -> None:
    """Create the data directory, signing key, demo tenant, demo policy and an API key.

    With --db, the ledger is that PostgreSQL database (migrated here) and the URL is
    saved in the data directory, so later commands find it.
    """
    directory = datadir(data, db)
    result = directory.initialise()
    if not result.created:
        out.print(f"ExecGuard data directory {data} already exists: nothing changed.")
    else:
        out.print(f"Created ExecGuard data directory {data}")
        out.print(f"  ledger         {directory.database_label}")
        out.print(f"  signing key    {result.key_id} (private key mode 0600)")
        out.print("  tenant         demo")
        out.print(f"  active policy  {result.policy_version} (bundled demo policy)")
    if result.api_key:
        print(f"EXECGUARD_API_KEY={result.api_key}")


class LogFormat(StrEnum):
    """How ``execguard serve`` writes its log lines."""

    json = "json"
    text = "text"


@app.command()
def serve(
    data: DataOption = DEFAULT_DATA,
    db: DbOption = None,
    host: Annotated[str | None, typer.Option(
        help="Address to listen on (default $EXECGUARD_HOST, else 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(
        help="Port to listen on (default $EXECGUARD_PORT, else 8080).")] = None,
    log_format: Annotated[LogFormat, typer.Option(
        envvar="EXECGUARD_LOG_FORMAT",
        help="Log lines on stderr: one JSON object per line, or plain text.")] = "json",
) -> None:
    """Serve the gateway until SIGTERM/SIGINT, then finish in-flight requests and stop."""
    import logging

    from execguard.protocol.errors import NoSigningKey
    from execguard.server.app import create_app
    from execguard.server.decision_process import DecisionProcess
    from execguard.server.logs import configure_logging
    from execguard.server.run import serve_until_signalled
    from execguard.server.settings import Settings

    configure_logging(LogFormat(log_format).value)
    logging.getLogger("psycopg.pool").setLevel(logging.NOTSET)  # a server's log keeps them
    settings = Settings.from_env(data_dir=data, host=host, port=port)
    directory = datadir(settings.data_dir, db)
    store = directory.open_store()
    # Started first: it opens the ledger while this process finishes starting.
    database = directory.database_url
    decisions = DecisionProcess(settings, database, LogFormat(log_format).value,
                                ledger_file=None if database else directory.db_path)
    decisions.spawn()
    signers = directory.signer_source(store)
    try:
        signers.current()
    except NoSigningKey as exc:
        logging.getLogger("execguard").error("%s: decisions will fail closed (503)", exc)
    application = create_app(settings, store, signers, decisions)
    out.print(f"ExecGuard gateway on http://{settings.host}:{settings.port}  (data: {data}, "
              f"ledger: {directory.database_label})")
    if directory.demo_key_path.exists():
        out.print(f"Demo API key in {directory.demo_key_path}")  # never the key itself
    try:
        serve_until_signalled(application, settings.host, settings.port)
    finally:
        store.close()



@keys_app.command("create")
def keys_create(
    tenant: TenantOption,
    role: Annotated[str, typer.Option(help="agent, approver or admin.")] = "agent",
    label: Annotated[str | None, typer.Option(
        help="Who holds the key (an approver's name; it must differ from the actor of any "
             "request the key votes on).")] = None,
    group: Annotated[list[str] | None, typer.Option(
        help="Approver group (repeatable), for --role approver.")] = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Create an API key for a tenant (creating the tenant if it is new)."""
    from execguard.server.datadir import now_text
    directory = datadir(data)
    store = directory.open_store()
    try:
        if not store.tenant_exists(tenant) and not _TENANT_RE.match(tenant):
            raise ConfigError(f"tenant name {tenant!r}: expected a letter or digit, then up "
                              "to 63 letters, digits, '.', '_' or '-'")
        if store.create_tenant(tenant, now_text()):
            out.print(f"Created tenant {tenant} (it has no active policy yet: "
                      "push and activate one)")
        key = directory.create_api_key(store, tenant, role, label, tuple(group or ()))
    finally:
        store.close()
    out.print(f"API key for tenant {tenant}, role {role}. It is shown once; store it now.")
    print(f"EXECGUARD_API_KEY={key}")




#: A key is named by the first digits of its SHA-256, as vote receipts name voters.
KEY_ID_DIGITS = 16


@keys_app.command("list")
def keys_list(tenant: TenantOption = "demo", json_output: JsonOption = False,
              data: DataOption = DEFAULT_DATA) -> None:
    """List the tenant's API keys by id (never the keys themselves), revoked ones too."""
    store = datadir(data).open_store()
    try:
        if not store.tenant_exists(tenant):
            raise ConfigError(f"tenant {tenant!r} does not exist")
        keys = store.api_keys(tenant)
    finally:
        store.close()
    rows = [{"id": k.key_hash[:KEY_ID_DIGITS], "role": k.role, "label": k.label,
             "groups": list(k.groups), "createdAt": k.created_at, "revokedAt": k.revoked_at}
            for k in keys]
    if json_output:
        print(json.dumps({"tenant": tenant, "keys": rows}, indent=2))
        return
    table = Table("id", "role", "label", "groups", "created", "revoked")
    for row in rows:
        table.add_row(row["id"], row["role"], row["label"] or "", ", ".join(row["groups"]),
                      row["createdAt"], row["revokedAt"] or "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(
        metavar="KEY", help="The API key itself, or its id ('keys list', or a vote "
                            "receipt's voterKey).")],
    tenant: TenantOption = "demo",
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Revoke an API key for good: every gateway refuses it within 5 seconds."""
    from execguard.server.datadir import hash_api_key, now_text
    from execguard.server.gateway import KEY_CACHE_SECONDS
    store = datadir(data).open_store()
    try:
        if not store.tenant_exists(tenant):
            raise ConfigError(f"tenant {tenant!r} does not exist")
        wanted = key.strip().lower()
        is_id = len(wanted) == KEY_ID_DIGITS and all(c in "0123456789abcdef" for c in wanted)
        matches = [k for k in store.api_keys(tenant)
                   if (k.key_hash[:KEY_ID_DIGITS] == wanted if is_id
                       else k.key_hash == hash_api_key(key.strip()))]
        if not matches:
            raise ConfigError(f"tenant {tenant!r} has no API key {_shown(key, is_id)}")
        if len(matches) > 1:  # two keys whose hashes share 64 bits: never seen, but say so
            raise ConfigError(f"id {wanted} names {len(matches)} keys: give the key itself")
        record = matches[0]
        if not store.revoke_api_key(record.key_hash, now_text()):
            raise ConfigError(f"API key {record.key_hash[:KEY_ID_DIGITS]} was revoked before "
                              f"({record.revoked_at or 'just now'})")
    finally:
        store.close()
    out.print(f"Revoked API key {record.key_hash[:KEY_ID_DIGITS]} ({record.role}"
              f"{', ' + record.label if record.label else ''}) of tenant {tenant}; "
              f"gateways refuse it within {KEY_CACHE_SECONDS:g} seconds.")


def _shown(key: str, is_id: bool) -> str:
    # A key given by its text is a secret: name it by its id, never echo it.
    from execguard.server.datadir import hash_api_key
    return key.strip().lower() if is_id else f"with id {hash_api_key(key.strip())[:KEY_ID_DIGITS]}"


@keys_app.command("rotate")
def keys_rotate(data: DataOption = DEFAULT_DATA) -> None:
    """Make a new signing key active. Old keys stay published as retired and keep verifying.

    A running gateway switches to the new key within a second, without a restart.
    """
    directory = datadir(data)
    store = directory.open_store()
    try:
        signer, retired = directory.rotate_signing_key(store)
    finally:
        store.close()
    out.print(f"Active signing key: {signer.key_id}")
    for key_id in retired:
        out.print(f"Retired (still published, still verifying): {key_id}")
    print(signer.key_id)


@db_app.command("migrate")
def db_migrate(data: DataOption = DEFAULT_DATA, db: DbOption = None) -> None:
    """Bring the ledger's schema up to this version of ExecGuard (safe to run again).

    Run it once before starting gateways of a new version on PostgreSQL; every
    replica refuses to start on a schema other than its own. SQLite files are
    upgraded when they are opened.
    """
    from execguard.ledger import open_ledger
    directory = datadir(data, db)
    store = open_ledger(directory.ledger_location, migrate=True)
    try:
        version = store.schema_version()
    finally:
        store.close()
    out.print(f"Ledger {directory.database_label} is at schema version {version}.")

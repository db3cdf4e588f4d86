"""Shared pieces of the ``execguard`` command: the Typer apps, the console, options."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from execguard.protocol.errors import ConfigError

app = typer.Typer(help="ExecGuard: no PERMIT, no execution.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Signing keys and API keys.", no_args_is_help=True)
db_app = typer.Typer(help="The ledger database: schema migrations.", no_args_is_help=True)
policy_app = typer.Typer(help="Policy bundles: push, list, activate, show.", no_args_is_help=True)
receipt_app = typer.Typer(help="Receipts.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(policy_app, name="policy")
app.add_typer(receipt_app, name="receipt")

# Piped output is read by people later (CI logs) and by grep: don't squeeze it to 80 columns.
# It prints what others wrote (an agent's actor id, a label, a path): no markup, so a '[/]'
# there is text, not a crash. Colour is given as rich Text.
out = Console(highlight=False, soft_wrap=True, markup=False,
              width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

DataOption = Annotated[Path, typer.Option(
    "--data", envvar="EXECGUARD_DATA", help="Data directory.", show_default=True)]
DbOption = Annotated[str | None, typer.Option(
    "--db", envvar="EXECGUARD_DB", show_default=False,
    help="PostgreSQL URL (postgresql://user@host:port/db); default: the SQLite file in "
         "--data, or the URL that 'init --db' saved there.")]
TenantOption = Annotated[str, typer.Option("--tenant", help="Tenant name.")]
VersionArgument = Annotated[str, typer.Argument(metavar="VERSION",
                                                help="A policy bundle version (64 hex digits).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
DEFAULT_DATA = Path(".execguard")


def datadir(path: Path, database: str | None = None) -> Any:
    """The data directory (imported lazily: ``execguard verify`` needs no server code).

    Every command that opens the ledger honours ``EXECGUARD_DB``; ``--db`` wins.
    """
    from execguard.server.datadir import DataDir
    return DataDir(path, database or os.environ.get("EXECGUARD_DB") or None)


def require_tenant(store: Any, tenant: str) -> None:
    """A :class:`ConfigError` for a tenant that does not exist: a typo lists nothing."""
    if not store.tenant_exists(tenant):
        raise ConfigError(f"tenant {tenant!r} does not exist")


def read_file(path: Path) -> bytes:
    """A file's bytes, or a :class:`ConfigError` naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def load_json_source(source: str) -> Any:
    """A JSON document from a file path or an http(s) URL."""
    if source.startswith(("http://", "https://")):
        try:
            response = httpx.get(source, timeout=10.0)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ConfigError(f"cannot fetch {source}: {exc}") from None
    try:
        return json.loads(read_file(Path(source)))
    except ValueError as exc:
        raise ConfigError(f"{source} is not JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source} is not JSON this tool reads: nested too deep") from None

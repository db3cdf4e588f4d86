"""The ``execguard`` command. It parses, calls the library, prints, and exits.

Errors are caught once, in :func:`main`: one clear line on stderr and exit
code 1 (2 for usage errors). Lines that scripts read (``EXECGUARD_API_KEY=``)
are exact and last.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from execguard.protocol.errors import ConfigError, ExecGuardError, VerificationError

app = typer.Typer(help="ExecGuard: no PERMIT, no execution.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
policy_app = typer.Typer(help="Policy bundles: push, list, activate, show.", no_args_is_help=True)
receipt_app = typer.Typer(help="Receipts.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(policy_app, name="policy")
app.add_typer(receipt_app, name="receipt")

# Piped output is read by people later (CI logs) and by grep: don't squeeze it to 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)

DataOption = Annotated[Path, typer.Option(
    "--data", envvar="EXECGUARD_DATA", help="Data directory.", show_default=True)]
TenantOption = Annotated[str, typer.Option("--tenant", help="Tenant name.")]
VersionArgument = Annotated[str, typer.Argument(metavar="VERSION",
                                                help="A policy bundle version (64 hex digits).")]
DEFAULT_DATA = Path(".execguard")


def _datadir(path: Path) -> Any:
    from execguard.server.datadir import DataDir
    return DataDir(path)


# -- set-up and serving ----------------------------------------------------------------


@app.command()
def init(data: DataOption = DEFAULT_DATA) -> None:
    """Create the data directory, signing key, demo tenant, demo policy and an API key."""
    result = _datadir(data).initialise()
    if not result.created:
        out.print(f"ExecGuard data directory {data} already exists: nothing changed.")
    else:
        out.print(f"Created ExecGuard data directory {data}")
        out.print(f"  signing key    {result.key_id} (private key mode 0600)")
        out.print("  tenant         demo")
        out.print(f"  active policy  {result.policy_version} (bundled demo policy)")
    if result.api_key:
        print(f"EXECGUARD_API_KEY={result.api_key}")


@app.command()
def serve(
    data: DataOption = DEFAULT_DATA,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """Serve the gateway until SIGTERM/SIGINT, then finish in-flight requests and stop."""
    import logging

    from execguard.protocol.errors import NoSigningKey
    from execguard.server.app import create_app
    from execguard.server.run import serve_until_signalled
    from execguard.server.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s "
                        "%(message)s")
    settings = Settings.from_env(data_dir=data, host=host, port=port)
    datadir = _datadir(settings.data_dir)
    store = datadir.open_store()
    signers = datadir.signer_source(store)
    try:
        signers.current()
    except NoSigningKey as exc:
        logging.getLogger("execguard").error("%s: decisions will fail closed (503)", exc)
    application = create_app(settings, store, signers)
    out.print(f"ExecGuard gateway on http://{host}:{port}  (data: {data})")
    if datadir.demo_key_path.exists():
        out.print(f"Demo API key: {datadir.demo_key_path.read_text().strip()}")
    try:
        serve_until_signalled(application, host, port)
    finally:
        store.close()


# -- keys ------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    tenant: TenantOption,
    role: Annotated[str, typer.Option(help="agent, approver or admin.")] = "agent",
    label: Annotated[str | None, typer.Option(help="A note to recognise the key by.")] = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Create an API key for a tenant (creating the tenant if it is new)."""
    from execguard.server.datadir import now_text
    datadir = _datadir(data)
    store = datadir.open_store()
    try:
        if store.create_tenant(tenant, now_text()):
            out.print(f"Created tenant {tenant} (it has no active policy yet: "
                      "push and activate one)")
        key = datadir.create_api_key(store, tenant, role, label)
    finally:
        store.close()
    out.print(f"API key for tenant {tenant}, role {role}. It is shown once; store it now.")
    print(f"EXECGUARD_API_KEY={key}")


# -- policy ----------------------------------------------------------------------------


@policy_app.command("push")
def policy_push(
    directory: Annotated[Path, typer.Argument(help="The bundle directory.")],
    tenant: TenantOption = "demo",
    activate: Annotated[bool, typer.Option(help="Also make it the active version.")] = False,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Validate a bundle and store it (immutable, content-addressed)."""
    from execguard.arbiter import PolicyBundle
    from execguard.server.datadir import now_text
    bundle = PolicyBundle.from_directory(directory)
    store = _datadir(data).open_store()
    try:
        if not store.tenant_exists(tenant):
            raise ConfigError(f"tenant {tenant!r} does not exist")
        new = store.put_bundle(tenant, bundle.version, bundle.files, now_text())
        if activate:
            store.activate_bundle(tenant, bundle.version, now_text())
    finally:
        store.close()
    state = "stored" if new else "already stored"
    out.print(f"Policy bundle {state} for tenant {tenant}: {len(bundle.files)} files, "
              f"{len(bundle.registry)} surfaces"
              + (" (now active)" if activate else ""))
    print(bundle.version)


@policy_app.command("list")
def policy_list(tenant: TenantOption = "demo", data: DataOption = DEFAULT_DATA,
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the tenant's bundles; the active one is marked."""
    store = _datadir(data).open_store()
    try:
        bundles = store.list_bundles(tenant)
    finally:
        store.close()
    if as_json:
        print(json.dumps([{"version": b.version, "createdAt": b.created_at,
                           "active": b.active} for b in bundles], indent=2))
        return
    table = Table("active", "version", "pushed")
    for b in bundles:
        table.add_row("*" if b.active else "", b.version, b.created_at)
    out.print(table)


@policy_app.command("activate")
def policy_activate(version: VersionArgument, tenant: TenantOption = "demo",
                    data: DataOption = DEFAULT_DATA) -> None:
    """Make a pushed version the tenant's active policy."""
    from execguard.server.datadir import now_text
    store = _datadir(data).open_store()
    try:
        store.activate_bundle(tenant, version, now_text())
    finally:
        store.close()
    out.print(f"Tenant {tenant} now decides under policy version {version}")


@policy_app.command("show")
def policy_show(version: VersionArgument, tenant: TenantOption = "demo",
                data: DataOption = DEFAULT_DATA,
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show a bundle's files and surfaces."""
    from execguard.arbiter import PolicyBundle
    from execguard.protocol.errors import NotFound
    store = _datadir(data).open_store()
    try:
        record = store.get_bundle(tenant, version)
    finally:
        store.close()
    if record is None:
        raise NotFound(f"policy version {version} is not stored for tenant {tenant!r}")
    bundle = PolicyBundle.from_files(record.files)
    if as_json:
        print(json.dumps({"version": version, "active": record.active,
                          "createdAt": record.created_at, "files": sorted(record.files),
                          "surfaces": list(bundle.registry.names())}, indent=2))
        return
    out.print(f"version {version}{'  (active)' if record.active else ''}")
    out.print(f"pushed  {record.created_at}")
    table = Table("surface", "risk", "observe", "required context")
    for spec in bundle.registry:
        required = ", ".join(f for f, field in spec.context.items() if field.required)
        table.add_row(spec.name, spec.risk, "yes" if spec.observe_allowed else "no", required)
    out.print(table)
    for path in sorted(record.files):
        out.print(f"  {path}  ({len(record.files[path])} bytes)")


# -- local evaluation and verification -------------------------------------------------


@app.command()
def decide(
    request_file: Annotated[Path, typer.Argument(metavar="REQUEST.json")],
    policy: Annotated[Path | None, typer.Option(help="Evaluate under this bundle "
                                                "directory instead of the active one.")] = None,
    tenant: TenantOption = "demo",
    data: DataOption = DEFAULT_DATA,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Evaluate a request locally (no receipt, nothing recorded): the policy author's tool."""
    from execguard.arbiter import CompiledBundle, PolicyBundle, compute_facts
    from execguard.protocol.request import parse_execution_request
    request = parse_execution_request(_read(request_file))
    if policy is not None:
        bundle = PolicyBundle.from_directory(policy)
    else:
        store = _datadir(data).open_store()
        try:
            version = store.active_bundle_version(tenant)
            record = store.get_bundle(tenant, version) if version else None
        finally:
            store.close()
        if record is None:
            raise ConfigError(f"tenant {tenant!r} has no active policy; pass --policy DIR")
        bundle = PolicyBundle.from_files(record.files)
    evaluation = CompiledBundle(bundle).evaluate(request, compute_facts(datetime.now(UTC)))
    if as_json:
        print(json.dumps({"decision": evaluation.outcome.value,
                          "reasonCode": evaluation.reason_code, "reason": evaluation.reason,
                          "determiningPolicies": list(evaluation.determining_policies),
                          "policyVersion": evaluation.policy_version,
                          "errors": list(evaluation.errors)}, indent=2))
        return
    out.print(f"decision              {evaluation.outcome.value}")
    out.print(f"reason                {evaluation.reason_code}: {evaluation.reason}")
    out.print("determining policies  " + (", ".join(evaluation.determining_policies) or "-"))
    out.print(f"policy version        {evaluation.policy_version}")
    for error in evaluation.errors:
        out.print(f"evaluation error      {error}")


def _read(path: Path) -> bytes:
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
        return json.loads(_read(Path(source)))
    except ValueError as exc:
        raise ConfigError(f"{source} is not JSON: {exc}") from None


@receipt_app.command("verify")
def receipt_verify(
    file: Annotated[Path, typer.Argument(help="A receipt, or a response holding one.")],
    keys: Annotated[str, typer.Option(help="Keys document: a file or a URL.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Verify a receipt offline: recompute its hash and check its signature."""
    from execguard.verify import KeySet, extract_receipt, verify_receipt
    document = load_json_source(str(file))
    keyset = KeySet.from_document(load_json_source(keys))
    try:
        verified = verify_receipt(extract_receipt(document), keyset)
    except VerificationError as exc:
        if as_json:
            print(json.dumps({"valid": False, "error": exc.code, "reason": str(exc)}))
        else:
            out.print(f"[red]INVALID[/red]: {exc}")
        raise typer.Exit(1) from None
    receipt = verified.receipt
    if as_json:
        print(json.dumps({"valid": True, "receiptHash": verified.receipt_hash,
                          "keyId": verified.key_id, "executionId": receipt.get("executionId"),
                          "decision": receipt.get("decision")}))
        return
    out.print(f"[green]VALID[/green]: {receipt.get('receiptType', 'decision')} receipt "
              f"{receipt.get('executionId')} ({receipt.get('decision') or receipt.get('outcome')}"
              f" on {receipt.get('surface')}), signed by {verified.key_id}")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; ExecGuard errors become one line on stderr and exit code 1."""
    try:
        code = app(args=argv, prog_name="execguard", standalone_mode=False)
    except ExecGuardError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: shown with their own exit code
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)

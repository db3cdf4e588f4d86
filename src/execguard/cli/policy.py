"""``execguard policy`` and ``decide``: the policy author's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from execguard.cli._common import (
    DEFAULT_DATA,
    DataOption,
    TenantOption,
    VersionArgument,
    app,
    datadir,
    out,
    policy_app,
    read_file,
)
from execguard.protocol.errors import ConfigError


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
    store = datadir(data).open_store()
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
    store = datadir(data).open_store()
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
    store = datadir(data).open_store()
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
    store = datadir(data).open_store()
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



@app.command()
def decide(
    request_file: Annotated[Path, typer.Argument(metavar="REQUEST.json")],
    policy: Annotated[Path | None, typer.Option(help="Evaluate under this bundle "
                                                "directory instead of the active one.")] = None,
    facts: Annotated[str | None, typer.Option(
        help="Stateful facts to assume, as JSON, e.g. '{\"amount_sum_24h\": \"49000\"}' "
             "(default: no earlier permits).")] = None,
    tenant: TenantOption = "demo",
    data: DataOption = DEFAULT_DATA,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Evaluate a request locally (no receipt, nothing recorded): the policy author's tool."""
    import time
    from decimal import Decimal, InvalidOperation

    from execguard.arbiter import CompiledBundle, PolicyBundle
    from execguard.protocol.request import parse_execution_request
    from execguard.server.decisions import NoHistory, facts_for
    request = parse_execution_request(read_file(request_file))
    if policy is not None:
        bundle = PolicyBundle.from_directory(policy)
    else:
        store = datadir(data).open_store()
        try:
            version = store.active_bundle_version(tenant)
            record = store.get_bundle(tenant, version) if version else None
        finally:
            store.close()
        if record is None:
            raise ConfigError(f"tenant {tenant!r} has no active policy; pass --policy DIR")
        bundle = PolicyBundle.from_files(record.files)
    spec = bundle.registry.get(request.surface)
    assumed = facts_for(spec, request, time.time(), NoHistory()) if spec else {}
    if facts is not None:
        try:
            given = json.loads(facts, parse_float=Decimal)
            assumed.update({k: Decimal(v) if isinstance(v, str) else v
                            for k, v in given.items()})
        except (ValueError, AttributeError, InvalidOperation) as exc:
            raise ConfigError(f"--facts is not a JSON object of facts: {exc}") from None
    evaluation = CompiledBundle(bundle).evaluate(request, assumed)
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



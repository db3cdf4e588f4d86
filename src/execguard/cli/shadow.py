"""``execguard policy shadow`` and ``policy shadow-report``: try a policy on live traffic."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Annotated

import typer
from rich.table import Table

from execguard.cli._common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    TenantOption,
    datadir,
    out,
    policy_app,
    require_tenant,
)
from execguard.protocol.errors import ConfigError


@policy_app.command("shadow")
def policy_shadow(
    version: Annotated[str | None, typer.Argument(
        metavar="[VERSION]", help="A pushed policy version to evaluate beside the active one.")]
    = None,
    off: Annotated[bool, typer.Option("--off", help="Stop shadow evaluation.")] = False,
    tenant: TenantOption = "demo",
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Evaluate a candidate policy on live traffic next to the active one, without effect.

    Every decision is also evaluated under the candidate; where it would decide
    differently, the disagreement is recorded (see `policy shadow-report`).
    """
    from execguard.server.datadir import now_text
    if (version is None) == (not off):
        raise ConfigError("give a VERSION to shadow, or --off to stop")
    store = datadir(data).open_store()
    try:
        store.set_shadow(tenant, None if off else version, now_text())
    finally:
        store.close()
    out.print(f"Tenant {tenant}: shadow evaluation stopped" if off else
              f"Tenant {tenant}: evaluating {version} in the shadow of the active policy")


@policy_app.command("shadow-report")
def policy_shadow_report(
    version: Annotated[str | None, typer.Option(help="Only this shadow version.")] = None,
    tenant: TenantOption = "demo",
    data: DataOption = DEFAULT_DATA,
    as_json: JsonOption = False,
) -> None:
    """Where the shadow policy disagreed with the active one, by surface and from -> to."""
    store = datadir(data).open_store()
    try:
        require_tenant(store, tenant)
        rows = store.shadow_disagreements(tenant, version)
    finally:
        store.close()
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for row in rows:
        key = (row["surface"], f"{row['activeDecision']} ({row['activeReason']})",
               f"{row['shadowDecision']} ({row['shadowReason']})")
        groups[key].append(row["executionId"])
    if as_json:
        print(json.dumps({"disagreements": len(rows), "groups": [
            {"surface": s, "from": f, "to": t, "count": len(ids), "examples": ids[:3]}
            for (s, f, t), ids in sorted(groups.items())]}, indent=2))
        return
    table = Table("surface", "active decided", "shadow would decide", "count", "examples",
                  title=f"{len(rows)} disagreement(s)")
    for (surface, active, shadow), ids in sorted(groups.items()):
        table.add_row(surface, active, shadow, str(len(ids)), ", ".join(ids[:3]))
    out.print(table)

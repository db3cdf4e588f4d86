"""``execguard policy``, ``decide`` and ``replay``: the policy author's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from execguard.cli._common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    TenantOption,
    VersionArgument,
    app,
    datadir,
    err,
    out,
    policy_app,
    read_file,
    require_tenant,
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
    from execguard.arbiter import CompiledBundle, PolicyBundle
    from execguard.server.datadir import now_text
    bundle = PolicyBundle.from_directory(directory)
    CompiledBundle(bundle)  # also checks what only evaluation reads (@approvers, @quorum)
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
        require_tenant(store, tenant)
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
        assumed.update(_assumed_facts(facts))
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


def _assumed_facts(text: str) -> dict[str, Any]:
    """``--facts``: a JSON object of numbers, or of numbers written as strings."""
    from decimal import Decimal, InvalidOperation
    try:
        given = json.loads(text, parse_float=Decimal)
    except ValueError as exc:
        raise ConfigError(f"--facts is not JSON: {exc}") from None
    if not isinstance(given, dict):
        raise ConfigError(f"--facts must be a JSON object such as "
                          f"'{{\"amount_sum_24h\": \"49000\"}}', got {type(given).__name__}")
    facts: dict[str, Any] = {}
    for name, value in given.items():
        try:
            facts[name] = Decimal(value) if isinstance(value, str) else value
        except InvalidOperation:
            raise ConfigError(f"--facts: {name} must be a number (or one written as a "
                              f"string), got {value!r}") from None
    return facts


@policy_app.command("test")
def policy_test(directory: Annotated[Path, typer.Argument(help="The bundle directory.")],
                as_json: JsonOption = False) -> None:
    """Run the bundle's test cases (tests/*.toml); exit 1 if any case fails."""
    from execguard.arbiter import CompiledBundle, PolicyBundle
    from execguard.arbiter.testing import load_cases, run_cases
    bundle = PolicyBundle.from_directory(directory)  # refuses malformed case files
    results = run_cases(CompiledBundle(bundle), load_cases(bundle))
    failed = [r for r in results if not r.ok]
    decided = {p for r in results if r.ok and r.evaluation for p in r.evaluation
               .determining_policies}
    untested = sorted(p.id for p in bundle.policies if p.id not in decided)
    if as_json:
        print(json.dumps({"version": bundle.version, "passed": len(results) - len(failed),
                          "failed": len(failed), "untestedPolicies": untested,
                          "cases": [r.to_json() for r in results]}, indent=2))
    else:
        table = Table("file", "case", "expected", "got", "ok")
        for r in results:
            table.add_row(r.case.file, r.case.name, r.case.expect.describe(), r.got(),
                          "ok" if r.ok else Text("FAIL", style="red"))
        out.print(table)
        for r in failed:
            where = f"{r.case.file}:{r.case.line}" if r.case.line else r.case.file
            out.print(f"FAIL {where} [case {r.case.name!r}]: " + "; ".join(r.problems))
            for error in r.evaluation.errors if r.evaluation else ():
                out.print(f"  evaluation error: {error}")
        if untested:
            out.print(f"note: no passing case is decided by {', '.join(untested)}")
        out.print(f"{len(results) - len(failed)} passed, {len(failed)} failed "
                  f"(policy version {bundle.version})")
    if not results:
        err.print(f"error: {directory} has no test cases; add [[case]] tables in "
                  "tests/*.toml")
    if failed or not results:
        raise typer.Exit(1)


@app.command()
def replay(
    execution_id: Annotated[str, typer.Argument(metavar="EXECUTION_ID")],
    policy: Annotated[str | None, typer.Option(
        metavar="VERSION", help="What this stored policy version would decide instead "
        "(default: check that the recorded version reproduces the decision).")] = None,
    tenant: TenantOption = "demo",
    data: DataOption = DEFAULT_DATA,
    as_json: JsonOption = False,
) -> None:
    """Re-evaluate a recorded decision with its stored request and facts.

    Exit 0 when the recorded policy version reproduces the decision and reason (or, with
    --policy, when the other version could be evaluated); 1 otherwise, including when the
    stored request or facts no longer match the signed receipt.
    """
    from execguard.replay import ReplayStatus, replay_stored
    store = datadir(data).open_store()
    try:
        result = replay_stored(store, tenant, execution_id, policy)
    finally:
        store.close()
    what_if = result.replayed_version != result.recorded_version
    ok = result.status is ReplayStatus.REPRODUCED or (
        what_if and result.status is ReplayStatus.CHANGED)
    ev = result.evaluation
    if as_json:
        print(json.dumps({
            "executionId": result.execution_id, "surface": result.surface,
            "executionMode": result.mode, "status": result.status.value, "whatIf": what_if,
            "reproduced": result.reproduced, "problem": result.problem, "note": result.note,
            "recorded": {"policyVersion": result.recorded_version,
                         "decision": result.recorded_decision,
                         "reasonCode": result.recorded_reason},
            "replayed": None if ev is None else {
                "policyVersion": result.replayed_version, "decision": ev.outcome.value,
                "reasonCode": ev.reason_code, "reason": ev.reason,
                "determiningPolicies": list(ev.determining_policies),
                "errors": list(ev.errors)}}, indent=2))
    else:
        out.print(f"execution  {result.execution_id} ({result.surface}, {result.mode})")
        out.print(f"recorded   {result.recorded_outcome}  under {result.recorded_version}")
        if ev is not None:
            policies = ", ".join(ev.determining_policies) or "-"
            out.print(f"replayed   {result.replayed_outcome}  under "
                      f"{result.replayed_version}  [{policies}]")
        if result.note:
            out.print(f"note       {result.note}")
        changed = "a different outcome" if what_if else (
            "the same decision by the same policies; the reason code as this release "
            "chooses it" if result.reason_rule_changed else
            "NOT reproduced: the same request and facts now decide differently")
        verdict = {ReplayStatus.REPRODUCED: "the same decision and reason",
                   ReplayStatus.CHANGED: changed}
        text = verdict.get(result.status) or f"{result.status.value.upper()}: {result.problem}"
        out.print(f"verdict    {text}", style=None if ok else "bold red")
    if not ok:
        raise typer.Exit(1)


@policy_app.command("impact")
def policy_impact(
    candidate: Annotated[str, typer.Option(metavar="VERSION",
                                           help="A pushed policy version to try.")],
    since: Annotated[str, typer.Option(help="From (RFC 3339, or 7d/24h/30m ago).")],
    until: Annotated[str | None, typer.Option(help="Until, exclusive.")] = None,
    tenant: TenantOption = "demo",
    data: DataOption = DEFAULT_DATA,
    as_json: JsonOption = False,
) -> None:
    """Replay the recorded decisions of a period under a candidate version; show what changes."""
    from execguard.cli.evidence import _when
    from execguard.replay import ImpactGroup, ImpactReport, impact
    start, end = _when(since, "since"), _when(until, "until")
    store = datadir(data).open_store()
    try:
        report = impact(store, tenant, candidate, start, end)
    finally:
        store.close()
    changes, skipped = ImpactReport.ordered(report.changes), ImpactReport.ordered(report.skipped)
    totals = {"decisions": report.decisions, "replayed": report.unchanged + report.changed,
              "unchanged": report.unchanged, "changed": report.changed,
              "notReplayable": report.not_replayable}
    if as_json:
        def rows(groups: list[ImpactGroup]) -> list[dict[str, object]]:
            return [{"surface": g.surface, "from": g.before, "to": g.after, "count": g.count,
                     "examples": g.examples} for g in groups]
        print(json.dumps({"candidate": report.candidate, "tenant": tenant, "since": start,
                          "until": end, "totals": totals, "changes": rows(changes),
                          "notReplayable": rows(skipped)}, indent=2))
        return
    out.print(f"Decisions of tenant {tenant} from {start} to {end or 'now'} "
              f"under candidate {candidate}")
    if changes:
        table = Table("surface", "from", "to", "count", "examples")
        for g in changes:
            table.add_row(g.surface, g.before, g.after, str(g.count), "\n".join(g.examples))
        out.print(table)
    for g in skipped:
        out.print(f"not replayable ({g.count}, {g.surface}, e.g. {g.examples[0]}): "
                  f"{g.after}")
    out.print(f"decisions {report.decisions}, replayed {totals['replayed']}, unchanged "
              f"{report.unchanged}, changed {report.changed}, not replayable "
              f"{report.not_replayable}")

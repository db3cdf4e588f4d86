"""``execguard approvals`` (for approvers, over HTTP with their own key) and ``webhooks``."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from rich.table import Table

from execguard.cli._common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    TenantOption,
    app,
    datadir,
    out,
    require_tenant,
)
from execguard.protocol.errors import ConfigError

approvals_app = typer.Typer(help="Approve or deny escalated requests (approver keys).",
                            no_args_is_help=True)
webhooks_app = typer.Typer(help="Webhooks for new and resolved approvals.", no_args_is_help=True)
app.add_typer(approvals_app, name="approvals")
app.add_typer(webhooks_app, name="webhooks")

UrlOption = Annotated[str | None, typer.Option(envvar="EXECGUARD_URL", help="Gateway URL.")]
KeyOption = Annotated[str | None, typer.Option(envvar="EXECGUARD_API_KEY",
                                               help="Your API key.")]


def _call(url: str | None, api_key: str | None, method: str, path: str,
          **kwargs: Any) -> Any:
    if not url or not api_key:
        raise ConfigError("give --url and --api-key (or set EXECGUARD_URL and EXECGUARD_API_KEY)")
    try:
        response = httpx.request(method, url.rstrip("/") + path, timeout=10.0,
                                 headers={"Authorization": f"Bearer {api_key}"}, **kwargs)
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach {url}: {exc}") from None
    body = response.json() if response.headers.get("content-type", "").startswith(
        "application/json") else {}
    if response.status_code != 200:
        raise ConfigError(f"{response.status_code} {body.get('error', '')}: "
                          f"{body.get('message', response.text[:200])}")
    return body


@approvals_app.command("list")
def approvals_list(url: UrlOption = None, api_key: KeyOption = None,
                   status: Annotated[str | None, typer.Option(
                       help="pending, approved, denied or expired.")] = "pending",
                   as_json: JsonOption = False) -> None:
    """List approval requests (pending by default)."""
    params = {"status": status} if status else {}
    items = _call(url, api_key, "GET", "/v1/approvals", params=params)["approvals"]
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table("id", "surface", "actor", "group", "votes", "status", "expires")
    for a in items:
        approve = sum(v["vote"] == "APPROVE" for v in a["votes"])
        table.add_row(a["id"], a["surface"], a["actorId"] or "-", a["approvers"],
                      f"{approve}/{a['quorum']}", a["status"], a["expiresAt"])
    out.print(table)


@approvals_app.command("show")
def approvals_show(approval_id: str, url: UrlOption = None, api_key: KeyOption = None,
                   as_json: JsonOption = False) -> None:
    """Show one approval request, its votes and its execution's decision."""
    item = _call(url, api_key, "GET", f"/v1/approvals/{approval_id}")
    if as_json:
        print(json.dumps(item, indent=2))
        return
    for key in ("id", "surface", "actorId", "approvers", "quorum", "status", "decision",
                "expiresAt"):
        out.print(f"{key:<10} {item.get(key)}")
    for v in item["votes"]:
        out.print(f"  {v['vote']:<8} {v['voter'] or '-'}  {v['at']}  {v['comment'] or ''}")


def _vote(choice: str, approval_id: str, comment: str | None, url: str | None,
          api_key: str | None, as_json: bool) -> None:
    result = _call(url, api_key, "POST", f"/v1/approvals/{approval_id}/{choice}",
                   json={"comment": comment} if comment else {})
    if as_json:
        print(json.dumps(result, indent=2))
        return
    approval = result["approval"]
    out.print(f"Recorded {choice} on {approval_id}: now {approval['status']} "
              f"(execution decision {result['decision']})")


@approvals_app.command("approve")
def approvals_approve(approval_id: str, comment: Annotated[str | None, typer.Option()] = None,
                      url: UrlOption = None, api_key: KeyOption = None,
                      as_json: JsonOption = False) -> None:
    """Vote to approve (your key must be an approver of the request's group)."""
    _vote("approve", approval_id, comment, url, api_key, as_json)


@approvals_app.command("deny")
def approvals_deny(approval_id: str, comment: Annotated[str | None, typer.Option()] = None,
                   url: UrlOption = None, api_key: KeyOption = None,
                   as_json: JsonOption = False) -> None:
    """Vote to deny: the request resolves to DENY."""
    _vote("deny", approval_id, comment, url, api_key, as_json)


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Where to POST events.")],
    tenant: TenantOption = "demo",
    secret: Annotated[str | None, typer.Option(help="HMAC secret (default: generated, "
                                               "printed once).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or slack.")] = "json",
    event: Annotated[list[str] | None, typer.Option(
        help="approval.requested and/or approval.resolved (default both).")] = None,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Send the tenant's approval events to URL, signed with HMAC-SHA256."""
    from execguard.ledger import WebhookRecord
    from execguard.server.datadir import now_text
    from execguard.server.webhooks import EVENTS, webhook_host
    _check_webhook_url(url)
    if fmt not in ("json", "slack"):
        raise ConfigError(f"--format {fmt!r} is not json or slack")
    events = tuple(event or EVENTS)
    for name in events:
        if name not in EVENTS:
            raise ConfigError(f"--event {name!r} is not one of {', '.join(EVENTS)}")
    secret = secret or secrets.token_urlsafe(32)
    record = WebhookRecord(f"wh_{uuid.uuid4().hex[:12]}", tenant, url, secret, fmt, events,
                           now_text())
    store = datadir(data).open_store()
    try:
        if not store.tenant_exists(tenant):
            raise ConfigError(f"tenant {tenant!r} does not exist")
        store.add_webhook(record)
    finally:
        store.close()
    out.print(f"Webhook {record.id} for tenant {tenant}: {', '.join(events)} -> "
              f"{webhook_host(url)} ({fmt})")
    print(f"EXECGUARD_WEBHOOK_SECRET={secret}")


@webhooks_app.command("list")
def webhooks_list(tenant: TenantOption = "demo", data: DataOption = DEFAULT_DATA) -> None:
    """List the tenant's webhooks (secrets are not shown)."""
    from execguard.server.webhooks import webhook_host
    store = datadir(data).open_store()
    try:
        require_tenant(store, tenant)
        hooks = store.webhooks(tenant)
    finally:
        store.close()
    table = Table("id", "host", "format", "events")
    for h in hooks:
        table.add_row(h.id, webhook_host(h.url), h.format, ", ".join(h.events))
    out.print(table)


@webhooks_app.command("remove")
def webhooks_remove(webhook_id: str, tenant: TenantOption = "demo",
                    data: DataOption = DEFAULT_DATA) -> None:
    """Stop sending events to a webhook."""
    store = datadir(data).open_store()
    try:
        removed = store.remove_webhook(tenant, webhook_id)
    finally:
        store.close()
    if not removed:
        raise ConfigError(f"tenant {tenant!r} has no webhook {webhook_id!r}")
    out.print(f"Removed webhook {webhook_id}")


def _check_webhook_url(url: str) -> None:
    """Refuse a URL that no delivery could use, now rather than at every event."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port out of range, a bracket left open
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https"):
        raise ConfigError(f"webhook URL {url!r} must start with http:// or https://")
    if not parts.hostname or not port_ok or any(c.isspace() or ord(c) < 32 for c in url):
        raise ConfigError(f"webhook URL {url!r} needs a host (and a port from 1 to 65535, "
                          "if any), and no spaces")

"""Webhooks: approvers hear about new and resolved approvals. They never decide anything.

Deliveries run in background tasks after the fact: a slow or failing receiver
never blocks or unblocks a request, and its failures are retried with
backoff, then logged. Each delivery is signed so the receiver can tell it came
from this gateway and was not replayed:

    X-ExecGuard-Timestamp: <unix seconds>
    X-ExecGuard-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

``format = "slack"`` sends a Slack-compatible ``{"text": ...}`` message instead of
the JSON event (same signature headers).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from execguard.ledger import WebhookRecord

__all__ = ["EVENTS", "Notifier", "sign_payload", "webhook_host"]

log = logging.getLogger("execguard.webhooks")

EVENTS = ("approval.requested", "approval.resolved")
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


def sign_payload(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for a delivery."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _slack_escaped(value: object) -> str:
    """Text as Slack shows it literally: ``<...>`` is Slack's markup for links and
    mentions (``<!channel>``), and the actor id is whatever the requester sent, so an
    approver must never see it turned into a link or a ping (api.slack.com: escaping)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_text(event: str, payload: Mapping[str, Any]) -> str:
    approval = {k: _slack_escaped(v) for k, v in payload.get("approval", {}).items()
                if v is not None}
    who = approval.get("actorId") or "an anonymous actor"
    if event == "approval.requested":
        return (f":raised_hand: {approval.get('surface')} by {who} needs {approval.get('quorum')}"
                f" approval(s) from *{approval.get('approvers')}* "
                f"(id `{approval.get('id')}`, expires {approval.get('expiresAt')}).")
    return (f":white_check_mark: approval `{approval.get('id')}` for {approval.get('surface')} "
            f"resolved: *{approval.get('status')}* -> {_slack_escaped(payload.get('decision'))}.")


class Notifier:
    """Sends events to the tenant's webhooks in the background, with retries."""

    def __init__(self, targets: Any, *, timeout: float = 5.0,
                 delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        #: ``targets(tenant) -> list[WebhookRecord]`` (read when an event happens).
        self._targets = targets
        self._timeout = timeout
        self._delays = delays
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, tenant: str, event: str, payload: Mapping[str, Any]) -> None:
        """Schedule deliveries and return at once; never raises (call it on the event loop)."""
        self._track(self._send(tenant, event, payload))

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, tenant: str, event: str, payload: Mapping[str, Any]) -> None:
        # The targets are read from the database on a thread: a slow or locked database
        # must hold up this event's deliveries only, never the event loop (and with it
        # every request of this gateway, /healthz included).
        try:
            targets = await asyncio.to_thread(self._targets, tenant)
        except Exception as exc:  # a webhook problem must never affect a decision
            log.warning("webhooks of tenant %s unavailable: %s", tenant, exc)
            return
        for target in targets:
            if event in target.events:
                self._track(self._deliver(target, event, payload))

    async def _deliver(self, target: WebhookRecord, event: str,
                       payload: Mapping[str, Any]) -> None:
        document: Any = {"event": event, **payload}
        if target.format == "slack":
            document = {"text": _slack_text(event, payload)}
        body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            for attempt, delay in enumerate((0.0, *self._delays)):
                await asyncio.sleep(delay)
                stamp = str(int(time.time()))
                headers = {"Content-Type": "application/json", "X-ExecGuard-Event": event,
                           "X-ExecGuard-Timestamp": stamp,
                           "X-ExecGuard-Signature": sign_payload(target.secret, stamp, body)}
                try:
                    response = await client.post(target.url, content=body, headers=headers)
                    if response.status_code < 300:
                        return
                    problem = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    said = str(exc).replace(target.url, "<its URL>")
                    problem = f"{exc.__class__.__name__}: {said}" if said else \
                        exc.__class__.__name__
                log.warning("webhook %s to %s failed (attempt %d): %s", event, _where(target),
                            attempt + 1, problem)
        log.error("webhook %s to %s gave up after %d attempts", event, _where(target),
                  len(self._delays) + 1)

    async def drain(self, timeout: float = 5.0) -> None:
        """At shutdown: let deliveries in flight finish for a moment, then give up on them."""
        deadline = time.monotonic() + timeout
        # Again while some remain: an event whose targets were being read starts its
        # deliveries meanwhile.
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._tasks), timeout=left)
        if self._tasks:
            log.warning("stopping: %d webhook deliveries still in flight are dropped",
                        len(self._tasks))
        for task in list(self._tasks):
            task.cancel()


def webhook_host(url: str) -> str:
    """How a webhook is shown (logs, the CLI): by its host, never its URL, whose user
    information, path or query may be a credential (a Slack webhook's path is one)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def _where(target: WebhookRecord) -> str:
    return f"{target.id} (host {webhook_host(target.url)})"

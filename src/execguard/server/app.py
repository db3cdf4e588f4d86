"""The HTTP API (FastAPI). Handlers are thin: read, call the gateway, answer.

``create_app`` receives its collaborators; nothing is a module global, so
tests and several servers in one process each get their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp

from execguard import __version__
from execguard.ledger import GroupCommitter, SQLStore
from execguard.protocol.errors import (
    MalformedRequest,
    PayloadTooLarge,
    ServiceUnavailable,
)
from execguard.protocol.outcome import format_timestamp, parse_timestamp
from execguard.protocol.request import describe
from execguard.server.approvals import Approvals
from execguard.server.decision_process import DecisionProcess, RelayedError
from execguard.server.errors import install_error_handlers, request_id_of
from execguard.server.gateway import Caller, Gateway, SigningKeys, explain_record
from execguard.server.heap import freeze_startup_objects
from execguard.server.logs import RequestLogMiddleware, log_background_failure, note_tenant
from execguard.server.metrics import CONTENT_TYPE, Metrics
from execguard.server.middleware import (
    ExecuteFastPath,
    RequestIdMiddleware,
    refuse_content_coding,
    with_request_id,
)
from execguard.server.openapi import EXECUTE_REQUEST_SCHEMA
from execguard.server.permits import Permits
from execguard.server.readiness import StorageProbe
from execguard.server.settings import Settings
from execguard.server.transparency import Transparency
from execguard.server.webhooks import Notifier

__all__ = ["create_app"]

log = logging.getLogger("execguard.server")

IDEMPOTENCY_PURGE_INTERVAL_SECONDS = 600
APPROVAL_SWEEP_SECONDS = 2.0
#: How long ``/readyz`` reports a failed append when nothing has committed since.
APPEND_FAILURE_READY_SECONDS = 5.0
#: The largest log size or index a query may name: both databases store them as signed
#: 64-bit integers, and a larger one cannot even be asked about.
MAX_LOG_SIZE = 2**63 - 1


def _json(body: dict[str, Any], request: Request, status: int = 200,
          headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")),
                    status_code=status, media_type="application/json", headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading it all."""
    refuse_content_coding(request.headers.get("content-encoding"))
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(limit)
        except ValueError:
            raise MalformedRequest("Content-Length", "a whole number", repr(declared)) from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def refuse_nul_in_url(request: Request) -> None:
    """Refuse a path or query parameter holding U+0000, as body text is refused
    (``parse_json_object``): PostgreSQL cannot even look such text up, and a
    malformed id must not read as a database fault. (``async``: run on the event
    loop, not handed to a worker thread for a few string checks.)"""
    for name, value in [*request.path_params.items(), *request.query_params.multi_items()]:
        if isinstance(value, str) and "\x00" in value:
            raise MalformedRequest(name, "text without NUL (U+0000) characters",
                                   describe(value))


class _ExecGuardApp(FastAPI):
    """FastAPI, with ``POST /execute`` answered in front of all of its layers.

    ``add_middleware`` always sits inside the framework's own error, telemetry and
    body-limit wrappers; the fast path handles its errors and limits itself, so it
    goes in front of them (each costs a call per request for nothing).
    """

    fast_path: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.fast_path is None else self.fast_path(stack)


def create_app(settings: Settings, store: SQLStore, signers: SigningKeys,
               decisions: DecisionProcess, committer: GroupCommitter | None = None) -> FastAPI:
    """Build the ASGI app. The committer's writer thread and the decision process run for
    the app's lifespan: ``POST /execute`` is decided and appended by ``decisions``, every
    other write (consumption, outcomes, approvals) by ``committer``."""
    committer = committer or GroupCommitter(store)
    storage_probe = StorageProbe(store)
    gateway = Gateway(settings, store, signers)
    transparency = Transparency(settings, store, signers)
    permits = Permits(settings, store, committer, signers)
    approvals = Approvals(settings, store, committer, signers, gateway)
    notifier = Notifier(store.webhooks)
    gateway.notify = notifier.notify
    decisions.notify = notifier.notify
    # Operations: metrics (server/metrics.py) and request logs (server/logs.py).
    metrics = Metrics(store)
    committer.on_batch = metrics.observe_batch
    decisions.metrics = metrics
    committer.stalled_elsewhere = decisions.database_stalled
    gateway.on_authenticated = note_tenant

    async def forget_expired_idempotency_keys() -> None:
        # Expired keys are already ignored by lookups; this only keeps the table small.
        while True:
            try:
                await asyncio.to_thread(store.purge_idempotency, time.time())
            except Exception as exc:  # a storage fault must not end the task for good
                log_background_failure(log, "could not purge expired idempotency keys", exc)
            await asyncio.sleep(IDEMPOTENCY_PURGE_INTERVAL_SECONDS)

    async def expire_approvals() -> None:
        while True:
            await asyncio.sleep(APPROVAL_SWEEP_SECONDS)
            try:
                # Asked on a thread first: a database that hangs must not stall the event
                # loop (and every request with it) every sweep, and mostly nothing is due.
                if await asyncio.to_thread(store.due_approvals, approvals.clock()):
                    await approvals.expire_due()
            except Exception as exc:
                log_background_failure(log, "could not expire overdue approvals", exc)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        committer.start()
        await decisions.start()
        freeze_startup_objects()
        background = [asyncio.create_task(forget_expired_idempotency_keys()),
                      asyncio.create_task(transparency.checkpoint_on_schedule(committer)),
                      asyncio.create_task(expire_approvals())]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await notifier.drain()
            # In-flight requests have finished when uvicorn runs this: drain and stop,
            # then checkpoint what was committed last (the decision process its own).
            await decisions.stop()
            committer.stop()
            storage_probe.close()
            await asyncio.to_thread(transparency.checkpoint_grown, committer)

    app = _ExecGuardApp(title="ExecGuard", version=__version__, lifespan=lifespan,
                        description="Execution governance: no PERMIT, no execution.",
                        dependencies=[Depends(refuse_nul_in_url)])
    app.state.gateway = gateway
    app.add_middleware(RequestLogMiddleware, metrics=metrics)  # inside the request id
    app.add_middleware(RequestIdMiddleware)
    # Outermost: POST /execute answered without the framework's layers (middleware.py).
    app.fast_path = partial(ExecuteFastPath, gateway=gateway, decisions=decisions,
                            max_body_bytes=settings.max_body_bytes, metrics=metrics)
    install_error_handlers(app)

    def caller_of(request: Request) -> Caller:
        return gateway.authenticate(request.headers.get("authorization"),
                                    request.headers.get("x-consumer"))

    async def caller_off_loop(request: Request) -> Caller:
        # The asynchronous routes' caller: the store is never read on the event loop.
        return await gateway.authenticate_off_loop(request.headers.get("authorization"),
                                                   request.headers.get("x-consumer"))

    @app.post("/execute", summary="Decide on a proposed action",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": EXECUTE_REQUEST_SCHEMA}}}})
    async def execute(request: Request) -> Response:
        caller = await caller_off_loop(request)
        body = await read_body(request, settings.max_body_bytes)
        try:
            decided = await decisions.decide(caller, body, request.headers.get("idempotency-key"))
        except RelayedError as exc:
            return _json({**exc.body, "request_id": request_id_of(request)}, request,
                         exc.status, exc.headers)
        return Response(with_request_id(decided.answer, request_id_of(request) or ""),
                        media_type="application/json")

    @app.get("/.well-known/trigguard/keys.json", summary="Published signing keys")
    def keys_document(request: Request) -> Response:
        return _json(gateway.keys_document(), request,
                     headers={"Cache-Control": "public, max-age=300"})

    @app.get("/verify/{execution_id}", summary="Explain one decision")
    def verify(execution_id: str, request: Request) -> Response:
        return _json(gateway.explain(caller_of(request), execution_id), request)

    @app.get("/v1/executions/{execution_id}", summary="One decision and its outcome")
    def execution(execution_id: str, request: Request) -> Response:
        return _json(gateway.explain(caller_of(request), execution_id), request)

    @app.get("/v1/audit", summary="Recorded decisions, newest first")
    def audit(request: Request, execution_id: str | None = None,
              surface: str | None = None, actor: str | None = None,
              since: str | None = None,
              limit: int = Query(100, ge=1, le=1000)) -> Response:
        caller = caller_of(request)
        since_text = None
        if since is not None:
            try:
                since_text = format_timestamp(parse_timestamp(since))
            except ValueError:
                raise MalformedRequest("since", "an RFC 3339 timestamp such as "
                                       "2026-11-26T00:00:00Z", repr(since)) from None
        records = store.query_executions(caller.tenant, execution_id=execution_id,
                                         surface=surface, actor_id=actor, since=since_text,
                                         limit=limit)
        return _json({"entries": [explain_record(r) for r in records]}, request)

    @app.post("/v1/coach", summary="Dry run: what would be decided (no receipt)")
    async def coach(request: Request) -> Response:
        caller = await caller_off_loop(request)
        body = await read_body(request, settings.max_body_bytes)
        return _json(await asyncio.to_thread(gateway.coach, caller, body), request)

    @app.post("/executions/{execution_id}/outcome", summary="Report how an execution ended")
    async def outcome(execution_id: str, request: Request) -> Response:
        caller = await caller_off_loop(request)
        body = await read_body(request, settings.max_body_bytes)
        return _json(await permits.record_outcome(caller, execution_id, body), request)

    @app.post("/v1/permits/{execution_id}/consume",
              summary="Use a permit, once, for the request it was issued for")
    async def consume(execution_id: str, request: Request) -> Response:
        caller = await caller_off_loop(request)
        body = await read_body(request, settings.max_body_bytes)
        return _json(await permits.consume(caller, execution_id, body), request)

    @app.get("/v1/approvals", summary="Approval requests, newest first")
    async def list_approvals(request: Request, status: str | None = Query(
            None, pattern="^(pending|approved|denied|expired)$"),
            limit: int = Query(100, ge=1, le=1000)) -> Response:
        caller = await caller_off_loop(request)
        return _json(await approvals.list(caller, status, limit), request)

    @app.get("/v1/approvals/{execution_id}", summary="One approval request and its votes")
    async def show_approval(execution_id: str, request: Request) -> Response:
        caller = await caller_off_loop(request)
        return _json(await approvals.show(caller, execution_id), request)

    @app.post("/v1/approvals/{execution_id}/approve", summary="Vote to approve (approvers)")
    async def approve(execution_id: str, request: Request) -> Response:
        caller = await caller_off_loop(request)
        body = await read_body(request, settings.max_body_bytes)
        return _json(await approvals.vote(caller, execution_id, "approve", body), request)

    @app.post("/v1/approvals/{execution_id}/deny", summary="Vote to deny (approvers)")
    async def deny(execution_id: str, request: Request) -> Response:
        caller = await caller_off_loop(request)
        body = await read_body(request, settings.max_body_bytes)
        return _json(await approvals.vote(caller, execution_id, "deny", body), request)

    @app.get("/v1/surfaces/{surface}", summary="A surface as the active policy registers it")
    def surface(surface: str, request: Request) -> Response:
        return _json(gateway.surface(caller_of(request), surface), request)

    @app.get("/v1/log/checkpoint", summary="The latest signed checkpoint of the tenant's log")
    def log_checkpoint(request: Request) -> Response:
        return _json(transparency.checkpoint(caller_of(request).tenant), request)

    @app.get("/v1/log/checkpoints", summary="Stored checkpoints, smallest first")
    def log_checkpoints(request: Request, min_size: int = Query(0, ge=0, le=MAX_LOG_SIZE),
                        limit: int = Query(1000, ge=1, le=10000)) -> Response:
        return _json(transparency.checkpoints(caller_of(request).tenant, min_size, limit),
                     request)

    @app.get("/v1/log/proof/inclusion", summary="RFC 9162 inclusion proof")
    def log_inclusion(request: Request, index: int = Query(..., ge=0, le=MAX_LOG_SIZE),
                      size: int | None = Query(None, ge=1, le=MAX_LOG_SIZE)) -> Response:
        return _json(transparency.inclusion(caller_of(request).tenant, index, size), request)

    @app.get("/v1/log/proof/consistency", summary="RFC 9162 consistency proof")
    def log_consistency(request: Request,
                        from_: int = Query(..., alias="from", ge=1, le=MAX_LOG_SIZE),
                        to: int | None = Query(None, ge=1, le=MAX_LOG_SIZE)) -> Response:
        return _json(transparency.consistency(caller_of(request).tenant, from_, to), request)

    @app.get("/v1/log/entries", summary="Log entries start <= index < end, with receipts")
    def log_entries(request: Request, start: int = Query(..., ge=0, le=MAX_LOG_SIZE),
                    end: int = Query(..., ge=1, le=MAX_LOG_SIZE)) -> Response:
        return _json(transparency.entries(caller_of(request).tenant, start, end), request)

    @app.get("/v1/receipts/{execution_id}/bundle",
             summary="Receipt + inclusion proof + checkpoint: verifiable offline")
    def receipt_bundle(execution_id: str, request: Request) -> Response:
        return _json(transparency.bundle(caller_of(request).tenant, execution_id), request)

    @app.get("/metrics", summary="Prometheus metrics (no API key: counts only)")
    def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz", summary="Liveness")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="Readiness: can decisions be issued durably?")
    async def readyz(request: Request) -> Response:
        # Async, and the checks that touch the database run off the event loop, at once:
        # a database that hangs cannot hold up other requests, nor the probe for long.
        failed_at = max((t for t in (committer.last_failure_at, decisions.last_failure_at)
                         if t is not None), default=None)
        keys, storage, worker = await asyncio.gather(
            _signing_key_problem(signers), storage_probe.problem(stale_before=failed_at),
            decisions.storage_problem() if decisions.running else _nothing())
        problems = [] if keys is None else [keys]
        if not committer.running:
            problems.append("ledger writer not running")
        if not decisions.running:
            problems.append("the decision process is not running (starting or restarting)")
        stalled = committer.stalled_for()
        if stalled > committer.commit_timeout:
            problems.append(f"the database is not responding: a write to the log has been "
                            f"waiting for {stalled:.0f} s")
        silent = decisions.stalled_for()
        if silent > decisions.answer_timeout:
            problems.append(f"the decision process has not answered for {silent:.0f} s")
        failing = (committer.failing(within=APPEND_FAILURE_READY_SECONDS)
                   or decisions.failing(within=APPEND_FAILURE_READY_SECONDS))
        if failing is not None:
            problems.append(f"the last write to the log failed: {failing}")
        if worker is not None and worker not in problems:
            problems.append(f"the decision process cannot write to the log: {worker}")
        if storage is not None and storage not in problems and storage != failing:
            problems.append(storage)
        if problems:
            return _json({"status": "unavailable", "problems": problems}, request, 503)
        return _json({"status": "ready"}, request)

    return app


#: How long ``/readyz`` waits for the signing key's check (it reads the database).
KEY_CHECK_SECONDS = 2.0


async def _signing_key_problem(signers: SigningKeys) -> str | None:
    """Why no key can sign now, or None; read on a thread (a database that hangs holds it,
    not the event loop), waited for at most KEY_CHECK_SECONDS."""
    try:
        await asyncio.wait_for(asyncio.to_thread(signers.current), KEY_CHECK_SECONDS)
    except ServiceUnavailable as exc:
        return str(exc)
    except TimeoutError:
        return (f"the signing key could not be checked within {KEY_CHECK_SECONDS:g} s: "
                "the database is not answering")
    return None


async def _nothing() -> None:
    return None

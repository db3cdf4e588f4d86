"""Pure-ASGI middleware: request ids, and ``POST /execute`` served without the framework.

``RequestIdMiddleware`` gives every request an id and echoes it back.

``ExecuteFastPath`` answers ``POST /execute`` itself. The route stays declared in
FastAPI (its schema is in the OpenAPI document, and it still answers if this
layer is absent), but under load the framework's layers (routing, dependency
solving, six middleware wrappers of ``send``, reading the response back for the
logs) cost several times the HTTP parsing itself. This layer does the same
work once: request id, API key, the body, the decision (asked of the decision
process: ``decision_process.py``, which parses strictly, decides and appends),
the access and decision log lines, the metrics, and errors in the one error
shape (``server/errors.py``). Nothing is answered before the decision is
durable (the decision process answers only after its group commit).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from execguard.protocol.errors import ExecGuardError, MalformedRequest, PayloadTooLarge
from execguard.server.decision_process import Decided, RelayedError
from execguard.server.errors import error_parts, execguard_error_parts
from execguard.server.logs import begin_request, log_access, log_decision, request_id_var

if TYPE_CHECKING:
    from execguard.server.decision_process import DecisionProcess
    from execguard.server.gateway import Gateway
    from execguard.server.metrics import Metrics

__all__ = ["ExecuteFastPath", "RequestIdMiddleware", "new_request_id", "refuse_content_coding",
           "with_request_id"]

log = logging.getLogger("execguard.server")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}\Z")


def new_request_id() -> str:
    """32 random hex digits (the shape of ``uuid4().hex``, without building a UUID)."""
    return os.urandom(16).hex()


def _request_id(incoming: bytes | None) -> str:
    """A caller's short, plain ``X-Request-Id`` (followed across services), else a new one."""
    if incoming:
        text = incoming.decode("latin-1")
        if _SAFE_ID.match(text):
            return text
    return new_request_id()


class RequestIdMiddleware:
    """Sets ``request.state.request_id`` and the ``X-Request-Id`` response header.

    A caller-supplied ``X-Request-Id`` is kept when it is short and plain, so
    ids can be followed across services; otherwise a fresh one is made.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = value
                break
        request_id = _request_id(incoming)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        request_id_var.set(request_id)  # for log lines (each request runs in its own task)
        header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message["headers"] = [*headers, header]
            await send(message)

        await self.app(scope, receive, send_with_id)


class _Disconnected(Exception):
    """The client went away before its body arrived: nothing was decided."""


#: The request headers the fast path reads; everything else is ignored.
_WANTED = frozenset({b"authorization", b"x-consumer", b"idempotency-key", b"content-length",
                     b"x-request-id", b"content-encoding"})
#: A header sent twice is read once (the first); for this one the two could disagree on
#: which request a retry repeats, so two different values are refused.
_SINGLE_VALUED = b"idempotency-key"


class ExecuteFastPath:
    """``POST /execute`` answered straight from ASGI (see the module doc); the rest passes on.

    Installed outermost, so the request-id and request-log middleware never see
    these requests: this layer gives the id, logs the access and decision lines
    and feeds the metrics itself, exactly as they would have.
    """

    def __init__(self, app: ASGIApp, *, gateway: Gateway, decisions: DecisionProcess,
                 max_body_bytes: int, metrics: Metrics | None = None) -> None:
        self.app = app
        self.gateway = gateway
        self.decisions = decisions
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/execute" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers: dict[bytes, bytes] = {}
        ambiguous = False
        for name, value in scope["headers"]:
            if name in _WANTED and headers.setdefault(name, value) != value:
                ambiguous = ambiguous or name == _SINGLE_VALUED
        request_id = _request_id(headers.get(b"x-request-id"))
        begin_request(request_id)
        status, error_code, decided = 500, None, None
        try:
            try:
                decided = await self._decide(headers, receive, ambiguous)
                status, content, extra = 200, with_request_id(decided.answer, request_id), {}
            except RelayedError as exc:
                status, body, extra = exc.status, {**exc.body, "request_id": request_id}, \
                    exc.headers
                error_code = exc.code
                content = orjson.dumps(body)
            except ExecGuardError as exc:
                status, body, extra = execguard_error_parts(request_id, exc)
                error_code = exc.code
                content = orjson.dumps(body)
            except _Disconnected:
                status = 499  # no answer can reach the client; logged as nginx does
                return
            except Exception:
                log.exception("unexpected error; answering 500 (no decision was issued)")
                error_code = "internal_error"
                body, extra = error_parts(request_id, 500, error_code,
                                          "an unexpected error occurred; no decision was issued")
                content = orjson.dumps(body)
            raw_headers = [(b"content-type", b"application/json"),
                           (b"content-length", str(len(content)).encode("ascii")),
                           *((k.lower().encode("latin-1"), v.encode("latin-1"))
                             for k, v in extra.items() if k != "X-Request-Id"),
                           (b"x-request-id", request_id.encode("ascii"))]
            await send({"type": "http.response.start", "status": status,
                        "headers": raw_headers})
            await send({"type": "http.response.body", "body": content})
        finally:
            seconds = time.perf_counter() - started
            if decided is not None and status == 200:
                log_decision(decided.log_fields)
            if self.metrics is not None:
                self.metrics.observe_request("POST", "/execute", status, seconds, error_code)
            log_access("POST", "/execute", status, seconds)

    async def _decide(self, headers: dict[bytes, bytes], receive: Receive,
                      ambiguous_key: bool) -> Decided:
        caller = await self.gateway.authenticate_off_loop(
            _text(headers.get(b"authorization")), _text(headers.get(b"x-consumer")))
        if ambiguous_key:
            raise MalformedRequest("Idempotency-Key", "one Idempotency-Key header",
                                   "several with different values")
        refuse_content_coding(_text(headers.get(b"content-encoding")))
        body = await self._read_body(headers.get(b"content-length"), receive)
        return await self.decisions.decide(caller, body,
                                           _text(headers.get(b"idempotency-key")))

    async def _read_body(self, declared: bytes | None, receive: Receive) -> bytes:
        """The body, refusing more than the limit without reading it all (as ``read_body``)."""
        limit = self.max_body_bytes
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                raise MalformedRequest("Content-Length", "a whole number",
                                       repr(declared.decode("latin-1"))) from None
            if too_large:
                raise PayloadTooLarge(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def refuse_content_coding(coding: str | None) -> None:
    """The body is read as sent: a compressed one (``Content-Encoding: gzip``) was
    refused only as "not UTF-8", and a mislabelled one decided as if unlabelled."""
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        raise MalformedRequest("Content-Encoding", "no content coding (send the JSON body "
                               "uncompressed)", repr(coding))


def with_request_id(answer: bytes, request_id: str) -> bytes:
    """The worker's answer (a JSON object, orjson bytes) with ``request_id`` as its last
    member, exactly as ``orjson.dumps({**answer, "request_id": request_id})`` would
    write it: no parsing and re-encoding. ``request_id`` needs no escaping (``_SAFE_ID``
    or hex digits)."""
    return b"%s,\"request_id\":\"%s\"}" % (answer[:-1], request_id.encode("ascii"))


def _text(value: bytes | None) -> str | None:
    # Starlette decodes header values as latin-1; the same here, so answers do not change.
    return None if value is None else value.decode("latin-1")

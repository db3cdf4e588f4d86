"""The HTTP execution proxy: an enforcement point in front of an upstream API.

    app = create_proxy_app(load_proxy_config(Path("proxy.toml")))   # any ASGI server

Agents call the proxy instead of the upstream (a payments or deploy API). For a
request on a configured route the proxy builds the execution request from it
(surface, actor, context), then either asks the gateway for a decision with its
own API key or checks the permit the caller presents in ``X-Execution-Token``,
and forwards the request, with credentials the agent never sees, only after the
gateway durably recorded the permit's single use. Anything else (another
decision, a refused or mismatched permit, a gateway error or timeout) is a 403
and the upstream is never called. Unknown routes are 404: it is not an open relay.

The rules are the gate's (:mod:`execguard.gate._core`); this module only adds
:func:`check_presented_token`, the check of a permit a caller brings along, and
the HTTP plumbing. ``/proxy/execute`` serves ``trigguard-litellm``'s protected
mode, deciding with each caller's own key. See docs/PROXY.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Generator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from execguard.gate._core import (
    ExecutionBlocked,
    Permit,
    PreparedRequest,
    expected_request_hash,
    prepare,
)
from execguard.gate.client import AsyncGate, _Answer, _Call, _GateBase
from execguard.gate.proxy_config import (
    ProxyConfig,
    RouteConfig,
    Source,
    load_proxy_config,
    parse_proxy_config,
)
from execguard.protocol.errors import MalformedRequest, VerificationError
from execguard.protocol.request import parse_json_object
from execguard.verify import KeySet, VerifiedToken, verify_execution_token

__all__ = [
    "EXECUTION_ID_HEADER",
    "TOKEN_HEADER",
    "ProxyConfig",
    "check_presented_token",
    "create_proxy_app",
    "load_proxy_config",
    "parse_proxy_config",
]

log = logging.getLogger("execguard.proxy")

TOKEN_HEADER = "x-execution-token"
EXECUTION_ID_HEADER = "X-Execution-Id"
#: RFC 9110 §7.6.1 connection-specific fields, never forwarded in either direction.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
#: Headers that ask many frameworks to run another method than the request line's: the
#: gateway decided on the request line's, so the upstream must run that one.
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-method-override", "x-http-method"})
#: Caller headers the upstream never sees (its credentials come from the configuration).
_NOT_FORWARDED = HOP_BY_HOP | METHOD_OVERRIDES | {"host", "content-length", "authorization",
                                                  TOKEN_HEADER}
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_CALLER_GATES = 1024
_MISSING = object()


# -- the one rule this module adds ---------------------------------------------------------

def check_presented_token(token: str, prepared: PreparedRequest, keys: KeySet, *, now: float,
                          sensitive: frozenset[str] | None) -> tuple[VerifiedToken, str]:
    """Check a permit a caller presents for the request about to run; return it and the hash.

    The token must verify offline under the pinned keys (signature, algorithm,
    validity window, ``aud`` equal to the request's surface), and the request,
    normalized under the token's tenant and the surface's sensitive fields, must
    hash to the token's ``request_hash`` (not checked when ``sensitive`` is None: the
    hash returned is then ""). Consuming it is the caller's next step (the gateway
    checks the hash and single use again). Raises :class:`ExecutionBlocked`; the
    decision is PERMIT once the token is genuine.
    """
    try:
        verified = verify_execution_token(token, keys, now=now, surface=prepared.request.surface)
    except VerificationError as exc:
        raise ExecutionBlocked(f"the execution token does not verify: {exc}") from exc
    if sensitive is None:
        return verified, ""
    expected = expected_request_hash(verified, prepared, sensitive)
    if verified.claims["request_hash"] != expected:
        raise ExecutionBlocked("the permit is for a different request than the one about to run",
                               decision="PERMIT", execution_id=verified.execution_id)
    return verified, expected


def _key_id(token: str) -> str | None:
    """The ``kid`` a token names (unverified: only to pick the keys document to fetch)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    return kid if isinstance(kid, str) else None


# -- the gate, on a shared HTTP client ------------------------------------------------------

#: Per proxied request: the gateway's latest ``request_id``, for the caller's 403.
_TRACE: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("execguard_proxy_trace")


class _ProxyGate(AsyncGate):
    """An :class:`AsyncGate` for one API key, sending on the proxy's shared gateway client.

    Its caches (keys, surfaces) are per key, so one tenant's registry never hashes
    another tenant's requests.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, api_key: str, *, timeout: float,
                 keys: KeySet | None) -> None:
        # The base's configuration and caches; the HTTP client is the proxy's, shared.
        _GateBase.__init__(self, url, api_key, timeout=timeout, keys=keys)
        self._client = client

    async def _send(self, call: _Call) -> _Answer:
        headers = {**self._headers, **(call.headers or {})}
        status, answer = await super()._send(replace(call, headers=headers))
        trace = _TRACE.get(None)
        if trace is not None and isinstance(answer, Mapping) and \
                isinstance(answer.get("request_id"), str):
            trace["request_id"] = answer["request_id"]
        return status, answer

    @property
    def authority(self) -> str | None:
        """The authority of the keys document this gate verifies with (pinned or fetched)."""
        keys = self._pinned or (self._keys[1] if self._keys is not None else None)
        return keys.authority if keys is not None else None

    def _redeem_flow(self, token: str,
                     prepared: PreparedRequest) -> Generator[_Call, _Answer, Permit]:
        keys = yield from self._keys_flow(_key_id(token))
        verified, _ = check_presented_token(token, prepared, keys, now=self.clock(),
                                            sensitive=None)
        sensitive = yield from self._permit_sensitive_flow(verified, prepared)
        verified, expected = check_presented_token(token, prepared, keys, now=self.clock(),
                                                   sensitive=sensitive)
        execution_id = verified.execution_id
        consume_receipt = yield from self._consume_flow(execution_id, expected, keys)
        return Permit(execution_id=execution_id, surface=prepared.request.surface,
                      request_hash=expected, token=token, claims=verified.claims,
                      decision={"decision": "PERMIT", "execution_id": execution_id,
                                "surface": prepared.request.surface, "execution_token": token},
                      consume_receipt=consume_receipt)

    async def redeem(self, token: str, prepared: PreparedRequest) -> Permit:
        """Verify a presented permit for ``prepared`` and consume it; or raise ExecutionBlocked."""
        return await self._drive(self._redeem_flow(token, prepared))


# -- reading a request ----------------------------------------------------------------------

class _BadRequest(Exception):
    """The HTTP request cannot be turned into an execution request (answered 400)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        self.status, self.error, self.message = status, error, message
        super().__init__(message)


def _match(route: RouteConfig, segments: list[str]) -> dict[str, str] | None:
    if len(segments) != len(route.segments):
        return None
    params: dict[str, str] = {}
    names = iter(route.params)
    for template, segment in zip(route.segments, segments, strict=True):
        if template is None:
            params[next(names)] = segment
        elif template != segment:
            return None
    return params


def _idempotency_header(request: Request) -> str | None:
    """The caller's Idempotency-Key; sent twice with different values it is refused, as
    the gateway refuses it: which request would a retry repeat?"""
    values = set(request.headers.getlist("idempotency-key"))
    if len(values) > 1:
        raise _BadRequest(400, "malformed_request", "Idempotency-Key: expected one "
                          "Idempotency-Key header, got several with different values")
    return next(iter(values), None)


def _raw_path(request: Request) -> bytes:
    """The path as the caller sent it (percent-encoding intact), without the query."""
    raw = request.scope.get("raw_path") or request.url.path.encode("utf-8")
    return bytes(raw).partition(b"?")[0]


def _segments(raw_path: str) -> list[str] | None:
    """The decoded segments of a path, or None when a segment could mean two things: the
    upstream might read it differently from the route (and the policy).

    An encoded ``/`` and a backslash (Windows servers read it as ``/``), a dot segment,
    an empty segment (``//`` is collapsed by some servers), a ``;`` (servlet containers
    cut a segment there: ``name;jsessionid=1`` is ``name`` to them), a NUL.
    """
    if not raw_path.startswith("/"):
        return None
    decoded = [unquote(s, errors="strict") for s in raw_path[1:].split("/")] \
        if raw_path != "/" else []
    for segment in decoded:
        if not segment or segment in (".", "..") or any(c in segment for c in "/\\;\0"):
            return None
    return decoded


@dataclass
class _Incoming:
    request: Request
    body: bytes
    params: Mapping[str, str]
    _json: Any = _MISSING
    _query: dict[str, list[str]] | None = None

    def value(self, source: Source) -> Any:
        """The value a source names, or ``_MISSING`` when the request does not carry it."""
        if source.kind == "const":
            return source.arg
        if source.kind == "path":
            return self.params[source.arg]
        if source.kind == "query":
            if self._query is None:
                self._query = parse_qs(self.request.url.query, keep_blank_values=True)
            return self._single(self._query.get(source.arg, []), f"query parameter "
                                f"{source.arg!r}")
        if source.kind == "header":
            return self._single(self.request.headers.getlist(source.arg), f"header "
                                f"{source.arg!r}")
        value = self.json()
        for part in source.arg:
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return _MISSING
        return value

    @staticmethod
    def _single(values: list[str], what: str) -> Any:
        if len(values) > 1:  # two readers could pick different ones: refuse to guess
            raise _BadRequest(400, "ambiguous_request", f"the {what} is sent more than once")
        return values[0] if values else _MISSING

    def json(self) -> Any:
        if self._json is _MISSING:
            try:
                self._json = parse_json_object(self.body)
            except MalformedRequest as exc:
                raise _BadRequest(400, "malformed_request", f"the request body: {exc}") from None
        return self._json

    def values(self, sources: Mapping[str, Source]) -> dict[str, Any]:
        found = {name: self.value(source) for name, source in sources.items()}
        return {name: value for name, value in found.items() if value is not _MISSING}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(413, "payload_too_large", f"the body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(413, "payload_too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _connection_listed(headers: list[tuple[bytes, bytes]]) -> set[str]:
    listed: set[str] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(v.strip().lower() for v in value.decode("latin-1").split(","))
    return listed


def _forward_headers(raw: list[tuple[bytes, bytes]],
                     credentials: Mapping[str, str]) -> list[tuple[str, str]]:
    """The caller's headers minus hop-by-hop and credentials, plus the upstream's credentials.

    A forwarded value must be ASCII: bytes beyond it are text in an unknown encoding,
    which the proxy (latin-1) and the upstream (often UTF-8) would read differently, and
    httpx cannot send them. Raises :class:`_BadRequest` naming the header.
    """
    dropped = _NOT_FORWARDED | _connection_listed(raw) | {k.lower() for k in credentials}
    headers: list[tuple[str, str]] = []
    for name, value in raw:
        if name.decode("latin-1").lower() in dropped:
            continue
        if not value.isascii():
            raise _BadRequest(400, "malformed_request", f"the header {name.decode('latin-1')!r}"
                              " holds bytes that are not ASCII; the proxy forwards only ASCII "
                              "header values")
        headers.append((name.decode("latin-1"), value.decode("ascii")))
    if not any(k.lower() == "accept-encoding" for k, _ in headers):
        # No compression the caller did not ask for: the body is relayed (and hashed) as is.
        headers.append(("Accept-Encoding", "identity"))
    headers.extend(credentials.items())
    return headers


def _response_headers(raw: list[tuple[bytes, bytes]],
                      execution_id: str) -> list[tuple[bytes, bytes]]:
    dropped = HOP_BY_HOP | _connection_listed(raw) | {EXECUTION_ID_HEADER.lower()}
    kept = [(k.lower(), v) for k, v in raw if k.decode("latin-1").lower() not in dropped]
    return [*kept, (EXECUTION_ID_HEADER.lower().encode(), execution_id.encode("latin-1"))]


# -- answers --------------------------------------------------------------------------------

def _blocked(exc: ExecutionBlocked) -> dict[str, Any]:
    body: dict[str, Any] = {"error": "execution_blocked", "decision": exc.decision,
                            "reason": exc.reason, "reasonCode": exc.reason_code,
                            "executionId": exc.execution_id}
    request_id = _TRACE.get({}).get("request_id")
    if request_id:
        body["request_id"] = request_id
    return body


def _id_header(execution_id: str | None) -> dict[str, str]:
    return {EXECUTION_ID_HEADER: execution_id} if execution_id else {}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _UpstreamFailure(Exception):
    """A permitted request got no answer; ``sent``: whether the upstream may have received it."""

    def __init__(self, cause: Exception, *, sent: bool) -> None:
        super().__init__(str(cause))
        self.cause, self.sent = cause, sent


class _SendTrace:
    """httpcore's ``trace`` extension, noting when the request starts going out.

    Before that, nothing of it reached the upstream, whatever the error; after it,
    the upstream may have received it all and acted.
    """

    def __init__(self) -> None:
        self.sending = False

    async def __call__(self, event: str, _info: Mapping[str, Any]) -> None:
        if event.endswith(".send_request_headers.started"):
            self.sending = True


class _Proxy:
    """The proxy's state: configuration, HTTP clients, gates and background reports."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.gateway: httpx.AsyncClient | None = None
        self.upstream: httpx.AsyncClient | None = None
        self.gate: _ProxyGate | None = None
        self._caller_gates: OrderedDict[str, _ProxyGate] = OrderedDict()
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        gw, up = self.config.gateway, self.config.upstream
        self.gateway = httpx.AsyncClient(base_url=gw.url, timeout=gw.timeout_seconds)
        self.upstream = httpx.AsyncClient(timeout=up.timeout_seconds, follow_redirects=False)
        if gw.api_key:
            self.gate = self._new_gate(gw.api_key)
        try:
            yield
        finally:
            if self._background:
                await asyncio.wait(self._background, timeout=gw.timeout_seconds)
            await self.gateway.aclose()
            await self.upstream.aclose()

    def _new_gate(self, api_key: str) -> _ProxyGate:
        assert self.gateway is not None
        gw = self.config.gateway
        return _ProxyGate(self.gateway, gw.url, api_key, timeout=gw.timeout_seconds,
                          keys=gw.keys)

    def _caller_gate(self, api_key: str) -> _ProxyGate:
        """A gate deciding with the caller's own key (its tenant), its caches kept a while."""
        name = hashlib.sha256(api_key.encode("utf-8")).hexdigest()
        gate = self._caller_gates.get(name)
        if gate is None:
            gate = self._caller_gates[name] = self._new_gate(api_key)
            while len(self._caller_gates) > _CALLER_GATES:
                self._caller_gates.popitem(last=False)
        self._caller_gates.move_to_end(name)
        return gate

    def _later(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``work`` in a task of its own: not cancelled when a caller goes away."""
        async def run() -> None:
            await work
        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- the permit ------------------------------------------------------------------------

    async def _permit(self, work: Awaitable[Permit]) -> Permit:
        """Wait for a consumed permit, within the gateway timeout; anything else blocks."""
        timeout = self.config.gateway.timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                return await work
        except ExecutionBlocked:
            raise
        except TimeoutError:
            raise ExecutionBlocked(f"the gateway did not answer within {timeout:g} s") from None
        except Exception as exc:  # fail closed on anything unforeseen
            log.exception("permit check failed")
            raise ExecutionBlocked(f"the permit could not be checked ({type(exc).__name__})") \
                from exc

    # -- routes ----------------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        raw_path = _raw_path(request)
        try:
            segments = _segments(raw_path.decode("ascii"))
        except (UnicodeDecodeError, UnicodeError):
            segments = None
        route = params = None
        for candidate in self.config.routes if segments is not None else ():
            params = _match(candidate, segments) if candidate.method == request.method else None
            if params is not None:
                route = candidate
                break
        if route is None or params is None:
            return JSONResponse({"error": "no_route", "message": f"{request.method} "
                                 f"{request.url.path} is not a governed route of this proxy"},
                                404)
        _TRACE.set({})
        try:
            body = await _read_body(request, self.config.upstream.max_body_bytes)
            incoming = _Incoming(request, body, params)
            context = incoming.values(route.context)
            signals = incoming.values(route.signals)
            actor = incoming.value(route.actor) if route.actor else _MISSING
            # Built now, while the permit is whole: a request that cannot be sent is refused
            # before it uses one up.
            outgoing = self._outgoing(request, body)
            idempotency_key = _idempotency_header(request)
        except _BadRequest as exc:
            return JSONResponse({"error": exc.error, "message": exc.message}, exc.status)
        token = request.headers.get(TOKEN_HEADER)
        request_fields: dict[str, Any] = {
            "actor": None if actor is _MISSING else actor, "action": route.action,
            "signals": signals or None, "idempotency_key": idempotency_key}
        assert self.gate is not None
        try:
            if token is not None:
                prepared = prepare(route.surface, context, **request_fields)
                permit = await self._permit(self.gate.redeem(token.strip(), prepared))
            else:
                permit = await self._permit(self.gate.acquire(route.surface, context,
                                                              **request_fields))
        except ExecutionBlocked as exc:
            log.info("blocked %s %s: %s", request.method, request.url.path, exc)
            return JSONResponse(_blocked(exc), 403, headers=_id_header(exc.execution_id))
        return await self._forward(outgoing, permit)

    def _outgoing(self, request: Request, body: bytes) -> httpx.Request:
        """The request the upstream gets: the caller's path, query and body as received,
        its headers as :func:`_forward_headers` makes them. Raises :class:`_BadRequest`."""
        assert self.upstream is not None
        upstream = self.config.upstream
        query = (request.scope.get("query_string") or b"").decode("latin-1")
        url = upstream.url + _raw_path(request).decode("ascii") + (f"?{query}" if query else "")
        headers = _forward_headers(request.headers.raw, upstream.headers)
        try:
            return self.upstream.build_request(request.method, url, content=body,
                                               headers=headers)
        except httpx.InvalidURL as exc:
            raise _BadRequest(400, "malformed_request",
                              f"the request's URL cannot be forwarded: {exc}") from None

    async def _send(self, outgoing: httpx.Request, *, stream: bool) -> httpx.Response:
        """Send a permitted request; any failure is an :class:`_UpstreamFailure` saying
        whether the upstream may have received it."""
        assert self.upstream is not None
        trace = _SendTrace()
        outgoing.extensions["trace"] = trace
        try:
            return await self.upstream.send(outgoing, stream=stream)
        except Exception as exc:  # foreseen (httpx) or not, it is answered, never a traceback
            if not isinstance(exc, httpx.HTTPError):
                log.exception("sending to the upstream failed unexpectedly")
            raise _UpstreamFailure(exc, sent=trace.sending) from exc

    def _upstream_failed(self, gate: _ProxyGate, permit: Permit, failure: _UpstreamFailure,
                         started: float) -> tuple[dict[str, Any], int]:
        """The answer (and status) for a permitted request the upstream did not answer.

        Never sent (refused connection, connect timeout, unknown host): the outcome is
        FAILURE, which frees the permit's share of the limits. Sent, then no complete
        answer (a read timeout, a dropped connection): the action may have run, and a
        FAILURE would let the limits count it as not spent, so no outcome is recorded.
        """
        execution_id, cause = permit.execution_id, type(failure.cause).__name__
        if not failure.sent:
            self._later(gate.report(permit, False, int((time.monotonic() - started) * 1000)))
            log.warning("upstream not reached for %s: %s", execution_id, failure.cause)
            return {"error": "upstream_unavailable",
                    "message": f"the upstream could not be reached ({cause}); the request "
                               "was not sent",
                    "executionId": execution_id}, 502
        log.warning("upstream gave no answer for %s, which may have run: %s (no outcome "
                    "recorded)", execution_id, failure.cause)
        timed_out = isinstance(failure.cause, httpx.TimeoutException)
        what = "did not answer in time" if timed_out else "gave no complete answer"
        return {"error": "upstream_result_unknown",
                "message": f"the request was sent, but the upstream {what} ({cause}): it may "
                           "have been executed; no outcome is recorded",
                "executionId": execution_id}, 504 if timed_out else 502

    async def _forward(self, outgoing: httpx.Request, permit: Permit) -> Response:
        assert self.gate is not None
        gate = self.gate
        started = time.monotonic()
        try:
            response = await self._send(outgoing, stream=True)
        except _UpstreamFailure as failure:
            answer, status = self._upstream_failed(gate, permit, failure, started)
            return JSONResponse(answer, status, headers=_id_header(permit.execution_id))
        relay = _Relay(self, gate, permit, response, started)
        answer = _RelayResponse(relay, status_code=response.status_code)
        answer.raw_headers = _response_headers(response.headers.raw, permit.execution_id)
        return answer

    # -- /proxy/execute ----------------------------------------------------------------------

    async def litellm(self, request: Request) -> Response:
        """``trigguard-litellm``'s protected path: decide with the caller's key, then forward."""
        lite = self.config.litellm
        assert lite is not None and self.upstream is not None
        _TRACE.set({})
        scheme, _, api_key = request.headers.get("authorization", "").partition(" ")
        api_key = api_key.strip()
        if scheme.lower() != "bearer" or not api_key:
            return JSONResponse({"permitted": False, "error": "unauthorized",
                                 "message": "send Authorization: Bearer <ExecGuard API key>"},
                                401)
        try:
            body = parse_json_object(await _read_body(request,
                                                      self.config.upstream.max_body_bytes))
            context = body.get("context")
            if context is None:  # absent or null: no context
                context = {}
            if not isinstance(context, dict):
                raise MalformedRequest("context", "a JSON object", type(context).__name__)
        except _BadRequest as exc:
            return JSONResponse({"permitted": False, "error": exc.error,
                                 "message": exc.message}, exc.status)
        except MalformedRequest as exc:
            return JSONResponse({"permitted": False, "error": "malformed_request",
                                 "message": str(exc)}, 400)
        # Built now, while the permit is whole (the configuration's URL and headers).
        outgoing = self.upstream.build_request(
            "POST", self.config.upstream.url + lite.upstream_path, json=body.get("payload"),
            headers={"Content-Type": "application/json", "Accept-Encoding": "identity",
                     **self.config.upstream.headers})
        surface = context.get("surface") or lite.surface
        try:
            header_key = _idempotency_header(request)
        except _BadRequest as exc:
            return JSONResponse({"permitted": False, "error": exc.error,
                                 "message": exc.message}, exc.status)
        context_key = context.get("idempotencyKey")
        try:
            if not isinstance(surface, str) or surface not in lite.allowed_surfaces:
                raise ExecutionBlocked(f"surface {surface!r} is not served by this proxy's "
                                       "/proxy/execute")
            if header_key and context_key and header_key != context_key:
                raise ExecutionBlocked("the Idempotency-Key header and context.idempotencyKey "
                                       "differ")
            gate = self._caller_gate(api_key)
            permit = await self._permit(gate.acquire(
                surface, {k: v for k, v in context.items()
                          if k not in ("surface", "actorId", "idempotencyKey")},
                actor=context.get("actorId") or None, action=body.get("action") or None,
                idempotency_key=header_key or context_key or None))
        except ExecutionBlocked as exc:
            log.info("blocked /proxy/execute on %s: %s", surface, exc)
            return JSONResponse({**_blocked(exc), "permitted": False}, 403,
                                headers=_id_header(exc.execution_id))
        started = time.monotonic()
        try:
            forwarded = await self._send(outgoing, stream=False)
        except _UpstreamFailure as failure:
            answer, status = self._upstream_failed(gate, permit, failure, started)
            return JSONResponse({"permitted": True, **answer}, status,
                                headers=_id_header(permit.execution_id))
        latency = int((time.monotonic() - started) * 1000)
        await gate.report(permit, forwarded.is_success, latency, _digest(forwarded.content))
        try:
            forward_body: Any = forwarded.json()
        except ValueError:
            forward_body = forwarded.text
        return JSONResponse({"permitted": True,
                             "forward": {"status": forwarded.status_code, "body": forward_body},
                             "executionId": permit.execution_id,
                             "authority": gate.authority or permit.claims.get("iss")},
                            headers=_id_header(permit.execution_id))


class _Relay:
    """One upstream response on its way to the caller, and the outcome it makes.

    A task of its own reads the upstream body to its end, hashing it, whether or
    not the caller keeps reading, then records the outcome: SUCCESS for a 2xx
    status, else FAILURE, with ``resultDigest`` over the whole body. The action
    ran, so its outcome never depends on the caller's connection. The caller's
    response drains a small queue; an upstream that breaks off mid-body breaks
    off the caller's response too.
    """

    def __init__(self, proxy: _Proxy, gate: _ProxyGate, permit: Permit,
                 response: httpx.Response, started: float) -> None:
        self.gate, self.permit, self.response, self.started = gate, permit, response, started
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=8)
        self.abandoned = False
        self.task = proxy._later(self._pump())

    async def _pump(self) -> None:
        digest = hashlib.sha256()
        complete = False
        try:
            async for chunk in self.response.aiter_raw():
                digest.update(chunk)
                if not self.abandoned:
                    await self.queue.put(chunk)
            complete = True
        except httpx.HTTPError as exc:
            log.warning("upstream body of %s broke off: %s", self.permit.execution_id, exc)
        finally:
            await self.response.aclose()
        if not self.abandoned:
            await self.queue.put(None if complete else
                                 ConnectionError("the upstream body broke off"))
        latency = int((time.monotonic() - self.started) * 1000)
        await self.gate.report(self.permit, self.response.is_success, latency,
                               "sha256:" + digest.hexdigest() if complete else None)

    def abandon(self) -> None:
        """The caller is done (or gone): stop queueing; the pump still reads and reports."""
        self.abandoned = True
        while not self.queue.empty():
            self.queue.get_nowait()

    async def body(self) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.abandon()


class _RelayResponse(StreamingResponse):
    """A streamed upstream response that lets its relay go even if it never starts."""

    def __init__(self, relay: _Relay, status_code: int) -> None:
        super().__init__(relay.body(), status_code=status_code)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.relay.abandon()


async def _healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_proxy_app(config: ProxyConfig) -> Starlette:
    """The proxy as an ASGI app: ``/healthz``, the configured routes, and ``/proxy/execute``
    when ``[litellm]`` is configured. Every other request is 404 and never forwarded."""
    proxy = _Proxy(config)
    routes = [Route("/healthz", _healthz, methods=["GET"])]
    if config.litellm is not None:
        routes.append(Route("/proxy/execute", proxy.litellm, methods=["POST"]))
    routes.append(Route("/{path:path}", proxy.dispatch, methods=_METHODS))
    app = Starlette(routes=routes, lifespan=proxy.lifespan)
    app.state.proxy = proxy
    return app

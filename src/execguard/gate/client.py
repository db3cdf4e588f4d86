"""The gate clients: ``Gate`` (sync) and ``AsyncGate``, on httpx.

The steps of acquiring a permit are written once, as a generator that yields
HTTP calls and receives their answers (httpx's ``auth_flow`` idea); each client
only drives it with its own I/O. See :mod:`execguard.gate._core` for the rules.

    gate = Gate("http://127.0.0.1:8080", api_key)

    @gate.guard(surface="payment.execute",
                context=lambda invoice: {"amount": invoice.total, "currency": "EUR",
                                         "beneficiary": invoice.payee})
    def pay(invoice): ...

    with gate.authorize(surface="deploy.release", context={...}) as permit:
        deploy()
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from execguard.gate._core import (
    ExecutionBlocked,
    Permit,
    PreparedRequest,
    check_consumption,
    check_decision,
    check_gateway_url,
    check_timeout,
    digest_result,
    expected_request_hash,
    prepare,
)
from execguard.protocol.errors import ConfigError, VerificationError
from execguard.verify import KeySet, VerifiedToken

__all__ = ["DEFAULT_TIMEOUT", "AsyncGate", "Gate"]

log = logging.getLogger("execguard.gate")

DEFAULT_TIMEOUT = 5.0
KEYS_TTL_SECONDS = 300.0
SURFACE_TTL_SECONDS = 60.0

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    body: Any = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class _Sleep:
    seconds: float


_Answer = tuple[int, Any]
_Flow = Generator[Any, Any, Any]


class _GateBase:
    """Configuration, caches and the I/O-free flows shared by both clients."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, keys: KeySet | Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        where = "url=" if url else "EXECGUARD_URL"
        url = url or os.environ.get("EXECGUARD_URL") or ""
        self.api_key = api_key or os.environ.get("EXECGUARD_API_KEY") or ""
        if not url:
            raise ConfigError("no gateway URL: pass url= or set EXECGUARD_URL")
        if not self.api_key:
            raise ConfigError("no API key: pass api_key= or set EXECGUARD_API_KEY")
        if not (self.api_key.isascii() and self.api_key.isprintable()):
            # It travels in a header: anything else could not be sent (a pasted key with
            # a newline or a typographic character is a configuration error, said so).
            raise ConfigError("the API key is not printable ASCII: check api_key= or "
                              "EXECGUARD_API_KEY")
        try:
            self.url = check_gateway_url(url)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        self.timeout = check_timeout(timeout)
        self.clock = clock
        self._pinned = keys if isinstance(keys, KeySet) else (
            KeySet.from_document(keys) if keys is not None else None)
        self._keys: tuple[float, KeySet] | None = None
        self._surfaces: dict[str, tuple[float, frozenset[str]]] = {}

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}

    # -- flows (no I/O) ----------------------------------------------------------------

    def _keys_flow(self, needed_key: str | None) -> Generator[_Call, _Answer, KeySet]:
        if self._pinned is not None:
            return self._pinned
        now = self.clock()
        if self._keys is not None and now - self._keys[0] < KEYS_TTL_SECONDS:
            cached = self._keys[1]
            if needed_key is None or needed_key in cached.keys:
                return cached
        status, document = yield _Call("GET", "/.well-known/trigguard/keys.json")
        if status != 200:
            raise ExecutionBlocked(f"the gateway's keys are unavailable (HTTP {status})")
        try:
            keyset = KeySet.from_document(document)
        except VerificationError as exc:
            raise ExecutionBlocked(f"the gateway's keys document is invalid: {exc}") from exc
        self._keys = (now, keyset)
        return keyset

    def _sensitive_flow(self, surface: str,
                        refresh: bool = False) -> Generator[_Call, _Answer, frozenset[str]]:
        now = self.clock()
        cached = self._surfaces.get(surface)
        if not refresh and cached is not None and now - cached[0] < SURFACE_TTL_SECONDS:
            return cached[1]
        status, answer = yield _Call("GET", f"/v1/surfaces/{surface}")
        sensitive = answer.get("sensitive") if isinstance(answer, Mapping) else None
        if status != 200 or not isinstance(sensitive, list) or \
                not all(isinstance(s, str) for s in sensitive):
            raise ExecutionBlocked(f"surface {surface!r} could not be looked up (HTTP {status})")
        fields = frozenset(sensitive)
        self._surfaces[surface] = (now, fields)
        return fields

    def _acquire_flow(self, prepared: PreparedRequest,
                      wait_for_approval: float = 0.0) -> Generator[Any, Any, Permit]:
        key = prepared.idempotency_key
        # The body carries the key too; a header carries printable ASCII only (PROTOCOL.md).
        execute = _Call("POST", "/execute", prepared.body,
                        {"Idempotency-Key": key} if key.isascii() and key.isprintable() else {})
        status, answer = yield execute
        if wait_for_approval > 0 and status == 200 and isinstance(answer, Mapping) \
                and answer.get("decision") == "ESCALATE" and answer.get("approval"):
            # Re-sending the same request with the same key returns its current state:
            # the resolution once the approvers have voted (or the escalation expired).
            deadline = time.monotonic() + wait_for_approval
            delay = 0.25
            while answer.get("decision") == "ESCALATE" and time.monotonic() < deadline:
                yield _Sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 5.0)
                status, answer = yield execute
                if status != 200 or not isinstance(answer, Mapping):
                    break
        if status != 200:
            message = answer.get("message") if isinstance(answer, Mapping) else None
            raise ExecutionBlocked(f"the gateway gave no decision (HTTP {status}"
                                   f"{': ' + str(message) if message else ''})")
        keys = yield from self._keys_flow(_signing_key_id(answer))
        verified, _ = check_decision(answer, prepared, keys, now=self.clock(), sensitive=None)
        sensitive = yield from self._permit_sensitive_flow(verified, prepared)
        verified, expected = check_decision(answer, prepared, keys, now=self.clock(),
                                            sensitive=sensitive)
        execution_id = verified.execution_id
        consume_receipt = yield from self._consume_flow(execution_id, expected, keys)
        return Permit(execution_id=execution_id, surface=prepared.request.surface,
                      request_hash=expected, token=answer["execution_token"],
                      claims=verified.claims, decision=answer, consume_receipt=consume_receipt)

    def _permit_sensitive_flow(self, verified: VerifiedToken, prepared: PreparedRequest
                               ) -> Generator[_Call, _Answer, frozenset[str]]:
        """The surface's sensitive fields, as the permit's request hash was computed with."""
        sensitive = yield from self._sensitive_flow(prepared.request.surface)
        if expected_request_hash(verified, prepared, sensitive) != verified.claims["request_hash"]:
            # A new policy may have marked other fields sensitive since they were cached:
            # look again rather than refuse every permit until the cache expires.
            sensitive = yield from self._sensitive_flow(prepared.request.surface, refresh=True)
        return sensitive

    def _consume_flow(self, execution_id: str, expected: str,
                      keys: KeySet) -> Generator[_Call, _Answer, Mapping[str, Any]]:
        """Consume the permit; its verified consume receipt, or ExecutionBlocked."""
        status, consumed = yield _Call("POST", f"/v1/permits/{quote(execution_id, safe='')}"
                                       "/consume", {"requestHash": expected})
        if status == 200:
            # A rotation between the decision and the consumption (or replicas that pick it
            # up a moment apart) signs the consume receipt with a key the cached document
            # does not have yet: look again rather than throw away a consumed permit.
            keys = yield from self._keys_flow(_signing_key_id(consumed))
        return check_consumption(consumed, status, keys, execution_id)

    @staticmethod
    def _outcome_call(permit: Permit, ok: bool, latency_ms: int,
                      result_digest: str | None) -> _Call:
        body: dict[str, Any] = {"result": "SUCCESS" if ok else "FAILURE",
                                "latencyMs": max(0, latency_ms)}
        if result_digest is not None:
            body["resultDigest"] = result_digest
        return _Call("POST", f"/executions/{permit.execution_id}/outcome", body)

    @staticmethod
    def _answer(response: httpx.Response) -> _Answer:
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    @staticmethod
    def _unreachable(exc: Exception) -> ExecutionBlocked:
        if isinstance(exc, httpx.TimeoutException):
            return ExecutionBlocked("the gateway did not answer in time "
                                    f"({exc.__class__.__name__})")
        return ExecutionBlocked(f"the gateway could not be reached: {exc}")


def _signing_key_id(answer: Any) -> str | None:
    """The ``authorityKeyId`` of the answer's receipt, if it names one."""
    receipt = answer.get("receipt") if isinstance(answer, Mapping) else None
    key_id = receipt.get("authorityKeyId") if isinstance(receipt, Mapping) else None
    return key_id if isinstance(key_id, str) else None


def _context_of(spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return spec(*args, **kwargs) if callable(spec) else spec


class Gate(_GateBase):
    """The synchronous gate. Every method that could run an action fails closed."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, keys: KeySet | Mapping[str, Any] | None = None,
                 transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(url, api_key, timeout=timeout, keys=keys, clock=clock)
        self._client = httpx.Client(base_url=self.url, headers=self._headers,
                                    timeout=self.timeout, transport=transport)

    def _send(self, call: _Call) -> _Answer:
        try:
            response = self._client.request(call.method, call.path, json=call.body,
                                            headers=call.headers)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(response)

    def _drive(self, flow: _Flow) -> Any:
        try:
            step = next(flow)
            while True:
                if isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                else:
                    step = flow.send(self._send(step))
        except StopIteration as done:
            return done.value

    def _within_timeout(self, work: Callable[[], T], extra: float = 0.0) -> T:
        """Run ``work`` (calls to the gateway) to its end within ``timeout`` seconds, or block.

        httpx's timeout bounds each socket operation, not a whole answer: a gateway that
        trickles its answer a byte at a time would hold the caller forever. The work runs in
        a daemon thread that is abandoned when the deadline passes; whatever it still
        obtains is never used.
        """
        done: list[tuple[bool, Any]] = []
        context = contextvars.copy_context()

        def run() -> None:
            try:
                done.append((True, context.run(work)))
            except BaseException as exc:
                done.append((False, exc))

        worker = threading.Thread(target=run, name="execguard-gate", daemon=True)
        worker.start()
        worker.join(self.timeout + extra)
        if not done:
            raise ExecutionBlocked("the gateway did not answer within "
                                   f"{self.timeout + extra:g} s")
        ok, value = done[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def acquire(self, surface: str, context: Mapping[str, Any] | None = None, *,
                wait_for_approval: float = 0.0, **request: Any) -> Permit:
        """Decide, verify and consume within ``timeout`` seconds: return a permit, or raise
        :class:`ExecutionBlocked`.

        ``wait_for_approval``: on ESCALATE, wait up to this many more seconds for the
        approvers; an approved request then runs, anything else blocks.
        """
        flow = self._acquire_flow(prepare(surface, context, **request), wait_for_approval)
        return self._within_timeout(  # type: ignore[no-any-return]
            lambda: self._drive(flow), extra=wait_for_approval)

    def report(self, permit: Permit, ok: bool, latency_ms: int,
               result_digest: str | None = None) -> Mapping[str, Any] | None:
        """Record the outcome (best effort: the action already ran; a failure is logged)."""
        call = self._outcome_call(permit, ok, latency_ms, result_digest)
        try:
            status, answer = self._within_timeout(lambda: self._send(call))
        except ExecutionBlocked as exc:
            log.warning("outcome of %s not recorded: %s", permit.execution_id, exc)
            return None
        if status != 200:
            log.warning("outcome of %s not recorded: HTTP %s", permit.execution_id, status)
            return None
        return answer.get("receipt") if isinstance(answer, Mapping) else None

    @contextmanager
    def authorize(self, surface: str, context: Mapping[str, Any] | None = None,
                  **request: Any) -> Iterator[Permit]:
        """``with gate.authorize(...) as permit:`` runs the block only with a consumed permit."""
        permit = self.acquire(surface, context, **request)
        started = time.monotonic()
        try:
            yield permit
        except BaseException:
            self.report(permit, False, int((time.monotonic() - started) * 1000))
            raise
        self.report(permit, True, int((time.monotonic() - started) * 1000),
                    permit.extra.get("result_digest"))

    def guard(self, surface: str, context: Any = None, **request: Any) -> Callable[[F], F]:
        """Decorate a function so it runs only after PERMIT + consume; outcomes are recorded.

        ``context``, ``actor`` and ``idempotency_key`` may be values or callables that
        receive the function's arguments.
        """
        def decorate(function: F) -> F:
            if inspect.iscoroutinefunction(function):
                raise ConfigError(f"{function.__qualname__} is async: use AsyncGate.guard")

            @functools.wraps(function)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                resolved = {k: _context_of(v, args, kwargs) for k, v in request.items()}
                with self.authorize(surface, _context_of(context, args, kwargs),
                                    **resolved) as permit:
                    result = function(*args, **kwargs)
                    permit.extra["result_digest"] = digest_result(result)
                return result
            return guarded  # type: ignore[return-value]
        return decorate

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncGate(_GateBase):
    """The asyncio gate: the same rules, awaited."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, keys: KeySet | Mapping[str, Any] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(url, api_key, timeout=timeout, keys=keys, clock=clock)
        self._client = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                         timeout=self.timeout, transport=transport)

    async def _send(self, call: _Call) -> _Answer:
        try:
            response = await self._client.request(call.method, call.path, json=call.body,
                                                  headers=call.headers)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(response)

    async def _drive(self, flow: _Flow) -> Any:
        try:
            step = next(flow)
            while True:
                if isinstance(step, _Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                else:
                    step = flow.send(await self._send(step))
        except StopIteration as done:
            return done.value

    async def _within_timeout(self, work: Awaitable[T], extra: float = 0.0) -> T:
        """Await ``work`` within ``timeout`` seconds in all (see ``Gate._within_timeout``)."""
        try:
            async with asyncio.timeout(self.timeout + extra):
                return await work
        except TimeoutError:
            raise ExecutionBlocked("the gateway did not answer within "
                                   f"{self.timeout + extra:g} s") from None

    async def acquire(self, surface: str, context: Mapping[str, Any] | None = None, *,
                      wait_for_approval: float = 0.0, **request: Any) -> Permit:
        """Decide, verify and consume within ``timeout`` seconds: return a permit, or raise
        :class:`ExecutionBlocked`.

        ``wait_for_approval``: on ESCALATE, wait up to this many more seconds for the
        approvers; an approved request then runs, anything else blocks.
        """
        flow = self._acquire_flow(prepare(surface, context, **request), wait_for_approval)
        return await self._within_timeout(  # type: ignore[no-any-return]
            self._drive(flow), extra=wait_for_approval)

    async def report(self, permit: Permit, ok: bool, latency_ms: int,
                     result_digest: str | None = None) -> Mapping[str, Any] | None:
        """Record the outcome (best effort: the action already ran; a failure is logged)."""
        call = self._outcome_call(permit, ok, latency_ms, result_digest)
        try:
            status, answer = await self._within_timeout(self._send(call))
        except ExecutionBlocked as exc:
            log.warning("outcome of %s not recorded: %s", permit.execution_id, exc)
            return None
        if status != 200:
            log.warning("outcome of %s not recorded: HTTP %s", permit.execution_id, status)
            return None
        return answer.get("receipt") if isinstance(answer, Mapping) else None

    @asynccontextmanager
    async def authorize(self, surface: str, context: Mapping[str, Any] | None = None,
                        **request: Any) -> AsyncIterator[Permit]:
        """``async with gate.authorize(...) as permit:``: the block runs only with a permit."""
        permit = await self.acquire(surface, context, **request)
        started = time.monotonic()
        try:
            yield permit
        except BaseException:
            await self.report(permit, False, int((time.monotonic() - started) * 1000))
            raise
        await self.report(permit, True, int((time.monotonic() - started) * 1000),
                          permit.extra.get("result_digest"))

    def guard(self, surface: str, context: Any = None, **request: Any) -> Callable[[F], F]:
        """Decorate an ``async def`` so it runs only after PERMIT + consume."""
        def decorate(function: F) -> F:
            if not inspect.iscoroutinefunction(function):
                raise ConfigError(f"{function.__qualname__} is not async: use Gate.guard")

            @functools.wraps(function)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                resolved = {k: _context_of(v, args, kwargs) for k, v in request.items()}
                async with self.authorize(surface, _context_of(context, args, kwargs),
                                          **resolved) as permit:
                    result = await function(*args, **kwargs)
                    permit.extra["result_digest"] = digest_result(result)
                return result
            return guarded  # type: ignore[return-value]
        return decorate

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def __aenter__(self) -> AsyncGate:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

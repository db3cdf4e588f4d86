"""The gate's sans-I/O core: building requests, checking answers, deciding "blocked".

Both clients (sync and async) only move bytes; every rule about what may run
lives here, once. The rule is simple: an action runs only after a PERMIT whose
token verifies offline under the pinned keys, for exactly the request about to
run, and whose single use the gateway has durably recorded. Anything else —
another decision, an error, a timeout, a malformed or forged answer — is
:class:`ExecutionBlocked`. There is no switch to fail open.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from execguard.protocol.canonical import canonical_json, canonical_sha256
from execguard.protocol.errors import (
    CanonicalizationError,
    ConfigError,
    ExecGuardError,
    MalformedRequest,
    VerificationError,
)
from execguard.protocol.request import (
    ExecutionRequest,
    normalized_request,
    parse_execution_request,
    request_hash,
)
from execguard.verify import KeySet, VerifiedToken, verify_execution_token, verify_receipt

__all__ = [
    "ExecutionBlocked",
    "Permit",
    "PreparedRequest",
    "check_base_url",
    "check_consumption",
    "check_decision",
    "check_gateway_url",
    "check_timeout",
    "digest_result",
    "expected_request_hash",
    "prepare",
]


class ExecutionBlocked(ExecGuardError):
    """The action did not run: there was no valid, consumed permit for it.

    ``decision`` is the gateway's decision when there was one (DENY, ESCALATE,
    SILENCE, or PERMIT when the permit itself was refused); ``reason`` says why.
    """

    code = "execution_blocked"

    def __init__(self, reason: str, *, decision: str | None = None,
                 reason_code: str | None = None, execution_id: str | None = None) -> None:
        self.decision = decision
        self.reason = reason
        self.reason_code = reason_code
        self.execution_id = execution_id
        head = f"{decision}: " if decision else ""
        tail = f" (execution {execution_id})" if execution_id else ""
        super().__init__(f"blocked: {head}{reason}{tail}")


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, its wire body and its idempotency key."""

    request: ExecutionRequest
    body: dict[str, Any]
    idempotency_key: str


@dataclass(frozen=True)
class Permit:
    """A consumed permit: the action it names may now run, once."""

    execution_id: str
    surface: str
    request_hash: str
    token: str
    claims: Mapping[str, Any]
    decision: Mapping[str, Any]
    consume_receipt: Mapping[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def receipt(self) -> Mapping[str, Any]:
        """The decision's signed receipt."""
        return self.decision["receipt"]  # type: ignore[no-any-return]


def check_timeout(seconds: float) -> float:
    """``seconds`` if it is a usable timeout: a positive, finite number. Else ConfigError.

    An infinite (or NaN) deadline is no deadline: a hung peer would hold the caller forever.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"timeout must be a positive, finite number of seconds, "
                          f"got {seconds!r}")
    return float(seconds)


def check_base_url(url: str) -> str:
    """``url`` without a trailing ``/`` if a client can send to it: http(s), a host, a port
    in 1-65535, no query or fragment. Else ConfigError saying why.

    Checked with the parser that will send to it (httpx's), so a URL accepted here is
    never refused later, when a request is already on its way.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"{url!r} is not a URL: {exc}") from None
    problem = None
    if parsed.scheme not in ("http", "https"):
        problem = "it is not http:// or https://"
    elif not parsed.host:
        problem = "it names no host"
    elif parsed.port is not None and not 0 < parsed.port < 65536:
        problem = f"port {parsed.port} is not within 1-65535"
    elif parsed.query or parsed.fragment:
        problem = "it has a query or fragment"
    if problem is not None:
        raise ConfigError(f"{url!r} is not a usable base URL: {problem}")
    return url.rstrip("/")


def check_gateway_url(url: str) -> str:
    """:func:`check_base_url` for the gateway, which takes no ``user:password``: a client
    would send it as Basic credentials instead of the API key, and every call would be
    refused (and the password sent to the gateway with each)."""
    checked = check_base_url(url)
    parsed = httpx.URL(url)
    if parsed.userinfo:
        raise ConfigError(f"the gateway URL for {parsed.host!r} holds a user name or "
                          "password: remove it (the gateway is reached with an API key)")
    return checked


def prepare(surface: str, context: Mapping[str, Any] | None = None, *,
            actor: str | None = None, action: str | None = None,
            signals: Mapping[str, Any] | None = None, subject_digest: str | None = None,
            idempotency_key: str | None = None) -> PreparedRequest:
    """Build and validate the request exactly as the gateway will read it.

    Without an explicit key, the idempotency key is derived from the request's
    content: calling again with the same arguments (a retry after a lost
    answer) gets the same decision and the same, already used, permit — never
    a second execution. Pass a key (an invoice number, a run id) to make
    identical requests distinct on purpose.
    """
    body: dict[str, Any] = {"surface": surface, "context": dict(context or {}),
                            "signals": dict(signals or {})}
    for key, value in (("actorId", actor), ("action", action),
                       ("subjectDigest", subject_digest)):
        if value is not None:
            body[key] = value
    try:
        derived = "gate-" + canonical_sha256(body)[:40]
    except CanonicalizationError as exc:
        raise ExecutionBlocked(f"the request cannot be represented exactly: {exc}") from exc
    body["idempotencyKey"] = idempotency_key or derived
    try:
        request = parse_execution_request(json.dumps(body, allow_nan=False).encode("utf-8"))
    except (MalformedRequest, ValueError) as exc:
        raise ExecutionBlocked(f"the request is malformed: {exc}") from exc
    return PreparedRequest(request, body, body["idempotencyKey"])


def _field(answer: Mapping[str, Any], name: str, kind: type) -> Any:
    value = answer.get(name)
    if not isinstance(value, kind):
        raise ExecutionBlocked(f"the gateway's answer is malformed: {name!r} is missing or not "
                               f"a {kind.__name__}")
    return value


def check_decision(answer: Any, prepared: PreparedRequest, keys: KeySet, *, now: float,
                   sensitive: frozenset[str] | None) -> tuple[VerifiedToken, str]:
    """Check a ``/execute`` answer; return the verified token and the expected request hash.

    1. the answer is a decision object with a signed receipt;
    2. the decision is PERMIT (anything else blocks, with its reason);
    3. the receipt verifies under the pinned keys and names the same execution;
    4. the execution token verifies offline (signature, algorithm, expiry, surface);
    5. the request about to run, under the token's tenant and the surface's sensitive
       fields, hashes to the token's request hash (and the receipt's).

    ``sensitive`` may be None on a first call: the caller then looks the surface
    up and calls again (its tenant comes from the verified token).
    """
    # 1. shape
    if not isinstance(answer, Mapping):
        raise ExecutionBlocked("the gateway's answer is not a JSON object")
    decision = _field(answer, "decision", str).upper()
    execution_id = answer.get("execution_id")
    # 2. the decision
    if decision != "PERMIT":
        raise ExecutionBlocked(str(answer.get("reason") or "no permit was issued"),
                               decision=decision, reason_code=answer.get("reasonCode"),
                               execution_id=execution_id if isinstance(execution_id, str)
                               else None)
    execution_id = _field(answer, "execution_id", str)
    receipt = _field(answer, "receipt", Mapping)
    token = _field(answer, "execution_token", str)
    blocked = _blocker(decision, execution_id)
    # 3. the receipt
    try:
        verify_receipt(receipt, keys)
    except VerificationError as exc:
        raise blocked(f"the decision receipt does not verify: {exc}") from exc
    if receipt.get("executionId") != execution_id or receipt.get("decision") != "PERMIT":
        raise blocked("the receipt is for another execution or decision")
    # 4. the token
    surface = prepared.request.surface
    try:
        verified = verify_execution_token(token, keys, now=now, surface=surface)
    except VerificationError as exc:
        raise blocked(f"the execution token does not verify: {exc}") from exc
    if verified.execution_id != execution_id:
        raise blocked("the execution token is for another execution")
    # 5. the request
    if sensitive is None:
        return verified, ""
    expected = expected_request_hash(verified, prepared, sensitive)
    if verified.claims["request_hash"] != expected or receipt.get("requestHash") != expected:
        raise blocked("the permit is for a different request than the one about to run")
    return verified, expected


def expected_request_hash(verified: VerifiedToken, prepared: PreparedRequest,
                          sensitive: frozenset[str]) -> str:
    """The hash of the request about to run, under the token's tenant and these sensitive
    fields: what the permit's ``request_hash`` must be."""
    return request_hash(normalized_request(str(verified.claims["tenant"]), prepared.request,
                                           sensitive))


def check_consumption(answer: Any, status: int, keys: KeySet, execution_id: str,
                      decision: str = "PERMIT") -> Mapping[str, Any]:
    """Check the answer to a consume call; return the consume receipt or block."""
    blocked = _blocker(decision, execution_id)
    if status != 200:
        reason = answer.get("message") if isinstance(answer, Mapping) else None
        code = answer.get("refusalReason") if isinstance(answer, Mapping) else None
        raise ExecutionBlocked(f"the permit was refused: {code or f'HTTP {status}'}"
                               + (f" ({reason})" if reason and not code else ""),
                               decision=decision, reason_code=code, execution_id=execution_id)
    receipt = answer.get("receipt") if isinstance(answer, Mapping) else None
    if not isinstance(receipt, Mapping):
        raise blocked("the consume answer has no receipt")
    try:
        verify_receipt(receipt, keys)
    except VerificationError as exc:
        raise blocked(f"the consume receipt does not verify: {exc}") from exc
    if receipt.get("receiptType") != "consume" or receipt.get("consumeResult") != "CONSUMED" \
            or receipt.get("executionId") != execution_id:
        raise blocked("the consume receipt does not record this permit as consumed")
    return receipt


def _blocker(decision: str, execution_id: str) -> Any:
    def blocked(reason: str) -> ExecutionBlocked:
        return ExecutionBlocked(reason, decision=decision, execution_id=execution_id)
    return blocked


def digest_result(value: Any) -> str:
    """``sha256:`` + hex of the result's canonical JSON (or of its ``repr`` if it has none)."""
    # Called after the action ran: it must not fail, or a success would be reported as a
    # failure and the caller would get an exception instead of the result.
    try:
        data = canonical_json(value)
    except (CanonicalizationError, TypeError, ValueError, RecursionError):
        try:
            data = repr(value).encode("utf-8", errors="replace")
        except Exception:  # a broken __repr__
            data = f"<{type(value).__qualname__} without a repr>".encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()

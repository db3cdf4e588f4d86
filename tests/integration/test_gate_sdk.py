"""The gate SDK against a real gateway: an action runs once with a consumed permit, or never.

Every guarded function here calls a real upstream HTTP service (``Upstream``) that counts
what it receives: "the action did not run" means that service saw nothing. Misbehaving
gateways are real loopback servers too (``FakeGateway``, ``BlackHole``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from execguard.arbiter import demo_bundle_path
from execguard.gate import AsyncGate, ExecutionBlocked, Gate, digest_result, prepare
from execguard.gate._core import check_consumption, check_decision
from execguard.protocol.errors import ConfigError
from execguard.protocol.request import normalized_request, request_hash
from execguard.verify import KeySet, verify_receipt
from tests.conftest import Gateway, free_port, run_cli
from tests.integration.gate_fixtures import (
    BlackHole,
    FakeGateway,
    Raw,
    Trickler,
    Upstream,
    keys_document,
    permit_header,
)

KEYS = "/.well-known/trigguard/keys.json"
SANCTIONED = "Blackwater Lagoon Trading (fictional)"
#: "Blocked within the timeout": Gate(timeout=0.5) must give up well inside this.
BLOCKED_WITHIN_S = 5.0


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    service = Upstream()
    yield service
    service.stop()


@pytest.fixture
def tag() -> str:
    """Unique per test: actors and beneficiaries carry it, so derived idempotency keys never
    collide with another test's on the shared gateway."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def fake() -> Iterator[FakeGateway]:
    gateway = FakeGateway()
    yield gateway
    gateway.stop()


def payment(amount: Any, to: str, invoice: str | None = None) -> dict[str, Any]:
    return {"amount": amount, "currency": "EUR", "beneficiary": to}


def guarded_payer(gate: Gate, upstream: Upstream, actor: str,
                  **guard: Any) -> Callable[..., dict[str, Any]]:
    """``pay(amount, to, invoice=None)``: POST /payments upstream, only through the gate."""
    @gate.guard(surface="payment.execute", context=payment, actor=actor, **guard)
    def pay(amount: Any, to: str, invoice: str | None = None) -> dict[str, Any]:
        response = httpx.post(f"{upstream.url}/payments", timeout=10,
                              json={"amount": amount, "to": to, "invoice": invoice})
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]
    return pay


def executions_of(gateway: Gateway, actor: str) -> list[dict[str, Any]]:
    """The gateway's records of this actor's decisions, newest first."""
    with gateway.client() as client:
        answer = client.get("/v1/audit", params={"actor": actor, "limit": 100})
    assert answer.status_code == 200, answer.text
    return answer.json()["entries"]  # type: ignore[no-any-return]


def story(gateway: Gateway, execution_id: str) -> dict[str, Any]:
    with gateway.client() as client:
        answer = client.get(f"/verify/{execution_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def keys_of(gateway: Gateway) -> dict[str, Any]:
    with gateway.client() as client:
        return client.get(KEYS).json()  # type: ignore[no-any-return]


def sensitive_of(gateway: Gateway, surface: str) -> frozenset[str]:
    with gateway.client() as client:
        return frozenset(client.get(f"/v1/surfaces/{surface}").json()["sensitive"])


def hash_under(tenant: str, prepared: Any, sensitive: frozenset[str]) -> str:
    return request_hash(normalized_request(tenant, prepared.request, sensitive))


# -- 1. the happy path -----------------------------------------------------------------


def test_a_permitted_call_runs_once_and_leaves_a_verifiable_outcome(
        gateway: Gateway, upstream: Upstream, tag: str, tmp_path: Path) -> None:
    actor = f"agent-{tag}"
    with Gate(gateway.url, gateway.api_key) as gate:
        pay = guarded_payer(gate, upstream, actor)
        result = pay(250, f"Acme Office Supplies {tag}")

    assert upstream.count("/payments") == 1
    assert result == {"id": "payments-1", "received": {
        "amount": 250, "to": f"Acme Office Supplies {tag}", "invoice": None}}

    [record] = executions_of(gateway, actor)
    detail = story(gateway, record["executionId"])
    keys = KeySet.from_document(keys_of(gateway))
    assert detail["decision"] == "PERMIT" and detail["reasonCode"] == "WITHIN_LIMIT"
    consumption, outcome = detail["consumption"], detail["outcome"]
    for receipt in (detail["receipt"], consumption, outcome):
        verify_receipt(receipt, keys)
    assert consumption["consumeResult"] == "CONSUMED"
    assert consumption["requestHash"] == detail["requestHash"]
    assert detail["refusedConsumptions"] == []
    assert outcome["receiptType"] == "outcome" and outcome["outcome"] == "SUCCESS"
    assert outcome["resultDigest"] == digest_result(result)
    assert outcome["decisionReceiptHash"] == detail["receipt"]["receiptHash"]
    assert outcome["consumeReceiptHash"] == consumption["receiptHash"]

    # Offline, with the real CLI and the pinned keys.
    keys_file, outcome_file = tmp_path / "keys.json", tmp_path / "outcome.json"
    keys_file.write_text(json.dumps(keys_of(gateway)))
    outcome_file.write_text(json.dumps(outcome))
    verified = run_cli("verify", str(outcome_file), "--keys", str(keys_file), "--json")
    report = json.loads(verified.stdout)
    assert report["valid"] is True and report["executionId"] == record["executionId"]
    assert report["decision"] == "SUCCESS"
    # ... and the verifier is not a rubber stamp: a receipt naming another result fails.
    outcome_file.write_text(json.dumps({**outcome, "resultDigest": digest_result("other")}))
    rejected = run_cli("verify", str(outcome_file), "--keys", str(keys_file), check=False)
    assert rejected.returncode == 1, rejected.stdout


class _Opaque:
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


def _self_containing() -> list[Any]:
    value: list[Any] = [1]
    value.append(value)
    return value


@pytest.mark.parametrize("make", [set, _self_containing, _Opaque],
                         ids=["a set", "a list that contains itself", "a broken repr"])
def test_a_result_without_json_form_is_returned_and_recorded_as_success(
        gateway: Gateway, upstream: Upstream, tag: str, make: Callable[[], Any]) -> None:
    """The action already ran: digesting its result must not turn it into a failure."""
    actor = f"agent-{tag}"
    result = make()
    with Gate(gateway.url, gateway.api_key) as gate:
        @gate.guard(surface="payment.execute", context=payment, actor=actor)
        def pay(amount: int, to: str) -> Any:
            httpx.post(f"{upstream.url}/payments", json={"amount": amount}, timeout=10)
            return result

        assert pay(250, f"Acme {tag}") is result
    assert upstream.count() == 1
    [record] = executions_of(gateway, actor)
    outcome = story(gateway, record["executionId"])["outcome"]
    assert outcome["outcome"] == "SUCCESS"
    assert outcome["resultDigest"] == digest_result(result)


# -- 2. no permit ----------------------------------------------------------------------


@pytest.mark.parametrize(("surface", "args", "decision", "reason_code"), [
    ("payment.execute", (25_000, "Acme Office Supplies"), "ESCALATE", "HIGH_VALUE_PAYMENT"),
    ("payment.execute", (250, SANCTIONED), "DENY", "SANCTIONED_BENEFICIARY"),
    ("deploy.release", ("production", "api"), "SILENCE", "NO_MATCHING_POLICY"),
], ids=["escalate", "deny", "silence"])
def test_no_permit_means_the_function_never_runs(
        gateway: Gateway, upstream: Upstream, tag: str, surface: str, args: tuple[Any, ...],
        decision: str, reason_code: str) -> None:
    actor = f"agent-{tag}"
    with Gate(gateway.url, gateway.api_key) as gate:
        if surface == "payment.execute":
            action = guarded_payer(gate, upstream, actor)
        else:
            @gate.guard(surface="deploy.release", actor=actor,
                        context=lambda environment, service: {"environment": environment,
                                                              "service": service})
            def action(environment: str, service: str) -> Any:
                return httpx.post(f"{upstream.url}/deployments", timeout=10,
                                  json={"environment": environment, "service": service}).json()

        with pytest.raises(ExecutionBlocked) as caught:
            action(*args)

    blocked = caught.value
    assert (blocked.decision, blocked.reason_code) == (decision, reason_code)
    assert blocked.execution_id is not None
    assert upstream.count() == 0
    # The exception names the gateway's own record of that decision, which nobody consumed.
    detail = story(gateway, blocked.execution_id)
    assert (detail["decision"], detail["reasonCode"]) == (decision, reason_code)
    assert detail["actorId"] == actor and detail["surface"] == surface
    assert detail["consumption"] is None and detail["outcome"] is None


# -- 3. replay -------------------------------------------------------------------------


def test_the_same_call_again_is_a_replay_and_is_blocked(
        gateway: Gateway, upstream: Upstream, tag: str) -> None:
    actor, to = f"agent-{tag}", f"Acme Office Supplies {tag}"
    with Gate(gateway.url, gateway.api_key) as gate:
        # Without an invoice number the key is derived from the request; with one, it is used.
        pay = guarded_payer(gate, upstream, actor,
                            idempotency_key=lambda amount, to, invoice=None: invoice)
        pay(250, to)
        assert upstream.count() == 1
        [first] = executions_of(gateway, actor)

        with pytest.raises(ExecutionBlocked) as caught:
            pay(250, to)
        assert caught.value.reason_code == "ALREADY_CONSUMED"
        assert caught.value.decision == "PERMIT"
        # The retry was answered from the idempotency record: the same, used, permit.
        assert caught.value.execution_id == first["executionId"]
        assert upstream.count() == 1
        assert len(executions_of(gateway, actor)) == 1

        pay(250, to, invoice="INV-2")  # the same payment, on purpose a second one
        assert upstream.count() == 2
        with pytest.raises(ExecutionBlocked) as again:
            pay(250, to, invoice="INV-2")
        assert again.value.reason_code == "ALREADY_CONSUMED"
        assert upstream.count() == 2
        # A key that is not printable ASCII travels in the body only (a header cannot
        # carry it): it was "the gateway could not be reached".
        pay(250, to, invoice="Rechnung-\u00e4-3")
        assert upstream.count() == 3
        with pytest.raises(ExecutionBlocked) as third:
            pay(250, to, invoice="Rechnung-\u00e4-3")
        assert third.value.reason_code == "ALREADY_CONSUMED"
        assert upstream.count() == 3

    executions = executions_of(gateway, actor)
    assert len(executions) == 3
    refused = story(gateway, first["executionId"])["refusedConsumptions"]
    assert [r["refusalReason"] for r in refused] == ["ALREADY_CONSUMED"]


# -- 4. a permit for A is not a permit for B -------------------------------------------


def test_a_permit_for_one_request_does_not_authorize_another(
        gateway: Gateway, tag: str) -> None:
    to = f"Acme Office Supplies {tag}"
    a = prepare("payment.execute", payment(250, to), actor=f"agent-{tag}")
    b = prepare("payment.execute", payment(9_999, to), actor=f"agent-{tag}")
    sensitive = sensitive_of(gateway, "payment.execute")
    keys = KeySet.from_document(keys_of(gateway))

    # The gateway: A's permit, presented with B's request hash, is refused.
    with Gate(gateway.url, gateway.api_key) as gate:
        permit = gate.acquire("payment.execute", payment(250, to), actor=f"agent-{tag}")
    b_hash = hash_under(str(permit.claims["tenant"]), b, sensitive)
    assert b_hash != permit.request_hash
    with gateway.client() as client:
        refused = client.post(f"/v1/permits/{permit.execution_id}/consume",
                              json={"requestHash": b_hash})
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "request_mismatch"
    assert refused.json()["refusalReason"] == "REQUEST_MISMATCH"
    detail = story(gateway, permit.execution_id)
    assert detail["consumption"]["requestHash"] == permit.request_hash  # A's, used once by A

    # The SDK, before asking anyone: a genuine PERMIT for A checked against B is blocked.
    with gateway.client() as client:
        # (a fresh decision for A, not the one acquire() used: its own idempotency key)
        answer = client.post("/execute", json={**a.body, "idempotencyKey": f"raw-{tag}"}).json()
    assert answer["decision"] == "PERMIT"
    with pytest.raises(ExecutionBlocked, match="different request") as caught:
        check_decision(answer, b, keys, now=time.time(), sensitive=sensitive)
    assert caught.value.decision == "PERMIT"
    assert caught.value.execution_id == answer["execution_id"]
    # The same answer for the request it was issued for passes.
    verified, expected = check_decision(answer, a, keys, now=time.time(), sensitive=sensitive)
    assert expected == answer["receipt"]["requestHash"] == verified.claims["request_hash"]


# -- 5. expiry -------------------------------------------------------------------------

# Short enough to wait out in a test, long enough that a slow machine still gets a fresh
# permit from decision to consumption.
SHORT_TTL_SECONDS = 3


@pytest.fixture(scope="module")
def short_ttl_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose permits live one second."""
    data = tmp_path_factory.mktemp("short-ttl") / "data"
    run_cli("init", data=data)
    gateway = Gateway(data=data, port=free_port(),
                      api_key=(data / "demo-api-key").read_text().strip(),
                      env={"EXECGUARD_TOKEN_TTL_SECONDS": str(SHORT_TTL_SECONDS)})
    gateway.start()
    yield gateway
    gateway.stop()


def test_an_expired_permit_is_refused_by_the_sdk_clock(
        short_ttl_gateway: Gateway, upstream: Upstream, tag: str) -> None:
    actor = f"agent-{tag}"
    # 30 s ahead: past exp (iat + 3 s) plus the 5 s clock-skew allowance, with a margin.
    with Gate(short_ttl_gateway.url, short_ttl_gateway.api_key,
              clock=lambda: time.time() + 30) as ahead:
        pay = guarded_payer(ahead, upstream, actor)
        with pytest.raises(ExecutionBlocked, match="expired") as caught:
            pay(250, f"Acme {tag}")
    assert caught.value.decision == "PERMIT"
    assert upstream.count() == 0
    # Refused offline: the permit was never even presented for consumption.
    detail = story(short_ttl_gateway, str(caught.value.execution_id))
    assert detail["consumption"] is None and detail["refusedConsumptions"] == []

    # The same gateway with a right clock: the permit is good and the call runs.
    with Gate(short_ttl_gateway.url, short_ttl_gateway.api_key) as gate:
        guarded_payer(gate, upstream, actor)(251, f"Acme {tag}")
    assert upstream.count() == 1


def test_a_permit_that_expires_before_consumption_is_refused_by_the_gateway(
        short_ttl_gateway: Gateway, upstream: Upstream, tag: str) -> None:
    """The SDK's steps one by one, with a pause past expiry between decision and consume."""
    prepared = prepare("payment.execute", payment(250, f"Acme {tag}"), actor=f"agent-{tag}")
    gw = short_ttl_gateway
    keys = KeySet.from_document(keys_of(gw))
    sensitive = sensitive_of(gw, "payment.execute")
    with gw.client() as client:
        answer = client.post("/execute", json=prepared.body,
                             headers={"Idempotency-Key": prepared.idempotency_key}).json()
    verified, expected = check_decision(answer, prepared, keys, now=time.time(),
                                        sensitive=sensitive)
    time.sleep(SHORT_TTL_SECONDS + 0.5)
    # Inside the SDK's 5 s skew allowance the token still checks out offline...
    check_decision(answer, prepared, keys, now=time.time(), sensitive=sensitive)

    def run_if_consumed() -> None:
        with gw.client() as client:
            consumed = client.post(f"/v1/permits/{verified.execution_id}/consume",
                                   json={"requestHash": expected})
        check_consumption(consumed.json(), consumed.status_code, keys, verified.execution_id)
        httpx.post(f"{upstream.url}/payments", json=prepared.body, timeout=10)

    # ... but the gateway, on its own clock, refuses to let it be used.
    with pytest.raises(ExecutionBlocked) as caught:
        run_if_consumed()
    assert caught.value.reason_code == "EXPIRED"
    assert upstream.count() == 0
    refused = story(gw, verified.execution_id)["refusedConsumptions"]
    assert [r["refusalReason"] for r in refused] == ["EXPIRED"]


# -- 6. an unreachable or hanging gateway ----------------------------------------------


def test_a_stopped_gateway_blocks(fresh_gateway: Gateway, upstream: Upstream,
                                  tag: str) -> None:
    # A timeout a slow machine's first decision fits in; a stopped gateway refuses at once.
    with Gate(fresh_gateway.url, fresh_gateway.api_key, timeout=2) as gate:
        pay = guarded_payer(gate, upstream, f"agent-{tag}")
        pay(250, f"Acme {tag}")  # the gate works while the gateway is up
        assert upstream.count() == 1
        fresh_gateway.stop()
        started = time.monotonic()
        with pytest.raises(ExecutionBlocked, match="could not be reached") as caught:
            pay(251, f"Acme {tag}")
        assert time.monotonic() - started < BLOCKED_WITHIN_S
    assert caught.value.decision is None
    assert upstream.count() == 1


def _blocked_within_the_timeout(url: str, upstream: Upstream, kind: str) -> ExecutionBlocked:
    """One guarded payment through a ``Gate`` or ``AsyncGate(timeout=0.5)`` at ``url``: it
    must be blocked, well within ``BLOCKED_WITHIN_S``, and the upstream never called.

    The attempt runs in a daemon thread, so a gate that waits forever fails this test
    instead of hanging the suite."""
    def attempt() -> None:
        if kind == "sync":
            with Gate(url, "egk_test", timeout=0.5) as gate:
                guarded_payer(gate, upstream, "agent-x")(250, "Acme")
            return

        async def attempt_async() -> None:
            async with AsyncGate(url, "egk_test", timeout=0.5) as agate:
                @agate.guard(surface="payment.execute", context=payment)
                async def pay(amount: int, to: str) -> None:
                    await asyncio.to_thread(httpx.post, f"{upstream.url}/payments")
                await pay(250, "Acme")
        asyncio.run(attempt_async())

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            attempt()
            outcome.append(None)
        except BaseException as exc:  # reported below
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(BLOCKED_WITHIN_S)
    assert not worker.is_alive(), f"still waiting for the gateway after {BLOCKED_WITHIN_S} s"
    assert time.monotonic() - started < BLOCKED_WITHIN_S
    [blocked] = outcome
    assert isinstance(blocked, ExecutionBlocked), f"not blocked: {blocked!r}"
    assert "did not answer" in blocked.reason
    assert blocked.decision is None
    assert upstream.count() == 0
    return blocked


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("server", ["silent", "trickling headers", "trickling body"])
def test_a_gateway_that_never_finishes_answering_blocks_within_the_timeout(
        upstream: Upstream, server: str, kind: str) -> None:
    """Silent: accepts and says nothing. Trickling: one byte every 0.1 s, so that no single
    read ever times out; only a deadline on the whole answer stops the wait."""
    hole = BlackHole() if server == "silent" else Trickler(server.split()[1])
    try:
        _blocked_within_the_timeout(hole.url, upstream, kind)
        assert hole.accepted, "the gate never connected: this tested nothing"
    finally:
        hole.stop()


def test_a_gateway_that_hangs_on_consume_blocks_within_the_timeout(
        fake: FakeGateway, upstream: Upstream) -> None:
    with Gate(fake.url, "egk_test", timeout=0.5) as gate:
        pay = guarded_payer(gate, upstream, "agent-x")
        pay(1, "Acme")  # the fake answers like a gateway: the call runs
        assert upstream.count() == 1
        fake.hang_on.add("consume")  # from now on, decisions come but consumption hangs
        started = time.monotonic()
        with pytest.raises(ExecutionBlocked, match="did not answer"):
            pay(2, "Acme")
        assert time.monotonic() - started < BLOCKED_WITHIN_S
    assert upstream.count() == 1
    assert sum(p.endswith("/consume") for p in fake.paths()) == 2  # it got as far as consume


# -- 7. malformed and forged answers from an impostor ----------------------------------


def _resigned(fake: FakeGateway, answer: dict[str, Any], signer: Any = None,
              **claims: Any) -> dict[str, Any]:
    """The answer with its token signed again, over changed claims."""
    changed = {**fake.claims[answer["execution_id"]], **claims}
    return {**answer, "execution_token": fake.sign_token(changed, signer)}


def _resealed(fake: FakeGateway, answer: dict[str, Any], signer: Any = None,
              **fields: Any) -> dict[str, Any]:
    """The answer with its receipt sealed again, over changed fields."""
    return {**answer, "receipt": fake.seal({**answer["receipt"], **fields}, signer)}


def _token_with_header(fake: FakeGateway, answer: dict[str, Any], header: dict[str, Any],
                       signature: bytes | None = None) -> dict[str, Any]:
    claims = fake.claims[answer["execution_id"]]
    return {**answer, "execution_token": fake.unsafe_token(claims, header, signature)}


def _hs256_with_public_key(fake: FakeGateway, answer: dict[str, Any]) -> dict[str, Any]:
    """Algorithm confusion: HMAC-SHA256 keyed with the published public key PEM."""
    header = permit_header(fake.signer.key_id, alg="HS256")
    claims = fake.claims[answer["execution_id"]]
    unsigned = fake.unsafe_token(claims, header, b"").rstrip(".")
    mac = hmac.new(fake.signer.public_pem.encode(), unsigned.encode(), hashlib.sha256).digest()
    return _token_with_header(fake, answer, header, mac)


def _for_another_request(fake: FakeGateway, answer: dict[str, Any]) -> dict[str, Any]:
    """A validly signed permit (token and receipt) for 9,999 instead of 250."""
    other = prepare("payment.execute", payment(9_999, "Acme Office Supplies"),
                    actor="agent-x")
    digest = hash_under(fake.tenant, other, fake.sensitive)
    return _resealed(fake, _resigned(fake, answer, request_hash=digest), requestHash=digest)


def _expired(fake: FakeGateway, answer: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    return _resigned(fake, answer, iat=now - 120, nbf=now - 120, exp=now - 60)


def _consume_resealed(unpublished_key: bool = False,
                      **fields: Any) -> Callable[[FakeGateway, dict[str, Any]], Any]:
    def spoil(fake: FakeGateway, answer: dict[str, Any]) -> Any:
        return _resealed(fake, answer, fake.other_signer if unpublished_key else None,
                         **fields)
    return spoil


EXECUTE_SPOILERS: dict[str, tuple[Callable[[FakeGateway, dict[str, Any]], Any], str]] = {
    "not JSON": (lambda f, a: Raw(200, b"<html>Welcome to nginx!</html>", "text/html"),
                 "not a JSON object"),
    "empty body": (lambda f, a: Raw(200, b""), "not a JSON object"),
    "a JSON list": (lambda f, a: Raw(200, b"[]"), "not a JSON object"),
    "HTTP 500": (lambda f, a: Raw(500, b'{"error":"internal","message":"boom"}'),
                 r"no decision \(HTTP 500"),
    "PERMIT without a token": (
        lambda f, a: {k: v for k, v in a.items() if k != "execution_token"},
        "'execution_token' is missing"),
    "token signed by an unpublished key": (
        lambda f, a: _resigned(f, a, f.other_signer), "execution token does not verify"),
    "receipt and token signed by an unpublished key": (
        lambda f, a: _resealed(f, _resigned(f, a, f.other_signer), f.other_signer),
        "decision receipt does not verify"),
    "alg none, no signature": (
        lambda f, a: _token_with_header(f, a, permit_header(f.signer.key_id, alg="none"), b""),
        "execution token does not verify"),
    "alg none, with a signature": (
        lambda f, a: _token_with_header(f, a, permit_header(f.signer.key_id, alg="none")),
        "alg is 'none'"),
    "HS256 keyed with the public key": (_hs256_with_public_key, "alg is 'HS256'"),
    "receipt altered after sealing": (
        lambda f, a: {**a, "receipt": {**a["receipt"], "reasonCode": "MANUAL_OVERRIDE"}},
        "decision receipt does not verify"),
    "receipt of a DENY": (lambda f, a: _resealed(f, a, decision="DENY"),
                          "another execution or decision"),
    "permit for another request": (_for_another_request, "different request"),
    "token for another surface": (
        lambda f, a: _resigned(f, a, aud="data.export", surface="data.export"),
        "execution token does not verify"),
    "token for another execution": (
        lambda f, a: _resigned(f, a, jti=str(uuid.uuid4())), "another execution"),
    "token from another issuer": (lambda f, a: _resigned(f, a, iss="not-execguard"), "'iss'"),
    "expired token": (_expired, "expired"),
}

CONSUME_SPOILERS: dict[str, tuple[Callable[[FakeGateway, dict[str, Any]], Any], str]] = {
    "consume refused": (
        lambda f, a: Raw(409, b'{"error":"permit_already_consumed",'
                              b'"refusalReason":"ALREADY_CONSUMED"}'),
        "refused: ALREADY_CONSUMED"),
    "consume answer not JSON": (lambda f, a: Raw(200, b"ok", "text/plain"), "no receipt"),
    "consume answer without receipt": (lambda f, a: {"consumed": True}, "no receipt"),
    "consume receipt says REFUSED": (
        _consume_resealed(consumeResult="REFUSED", refusalReason="ALREADY_CONSUMED"),
        "not record this permit as consumed"),
    "consume receipt of another execution": (
        _consume_resealed(executionId=str(uuid.uuid4())), "not record this permit as consumed"),
    "consume receipt signed by an unpublished key": (
        _consume_resealed(unpublished_key=True), "consume receipt does not verify"),
    "consume receipt altered after sealing": (
        lambda f, a: {**a, "receipt": {**a["receipt"], "requestHash": "0" * 64}},
        "consume receipt does not verify"),
}

KEYS_SPOILERS: dict[str, tuple[Callable[[FakeGateway], Any], str]] = {
    "keys document not JSON": (lambda f: Raw(200, b"nope", "text/plain"),
                               "keys document is invalid"),
    "keys unavailable": (lambda f: Raw(503, b'{"error":"keys_unavailable"}'),
                         r"keys are unavailable \(HTTP 503\)"),
    "keys document without the signing key": (lambda f: keys_document(f.other_signer),
                                              "decision receipt does not verify"),
}


def _attempt(fake: FakeGateway, upstream: Upstream, **gate: Any) -> ExecutionBlocked | None:
    """One guarded payment through the fake; the exception if it was blocked."""
    with Gate(fake.url, "egk_test", timeout=5, **gate) as client:
        try:
            guarded_payer(client, upstream, "agent-x")(250, "Acme Office Supplies")
        except ExecutionBlocked as blocked:
            return blocked
    return None


def test_the_impostor_answers_like_a_gateway_when_unspoiled(
        fake: FakeGateway, upstream: Upstream) -> None:
    """The control for the tests below: only the spoiled detail can be what blocks them."""
    assert _attempt(fake, upstream) is None
    assert _attempt(fake, upstream, keys=keys_document(fake.signer)) is None
    assert upstream.count() == 2
    consumed = [p for p in fake.paths() if p.endswith("/consume")]
    reported = [p for p in fake.paths() if p.endswith("/outcome")]
    assert len(consumed) == len(reported) == 2


@pytest.mark.parametrize("name", sorted(EXECUTE_SPOILERS))
def test_a_malformed_or_forged_decision_blocks(
        fake: FakeGateway, upstream: Upstream, name: str) -> None:
    fake.spoil_execute, reason = EXECUTE_SPOILERS[name]
    blocked = _attempt(fake, upstream)
    assert blocked is not None, "the guarded function ran"
    assert re.search(reason, str(blocked)), str(blocked)
    assert upstream.count() == 0
    # Refused before the permit was even presented: nothing consumed, nothing reported.
    assert not [p for p in fake.paths() if p.endswith(("/consume", "/outcome"))]


@pytest.mark.parametrize("name", sorted(CONSUME_SPOILERS))
def test_a_malformed_or_forged_consumption_blocks(
        fake: FakeGateway, upstream: Upstream, name: str) -> None:
    fake.spoil_consume, reason = CONSUME_SPOILERS[name]
    blocked = _attempt(fake, upstream)
    assert blocked is not None, "the guarded function ran"
    assert re.search(reason, str(blocked)), str(blocked)
    assert blocked.decision == "PERMIT" and blocked.execution_id in fake.claims
    assert upstream.count() == 0
    assert not [p for p in fake.paths() if p.endswith("/outcome")]


@pytest.mark.parametrize("name", sorted(KEYS_SPOILERS))
def test_a_bad_keys_document_blocks(fake: FakeGateway, upstream: Upstream, name: str) -> None:
    spoil, reason = KEYS_SPOILERS[name]
    fake.keys_served = spoil(fake)
    blocked = _attempt(fake, upstream)
    assert blocked is not None, "the guarded function ran"
    assert re.search(reason, str(blocked)), str(blocked)
    assert upstream.count() == 0
    assert not [p for p in fake.paths() if p.endswith("/consume")]


def test_pinned_keys_are_not_replaced_by_the_keys_an_impostor_serves(
        gateway: Gateway, fake: FakeGateway, upstream: Upstream) -> None:
    """The impostor signs everything with its own key and publishes that key; an SDK pinned to
    the real gateway's keys never asks for the impostor's document and refuses its answers."""
    blocked = _attempt(fake, upstream, keys=keys_of(gateway))
    assert blocked is not None, "the guarded function ran"
    assert re.search("decision receipt does not verify", str(blocked)), str(blocked)
    assert upstream.count() == 0
    assert ("GET", KEYS) not in fake.calls
    assert not [p for p in fake.paths() if p.endswith("/consume")]
    # Pinned as a KeySet too.
    assert _attempt(fake, upstream, keys=KeySet.from_document(keys_of(gateway))) is not None
    assert upstream.count() == 0


def rotate_signing_key(gateway: Gateway, old_ids: set[str]) -> str:
    """Rotate with the real CLI; return the new key's id once the gateway signs with it."""
    run_cli("keys", "rotate", data=gateway.data)
    deadline = time.monotonic() + 30  # "within a second"; generous on a busy machine
    with gateway.client() as client:
        while True:
            probe = client.post("/execute", json={"surface": "payment.execute",
                                                  "context": payment(1, "probe")}).json()
            if probe["receipt"]["authorityKeyId"] not in old_ids:
                return str(probe["receipt"]["authorityKeyId"])
            assert time.monotonic() < deadline, "the gateway kept signing with the old key"
            time.sleep(0.1)


def test_a_key_rotation_is_followed_unless_the_keys_are_pinned(
        fresh_gateway: Gateway, upstream: Upstream, tag: str) -> None:
    gw = fresh_gateway
    before = keys_of(gw)
    old_ids = {k["keyId"] for k in before["keys"]}
    with Gate(gw.url, gw.api_key) as gate, Gate(gw.url, gw.api_key, keys=before) as pinned:
        pay = guarded_payer(gate, upstream, f"agent-{tag}")
        pay_pinned = guarded_payer(pinned, upstream, f"pinned-{tag}")
        pay(1, "Acme")  # the gate now holds the keys document in its cache
        pay_pinned(1, "Acme")
        assert upstream.count() == 2

        new_id = rotate_signing_key(gw, old_ids)

        pay(2, "Acme")  # an unknown key id: the gate fetched the keys document again
        assert upstream.count() == 3
        with pytest.raises(ExecutionBlocked, match="does not verify") as caught:
            pay_pinned(2, "Acme")
        assert caught.value.decision == "PERMIT"
        assert upstream.count() == 3
    [latest, _] = executions_of(gw, f"agent-{tag}")
    assert latest["receipt"]["authorityKeyId"] == new_id


class _RotateAfterTheDecision(httpx.HTTPTransport):
    """Lets the next ``/execute`` answer through, then rotates the gateway's signing key
    before the gate can consume: the decision is signed by the old key, the consumption by
    the new one (as when replicas pick up a rotation a moment apart)."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.armed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self.armed and request.url.path == "/execute":
            self.armed = False
            rotate_signing_key(self.gateway, {k["keyId"] for k in keys_of(self.gateway)["keys"]})
        return response


def test_a_rotation_between_decision_and_consumption_does_not_waste_the_permit(
        fresh_gateway: Gateway, upstream: Upstream, tag: str) -> None:
    gw = fresh_gateway
    transport = _RotateAfterTheDecision(gw)
    with Gate(gw.url, gw.api_key, transport=transport, timeout=60) as gate:
        pay = guarded_payer(gate, upstream, f"agent-{tag}")
        pay(1, "Acme")  # the gate now holds the keys document (old key only) in its cache
        transport.armed = True
        pay(2, "Acme")  # consumed under the new key: the gate looks the new key up
    assert upstream.count() == 2
    latest = story(gw, executions_of(gw, f"agent-{tag}")[0]["executionId"])
    assert latest["receipt"]["authorityKeyId"] != latest["consumption"]["authorityKeyId"]
    assert latest["outcome"]["outcome"] == "SUCCESS"


def test_a_newly_sensitive_field_does_not_block_until_the_cache_expires(
        fresh_gateway: Gateway, upstream: Upstream, tag: str, tmp_path: Path) -> None:
    """An operator marks ``currency`` sensitive: the gateway now hashes its digest, so the
    gate's cached list of sensitive fields no longer explains the permit; it looks again."""
    gw = fresh_gateway
    with Gate(gw.url, gw.api_key) as gate:
        pay = guarded_payer(gate, upstream, f"agent-{tag}")
        pay(1, "Acme")  # the gate now holds the surface's sensitive fields in its cache
        bundle = tmp_path / "bundle"
        shutil.copytree(demo_bundle_path(), bundle)
        registry = bundle / "surfaces.toml"
        registry.write_text(registry.read_text().replace(
            'sensitive = ["beneficiary_account"]',
            'sensitive = ["beneficiary_account", "currency"]', 1))
        version = run_cli("policy", "push", str(bundle), "--activate",
                          data=gw.data).stdout.split()[-1]
        deadline = time.monotonic() + 30
        with gw.client() as client:
            while client.post("/execute", json={"surface": "payment.execute", "context":
                                                payment(1, "probe")}).json()["policyVersion"] \
                    != version:
                assert time.monotonic() < deadline, "the gateway kept the old policy"
                time.sleep(0.1)
        pay(2, "Acme")
    assert upstream.count() == 2
    assert sensitive_of(gw, "payment.execute") == {"beneficiary_account", "currency"}


# -- 8. the context-manager form -------------------------------------------------------


def test_the_authorize_block_runs_once_and_an_exception_is_a_failure_outcome(
        gateway: Gateway, upstream: Upstream, tag: str) -> None:
    actor, to = f"agent-{tag}", f"Acme Office Supplies {tag}"
    with Gate(gateway.url, gateway.api_key) as gate:
        with gate.authorize("payment.execute", payment(250, to), actor=actor) as permit:
            httpx.post(f"{upstream.url}/payments", json={"amount": 250}, timeout=10)
        assert upstream.count() == 1
        done = story(gateway, permit.execution_id)
        assert done["consumption"]["consumeResult"] == "CONSUMED"
        assert done["outcome"]["outcome"] == "SUCCESS"

        failure = RuntimeError("the bank refused the transfer")
        with pytest.raises(RuntimeError) as caught, \
                gate.authorize("payment.execute", payment(260, to), actor=actor) as failing:
            httpx.post(f"{upstream.url}/payments", json={"amount": 260}, timeout=10)
            raise failure
        assert caught.value is failure  # re-raised as is
        assert upstream.count() == 2
        failed = story(gateway, failing.execution_id)
        assert failed["consumption"]["consumeResult"] == "CONSUMED"
        assert failed["outcome"]["outcome"] == "FAILURE"
        assert failed["outcome"]["resultDigest"] is None

        # The decorator records a failure the same way.
        @gate.guard(surface="payment.execute", context=payment, actor=actor)
        def pay_then_fail(amount: int, to: str) -> None:
            httpx.post(f"{upstream.url}/payments", json={"amount": amount}, timeout=10)
            raise ValueError("upstream said 402")

        with pytest.raises(ValueError, match="402"):
            pay_then_fail(270, to)
        assert upstream.count() == 3
        latest = executions_of(gateway, actor)[0]
        assert latest["outcome"]["outcome"] == "FAILURE"

        entered = False
        with pytest.raises(ExecutionBlocked) as denied, \
                gate.authorize("payment.execute", payment(250, SANCTIONED), actor=actor):
            entered = True
        assert not entered and denied.value.decision == "DENY"
    assert upstream.count() == 3


# -- 9. asyncio ------------------------------------------------------------------------


def test_async_gate_runs_a_permitted_coroutine_once_and_blocks_a_deny(
        gateway: Gateway, upstream: Upstream, tag: str) -> None:
    actor, to = f"agent-{tag}", f"Acme Office Supplies {tag}"

    async def scenario() -> tuple[Any, ExecutionBlocked, ExecutionBlocked]:
        async with AsyncGate(gateway.url, gateway.api_key) as gate:
            @gate.guard(surface="payment.execute", context=payment, actor=actor)
            async def pay(amount: int, to: str) -> Any:
                async with httpx.AsyncClient(timeout=10) as client:
                    response = await client.post(f"{upstream.url}/payments",
                                                 json={"amount": amount, "to": to})
                return response.json()

            result = await pay(250, to)
            with pytest.raises(ExecutionBlocked) as denied:
                await pay(250, SANCTIONED)
            with pytest.raises(ExecutionBlocked) as replayed:
                await pay(250, to)
        return result, denied.value, replayed.value

    result, denied, replayed = asyncio.run(scenario())
    assert upstream.count() == 1
    assert denied.decision == "DENY" and denied.reason_code == "SANCTIONED_BENEFICIARY"
    assert replayed.reason_code == "ALREADY_CONSUMED"
    permitted = [e for e in executions_of(gateway, actor) if e["decision"] == "PERMIT"]
    assert len(permitted) == 1
    detail = story(gateway, permitted[0]["executionId"])
    assert detail["outcome"]["outcome"] == "SUCCESS"
    assert detail["outcome"]["resultDigest"] == digest_result(result)
    assert story(gateway, str(denied.execution_id))["decision"] == "DENY"


# -- 10. configuration -----------------------------------------------------------------


def test_configuration_comes_from_the_environment_or_fails(
        gateway: Gateway, upstream: Upstream, tag: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECGUARD_URL", gateway.url)
    monkeypatch.setenv("EXECGUARD_API_KEY", gateway.api_key)
    with Gate() as gate:
        guarded_payer(gate, upstream, f"agent-{tag}")(250, f"Acme {tag}")
    assert upstream.count() == 1

    monkeypatch.setenv("EXECGUARD_API_KEY", "egk_not-a-key")
    with Gate() as gate, pytest.raises(ExecutionBlocked, match="HTTP 401"):
        guarded_payer(gate, upstream, f"agent-{tag}")(251, f"Acme {tag}")
    assert upstream.count() == 1

    monkeypatch.delenv("EXECGUARD_URL")
    monkeypatch.delenv("EXECGUARD_API_KEY")
    for kind in (Gate, AsyncGate):
        with pytest.raises(ConfigError):
            kind()
    monkeypatch.setenv("EXECGUARD_URL", gateway.url)
    with pytest.raises(ConfigError, match="API key"):
        Gate()
    monkeypatch.delenv("EXECGUARD_URL")
    monkeypatch.setenv("EXECGUARD_API_KEY", gateway.api_key)
    with pytest.raises(ConfigError, match="URL"):
        Gate()
    with pytest.raises(ConfigError, match="timeout"):
        Gate(gateway.url, gateway.api_key, timeout=0)
    # No deadline is no timeout (a hung gateway would hold the caller forever); a URL
    # that cannot be sent to is refused when the gate is made, not on the first call.
    for kind in (Gate, AsyncGate):
        for timeout in (math.inf, math.nan, -1.0):
            with pytest.raises(ConfigError, match="positive, finite number of seconds"):
                kind(gateway.url, gateway.api_key, timeout=timeout)
        with pytest.raises(ConfigError, match=r"url=: 'http://\[::1' is not a URL"):
            kind("http://[::1", gateway.api_key)
        with pytest.raises(ConfigError, match="port 99999 is not within 1-65535"):
            kind("http://127.0.0.1:99999", gateway.api_key)
        for pasted in ("egk_abc\n", "egk_\u00e4bc"):
            with pytest.raises(ConfigError, match="API key is not printable ASCII"):
                kind(gateway.url, pasted)
        # Sent as Basic credentials instead of the key: every call would be refused.
        with pytest.raises(ConfigError, match="holds a user name or password"):
            kind(gateway.url.replace("http://", "http://user:pw@"), gateway.api_key)


def test_each_gate_refuses_the_other_kind_of_function(gateway: Gateway) -> None:
    with Gate(gateway.url, gateway.api_key) as gate, pytest.raises(ConfigError, match="async"):
        @gate.guard(surface="payment.execute")
        async def coroutine() -> None: ...

    async def check() -> None:
        async with AsyncGate(gateway.url, gateway.api_key) as agate:
            with pytest.raises(ConfigError, match="not async"):
                @agate.guard(surface="payment.execute")
                def plain() -> None: ...
    asyncio.run(check())


# -- 11. concurrency -------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["one gate", "a gate per thread"])
def test_twenty_simultaneous_identical_calls_execute_once(
        gateway: Gateway, upstream: Upstream, tag: str, shared: bool) -> None:
    actor, to, threads = f"agent-{tag}", f"Acme Office Supplies {tag}", 20
    gates = [Gate(gateway.url, gateway.api_key)] * threads if shared else \
        [Gate(gateway.url, gateway.api_key) for _ in range(threads)]
    payers = [guarded_payer(g, upstream, actor) for g in gates]
    start = threading.Barrier(threads)
    lock = threading.Lock()
    results: list[Any] = []
    blocked: list[ExecutionBlocked] = []
    errors: list[BaseException] = []

    def call(pay: Callable[..., Any]) -> None:
        start.wait()
        try:
            outcome: Any = pay(250, to)
        except ExecutionBlocked as exc:
            outcome = exc
        except BaseException as exc:  # reported below
            with lock:
                errors.append(exc)
            return
        with lock:
            (blocked if isinstance(outcome, ExecutionBlocked) else results).append(outcome)

    workers = [threading.Thread(target=call, args=(p,)) for p in payers]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for g in set(gates):
            g.close()
    assert errors == []
    assert len(results) == 1 and len(blocked) == threads - 1
    assert upstream.count() == 1
    [execution] = executions_of(gateway, actor)
    assert {b.execution_id for b in blocked} == {execution["executionId"]}
    assert {b.reason_code for b in blocked} == {"ALREADY_CONSUMED"}
    refused = story(gateway, execution["executionId"])["refusedConsumptions"]
    assert len(refused) == threads - 1

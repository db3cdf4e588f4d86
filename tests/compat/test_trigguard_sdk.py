"""The public ``trigguard`` SDK (PyPI 0.3.1), unchanged, pointed at our gateway."""

from __future__ import annotations

import pytest
from trigguard import Client, TrigGuard, TrigGuardError

from tests.conftest import Gateway

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}


@pytest.fixture
def tg(gateway: Gateway) -> TrigGuard:
    return TrigGuard(api_key=gateway.api_key, gateway_url=gateway.url, timeout=10)


@pytest.mark.parametrize(("context", "decision"), [
    (PAY, "PERMIT"),
    ({**PAY, "amount": 25_000}, "ESCALATE"),
    ({**PAY, "beneficiary": "Blackwater Lagoon Trading (fictional)"}, "DENY"),
    ({"currency": "EUR"}, "SILENCE"),
])
def test_authorize_returns_the_decision_with_a_verifiable_receipt(
        tg: TrigGuard, context: dict[str, object], decision: str) -> None:
    result = tg.authorize(surface="payment.execute", actor="agent-7", context=context)
    assert result["decision"] == decision
    assert result["surface"] == "payment.execute"
    assert result["executionId"] == result["receipt"]["executionId"]
    assert tg.verify(result["receipt"]) is True


def test_altered_receipts_do_not_verify(tg: TrigGuard) -> None:
    receipt = dict(tg.authorize(surface="payment.execute", context=PAY)["receipt"])
    signature = receipt["authoritySignature"]
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    assert tg.verify({**receipt, "authoritySignature": flipped}) is False
    digest = receipt["receiptHash"]
    other_hash = ("0" if digest[0] != "0" else "1") + digest[1:]
    assert tg.verify({**receipt, "receiptHash": other_hash}) is False
    assert tg.verify({**receipt, "authorityKeyId": "someone-else"}) is False


def test_explain_and_audit(tg: TrigGuard) -> None:
    actor = "sdk-explain-actor"
    result = tg.authorize(surface="payment.execute", actor=actor, context={**PAY,
                                                                           "amount": 20_000})
    explained = tg.explain(result["executionId"])
    assert explained["decision"] == "ESCALATE"
    assert explained["surface"] == "payment.execute"
    assert "ESCALATE" in explained["summary"]
    assert explained["detail"]["receipt"] == result["receipt"]
    audit = tg.audit(surface="payment.execute", actor=actor)
    assert audit["entries"][0]["executionId"] == result["executionId"]
    assert all(e["decision"] for e in audit["entries"])


def test_coach_is_advisory(tg: TrigGuard) -> None:
    advice = tg.coach(intent={"surface": "payment.execute"}, context={**PAY, "amount": 25_000})
    assert advice["likelyOutcome"] == "ESCALATE"
    assert advice["confidence"] == 1.0
    assert advice["advisoryOnly"] is True


def test_default_surfaces_and_memory_client(tg: TrigGuard) -> None:
    attested = tg.attest(action="send-weekly-report")
    assert attested["surface"] == "execution.external_action"
    assert attested["attestationId"]
    read = tg.memory.read(memory_id="user-prefs", confidence=0.9, evidence_refs=["doc-1"])
    assert read["surface"] == "memory.read"
    assert read["decision"] == "PERMIT"
    assert tg.verify(read["receipt"]) is True
    # Every operation of the memory client is a surface of the demo bundle: answered with
    # a decision (and a receipt), not a 400 unknown_surface.
    expected = {"verify": "PERMIT", "write": "SILENCE", "promote": "SILENCE",
                "archive": "SILENCE", "delete": "SILENCE"}
    for operation, decision in expected.items():
        answer = getattr(tg.memory, operation)(memory_id="user-prefs")
        assert (answer["surface"], answer["decision"]) == (f"memory.{operation}", decision)
        assert tg.verify(answer["receipt"]) is True


def test_errors_surface_as_sdk_exceptions(gateway: Gateway) -> None:
    wrong = TrigGuard(api_key="egk_wrong", gateway_url=gateway.url, timeout=10)
    with pytest.raises(TrigGuardError) as info:
        wrong.authorize(surface="payment.execute", context=PAY)
    assert info.value.status == 401
    tg = TrigGuard(api_key=gateway.api_key, gateway_url=gateway.url, timeout=10)
    with pytest.raises(TrigGuardError) as info:
        tg.authorize(surface="no.such.surface", context={})
    assert info.value.status == 400
    assert "no.such.surface" in str(info.value)


def test_legacy_client_execute(gateway: Gateway) -> None:
    raw = Client(api_key=gateway.api_key, base_url=gateway.url, timeout=10).execute(
        surface="payment.execute", context=PAY, actor_id="legacy")
    assert raw["decision"] == "PERMIT"
    assert raw["decision_code"] == "PERMIT"
    assert raw["receipt"]["decision"] == "PERMIT"
    assert raw["execution_token"]
    assert raw["request_id"]


def test_an_observe_decision_never_reads_as_a_permit_through_the_sdk(
        tg: TrigGuard, gateway: Gateway) -> None:
    # The SDK cannot ask in observe mode (a CI client does): ask over HTTP, read with the SDK.
    bulk = {"row_count": 5_000_000, "destination": "partner", "contains_pii": False}
    actor = "sdk-observer"
    with gateway.client() as client:
        observed = client.post("/execute", json={"surface": "data.export", "actorId": actor,
                                                 "context": bulk,
                                                 "executionMode": "observe"}).json()
    assert (observed["decision"], observed["would_decision"]) == ("PERMIT", "DENY")
    assert "execution_token" not in observed
    assert tg.verify(observed["receipt"]) is True
    explained = tg.explain(observed["execution_id"])
    assert explained["decision"] == "PERMIT"
    # The line a person reads says it was not enforced, and what enforcing would decide.
    for summary in (observed["summary"], explained["summary"],
                    tg.audit(execution_id=observed["execution_id"])["entries"][0]["summary"]):
        assert "observe mode" in summary and "DENY" in summary, summary
    assert explained["detail"]["executionMode"] == "observe"
    assert explained["detail"]["wouldDecision"] == "DENY"

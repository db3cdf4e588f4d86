"""POST /execute against a real gateway process, over HTTP."""

from __future__ import annotations

import gzip
import json
import threading
import uuid
from typing import Any

import httpx
import jwt
import pytest

from execguard.protocol.signing import load_public_key_pem
from execguard.verify import KeySet, verify_receipt
from tests.conftest import Gateway

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}
SANCTIONED = "Blackwater Lagoon Trading (fictional)"


def execute(client: httpx.Client, surface: str = "payment.execute", **body: Any) -> httpx.Response:
    # A fresh actor unless the test names one: each actor has a daily payment limit.
    body.setdefault("actorId", f"agent-{uuid.uuid4()}")
    return client.post("/execute", json={"surface": surface, **body})


def keys(client: httpx.Client) -> KeySet:
    return KeySet.from_document(client.get("/.well-known/trigguard/keys.json").json())


def assert_valid_receipt(client: httpx.Client, answer: dict[str, Any]) -> dict[str, Any]:
    receipt = answer["receipt"]
    verify_receipt(receipt, keys(client))
    assert receipt["decision"] == answer["decision"]
    assert receipt["executionId"] == answer["execution_id"]
    assert receipt["surface"] == answer["surface"]
    return receipt


def test_permit_comes_with_a_valid_receipt_and_token(client: httpx.Client) -> None:
    response = execute(client, actorId="agent-7", context=PAY)
    assert response.status_code == 200
    answer = response.json()
    assert answer["decision"] == "PERMIT"
    assert answer["reasonCode"] == "WITHIN_LIMIT"
    assert answer["determiningPolicies"]
    assert response.headers["x-request-id"] == answer["request_id"]
    receipt = assert_valid_receipt(client, answer)
    assert receipt["policyVersion"] == answer["policyVersion"]
    assert receipt["determiningPolicies"] == answer["determiningPolicies"]
    assert isinstance(receipt["logIndex"], int)

    token = answer["execution_token"]
    header = jwt.get_unverified_header(token)
    document = client.get("/.well-known/trigguard/keys.json").json()
    pem = next(k["publicKeyPem"] for k in document["keys"] if k["keyId"] == header["kid"])
    claims = jwt.decode(token, load_public_key_pem(pem), algorithms=["EdDSA"],
                        audience="payment.execute")
    assert claims["jti"] == answer["execution_id"]
    assert claims["request_hash"] == receipt["requestHash"]
    assert claims["tenant"] == "demo"
    assert claims["surface"] == "payment.execute"
    assert claims["sub"] == "agent-7"
    assert claims["policy_version"] == receipt["policyVersion"]
    assert claims["exp"] - claims["iat"] == 60


@pytest.mark.parametrize(("context", "decision", "reason"), [
    ({**PAY, "amount": 10_000}, "PERMIT", "WITHIN_LIMIT"),
    ({**PAY, "amount": 10_000.01}, "ESCALATE", "HIGH_VALUE_PAYMENT"),
    ({**PAY, "amount": 50_000}, "ESCALATE", "HIGH_VALUE_PAYMENT"),
    ({**PAY, "beneficiary": SANCTIONED}, "DENY", "SANCTIONED_BENEFICIARY"),
    ({**PAY, "beneficiary": SANCTIONED, "amount": 50_000}, "DENY",
     "SANCTIONED_BENEFICIARY"),
])
def test_the_four_outcomes_on_payments(client: httpx.Client, context: dict[str, Any],
                                       decision: str, reason: str) -> None:
    answer = execute(client, context=context).json()
    assert (answer["decision"], answer["reasonCode"]) == (decision, reason)
    assert_valid_receipt(client, answer)
    assert ("execution_token" in answer) == (decision == "PERMIT")


def test_nothing_matching_is_silence(client: httpx.Client) -> None:
    answer = execute(client, "deploy.release",
                     context={"environment": "production", "service": "api"}).json()
    assert answer["decision"] == "SILENCE"
    assert "execution_token" not in answer
    assert_valid_receipt(client, answer)


@pytest.mark.parametrize(("context", "reason", "field"), [
    ({"currency": "EUR", "beneficiary": "Acme"}, "MISSING_CONTEXT", "amount"),
    ({"amt": 5, "currency": "EUR", "beneficiary": "Acme"}, "MISSING_CONTEXT", "amount"),
    ({**PAY, "amount": "250"}, "INVALID_CONTEXT", "amount"),
    ({**PAY, "amount": True}, "INVALID_CONTEXT", "amount"),
    ({**PAY, "amount": -5}, "INVALID_CONTEXT", "amount"),
    ({**PAY, "amount": 0.123456}, "INVALID_CONTEXT", "amount"),
    ({**PAY, "amount": None}, "MISSING_CONTEXT", "amount"),
    ({**PAY, "currency": "DOGE"}, "INVALID_CONTEXT", "currency"),
])
def test_context_that_does_not_satisfy_the_surface_is_silence(
        client: httpx.Client, context: dict[str, Any], reason: str, field: str) -> None:
    answer = execute(client, context=context).json()
    assert answer["decision"] == "SILENCE"
    assert answer["reasonCode"] == reason
    assert f"context.{field}" in answer["reason"]
    assert_valid_receipt(client, answer)


@pytest.mark.parametrize(("raw", "field"), [
    ('{"surface":"payment.execute","context":{"amount":NaN,"currency":"EUR",'
     '"beneficiary":"A"}}', "body"),
    ('{"surface":"payment.execute","context":{"amount":Infinity,"currency":"EUR",'
     '"beneficiary":"A"}}', "body"),
    ('{"surface":"payment.execute","context":{"amount":-Infinity,"currency":"EUR",'
     '"beneficiary":"A"}}', "body"),
    ('{"surface":"payment.execute","context":{"amount":1' + "0" * 399 +
     ',"currency":"EUR","beneficiary":"A"}}', "body.context.amount"),
    ('{"surface":"payment.execute","context":{"amount":1,"amount":99999999,'
     '"currency":"EUR","beneficiary":"A"}}', "body"),
    # Read as 10000.0, it was decided as that, under the demo's escalation threshold.
    ('{"surface":"payment.execute","context":{"amount":10000.0000000000001,'
     '"currency":"EUR","beneficiary":"A"}}', "body"),
    ('{"surface":"payment.execute","context":{"facts":{"amount_sum_24h":0},'
     '"amount":1,"currency":"EUR","beneficiary":"A"}}', "context.facts"),
    ('{"surface":"payment.execute","context":{"now":"2020-01-01T00:00:00Z"}}', "context.now"),
    ('{"context":{}}', "surface"),
    ('{"surface":["payment.execute"]}', "surface"),
    ('{"surface":"payment.execute","context":"amount=5"}', "context"),
    ("not json", "body"),
    # U+0000: PostgreSQL cannot store it; refused on every backend alike.
    ('{"surface":"payment.execute","actorId":"agent\\u0000x","context":{"amount":1,'
     '"currency":"EUR","beneficiary":"A"}}', "body.actorId"),
    ('{"surface":"payment.execute","context":{"amount":1,"currency":"EUR",'
     '"beneficiary":"Acme\\u0000"}}', "body.context.beneficiary"),
])
def test_malformed_bodies_are_422_naming_the_field(client: httpx.Client, raw: str,
                                                   field: str) -> None:
    before = len(client.get("/v1/audit", params={"limit": 1000}).json()["entries"])
    response = client.post("/execute", content=raw,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "malformed_request"
    assert body["field"] == field
    assert field in body["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert len(client.get("/v1/audit", params={"limit": 1000}).json()["entries"]) == before


def _storage_faults(client: httpx.Client) -> str:
    return next(line for line in client.get("/metrics").text.splitlines()
                if line.startswith('execguard_fail_closed_total{cause="storage_unavailable"}'))


@pytest.mark.parametrize(("method", "url", "field"), [
    ("GET", "/v1/executions/a%00b", "execution_id"),
    ("GET", "/verify/a%00b", "execution_id"),
    ("GET", "/v1/receipts/a%00b/bundle", "execution_id"),
    ("GET", "/v1/approvals/a%00b", "execution_id"),
    ("POST", "/v1/permits/a%00b/consume", "execution_id"),
    ("GET", "/v1/audit?actor=agent%00x", "actor"),
    ("GET", "/v1/audit?surface=payment.execute&surface=x%00", "surface"),
])
def test_nul_in_the_url_is_422_naming_the_parameter_not_a_database_fault(
        client: httpx.Client, method: str, url: str, field: str) -> None:
    faults = _storage_faults(client)
    response = client.request(method, url, json={} if method == "POST" else None)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert "NUL" in response.json()["expected"]
    assert _storage_faults(client) == faults
    assert client.get("/readyz").status_code == 200


def test_unknown_surface_is_400(client: httpx.Client) -> None:
    response = execute(client, "paymnt.execute", context=PAY)
    assert response.status_code == 400
    assert response.json()["error"] == "unknown_surface"
    assert "paymnt.execute" in response.json()["message"]


def test_too_large_bodies_are_413(client: httpx.Client) -> None:
    big = {"surface": "payment.execute", "context": {**PAY, "memo": "x" * 300_000}}
    response = client.post("/execute", json=big)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    # Without a Content-Length the limit still holds.
    chunks = (b'{"surface":"payment.execute","context":{"memo":"' + b"x" * 65536
              for _ in range(1))
    streamed = client.post("/execute", content=iter([*chunks, b"x" * 300_000, b'"}}']))
    assert streamed.status_code == 413


def test_unicode_context_is_decided_and_signed(client: httpx.Client) -> None:
    answer = execute(client, actorId="agent-ünï-🚀",
                     context={**PAY, "beneficiary": "Bäckerei Müller 🥨", "memo": "日本語"}).json()
    assert answer["decision"] == "PERMIT"
    assert assert_valid_receipt(client, answer)["actorId"] == "agent-ünï-🚀"


def test_authentication(gateway: Gateway) -> None:
    with gateway.client(api_key="") as anonymous:
        response = execute(anonymous, context=PAY)
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
    with gateway.client(api_key="egk_not-a-real-key") as wrong:
        assert execute(wrong, context=PAY).status_code == 401
        assert wrong.get("/v1/audit").status_code == 401
    with gateway.client() as good:
        consumer = good.post("/execute", json={"surface": "payment.execute", "context": PAY},
                             headers={"X-Consumer": "demo"})
        assert consumer.status_code == 200
        other = good.post("/execute", json={"surface": "payment.execute", "context": PAY},
                          headers={"X-Consumer": "someone-else"})
        assert other.status_code == 403
        assert other.json()["error"] == "forbidden"


def test_observe_mode_only_where_the_surface_allows_it(client: httpx.Client) -> None:
    big_export = {"row_count": 5_000_000, "destination": "partner",
                  "contains_pii": False}
    enforced = execute(client, "data.export", context=big_export).json()
    assert enforced["decision"] == "DENY"
    observed = execute(client, "data.export", context=big_export,
                       executionMode="observe").json()
    assert observed["decision"] == "PERMIT"
    assert observed["would_decision"] == "DENY"
    assert "execution_token" not in observed
    receipt = assert_valid_receipt(client, observed)
    assert receipt["executionMode"] == "observe" and receipt["wouldDecision"] == "DENY"
    # payment.execute does not allow observe mode: the request is enforced.
    payment = execute(client, context={**PAY, "beneficiary": SANCTIONED},
                      executionMode="observe").json()
    assert payment["decision"] == "DENY"
    assert payment["executionMode"] == "enforce"
    assert "would_decision" not in payment


def test_idempotent_retry_returns_the_identical_decision(client: httpx.Client) -> None:
    key = f"pay-{uuid.uuid4()}"
    body = {"surface": "payment.execute", "context": PAY, "idempotencyKey": key}
    first = client.post("/execute", json=body).json()
    count = len(client.get("/v1/audit", params={"limit": 1000}).json()["entries"])
    second = client.post("/execute", json=body).json()
    via_header = client.post("/execute", json={"surface": "payment.execute", "context": PAY},
                             headers={"Idempotency-Key": key}).json()
    for again in (second, via_header):
        assert again["execution_id"] == first["execution_id"]
        assert again["receipt"] == first["receipt"]
        assert again["execution_token"] == first["execution_token"]
    assert len(client.get("/v1/audit", params={"limit": 1000}).json()["entries"]) == count

    reused = client.post("/execute", json={**body, "context": {**PAY, "amount": 251}})
    assert reused.status_code == 409
    assert reused.json()["error"] == "idempotency_key_reuse"


def test_an_idempotency_key_padded_with_white_space_is_refused(client: httpx.Client) -> None:
    # HTTP strips the header's white space: in the body " k" was another key than the
    # header "k", and a client sending both (with equal values) got a mismatch.
    key = f"pad-{uuid.uuid4()}"
    response = execute(client, context=PAY, idempotencyKey=f" {key} ")
    assert response.status_code == 422
    assert response.json()["field"] == "idempotencyKey"
    assert "white space" in response.json()["expected"]


def test_an_idempotency_key_header_that_is_not_ascii_is_refused(client: httpx.Client) -> None:
    # A UTF-8 header is read as Latin-1: "café" would be stored as "cafÃ©".
    response = client.post("/execute", json={"surface": "payment.execute", "context": PAY},
                           headers=[(b"Idempotency-Key", "caf\u00e9".encode())])
    assert response.status_code == 422
    assert response.json()["field"] == "Idempotency-Key"
    assert "ASCII" in response.json()["expected"]


def test_two_different_idempotency_key_headers_are_refused(client: httpx.Client) -> None:
    first, second = f"one-{uuid.uuid4()}", f"two-{uuid.uuid4()}"
    response = client.post("/execute", json={"surface": "payment.execute", "context": PAY},
                           headers=[("Idempotency-Key", first), ("Idempotency-Key", second)])
    assert response.status_code == 422
    assert response.json()["field"] == "Idempotency-Key"
    # Sent twice alike, the key is unambiguous.
    same = client.post("/execute", json={"surface": "payment.execute", "context": PAY},
                       headers=[("Idempotency-Key", first), ("Idempotency-Key", first)])
    assert same.status_code == 200


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("path", ["/execute", "/v1/coach"])
def test_a_content_coded_body_is_refused_naming_the_header(client: httpx.Client, path: str,
                                                           compress: bool) -> None:
    raw = json.dumps({"surface": "payment.execute", "intent": "payment.execute",
                      "context": PAY}).encode()
    response = client.post(path, content=gzip.compress(raw) if compress else raw,
                           headers={"Content-Type": "application/json",
                                    "Content-Encoding": "gzip"})
    assert response.status_code == 422
    assert response.json()["field"] == "Content-Encoding"


LONG_KEY = "K" * 100_000


@pytest.mark.parametrize(("method", "url", "content"), [
    ("GET", "/verify/" + "A" * 20_000, None),
    ("GET", "/v1/receipts/" + "A" * 20_000 + "/bundle", None),
    ("GET", "/v1/audit?since=" + "A" * 20_000, None),
    ("POST", "/execute", f'{{"surface":"payment.execute","context":{{"{LONG_KEY}":1,'
     f'"{LONG_KEY}":2}}}}'),
    ("POST", "/execute", f'{{"surface":"payment.execute","context":{{"{LONG_KEY}":1e400}}}}'),
])
def test_errors_do_not_echo_long_input_back(client: httpx.Client, method: str, url: str,
                                            content: str | None) -> None:
    response = client.request(method, url, content=content)
    assert 400 <= response.status_code < 500
    body = response.json()
    assert len(response.content) < 2_000
    assert body["error"] and body["message"] and body["request_id"]


def test_concurrent_requests_with_one_key_are_evaluated_once(gateway: Gateway) -> None:
    key = f"race-{uuid.uuid4()}"
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def send() -> None:
        with gateway.client() as c:
            response = c.post("/execute", headers={"Idempotency-Key": key},
                              json={"surface": "payment.execute", "context": PAY})
            with lock:
                answers.append(response.json())

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 20
    assert len({a["execution_id"] for a in answers}) == 1
    with gateway.client() as c:
        entries = c.get("/v1/audit", params={"execution_id": answers[0]["execution_id"]})
        assert len(entries.json()["entries"]) == 1


def test_every_response_carries_a_request_id(client: httpx.Client) -> None:
    for response in (client.get("/healthz"), client.get("/nope"),
                     client.post("/execute", content=b"{"),
                     client.get("/verify/unknown-id")):
        assert response.headers.get("x-request-id")
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert set(missing.json()) >= {"error", "message", "request_id"}
    chosen = client.get("/healthz", headers={"X-Request-Id": "trace-abc-123"})
    assert chosen.headers["x-request-id"] == "trace-abc-123"


def test_keys_document_and_service_endpoints(client: httpx.Client) -> None:
    response = client.get("/.well-known/trigguard/keys.json")
    assert response.headers["cache-control"] == "public, max-age=300"
    document = response.json()
    assert document["keys"][0]["algorithm"] == "Ed25519"
    assert document["keys"][0]["status"] == "active"
    assert document["keys"][0]["publicKeyPem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    spec = client.get("/openapi.json").json()
    assert "/execute" in spec["paths"]
    assert spec["paths"]["/execute"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["required"] == ["surface"]


def test_verify_explains_a_decision(client: httpx.Client) -> None:
    answer = execute(client, actorId="agent-9", context={**PAY, "amount": 20_000}).json()
    detail = client.get(f"/verify/{answer['execution_id']}").json()
    assert detail["decision"] == "ESCALATE"
    assert detail["surface"] == "payment.execute"
    assert detail["reasonCode"] == "HIGH_VALUE_PAYMENT"
    assert detail["policyVersion"] == answer["policyVersion"]
    assert detail["determiningPolicies"] == answer["determiningPolicies"]
    assert detail["receipt"] == answer["receipt"]
    assert "ESCALATE" in detail["summary"]
    assert client.get("/verify/does-not-exist").status_code == 404


def test_audit_filters(client: httpx.Client) -> None:
    actor = f"auditor-{uuid.uuid4()}"
    for amount in (1, 2, 20_000):
        execute(client, actorId=actor, context={**PAY, "amount": amount})
    execute(client, "data.export", actorId=actor,
            context={"row_count": 1, "destination": "internal", "contains_pii": False})
    entries = client.get("/v1/audit", params={"actor": actor}).json()["entries"]
    assert len(entries) == 4
    assert [e["decision"] for e in entries][:1] == ["PERMIT"]  # newest first
    payments = client.get("/v1/audit", params={"actor": actor,
                                               "surface": "payment.execute"}).json()["entries"]
    assert len(payments) == 3
    assert len(client.get("/v1/audit", params={"actor": actor, "limit": 2}).json()[
        "entries"]) == 2
    later = client.get("/v1/audit", params={"actor": actor, "since": "2999-01-01T00:00:00Z"})
    assert later.json()["entries"] == []
    for since in ("yesterday", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        bad = client.get("/v1/audit", params={"since": since})  # the last two: not in UTC
        assert bad.status_code == 422 and bad.json()["field"] == "since", since
    assert client.get("/v1/audit", params={"limit": 0}).status_code == 422


def test_coach_is_a_dry_run(client: httpx.Client) -> None:
    actor = f"coach-{uuid.uuid4()}"
    advice = client.post("/v1/coach", json={
        "intent": {"surface": "payment.execute", "actorId": actor},
        "context": {**PAY, "amount": 20_000}}).json()
    assert advice["likely_outcome"] == "ESCALATE"
    assert advice["advisoryOnly"] is True
    assert "receipt" not in advice
    assert client.get("/v1/audit", params={"actor": actor}).json()["entries"] == []
    assert client.post("/v1/coach", json={"intent": "nope.surface"}).status_code == 400
    for falsy in ([], 0, "", False):  # not read as "no context"
        refused = client.post("/v1/coach", json={
            "intent": {"surface": "payment.execute", "context": falsy}})
        assert refused.status_code == 422 and refused.json()["field"] == "intent.context"


def test_outcome_is_a_signed_receipt_linked_to_the_decision(client: httpx.Client) -> None:
    answer = execute(client, context=PAY).json()
    path = f"/executions/{answer['execution_id']}/outcome"
    recorded = client.post(path, json={"result": "SUCCESS", "latencyMs": 42})
    assert recorded.status_code == 200
    receipt = recorded.json()["receipt"]
    verify_receipt(receipt, keys(client))
    assert receipt["receiptType"] == "outcome"
    assert receipt["outcome"] == "SUCCESS"
    assert receipt["decisionReceiptHash"] == answer["receipt"]["receiptHash"]
    assert receipt["logIndex"] > answer["receipt"]["logIndex"]
    assert client.post(path, json={"result": "FAILURE"}).status_code == 409
    detail = client.get(f"/verify/{answer['execution_id']}").json()
    assert detail["outcome"] == receipt

    bad = client.post(path, json={"result": "MAYBE"})
    assert bad.status_code == 422 and bad.json()["field"] == "result"
    denied = execute(client, context={**PAY, "beneficiary": SANCTIONED}).json()
    assert client.post(f"/executions/{denied['execution_id']}/outcome",
                       json={"result": "SUCCESS"}).status_code == 409
    assert client.post("/executions/nope/outcome", json={"result": "SUCCESS"}).status_code == 404


def test_sensitive_fields_are_never_stored_in_clear(fresh_gateway: Gateway) -> None:
    secret = "DE89370400440532013000"
    with fresh_gateway.client() as client:
        answer = execute(client, context={**PAY, "beneficiary_account": secret}).json()
        assert answer["decision"] == "PERMIT"
        detail = client.get(f"/verify/{answer['execution_id']}")
    assert secret not in json.dumps(answer)
    assert secret not in detail.text
    stored = fresh_gateway.stored_bytes()
    assert answer["execution_id"].encode() in stored  # the decision itself is stored...
    assert secret.encode() not in stored  # ...but the account number is only a digest

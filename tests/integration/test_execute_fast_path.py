"""POST /execute is answered outside the framework: same headers, shapes and codes as any route."""

from __future__ import annotations

import httpx

from tests.conftest import Gateway

PAY = {"surface": "payment.execute", "actorId": "fast-path",
       "context": {"amount": 1, "currency": "EUR", "beneficiary": "Acme Office Supplies"}}


def test_a_decision_keeps_the_callers_request_id(client: httpx.Client) -> None:
    response = client.post("/execute", json=PAY, headers={"X-Request-Id": "trace-exec-1"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "trace-exec-1"
    assert response.json()["request_id"] == "trace-exec-1"


def test_errors_have_the_one_shape_and_their_headers(gateway: Gateway) -> None:
    with gateway.client(api_key="") as anonymous:
        refused = anonymous.post("/execute", json=PAY, headers={"Authorization": ""})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    body = refused.json()
    assert body["error"] == "unauthorized"
    assert body["request_id"] == refused.headers["x-request-id"]
    assert set(body) >= {"error", "message", "request_id"}


def test_strict_validation_names_the_field(client: httpx.Client) -> None:
    assert client.post("/execute", content=b"{}").status_code == 422  # no surface
    bad = client.post("/execute", json={**PAY, "surface": 7})
    assert bad.status_code == 422
    assert (bad.json()["error"], bad.json()["field"]) == ("malformed_request", "surface")

"""When the gateway cannot sign or record, it issues no decision at all."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.conftest import Gateway, api_key_from, free_port, run_cli, start_gateway_with_broken_key

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}


def test_unreadable_signing_key_means_no_decisions(tmp_path: Path) -> None:
    gateway = start_gateway_with_broken_key(tmp_path)
    try:
        with gateway.client() as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert "signing key" in " ".join(ready.json()["problems"])
            response = client.post("/execute", json={"surface": "payment.execute",
                                                     "context": PAY})
            assert response.status_code == 503
            assert response.json()["error"] == "keys_unavailable"
            assert "execution_token" not in response.text
            # The public half is still published, so earlier receipts stay verifiable.
            assert client.get("/.well-known/trigguard/keys.json").status_code == 200
            assert client.get("/v1/audit").json()["entries"] == []
    finally:
        gateway.stop()


def test_no_published_key_means_keys_unavailable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = api_key_from(run_cli("init", data=data).stdout)
    with sqlite3.connect(data / "execguard.db") as conn:
        conn.execute("DELETE FROM signing_keys")
    gateway = Gateway(data=data, port=free_port(), api_key=key)
    gateway.start(require_ready=False)
    try:
        with gateway.client() as client:
            keys = client.get("/.well-known/trigguard/keys.json")
            assert keys.status_code == 503
            assert keys.json()["error"] == "keys_unavailable"
            assert client.post("/execute", json={"surface": "payment.execute",
                                                 "context": PAY}).status_code == 503
    finally:
        gateway.stop()


def test_a_key_file_that_becomes_unreadable_stops_signing_until_it_is_back(
        fresh_gateway: Gateway) -> None:
    import time

    (pem,) = (fresh_gateway.data / "keys").glob("*.pem")
    hidden = pem.with_suffix(".away")
    with fresh_gateway.client() as client:
        assert client.post("/execute", json={"surface": "payment.execute",
                                             "context": PAY}).status_code == 200
        pem.rename(hidden)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                response = client.post("/execute", json={"surface": "payment.execute",
                                                         "context": PAY})
                if response.status_code == 503:
                    break
                time.sleep(0.2)
            assert response.status_code == 503
            assert response.json()["error"] == "keys_unavailable"
            assert "execution_token" not in response.text
            assert client.get("/readyz").status_code == 503
        finally:
            hidden.rename(pem)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.2)
        recovered = client.post("/execute", json={"surface": "payment.execute",
                                                  "context": PAY})
        assert recovered.status_code == 200 and recovered.json()["decision"] == "PERMIT"

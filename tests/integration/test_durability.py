"""Acknowledged means durable: a decision a client received survives the server stopping."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx

from tests.conftest import Gateway, free_port

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}


def test_sigterm_under_load_loses_no_acknowledged_decision(fresh_gateway: Gateway) -> None:
    received: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def hammer() -> None:
        with fresh_gateway.client() as client:
            while not stop.is_set():
                try:
                    response = client.post("/execute", json={"surface": "payment.execute",
                                                             "context": PAY})
                except httpx.HTTPError:
                    continue  # the server is going away: no answer, no acknowledgement
                if response.status_code == 200:
                    with lock:
                        received.append(response.json())

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(received) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    exit_code = fresh_gateway.stop(signal.SIGTERM)
    stop.set()
    for t in threads:
        t.join()
    assert exit_code == 0
    assert len(received) >= 100

    fresh_gateway.port = free_port()
    fresh_gateway.start()
    with fresh_gateway.client() as client:
        for answer in received:
            detail = client.get(f"/verify/{answer['execution_id']}").json()
            assert detail["receipt"] == answer["receipt"]
        entries = client.get("/v1/audit", params={"limit": 1000}).json()["entries"]
    indexes = sorted(e["logIndex"] for e in entries)
    assert indexes == list(range(len(indexes)))  # gapless, no duplicates
    assert len(indexes) >= len(received)

"""Permits over HTTP: consumed once, for exactly their request, before they expire."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

from execguard.protocol.request import ExecutionRequest, normalized_request, request_hash
from execguard.verify import KeySet, verify_receipt
from tests.conftest import Gateway, free_port, run_cli

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}


def permit(client: httpx.Client, **context: Any) -> dict[str, Any]:
    answer = client.post("/execute", json={"surface": "payment.execute",
                                           "context": {**PAY, **context}}).json()
    assert answer["decision"] == "PERMIT"
    return answer


def consume(client: httpx.Client, answer: dict[str, Any],
            digest: str | None = None) -> httpx.Response:
    return client.post(f"/v1/permits/{answer['execution_id']}/consume",
                       json={"requestHash": digest or answer["receipt"]["requestHash"]})


def test_a_permit_is_consumed_once_and_every_attempt_is_a_receipt(client: httpx.Client) -> None:
    answer = permit(client)
    keys = KeySet.from_document(client.get("/.well-known/trigguard/keys.json").json())
    first = consume(client, answer)
    assert first.status_code == 200
    receipt = first.json()["receipt"]
    verify_receipt(receipt, keys)
    assert receipt["receiptType"] == "consume" and receipt["consumeResult"] == "CONSUMED"
    assert receipt["decisionReceiptHash"] == answer["receipt"]["receiptHash"]

    again = consume(client, answer)
    assert again.status_code == 409
    body = again.json()
    assert body["error"] == "permit_already_consumed"
    assert body["refusalReason"] == "ALREADY_CONSUMED"
    verify_receipt(body["receipt"], keys)
    assert body["receipt"]["consumeResult"] == "REFUSED"

    detail = client.get(f"/verify/{answer['execution_id']}").json()
    assert detail["consumption"] == receipt
    assert [r["refusalReason"] for r in detail["refusedConsumptions"]] == ["ALREADY_CONSUMED"]


def test_a_permit_for_one_request_does_not_run_another(client: httpx.Client) -> None:
    answer = permit(client)
    other = request_hash(normalized_request("demo", ExecutionRequest(
        surface="payment.execute", context={**PAY, "amount": 9_999})))
    refused = consume(client, answer, digest=other)
    assert refused.status_code == 409 and refused.json()["error"] == "request_mismatch"
    # The mismatch did not burn the permit for its own request.
    assert consume(client, answer).status_code == 200


def test_decisions_that_are_not_permits_cannot_be_consumed(client: httpx.Client) -> None:
    escalated = client.post("/execute", json={"surface": "payment.execute",
                                              "context": {**PAY, "amount": 50_000}}).json()
    refused = consume(client, escalated)
    assert refused.status_code == 409 and refused.json()["error"] == "not_permitted"
    observed = client.post("/execute", json={
        "surface": "data.export", "executionMode": "observe",
        "context": {"row_count": 5_000_000, "destination": "partner",
                    "contains_pii": False}}).json()
    assert observed["decision"] == "PERMIT"
    assert consume(client, observed).json()["error"] == "not_permitted"
    assert client.post("/v1/permits/nope/consume",
                       json={"requestHash": "0" * 64}).status_code == 404
    bad = client.post(f"/v1/permits/{escalated['execution_id']}/consume",
                      json={"requestHash": "xyz"})
    assert bad.status_code == 422 and bad.json()["field"] == "requestHash"


def test_a_request_hash_with_anything_after_its_64_digits_is_refused_unlogged(
        client: httpx.Client) -> None:
    answer = client.post("/execute", json={"surface": "payment.execute", "context": PAY}).json()
    for text in (answer["receipt"]["requestHash"] + "\n", " " + answer["receipt"]["requestHash"]):
        bad = consume(client, answer, text)
        assert bad.status_code == 422 and bad.json()["field"] == "requestHash", text
    story = client.get(f"/verify/{answer['execution_id']}").json()
    assert story["refusedConsumptions"] == [] and story["consumption"] is None
    assert consume(client, answer).status_code == 200


def test_an_expired_permit_is_refused(tmp_path: Any) -> None:
    data = tmp_path / "data"
    run_cli("init", data=data)
    key = (data / "demo-api-key").read_text().strip()
    gateway = Gateway(data=data, port=free_port(), api_key=key,
                      env={"EXECGUARD_TOKEN_TTL_SECONDS": "1"})
    gateway.start()
    try:
        with gateway.client() as client:
            answer = permit(client)
            time.sleep(1.2)
            refused = consume(client, answer)
            assert refused.status_code == 409
            assert refused.json()["error"] == "permit_expired"
    finally:
        gateway.stop()


def test_fifty_concurrent_consumes_one_success(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        answer = permit(client)
    codes: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def attempt() -> None:
        with fresh_gateway.client() as c:
            start.wait()
            status = consume(c, answer).status_code
            with lock:
                codes.append(status)

    threads = [threading.Thread(target=attempt) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] + [409] * 49
    with fresh_gateway.client() as client:
        detail = client.get(f"/verify/{answer['execution_id']}").json()
    assert len(detail["refusedConsumptions"]) == 49


def test_single_use_survives_editing_the_database(fresh_gateway: Gateway) -> None:
    """There is no 'used' flag to reset: the consume record is a log entry."""
    with fresh_gateway.client() as client:
        answer = permit(client)
        assert consume(client, answer).status_code == 200
        permit(client, amount=1)  # the consume entry is now in the middle of the log
        assert client.get("/v1/log/checkpoint").json()["size"] == 3
    # An operator with the database tries every place a "used" mark could live.
    for (execution_id, response) in fresh_gateway.sql("SELECT execution_id, response"
                                                      " FROM executions"):
        unmarked = {k: v for k, v in json.loads(str(response)).items() if k != "consumed"}
        fresh_gateway.sql("UPDATE executions SET response = ? WHERE execution_id = ?",
                          (json.dumps(unmarked), execution_id))
    fresh_gateway.sql("DELETE FROM idempotency")
    with fresh_gateway.client() as client:
        assert consume(client, answer).json()["error"] == "permit_already_consumed"
    # Deleting the consume entry itself needs the log's guard removed, and the audit sees it.
    fresh_gateway.remove_log_guards()
    fresh_gateway.sql("DELETE FROM log WHERE kind = 'consume' AND execution_id = ?",
                      (answer["execution_id"],))
    fresh_gateway.stop()
    result = run_cli("audit", "--db", fresh_gateway.ledger, "--no-state", "--json",
                     check=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)[0]
    assert {"deleted", "rollback"} & {f["kind"] for f in report["findings"]}


def test_an_acknowledged_consumption_survives_a_crash(fresh_gateway: Gateway) -> None:
    """The gate runs the action once consume answers 200: that record must outlive a SIGKILL."""
    import signal

    with fresh_gateway.client() as client:
        answer = permit(client)
        assert consume(client, answer).status_code == 200
    fresh_gateway.stop(signal.SIGKILL)
    fresh_gateway.port = free_port()
    fresh_gateway.start()
    with fresh_gateway.client() as client:
        assert consume(client, answer).json()["error"] == "permit_already_consumed"


def test_a_permit_whose_execution_has_an_outcome_cannot_start_it(client: httpx.Client) -> None:
    """A FAILURE reported before the permit is used frees its share of the actor's limit;
    the permit must not then run the action after all (the limit would not count it)."""
    actor = f"agent-ended-{time.monotonic_ns()}"
    spent = 0
    for _ in range(6):  # 60,000 against the demo's daily 50,000 per actor, had they run
        answer = client.post("/execute", json={"surface": "payment.execute", "actorId": actor,
                                               "context": {**PAY, "amount": 10_000}}).json()
        assert answer["decision"] == "PERMIT"
        ended = client.post(f"/executions/{answer['execution_id']}/outcome",
                            json={"result": "FAILURE"})
        assert ended.status_code == 200
        refused = consume(client, answer)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "execution_ended"
        assert refused.json()["refusalReason"] == "OUTCOME_RECORDED"
        assert refused.json()["receipt"]["consumeResult"] == "REFUSED"
        story = client.get(f"/verify/{answer['execution_id']}").json()
        assert story["consumption"] is None and len(story["refusedConsumptions"]) == 1
        spent += 10_000 if consume(client, answer).status_code == 200 else 0
    assert spent == 0
    # A SUCCESS reported first ends it too.
    answer = permit(client)
    assert client.post(f"/executions/{answer['execution_id']}/outcome",
                       json={"result": "SUCCESS"}).status_code == 200
    assert consume(client, answer).json()["refusalReason"] == "OUTCOME_RECORDED"
    # The usual order is untouched: consumed, then its outcome, then a replay is a replay.
    answer = permit(client)
    assert consume(client, answer).status_code == 200
    assert client.post(f"/executions/{answer['execution_id']}/outcome",
                       json={"result": "SUCCESS"}).status_code == 200
    assert consume(client, answer).json()["refusalReason"] == "ALREADY_CONSUMED"


def test_a_permit_consumed_twice_after_relabelling_its_entry_is_found(
        fresh_gateway: Gateway) -> None:
    """The gateway decides single use from the log's kind column; the audit checks that
    column against the signed receipt, and that no execution is consumed twice."""
    with fresh_gateway.client() as client:
        answer = permit(client)
        first = consume(client, answer)
        assert first.status_code == 200
    fresh_gateway.stop()
    fresh_gateway.remove_log_guards()
    fresh_gateway.sql("UPDATE log SET kind = 'decision' WHERE execution_id = ?"
                      " AND kind = 'consume'", (answer["execution_id"],))
    fresh_gateway.port = free_port()
    fresh_gateway.start()
    with fresh_gateway.client() as client:
        second = consume(client, answer)  # the relabelled log lets it through...
        assert second.status_code == 200
    fresh_gateway.stop()
    result = run_cli("audit", "--db", fresh_gateway.ledger, "--no-state", "--json",
                     check=False)
    assert result.returncode == 1  # ...and the audit says so, naming both entries
    findings = json.loads(result.stdout)[0]["findings"]
    before, after = first.json()["receipt"]["logIndex"], second.json()["receipt"]["logIndex"]
    assert any(f["kind"] == "modified" and f["index"] == before and "kind" in f["message"]
               for f in findings), findings
    (twice,) = [f for f in findings if f["kind"] == "consumed-twice"]
    assert twice["index"] == after and f"entry {before}" in twice["message"]


def test_a_log_of_every_kind_of_entry_audits_clean(fresh_gateway: Gateway) -> None:
    """Decisions, votes, resolutions, consumptions (used and refused) and outcomes: each
    stored kind agrees with its receipt, so an untouched log stays clean."""
    from tests.integration.test_approvals import approver, escalate, vote

    alice = approver(fresh_gateway, "finance", "alice")
    with fresh_gateway.client() as client:
        escalated = escalate(client)
        assert vote(fresh_gateway, alice, escalated["execution_id"]).status_code == 200
        resolved = client.get(f"/v1/executions/{escalated['execution_id']}").json()
        answer = permit(client)
        assert consume(client, answer).status_code == 200
        assert consume(client, answer).status_code == 409
        assert client.post(f"/executions/{answer['execution_id']}/outcome",
                           json={"result": "SUCCESS"}).status_code == 200
        kinds = {kind for (kind,) in fresh_gateway.sql("SELECT kind FROM log")}
        assert kinds == {"decision", "approval-vote", "consume", "consume-refused", "outcome"}
        assert resolved["decision"] == "PERMIT", resolved
        client.get("/v1/log/checkpoint")
    result = run_cli("audit", "--url", fresh_gateway.url, "--api-key", fresh_gateway.api_key,
                     "--no-state", "--json", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    fresh_gateway.stop()
    result = run_cli("audit", "--db", fresh_gateway.ledger, "--no-state", "--json",
                     check=False)
    assert result.returncode == 0, result.stdout

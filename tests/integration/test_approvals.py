"""ESCALATE with approvals, through the real HTTP API with separate API keys."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from execguard.arbiter import demo_bundle_path
from execguard.protocol.outcome import parse_timestamp
from execguard.verify import KeySet, verify_receipt
from tests.conftest import Gateway, api_key_from, run_cli

PAY = {"currency": "EUR", "beneficiary": "Acme Office Supplies"}
EXPORT = {"row_count": 500, "destination": "partner", "contains_pii": True}


def approver(gateway: Gateway, group: str, label: str) -> str:
    return api_key_from(run_cli("keys", "create", "--tenant", "demo", "--role", "approver",
                                "--group", group, "--label", label, data=gateway.data).stdout)


def escalate(client: httpx.Client, actor: str = "bob", amount: int = 20_000,
             key: str | None = None) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    answer = client.post("/execute", headers=headers, json={
        "surface": "payment.execute", "actorId": actor,
        "context": {**PAY, "amount": amount}}).json()
    assert answer["decision"] == "ESCALATE", answer
    return answer


def vote(gateway: Gateway, key: str, execution_id: str, choice: str = "approve",
         comment: str = "checked") -> httpx.Response:
    with gateway.client(api_key=key) as client:
        return client.post(f"/v1/approvals/{execution_id}/{choice}", json={"comment": comment})


def test_an_approval_turns_the_escalation_into_a_single_use_permit(
        fresh_gateway: Gateway) -> None:
    alice = approver(fresh_gateway, "finance", "alice")
    key = f"pay-{uuid.uuid4()}"
    with fresh_gateway.client() as client:
        answer = escalate(client, key=key)
        approval = answer["approval"]
        assert (approval["status"], approval["approvers"], approval["quorum"]) == \
            ("pending", "finance", 1)
        assert "execution_token" not in answer
        listed = client.get("/v1/approvals", params={"status": "pending"}).json()["approvals"]
        assert [a["id"] for a in listed] == [answer["execution_id"]]

        voted = vote(fresh_gateway, alice, answer["execution_id"])
        assert voted.status_code == 200
        body = voted.json()
        keys = KeySet.from_document(client.get("/.well-known/trigguard/keys.json").json())
        verify_receipt(body["receipt"], keys)
        assert body["receipt"]["receiptType"] == "approval"
        assert body["receipt"]["vote"] == "APPROVE" and body["receipt"]["voter"] == "alice"
        assert body["approval"]["status"] == "approved"
        resolution = body["resolution"]
        assert (resolution["decision"], resolution["reasonCode"]) == ("PERMIT", "APPROVED")
        verify_receipt(resolution["receipt"], keys)
        assert resolution["receipt"]["resolves"] == answer["receipt"]["receiptHash"]
        assert resolution["receipt"]["requestHash"] == answer["receipt"]["requestHash"]

        # Polling the execution, or re-sending with the same key, gives the resolution.
        polled = client.get(f"/v1/executions/{answer['execution_id']}").json()
        assert polled["decision"] == "PERMIT" and polled["approvalStatus"] == "approved"
        assert [d["decision"] for d in polled["decisions"]] == ["ESCALATE", "PERMIT"]
        assert (polled["logIndex"], polled["timestamp"]) == (
            polled["receipt"]["logIndex"], polled["receipt"]["timestamp"])
        assert polled["logIndex"] > answer["receipt"]["logIndex"]
        again = client.post("/execute", headers={"Idempotency-Key": key}, json={
            "surface": "payment.execute", "actorId": "bob",
            "context": {**PAY, "amount": 20_000}}).json()
        assert again["decision"] == "PERMIT" and again["execution_token"]

        # The approval authorizes exactly one execution of exactly that request.
        digest = answer["receipt"]["requestHash"]
        consume = f"/v1/permits/{answer['execution_id']}/consume"
        assert client.post(consume, json={"requestHash": "0" * 64}).json()["error"] == \
            "request_mismatch"
        assert client.post(consume, json={"requestHash": digest}).status_code == 200
        assert client.post(consume, json={"requestHash": digest}).json()["error"] == \
            "permit_already_consumed"
        # A second, identical request is a new execution and needs its own approval.
        assert escalate(client)["execution_id"] != answer["execution_id"]
        assert vote(fresh_gateway, alice, answer["execution_id"]).status_code == 409


def test_who_may_vote(fresh_gateway: Gateway) -> None:
    bob_the_approver = approver(fresh_gateway, "finance", "bob")
    outsider = approver(fresh_gateway, "privacy", "carol")
    with fresh_gateway.client() as client:
        answer = escalate(client, actor="bob")
    execution_id = answer["execution_id"]
    # The requester's own key, an approver of another group, the requester as approver.
    own = vote(fresh_gateway, fresh_gateway.api_key, execution_id)
    assert own.status_code == 403
    assert vote(fresh_gateway, outsider, execution_id).status_code == 403
    self_approval = vote(fresh_gateway, bob_the_approver, execution_id)
    assert self_approval.status_code == 403
    assert "own request" in self_approval.json()["message"]
    with fresh_gateway.client() as client:
        assert client.get(f"/v1/approvals/{execution_id}").json()["votes"] == []
        assert client.get("/v1/approvals/nope").status_code == 404


def test_a_quorum_of_two(fresh_gateway: Gateway) -> None:
    first, second = approver(fresh_gateway, "privacy", "dana"), approver(
        fresh_gateway, "privacy", "erin")
    with fresh_gateway.client() as client:
        answer = client.post("/execute", json={"surface": "data.export", "actorId": "bot",
                                               "context": EXPORT}).json()
    assert answer["decision"] == "ESCALATE" and answer["approval"]["quorum"] == 2
    one = vote(fresh_gateway, first, answer["execution_id"]).json()
    assert one["approval"]["status"] == "pending" and one["resolution"] is None
    assert vote(fresh_gateway, first, answer["execution_id"]).status_code == 409  # no 2nd vote
    # Nor with a second key of the same approver: a quorum counts people, not keys.
    again = vote(fresh_gateway, approver(fresh_gateway, "privacy", "dana"),
                 answer["execution_id"])
    assert again.status_code == 409 and "already voted" in again.json()["message"]
    two = vote(fresh_gateway, second, answer["execution_id"]).json()
    assert two["approval"]["status"] == "approved"
    assert two["resolution"]["decision"] == "PERMIT"


def test_an_approved_request_with_a_sensitive_field_is_evaluated_again_faithfully(
        fresh_gateway: Gateway, tmp_path: Path) -> None:
    """The stored request holds a sensitive field only as its digest. Re-evaluated as that
    digest, the demo's approved payments with an account were SILENCE (the digest is
    longer than the field's max_length), and a forbid on the account activated meanwhile
    did not fire: a PERMIT. Now the field gets a stand-in where no policy reads it, and
    where one does, the approval cannot be evaluated again: SILENCE, never a PERMIT."""
    alice = approver(fresh_gateway, "finance", "alice")
    account = {**PAY, "amount": 20_000, "beneficiary_account": "DE89370400440532013000"}

    def escalated(client: httpx.Client) -> str:
        answer = client.post("/execute", json={"surface": "payment.execute",
                                               "actorId": "bob", "context": account}).json()
        assert answer["decision"] == "ESCALATE", answer
        return str(answer["execution_id"])

    with fresh_gateway.client() as client:
        first, second = escalated(client), escalated(client)
    resolved = vote(fresh_gateway, alice, first).json()["resolution"]
    assert (resolved["decision"], resolved["reasonCode"]) == ("PERMIT", "APPROVED")

    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    (bundle / "policies" / "blocked.cedar").write_text(
        '@id("blocked-account") @reason("BLOCKED_ACCOUNT")\n'
        'forbid (principal, action == Action::"payment.execute", resource)\n'
        'when { context has beneficiary_account &&'
        ' context.beneficiary_account == "DE89370400440532013000" };\n')
    run_cli("policy", "push", str(bundle), "--activate", data=fresh_gateway.data)
    resolved = vote(fresh_gateway, alice, second).json()["resolution"]
    assert (resolved["decision"], resolved["reasonCode"]) == ("SILENCE", "EVALUATION_ERROR")
    assert "reads context.beneficiary_account" in resolved["reason"]
    assert "execution_token" not in resolved
    assert "DE89370400440532013000" not in str(resolved)


def test_a_deny_vote_resolves_to_deny(fresh_gateway: Gateway) -> None:
    alice = approver(fresh_gateway, "finance", "alice")
    with fresh_gateway.client() as client:
        answer = escalate(client)
    denied = vote(fresh_gateway, alice, answer["execution_id"], "deny", "not budgeted").json()
    assert denied["approval"]["status"] == "denied"
    assert (denied["resolution"]["decision"], denied["resolution"]["reasonCode"]) == \
        ("DENY", "APPROVAL_DENIED")


def test_a_hard_deny_that_fires_meanwhile_stays_deny(fresh_gateway: Gateway,
                                                     tmp_path: Path) -> None:
    alice = approver(fresh_gateway, "finance", "alice")
    with fresh_gateway.client() as client:
        answer = escalate(client)
    # While the request waits, the beneficiary lands on the sanctions list.
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    sanctions = bundle / "policies" / "sanctions.cedar"
    sanctions.write_text(sanctions.read_text().replace(
        '"Count Olaf Imports (fictional)"', '"Count Olaf Imports (fictional)",\n    '
        '"Acme Office Supplies"'))
    version = run_cli("policy", "push", str(bundle), "--activate",
                      data=fresh_gateway.data).stdout.strip().splitlines()[-1]
    resolved = vote(fresh_gateway, alice, answer["execution_id"]).json()["resolution"]
    assert (resolved["decision"], resolved["reasonCode"]) == ("DENY", "SANCTIONED_BENEFICIARY")
    assert resolved["policyVersion"] == version


@pytest.fixture
def quick_expiry(tmp_path: Path) -> Any:
    bundle = tmp_path / "quick"
    shutil.copytree(demo_bundle_path(), bundle)
    surfaces = bundle / "surfaces.toml"
    surfaces.write_text(surfaces.read_text().replace('approval_expiry = "24h"',
                                                     'approval_expiry = "2s"'))
    return bundle


def test_an_expired_approval_resolves_to_silence(fresh_gateway: Gateway,
                                                 quick_expiry: Path) -> None:
    run_cli("policy", "push", str(quick_expiry), "--activate", data=fresh_gateway.data)
    alice = approver(fresh_gateway, "finance", "alice")
    with fresh_gateway.client() as client:
        answer = escalate(client)
        time.sleep(2.5)
        late = vote(fresh_gateway, alice, answer["execution_id"])
        assert late.status_code == 409 and "expired" in late.json()["message"]
        polled = client.get(f"/v1/executions/{answer['execution_id']}").json()
        assert (polled["decision"], polled["reasonCode"]) == ("SILENCE", "APPROVAL_EXPIRED")
        assert polled["approvalStatus"] == "expired"
        consume = client.post(f"/v1/permits/{answer['execution_id']}/consume",
                              json={"requestHash": answer["receipt"]["requestHash"]})
        assert consume.json()["error"] == "not_permitted"


def test_approvals_resolve_while_the_active_policy_does_not_load(fresh_gateway: Gateway,
                                                                 quick_expiry: Path) -> None:
    """An active bundle stored before this release's stricter rules does not load. Then
    no approval could be denied or expire (503: the resolution read the policy even when
    it evaluates nothing), and the first overdue one stopped the gateway's expiry sweep
    for every tenant. A deny and an expiry need no policy; an approval, which must
    evaluate the request again, waits for a corrected bundle (503 saying so)."""
    from tests.integration.test_shadow import store_a_bundle_that_no_longer_loads

    surfaces = quick_expiry / "surfaces.toml"  # time to vote before the expiry
    surfaces.write_text(surfaces.read_text().replace('approval_expiry = "2s"',
                                                     'approval_expiry = "6s"'))
    run_cli("policy", "push", str(quick_expiry), "--activate", data=fresh_gateway.data)
    alice = approver(fresh_gateway, "finance", "alice")
    with fresh_gateway.client() as client:
        denied, expiring, approved = (escalate(client, actor=f"actor-{n}") for n in range(3))
    store_a_bundle_that_no_longer_loads(fresh_gateway, shadow=False)
    assert vote(fresh_gateway, alice, denied["execution_id"], "deny").status_code == 200
    refused = vote(fresh_gateway, alice, approved["execution_id"])
    assert refused.status_code == 503 and "does not load" in refused.json()["message"]
    with fresh_gateway.client() as client:
        deadline = time.monotonic() + 15
        while client.get(f"/v1/executions/{expiring['execution_id']}").json()[
                "decision"] != "SILENCE":
            assert time.monotonic() < deadline, "the overdue approval never expired"
            time.sleep(0.3)
        story = {answer["execution_id"]: client.get(
            f"/v1/executions/{answer['execution_id']}").json()
            for answer in (denied, expiring, approved)}
    assert (story[denied["execution_id"]]["decision"],
            story[denied["execution_id"]]["reasonCode"]) == ("DENY", "APPROVAL_DENIED")
    assert story[expiring["execution_id"]]["reasonCode"] == "APPROVAL_EXPIRED"
    assert story[approved["execution_id"]]["decision"] == "SILENCE"  # it expired meanwhile


def test_an_escalation_decided_under_a_policy_that_no_longer_loads_waits_for_no_vote(
        fresh_gateway: Gateway) -> None:
    """The version an escalation was decided under says which of its fields were stored
    as digests. When it no longer loads, an approving vote resolved it to SILENCE and
    closed the approval: the approvers' decision was lost. It is refused (503); the
    approval stays pending, and can still be denied."""
    from tests.integration.test_shadow import store_a_bundle_that_no_longer_loads

    alice = approver(fresh_gateway, "finance", "alice")
    with fresh_gateway.client() as client:
        kept, denied = escalate(client, actor="actor-a"), escalate(client, actor="actor-b")
    unusable = store_a_bundle_that_no_longer_loads(fresh_gateway, shadow=True)
    fresh_gateway.sql("UPDATE executions SET policy_version = ?", (unusable,))
    refused = vote(fresh_gateway, alice, kept["execution_id"])
    assert refused.status_code == 503 and "does not load" in refused.json()["message"]
    assert vote(fresh_gateway, alice, denied["execution_id"], "deny").status_code == 200
    with fresh_gateway.client() as client:
        still = client.get(f"/v1/approvals/{kept['execution_id']}").json()
        assert (still["status"], still["decision"]) == ("pending", "ESCALATE")
        ended = client.get(f"/v1/executions/{denied['execution_id']}").json()
        assert (ended["decision"], ended["reasonCode"]) == ("DENY", "APPROVAL_DENIED")


class Receiver:
    """A real local HTTP server that records the webhook deliveries it gets."""

    def __init__(self, status: int = 200) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append((dict(self.headers), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.deliveries) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.deliveries) >= count, self.deliveries


def test_every_expiry_is_announced_once_and_counted(fresh_gateway: Gateway,
                                                    quick_expiry: Path) -> None:
    """An approval expires by the gateway's sweep, or by the first vote that comes too
    late. The late vote's expiry sent no ``approval.resolved`` (nothing was left for the
    sweep to do), and neither kind of resolution was in the metrics: not as a decision,
    not in the batch sizes, whose sum must be the log's size."""
    import json as jsonlib

    from tests.integration.test_operations import scrape, value

    run_cli("policy", "push", str(quick_expiry), "--activate", data=fresh_gateway.data)
    hooks = Receiver()
    try:
        run_cli("webhooks", "add", hooks.url, "--event", "approval.resolved",
                data=fresh_gateway.data)
        alice = approver(fresh_gateway, "finance", "alice")
        with fresh_gateway.client() as client:
            swept, voted_late = escalate(client), escalate(client, actor="carol")
            # Just after its expiry: the sweep (every 2 s) has most likely not run since.
            expires = parse_timestamp(voted_late["approval"]["expiresAt"]).timestamp()
            time.sleep(max(0.0, expires - time.time()) + 0.02)
            late = vote(fresh_gateway, alice, voted_late["execution_id"])
            assert late.status_code == 409 and "expired" in late.json()["message"]
            deadline = time.monotonic() + 10
            while client.get(f"/v1/executions/{swept['execution_id']}").json()[
                    "decision"] != "SILENCE":
                assert time.monotonic() < deadline, "the sweep never expired the approval"
                time.sleep(0.2)
        hooks.wait_for(2)
        time.sleep(2.5)  # another sweep: nothing more to announce
        announced = sorted(jsonlib.loads(body)["executionId"] for _, body in hooks.deliveries)
        assert announced == sorted([swept["execution_id"], voted_late["execution_id"]])
    finally:
        hooks.server.shutdown()
    metrics = scrape(fresh_gateway)
    assert value(metrics, "execguard_approval_resolutions_total", decision="SILENCE",
                 surface="payment.execute") == 2
    ((stored,),) = fresh_gateway.sql("SELECT COUNT(*) FROM log WHERE tenant = 'demo'")
    assert stored == 4  # two escalations, two resolutions
    assert value(metrics, "execguard_group_commit_batch_size_sum") == stored
    assert value(metrics, "execguard_decisions_total", decision="ESCALATE",
                 surface="payment.execute", mode="enforce") == 2


def test_webhooks_are_signed_and_a_failing_one_blocks_nothing(fresh_gateway: Gateway) -> None:
    import json as jsonlib

    from execguard.server.webhooks import sign_payload

    good, slack, broken = Receiver(), Receiver(), Receiver(status=500)
    try:
        run_cli("webhooks", "add", good.url, "--secret", "s3cret", data=fresh_gateway.data)
        run_cli("webhooks", "add", slack.url, "--format", "slack", "--event",
                "approval.requested", data=fresh_gateway.data)
        # A webhook URL may hold credentials: neither the logs nor the CLI show them.
        printed = [run_cli("webhooks", "add", broken.url.replace("http://", "http://hook:"
                                                                "PASSWORD1@") + "?token=QUERY1",
                           data=fresh_gateway.data).stdout,
                   run_cli("webhooks", "add",
                           "http://hook:PASSWORD2@127.0.0.1:9/nowhere?token=QUERY2",
                           data=fresh_gateway.data).stdout,
                   run_cli("webhooks", "list", data=fresh_gateway.data).stdout]
        assert printed[-1].count("127.0.0.1") == 4
        for secret in ("PASSWORD1", "PASSWORD2", "QUERY1", "QUERY2", "/nowhere"):
            assert secret not in "".join(printed)
        alice = approver(fresh_gateway, "finance", "alice")
        with fresh_gateway.client() as client:
            started = time.monotonic()
            answer = escalate(client)
            assert time.monotonic() - started < 5  # nobody waited for the receivers
        good.wait_for(1)
        headers, body = good.deliveries[0]
        assert headers["X-ExecGuard-Event"] == "approval.requested"
        assert headers["X-ExecGuard-Signature"] == sign_payload(
            "s3cret", headers["X-ExecGuard-Timestamp"], body)
        event = jsonlib.loads(body)
        assert event["approval"]["id"] == answer["execution_id"]
        assert event["approval"]["approvers"] == "finance"

        env = {"EXECGUARD_URL": fresh_gateway.url, "EXECGUARD_API_KEY": alice}
        listed = run_cli("approvals", "list", "--json", env=env).stdout
        assert answer["execution_id"] in listed
        run_cli("approvals", "approve", answer["execution_id"], "--comment", "ok", env=env)
        shown = jsonlib.loads(run_cli("approvals", "show", answer["execution_id"], "--json",
                                      env=env).stdout)
        assert shown["status"] == "approved" and shown["decision"] == "PERMIT"
        good.wait_for(2)
        resolved = jsonlib.loads(good.deliveries[1][1])
        assert resolved["event"] == "approval.resolved" and resolved["decision"] == "PERMIT"
        slack.wait_for(1)
        assert "finance" in jsonlib.loads(slack.deliveries[0][1])["text"]
        assert len(slack.deliveries) == 1  # it asked for approval.requested only
        broken.wait_for(2)  # retried, and nothing waited for it
        fresh_gateway.stop()
        logged = fresh_gateway.log_path.read_text()
        assert "failed (attempt 2): HTTP 500" in logged and "(host 127.0.0.1)" in logged
        for secret in ("PASSWORD1", "PASSWORD2", "QUERY1", "QUERY2", "/nowhere"):
            assert secret not in logged
    finally:
        for receiver in (good, slack, broken):
            receiver.server.shutdown()


def test_the_sdk_waits_for_the_approvers_then_runs_once(fresh_gateway: Gateway) -> None:
    import threading

    from execguard.gate import ExecutionBlocked, Gate

    alice = approver(fresh_gateway, "finance", "alice")
    gate = Gate(fresh_gateway.url, fresh_gateway.api_key, timeout=5)
    runs: list[int] = []

    @gate.guard(surface="payment.execute", actor="bob", wait_for_approval=20,
                context=lambda amount: {**PAY, "amount": amount})
    def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    def approve_when_asked() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with fresh_gateway.client(api_key=alice) as client:
                pending = client.get("/v1/approvals", params={"status": "pending"}).json()
            if pending["approvals"]:
                vote(fresh_gateway, alice, pending["approvals"][0]["id"])
                return
            time.sleep(0.2)

    voter = threading.Thread(target=approve_when_asked)
    voter.start()
    try:
        assert pay(30_000) == "paid"
    finally:
        voter.join()
    assert runs == [30_000]

    impatient = Gate(fresh_gateway.url, fresh_gateway.api_key, timeout=5)
    with pytest.raises(ExecutionBlocked) as blocked:
        impatient.acquire("payment.execute", {**PAY, "amount": 31_000}, actor="carl",
                          wait_for_approval=1)
    assert blocked.value.decision == "ESCALATE"
    assert runs == [30_000]
    gate.close()
    impatient.close()

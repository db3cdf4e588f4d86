"""Replaying recorded decisions (``execguard replay``) and ``execguard policy impact``.

One gateway of its own records 1,000 decisions over HTTP across the demo surfaces, enforce
and observe, several actors and every outcome; the tests replay them from the ledger.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from execguard.arbiter import Evaluation, PolicyBundle, compute_facts, demo_bundle_path
from execguard.ledger import Committed, ExecutionRecord, PendingEntry, SQLiteStore
from execguard.protocol.canonical import canonical_sha256
from execguard.protocol.errors import BundleInvalid
from execguard.protocol.ids import execution_id as new_execution_id
from execguard.protocol.outcome import Outcome
from execguard.protocol.policyversion import bundle_version
from execguard.protocol.receipt import receipt_hash
from execguard.protocol.request import normalized_request, parse_execution_request, request_hash
from execguard.replay import ReplayStatus, ledger_keys, log_receipts, replay_execution
from execguard.server.datadir import DataDir
from execguard.server.decisions import DecisionInput, build_decision
from tests.conftest import Gateway, api_key_from, run_cli, start_gateway

DECISIONS = 1000
ACTORS = [f"agent-{n}" for n in range(10)]
SANCTIONED = "Oceanic Shell Holdings (fictional)"


@dataclass
class Recorded:
    """The gateway and what was sent to it, with its answers."""

    gateway: Gateway
    sent: list[tuple[dict[str, Any], dict[str, Any]]]
    resolved: list[str]  # escalations an approver then approved or denied

    @property
    def db(self) -> Path:
        return self.gateway.data / "execguard.db"

    def store(self) -> SQLiteStore:
        return SQLiteStore(self.db, readonly=True)

    def records(self) -> list[ExecutionRecord]:
        store = self.store()
        try:
            return store.query_executions("demo", limit=10 * DECISIONS)
        finally:
            store.close()


def payment(rng: random.Random) -> dict[str, Any]:
    kind = rng.random()
    if kind < 0.40:
        amount: Any = round(rng.uniform(1, 1000), 2)
    elif kind < 0.75:
        amount = rng.choice([1000, 1000.01, 10000, round(rng.uniform(1000, 10000), 2)])
    else:
        amount = round(rng.uniform(10000.01, 40000), 2)
    context: dict[str, Any] = {"amount": amount, "currency": rng.choice(["EUR", "USD", "GBP"]),
                               "beneficiary": SANCTIONED if rng.random() < 0.08
                               else rng.choice(["Acme Office Supplies", "Northwind Traders"])}
    extra = rng.random()
    if extra < 0.05:
        del context["amount"]  # SILENCE MISSING_CONTEXT
    elif extra < 0.08:
        context["amount"] = str(amount)  # SILENCE INVALID_CONTEXT
    elif extra < 0.25:  # sensitive: stored as a digest (71 characters, over its max_length)
        context["beneficiary_account"] = f"DE{rng.randrange(10**19, 10**20)}"
    elif extra < 0.28:  # sensitive and invalid (too long): the decision names it
        context["beneficiary_account"] = "X" * 70
    elif extra < 0.30:  # sensitive and null: it counts as absent
        context["beneficiary_account"] = None
    body = {"surface": "payment.execute", "actorId": rng.choice(ACTORS), "context": context}
    if rng.random() < 0.2:
        body["signals"] = {"risk_score": rng.choice([5, 50, 101])}
    return body


def other(rng: random.Random) -> dict[str, Any]:
    surface = rng.choice(["data.export", "infra.apply", "deploy.release", "comms.send",
                          "tool.invoke", "memory.read", "memory.write",
                          "execution.external_action"])
    context: dict[str, Any] = {}
    if surface == "data.export":
        context = {"row_count": rng.choice([10, 5000, 20000, 2_000_000]),
                   "destination": rng.choice(["internal", "partner", "public"]),
                   "contains_pii": rng.random() < 0.5}
    elif surface == "infra.apply":
        context = {"environment": rng.choice(["dev", "staging", "production"])}
        if rng.random() < 0.6:
            context["change_window"] = rng.random() < 0.5
    elif surface == "deploy.release":
        context = {"environment": "production", "service": "billing"}
        if rng.random() < 0.7:
            context["tests_passed"] = rng.random() < 0.7
    elif surface == "comms.send":
        external = rng.random() < 0.5
        context = {"recipients": [rng.choice(["ops@example.com", "all-staff@example.com"])],
                   "recipient_count": rng.choice([1, 10, 200]), "external": external,
                   "template": rng.choice(["order-confirmation", "free-text"])}
    body = {"surface": surface, "actorId": rng.choice(ACTORS), "context": context}
    if surface in ("data.export", "deploy.release", "execution.external_action") \
            and rng.random() < 0.4:
        body["executionMode"] = "observe"
    return body


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    gateway = start_gateway(tmp_path_factory.mktemp("replay"))
    rng = random.Random(20261126)
    bodies = [payment(rng) if rng.random() < 0.6 else other(rng) for _ in range(DECISIONS)]

    def send(chunk: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        with gateway.client() as client:
            answers = []
            for body in chunk:
                response = client.post("/execute", json=body)
                assert response.status_code == 200, response.text
                answers.append((body, response.json()))
            return answers

    try:
        with ThreadPoolExecutor(8) as pool:
            chunks = pool.map(send, [bodies[i::8] for i in range(8)])
            sent = [pair for chunk in chunks for pair in chunk]
        # A resolution replaces the stored receipt (not the stored facts) of its escalation.
        finance = api_key_from(run_cli("keys", "create", "--tenant", "demo", "--role",
                                       "approver", "--group", "finance", "--label", "fin",
                                       data=gateway.data).stdout)
        resolved = [a["execution_id"] for _, a in sent
                    if a["reasonCode"] == "HIGH_VALUE_PAYMENT"][:2]
        with gateway.client(api_key=finance) as client:
            for execution_id, vote in zip(resolved, ("approve", "deny"), strict=True):
                voted = client.post(f"/v1/approvals/{execution_id}/{vote}", json={})
                assert voted.status_code == 200, voted.text
        yield Recorded(gateway, sent, resolved)
    finally:
        gateway.stop()


def outcome(answer: dict[str, Any]) -> str:
    decision = answer.get("would_decision") or answer["decision"]
    return f"{decision} {answer['reasonCode']}"


def test_the_recorded_decisions_cover_every_outcome(recorded: Recorded) -> None:
    seen = Counter(outcome(answer) for _, answer in recorded.sent)
    for expected in ("PERMIT WITHIN_LIMIT", "ESCALATE HIGH_VALUE_PAYMENT", "DENY SPEND_LIMIT",
                     "DENY SANCTIONED_BENEFICIARY", "SILENCE MISSING_CONTEXT",
                     "SILENCE INVALID_CONTEXT", "SILENCE INVALID_SIGNALS",
                     "SILENCE NO_MATCHING_POLICY", "PERMIT INTERNAL_EXPORT",
                     "ESCALATE PII_EXTERNAL_EXPORT", "DENY BULK_EXPORT_LIMIT",
                     "DENY DISTRIBUTION_LIST_BLOCKED", "PERMIT TESTS_PASSED"):
        assert seen[expected] > 0, (expected, seen)
    assert sum(1 for _, a in recorded.sent if a["executionMode"] == "observe") > 50
    assert seen["DENY SPEND_LIMIT"] > 20  # the per-actor daily limit played its part


def test_every_recorded_decision_is_reproduced(recorded: Recorded) -> None:
    records = recorded.records()
    assert len(records) == DECISIONS
    store = recorded.store()
    try:
        versions = {r.policy_version for r in records}
        assert len(versions) == 1
        bundle = PolicyBundle.from_files(store.get_bundle("demo", versions.pop()).files)
        results = [replay_execution(r, bundle,
                                    log_receipts=log_receipts(store, "demo", r.execution_id))
                   for r in records]
    finally:
        store.close()
    failures = [(r.execution_id, r.status, r.problem, r.recorded_outcome, r.replayed_outcome)
                for r in results if not r.reproduced]
    assert failures == []
    # Including those whose sensitive field is only a digest, and observe-mode ones.
    digested = [r for r in records
                if str(r.request["context"].get("beneficiary_account", "")).startswith("sha256:")]
    assert len(digested) > 100
    assert {r.status for r in results} == {ReplayStatus.REPRODUCED}
    assert any(r.mode == "observe" and r.recorded_decision != "PERMIT" for r in results)
    # An approval's resolution is replayed as the escalation it resolved, and says so.
    by_id = {r.execution_id: r for r in results}
    resolutions = {r.execution_id: r.decision for r in records
                   if r.execution_id in recorded.resolved}
    assert len(resolutions) == 2 and "ESCALATE" not in resolutions.values()
    for execution_id in recorded.resolved:
        assert by_id[execution_id].recorded_outcome == "ESCALATE HIGH_VALUE_PAYMENT"
        assert (by_id[execution_id].note or "").startswith("resolved later as")
    # Without the log, a resolution cannot be matched with the facts stored for it.
    record = next(r for r in records if r.execution_id == recorded.resolved[0])
    assert replay_execution(record, bundle).status is ReplayStatus.NOT_REPLAYABLE


def test_replay_command_reproduces_decisions(recorded: Recorded) -> None:
    by_outcome = {outcome(answer): answer["execution_id"] for _, answer in recorded.sent}
    for label in ("PERMIT WITHIN_LIMIT", "DENY SPEND_LIMIT", "ESCALATE PII_EXTERNAL_EXPORT",
                  "SILENCE INVALID_CONTEXT"):
        result = run_cli("replay", by_outcome[label], data=recorded.gateway.data)
        assert "the same decision and reason" in result.stdout
        assert label in result.stdout
    observed = next(a for _, a in recorded.sent if a["executionMode"] == "observe"
                    and a["would_decision"] != "PERMIT")
    shown = json.loads(run_cli("replay", observed["execution_id"], "--json",
                               data=recorded.gateway.data).stdout)
    assert shown["status"] == "reproduced" and shown["reproduced"] is True
    assert shown["recorded"]["decision"] == shown["replayed"]["decision"] \
        == observed["would_decision"]
    resolution = run_cli("replay", recorded.resolved[1], data=recorded.gateway.data)
    assert "note       resolved later as DENY APPROVAL_DENIED" in resolution.stdout
    missing = run_cli("replay", "no-such-execution", data=recorded.gateway.data, check=False)
    assert missing.returncode == 1 and "no execution" in missing.stderr


def test_altered_facts_are_reported_not_replayed(recorded: Recorded) -> None:
    answer = next(a for _, a in recorded.sent if a["reasonCode"] == "SPEND_LIMIT")
    execution_id = answer["execution_id"]
    with sqlite3.connect(recorded.db, timeout=30) as conn:
        (original,) = conn.execute("SELECT request FROM executions WHERE execution_id = ?",
                                   (execution_id,)).fetchone()
    request = json.loads(original)
    request["facts"]["amount_sum_24h"] = "1.00"  # "under the limit": a forged history
    try:
        with sqlite3.connect(recorded.db, timeout=30) as conn:
            conn.execute("UPDATE executions SET request = ? WHERE execution_id = ?",
                         (json.dumps(request), execution_id))
        result = run_cli("replay", execution_id, data=recorded.gateway.data, check=False)
        assert result.returncode == 1
        assert "the stored facts were altered" in result.stdout
        assert answer["receipt"]["factsDigest"] in result.stdout
        shown = json.loads(run_cli("replay", execution_id, "--json", check=False,
                                   data=recorded.gateway.data).stdout)
        assert shown["status"] == "tampered" and shown["replayed"] is None
        store = recorded.store()
        try:
            record = store.get_execution("demo", execution_id)
            assert record is not None
            bundle = PolicyBundle.from_files(
                store.get_bundle("demo", answer["policyVersion"]).files)
        finally:
            store.close()
        assert replay_execution(record, bundle).status is ReplayStatus.TAMPERED
    finally:
        with sqlite3.connect(recorded.db, timeout=30) as conn:
            conn.execute("UPDATE executions SET request = ? WHERE execution_id = ?",
                         (original, execution_id))
    assert run_cli("replay", execution_id, data=recorded.gateway.data).returncode == 0


def test_a_stored_row_that_no_longer_reads_is_said_so_not_a_traceback(
        recorded: Recorded) -> None:
    execution_id = recorded.sent[0][1]["execution_id"]
    with sqlite3.connect(recorded.db, timeout=30) as conn:
        original = conn.execute("SELECT request, response FROM executions"
                                " WHERE execution_id = ?", (execution_id,)).fetchone()
    try:
        for column, damaged, said in (("request", "{not json", "cannot be read"),
                                      ("response", "[]", "not a JSON object")):
            with sqlite3.connect(recorded.db, timeout=30) as conn:
                conn.execute(f"UPDATE executions SET {column} = ? WHERE execution_id = ?",
                             (damaged, execution_id))
            result = run_cli("replay", execution_id, data=recorded.gateway.data, check=False)
            assert result.returncode == 1 and "Traceback" not in result.stderr
            assert said in result.stdout + result.stderr
            with sqlite3.connect(recorded.db, timeout=30) as conn:
                conn.execute("UPDATE executions SET request = ?, response = ?"
                             " WHERE execution_id = ?", (*original, execution_id))
    finally:
        with sqlite3.connect(recorded.db, timeout=30) as conn:
            conn.execute("UPDATE executions SET request = ?, response = ?"
                         " WHERE execution_id = ?", (*original, execution_id))
    assert run_cli("replay", execution_id, data=recorded.gateway.data).returncode == 0


def test_a_receipt_rewritten_with_its_hashes_recomputed_is_tampered(recorded: Recorded) -> None:
    """The hashes prove a receipt whole, not genuine: one rewritten with its hashes
    recomputed (here its facts and its time) was "the same decision" to a replay."""
    answer = next(a for _, a in recorded.sent if a["reasonCode"] == "SPEND_LIMIT")
    store = recorded.store()
    try:
        record = store.get_execution("demo", answer["execution_id"])
        assert record is not None
        bundle = PolicyBundle.from_files(store.get_bundle("demo", answer["policyVersion"]).files)
        keys = ledger_keys(store)
    finally:
        store.close()
    facts = {**record.request["facts"], "now": "2020-01-01T00:00:00Z"}
    receipt = {**record.response["receipt"], "timestamp": "2020-01-01T00:00:00.000Z",
               "factsDigest": canonical_sha256(facts)}
    receipt["receiptHash"] = receipt_hash(receipt)
    forged = dataclasses.replace(record, request={**record.request, "facts": facts},
                                 response={**record.response, "receipt": receipt})
    assert replay_execution(forged, bundle).reproduced  # what the hashes alone allow
    result = replay_execution(forged, bundle, keys=keys)
    assert result.status is ReplayStatus.TAMPERED
    assert "does not verify under the ledger's signing keys" in str(result.problem)
    assert replay_execution(record, bundle, keys=keys).reproduced


def lowered_threshold(tmp_path: Path) -> Path:
    bundle = tmp_path / "candidate"
    shutil.copytree(demo_bundle_path(), bundle)
    payments = bundle / "policies" / "payments.cedar"
    text = payments.read_text()
    assert text.count('decimal("10000.0")') == 2
    payments.write_text(text.replace('decimal("10000.0")', 'decimal("1000.0")'))
    shutil.rmtree(bundle / "tests", ignore_errors=True)  # its cases are the old thresholds'
    return bundle


def test_policy_impact_counts_exactly_the_changed_decisions(recorded: Recorded,
                                                           tmp_path: Path) -> None:
    data = recorded.gateway.data
    active = [b for b in json.loads(run_cli("policy", "list", "--json", data=data).stdout)
              if b["active"]]
    candidate = run_cli("policy", "push", str(lowered_threshold(tmp_path)),
                        data=data).stdout.strip().splitlines()[-1]
    # Only PERMITs of more than 1,000 up to 10,000 change; a sanctioned beneficiary or the
    # daily limit decided the others first, and the replay uses the recorded facts.
    changed = {a["execution_id"] for b, a in recorded.sent
               if b["surface"] == "payment.execute" and a["decision"] == "PERMIT"
               and Decimal("1000") < Decimal(str(b["context"]["amount"])) <= Decimal("10000")}
    assert len(changed) > 10

    report = json.loads(run_cli("policy", "impact", "--candidate", candidate, "--since", "1h",
                                "--json", data=data).stdout)
    assert report["totals"] == {"decisions": DECISIONS, "replayed": DECISIONS,
                                "unchanged": DECISIONS - len(changed), "changed": len(changed),
                                "notReplayable": 0}
    assert [(c["surface"], c["from"], c["to"], c["count"]) for c in report["changes"]] == [
        ("payment.execute", "PERMIT WITHIN_LIMIT", "ESCALATE HIGH_VALUE_PAYMENT", len(changed))]
    examples = report["changes"][0]["examples"]
    assert len(examples) == 3 and set(examples) <= changed

    table = run_cli("policy", "impact", "--candidate", candidate, "--since", "1h", data=data)
    assert "ESCALATE HIGH_VALUE_PAYMENT" in table.stdout and f"changed {len(changed)}" \
        in table.stdout
    what_if = run_cli("replay", examples[0], "--policy", candidate, data=data)
    assert "ESCALATE HIGH_VALUE_PAYMENT" in what_if.stdout
    # Nothing was activated, and a period before the first decision has nothing to replay.
    assert [b for b in json.loads(run_cli("policy", "list", "--json", data=data).stdout)
            if b["active"]] == active
    first = min(a["receipt"]["timestamp"] for _, a in recorded.sent)
    empty = json.loads(run_cli("policy", "impact", "--candidate", candidate, "--since", "1h",
                               "--until", first, "--json", data=data).stdout)
    assert empty["totals"]["decisions"] == 0
    unknown = run_cli("policy", "impact", "--candidate", "0" * 64, "--since", "1h", data=data,
                      check=False)
    assert unknown.returncode == 1 and "is not stored" in unknown.stderr


def test_a_policy_reading_a_sensitive_field_cannot_be_replayed_exactly(
        recorded: Recorded) -> None:
    record = next(r for r in recorded.records()
                  if r.surface == "payment.execute" and r.decision == "PERMIT"
                  and str(r.request["context"].get("beneficiary_account")).startswith("sha256:"))
    files = {p.relative_to(demo_bundle_path()).as_posix(): p.read_bytes()
             for p in demo_bundle_path().rglob("*") if p.is_file()}
    demo = PolicyBundle.from_files(files)
    files["policies/accounts.cedar"] = (
        b'@id("account-blocklist")\n@reason("BLOCKED_ACCOUNT")\n'
        b'forbid (principal, action == Action::"payment.execute", resource)\n'
        b'when { context has beneficiary_account && context.beneficiary_account like "GB*" };\n')
    reader = PolicyBundle.from_files(files)
    result = replay_execution(record, reader, recorded=demo)
    assert result.status is ReplayStatus.NOT_REPLAYABLE and result.evaluation is None
    assert "account-blocklist" in (result.problem or "")
    assert "context.beneficiary_account" in (result.problem or "")
    assert replay_execution(record, demo).reproduced


# -- decisions recorded by an earlier release ---------------------------------------------


def demo_files(**changes: bytes) -> dict[str, bytes]:
    files = {p.relative_to(demo_bundle_path()).as_posix(): p.read_bytes()
             for p in demo_bundle_path().rglob("*") if p.is_file()}
    return {**files, **changes}


def record_as_earlier_release(data: Path, files: dict[str, bytes], body: dict[str, Any],
                              evaluation: Callable[[str], Evaluation],
                              sensitive: frozenset[str] = frozenset({"beneficiary_account"}),
                              ) -> str:
    """Store ``files`` as a bundle and one decision of ``body`` under it, as a release before
    this one did (same rows and receipts; it checked bundles less strictly, and chose reason
    codes otherwise): ``evaluation(version)`` is what it decided, ``sensitive`` the fields
    it stored as digests. Returns the execution id."""
    version = bundle_version(files)
    request = parse_execution_request(json.dumps(body).encode())
    spec = PolicyBundle.from_directory(demo_bundle_path()).registry.get(request.surface)
    assert spec is not None
    store = SQLiteStore(data / "execguard.db")
    try:
        store.put_bundle("demo", version, files, "2026-11-26T00:00:00Z")
        normalized = normalized_request("demo", request, sensitive)
        now = time.time()
        minted = new_execution_id(int(now * 1000), os.urandom(10))
        given = DecisionInput("demo", request, spec, None,  # type: ignore[arg-type]
                              normalized, request_hash(normalized), "enforce", minted, now,
                              "execguard", 60)
        facts = compute_facts(datetime.fromtimestamp(now, UTC))
        if request.surface == "payment.execute":  # the limits, with this payment alone
            facts.update(amount_sum_24h=Decimal(str(request.context["amount"])), payments_1h=1)
        prepared = build_decision(given, evaluation(version), facts,
                                  DataDir(data).load_signer(store))
        [result] = store.commit_batch([PendingEntry(
            tenant="demo", kind="decision", execution_id=minted, seal=prepared.seal,
            execution=prepared.execution, response=prepared.response,
            reservation=prepared.reservation)], now)
        assert isinstance(result, Committed)
    finally:
        store.close()
    return minted


PAYMENT = {"surface": "payment.execute", "actorId": "agent-1",
           "context": {"amount": 250, "currency": "EUR", "beneficiary": "Acme"}}


def test_decisions_under_a_bundle_this_release_refuses_replay_under_a_corrected_one(
        tmp_path: Path) -> None:
    """A bundle pushed before this release's stricter rules (here: a sum over a sensitive
    field) no longer loads: replaying its decisions under it says why, and a corrected
    bundle can still be tried on them, instead of every replay and impact failing."""
    data = tmp_path / "data"
    run_cli("init", data=data)
    demo = PolicyBundle.from_directory(demo_bundle_path()).version
    refused = demo_files(**{"surfaces.toml": (demo_bundle_path() / "surfaces.toml").read_bytes()
                            .replace(b'sensitive = ["beneficiary_account"]',
                                     b'sensitive = ["beneficiary_account", "amount"]')})
    with pytest.raises(BundleInvalid):
        PolicyBundle.from_files(refused)

    def permitted(version: str) -> Evaluation:
        return Evaluation(Outcome.PERMIT, "TOOL_ALLOWED", "Policy permits.",
                          ("tool-invoke-allowed",), version)
    tool = record_as_earlier_release(data, refused, {"surface": "tool.invoke", "actorId": "a",
                                                     "context": {}}, permitted)
    own = run_cli("replay", tool, data=data, check=False)
    assert own.returncode == 1 and "Traceback" not in own.stderr
    assert "was stored by an earlier release and does not load in this one" in own.stderr
    assert "cannot sum the sensitive field 'amount'" in own.stderr
    assert "the same decision and reason" in run_cli("replay", tool, "--policy", demo,
                                                     data=data).stdout

    def within_limit(version: str) -> Evaluation:
        return Evaluation(Outcome.PERMIT, "WITHIN_LIMIT", "Policy permits.",
                          ("payment-within-limit",), version)
    payment = record_as_earlier_release(data, refused, PAYMENT, within_limit,
                                        frozenset({"beneficiary_account", "amount"}))
    shown = json.loads(run_cli("replay", payment, "--policy", demo, "--json", data=data,
                               check=False).stdout)
    assert shown["status"] == "not_replayable"  # was amount's digest stored, or a string?
    assert "context.amount" in shown["problem"] and "earlier release" in shown["problem"]

    report = json.loads(run_cli("policy", "impact", "--candidate", demo, "--since", "1h",
                                "--json", data=data).stdout)
    assert report["totals"] == {"decisions": 2, "replayed": 1, "unchanged": 1, "changed": 0,
                                "notReplayable": 1}
    refused_candidate = run_cli("policy", "impact", "--candidate", bundle_version(refused),
                                "--since", "1h", data=data, check=False)
    assert refused_candidate.returncode == 1 and "Traceback" not in refused_candidate.stderr
    assert "push a corrected bundle" in refused_candidate.stderr


def test_a_reason_code_chosen_by_an_earlier_release_is_said_to_be_the_release_s(
        tmp_path: Path) -> None:
    """Earlier releases took the reason code from the first determining policy by @id,
    this one from the first that gives a @reason: a replay of such a decision is not
    reproduced, and must say that the policies are the same, not only that it differs."""
    data = tmp_path / "data"
    run_cli("init", data=data)
    unnamed = (b'\n@id("a-blocklist")\nforbid (principal, action == Action::"payment.execute",'
               b' resource)\nwhen { context.beneficiary == "Oceanic Shell Holdings '
               b'(fictional)" };\n')
    sanctions = (demo_bundle_path() / "policies" / "sanctions.cedar").read_bytes()
    files = demo_files(**{"policies/sanctions.cedar": sanctions + unnamed})
    body = {**PAYMENT, "context": {**PAYMENT["context"], "beneficiary": SANCTIONED}}

    def denied(version: str) -> Evaluation:
        return Evaluation(Outcome.DENY, "POLICY_FORBID", "Policy 'a-blocklist' forbids it.",
                          ("a-blocklist", "payment-sanctioned-beneficiary"), version)
    denial = record_as_earlier_release(data, files, body, denied)
    replayed = run_cli("replay", denial, data=data, check=False)
    assert "DENY SANCTIONED_BENEFICIARY" in replayed.stdout
    assert "the same policies decided; only the reason code differs" in replayed.stdout
    report = json.loads(run_cli("policy", "impact", "--candidate", bundle_version(files),
                                "--since", "1h", "--json", data=data).stdout)
    assert [change["to"] for change in report["changes"]] == [
        "DENY SANCTIONED_BENEFICIARY (same policies; reason code as this release chooses it)"]

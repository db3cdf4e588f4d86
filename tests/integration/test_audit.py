"""`execguard audit` on a real database written by the real server, then tampered with."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execguard.ledger._sql_util import node_row
from execguard.protocol.chain import entry_hash
from execguard.protocol.checkpoint import Checkpoint, sign_checkpoint
from execguard.protocol.logentry import receipt_leaf_hash
from execguard.protocol.merkle import CompactRange
from execguard.protocol.receipt import seal_receipt
from execguard.protocol.signing import Signer
from tests.conftest import Gateway, run_cli, start_gateway

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}
ENTRIES = 20


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A data directory with 20 decisions, checkpoints, and the pinned keys document."""
    root = tmp_path_factory.mktemp("recorded")
    gateway = start_gateway(root)
    with gateway.client() as client:
        for i in range(ENTRIES):
            client.post("/execute", json={"surface": "payment.execute",
                                          "context": {**PAY, "amount": 100 + i}})
            if i in (9, ENTRIES - 1):
                client.get("/v1/log/checkpoint")  # checkpoints at 10 and 20
        keys = client.get("/.well-known/trigguard/keys.json").json()
    gateway.stop()
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps(keys))
    yield gateway.data, keys_file


@pytest.fixture
def copy(recorded: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The recorded database, copied so each test can tamper with its own."""
    data, keys_file = recorded
    target = tmp_path / "data"
    shutil.copytree(data, target)
    return target / "execguard.db", keys_file


def audit(db: Path, *extra: str, state: Path | None = None) -> tuple[int, list[dict[str, Any]]]:
    args = ["audit", "--db", str(db), "--json", *extra]
    args += ["--state", str(state)] if state else ["--no-state"]
    result = run_cli(*args, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def kinds(report: dict[str, Any]) -> set[str]:
    return {f["kind"] for f in report["findings"]}


def tamper(db: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Edit the database the way an attacker with file access would: triggers first."""
    conn = sqlite3.connect(db)
    for trigger in ("log_no_update", "log_no_delete", "merkle_nodes_no_update",
                    "merkle_nodes_no_delete", "checkpoints_no_update", "checkpoints_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for sql, params in statements:
        conn.execute(sql, params)
    conn.commit()
    conn.close()


def receipt_text(db: Path, index: int) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT receipt FROM log WHERE tenant = 'demo' AND idx = ?",
                            (index,)).fetchone()[0]


def test_a_clean_log_audits_clean(copy: tuple[Path, Path], tmp_path: Path) -> None:
    db, keys = copy
    code, reports = audit(db, "--keys", str(keys), state=tmp_path / "state.json")
    assert code == 0
    (report,) = reports
    assert report["ok"] and report["entries"] == ENTRIES
    assert report["checkpointsVerified"] >= 2
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["logs"]["execguard/demo"]["size"] == ENTRIES
    table = run_cli("audit", "--db", str(db), "--keys", str(keys), "--no-state").stdout
    assert "clean" in table and "execguard/demo" in table


def test_one_flipped_byte_in_a_receipt_is_found(copy: tuple[Path, Path]) -> None:
    db, keys = copy
    text = receipt_text(db, 5)
    changed = text.replace('"WITHIN_LIMIT"', '"WITHIN_LIMIS"')
    assert changed != text
    tamper(db, ("UPDATE log SET receipt = ? WHERE tenant = 'demo' AND idx = 5", (changed,)))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert report["firstBadIndex"] == 5
    assert "modified" in kinds(report)
    assert any("receiptHash" in f["message"] for f in report["findings"])


def test_a_deleted_entry_is_found(copy: tuple[Path, Path]) -> None:
    db, keys = copy
    tamper(db, ("DELETE FROM log WHERE tenant = 'demo' AND idx = 7", ()))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert report["firstBadIndex"] == 7
    assert "deleted" in kinds(report)


def test_swapped_entries_are_found(copy: tuple[Path, Path]) -> None:
    db, keys = copy
    tamper(db, ("UPDATE log SET idx = -1 WHERE tenant = 'demo' AND idx = 3", ()),
           ("UPDATE log SET idx = 3 WHERE tenant = 'demo' AND idx = 4", ()),
           ("UPDATE log SET idx = 4 WHERE tenant = 'demo' AND idx = -1", ()))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert report["firstBadIndex"] == 3
    assert "reordered" in kinds(report)


def test_a_rolled_back_log_is_found(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    data, keys = recorded
    early = tmp_path / "early"
    shutil.copytree(data, early)
    # The attacker removes the last five entries (and the tree nodes above them).
    tamper(early / "execguard.db",
           ("DELETE FROM log WHERE tenant = 'demo' AND idx >= 15", ()),
           ("DELETE FROM checkpoints WHERE tenant = 'demo' AND size > 15", ()))
    state = tmp_path / "state.json"
    code, _ = audit(data / "execguard.db", "--keys", str(keys), state=state)
    assert code == 0
    code, (report,) = audit(early / "execguard.db", "--keys", str(keys), state=state)
    assert code == 1
    assert "rollback" in kinds(report)
    assert report["firstBadIndex"] == 15
    # Even with no state, the signed checkpoint of size 20 gives it away...
    fresh = tmp_path / "again"
    shutil.copytree(data, fresh)
    tamper(fresh / "execguard.db", ("DELETE FROM log WHERE tenant = 'demo' AND idx >= 15", ()))
    code, (report,) = audit(fresh / "execguard.db", "--keys", str(keys))
    assert code == 1 and "rollback" in kinds(report)


def resign_history(db: Path) -> None:
    """Replace the whole log with a different history, consistently re-signed by a new key."""
    forger = Signer.generate()
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT idx, receipt FROM log WHERE tenant = 'demo' ORDER BY idx")
    receipts = [json.loads(text) for _, text in rows.fetchall()]
    statements: list[tuple[str, tuple[Any, ...]]] = [
        ("DELETE FROM log WHERE tenant = 'demo'", ()),
        ("DELETE FROM merkle_nodes WHERE tenant = 'demo'", ()),
        ("DELETE FROM checkpoints WHERE tenant = 'demo'", ()),
        ("DELETE FROM signing_keys", ()),
        ("INSERT INTO signing_keys VALUES (?, ?, 'active', '2026-01-01T00:00:00.000Z')",
         (forger.key_id, forger.public_pem)),
    ]
    conn.close()
    tree, prev = CompactRange(), None
    for receipt in receipts:
        forged = seal_receipt({**receipt, "decision": "DENY", "reasonCode": "FORGED"}, forger)
        leaf = receipt_leaf_hash("demo", forged)
        chained = entry_hash(forged["logIndex"], prev, forged["receiptHash"])
        statements.append(("INSERT INTO log VALUES ('demo', ?, 'decision', ?, ?, ?, ?, ?, ?)",
                           (forged["logIndex"], forged["executionId"], json.dumps(forged),
                            forged["receiptHash"], prev, chained, leaf)))
        statements += [("INSERT INTO merkle_nodes VALUES (?, ?, ?, ?, ?)", node_row("demo", node))
                       for node in tree.append(leaf)]
        prev = chained
    note = sign_checkpoint(Checkpoint("execguard/demo", tree.size, tree.root()), "execguard",
                           forger)
    statements.append(("INSERT INTO checkpoints VALUES ('demo', ?, ?, ?, ?, '2026')",
                       (tree.size, tree.root(), note, forger.key_id)))
    tamper(db, *statements)


def test_a_resigned_history_under_another_key_is_found(copy: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    db, keys = copy
    state = tmp_path / "state.json"
    assert audit(db, "--keys", str(keys), state=state)[0] == 0
    resign_history(db)
    # Pinned keys: not one receipt or checkpoint is signed by a key we trust.
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert {"unknown-key", "checkpoint"} <= kinds(report)
    assert report["firstBadIndex"] == 0
    # Keys read from the forged database itself verify, but the head we verified last time
    # is gone: the history was rewritten.
    code, (report,) = audit(db, state=state)
    assert code == 1
    assert "rewritten" in kinds(report)


def test_audit_over_http_with_state(fresh_gateway: Gateway, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with fresh_gateway.client() as client:
        for i in range(3):
            client.post("/execute", json={"surface": "payment.execute",
                                          "context": {**PAY, "amount": i}})
    result = run_cli("audit", "--url", fresh_gateway.url, "--api-key", fresh_gateway.api_key,
                     "--state", str(state), "--json")
    (report,) = json.loads(result.stdout)
    assert report["ok"] and report["entries"] == 3
    assert json.loads(state.read_text())["logs"]["execguard/demo"]["size"] == 3
    with fresh_gateway.client() as client:
        client.post("/execute", json={"surface": "payment.execute", "context": PAY})
    again = run_cli("audit", "--url", fresh_gateway.url, "--api-key", fresh_gateway.api_key,
                    "--state", str(state), "--json")
    assert json.loads(again.stdout)[0]["entries"] == 4
    bad = run_cli("audit", "--url", fresh_gateway.url, "--api-key", "egk_wrong", "--no-state",
                  check=False)
    assert bad.returncode == 1 and "401" in bad.stderr


def test_export_package_verifies_offline_and_detects_changes(fresh_gateway: Gateway,
                                                             tmp_path: Path) -> None:
    with fresh_gateway.client() as client:
        for i in range(6):
            client.post("/execute", json={"surface": "payment.execute",
                                          "context": {**PAY, "amount": 20_000 * (i % 2) + 1}})
        keys = client.get("/.well-known/trigguard/keys.json").json()
    fresh_gateway.stop()  # offline from here on
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))
    package = tmp_path / "package"
    run_cli("export", str(package), "--since", "1d", data=fresh_gateway.data)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["receipts"] == 6 and len(manifest["policies"]) == 1
    code = run_cli("audit", "--package", str(package), "--keys", str(keys_file), "--json",
                   check=False)
    assert code.returncode == 0, code.stdout
    report = json.loads(code.stdout)
    assert report["receiptsVerified"] == 6 and report["policiesVerified"] == 1

    lines = (package / "entries.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"ESCALATE"', '"PERMIT"', 1).replace('"PERMIT"', '"DENY"', 1)
    (package / "entries.jsonl").write_text("\n".join(lines) + "\n")
    policy = next((package / "policies").rglob("payments.cedar"))
    policy.write_text(policy.read_text().replace("10000.0", "99999.0"))
    result = run_cli("audit", "--package", str(package), "--keys", str(keys_file), "--json",
                     check=False)
    assert result.returncode == 1
    findings = json.loads(result.stdout)["findings"]
    assert any(f["index"] == 2 for f in findings)
    assert any("policy bundle" in f["message"] for f in findings)
    assert run_cli("export", str(package), data=fresh_gateway.data, check=False).returncode == 1


@pytest.mark.parametrize("since", ["last tuesday", "99999999999d",  # an age before year 1
                                   "0001-01-01T00:00:00+01:00"])  # a time before it in UTC
def test_export_refuses_a_bad_time(fresh_gateway: Gateway, tmp_path: Path, since: str) -> None:
    result = run_cli("export", str(tmp_path / "x"), "--since", since,
                     data=fresh_gateway.data, check=False)
    assert result.returncode == 1 and "--since" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_refuses_a_period_that_ends_before_it_starts(fresh_gateway: Gateway,
                                                           tmp_path: Path) -> None:
    result = run_cli("export", str(tmp_path / "x"), "--since", "2030-01-01T00:00:00Z",
                     "--until", "2020-01-01T00:00:00Z", data=fresh_gateway.data, check=False)
    assert result.returncode == 1 and "is not before --until" in result.stderr
    assert not (tmp_path / "x").exists()


def test_export_to_a_place_it_cannot_write_is_one_line(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        assert client.post("/execute", json={"surface": "payment.execute", "context": {
            "amount": 5, "currency": "EUR", "beneficiary": "Acme"}}).status_code == 200
    result = run_cli("export", "/proc/no-such-place/out", data=fresh_gateway.data, check=False)
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert "/proc/no-such-place" in result.stderr and "Traceback" not in result.stderr


def test_damaged_tree_hashes_break_the_consistency_of_checkpoints(
        copy: tuple[Path, Path]) -> None:
    """Receipts intact, but the stored tree the gateway proves from was altered."""
    db, keys = copy
    tamper(db, ("UPDATE merkle_nodes SET hash = zeroblob(32) WHERE tenant = 'demo'"
                " AND level = 3 AND idx = 0", ()))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert "fork" in kinds(report)
    assert any("not consistent" in f["message"] for f in report["findings"])

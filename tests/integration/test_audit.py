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
    # Heads are remembered by origin, which another installation's log may share: say so.
    assert any("a state file of its own" in f["message"] for f in report["findings"])
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


# -- rows the gateway acts on, checked against what was signed ------------------------------


def test_a_row_at_a_negative_index_is_found(copy: tuple[Path, Path]) -> None:
    """The gateway reads every row of an execution; the audit must read every row too."""
    db, keys = copy
    tamper(db, ("INSERT INTO log SELECT tenant, -1, 'consume', execution_id, receipt,"
                " receipt_hash, prev_hash, entry_hash, leaf_hash FROM log"
                " WHERE tenant = 'demo' AND idx = 0", ()))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert any(f["kind"] == "inserted" and f["index"] == -1 for f in report["findings"])
    assert report["entries"] == ENTRIES


@pytest.mark.parametrize(("column", "value"), [("kind", "consume"),
                                               ("execution_id", "someone-else"),
                                               ("receipt_hash", "0" * 64)])
def test_a_column_that_disagrees_with_its_signed_receipt_is_found(
        copy: tuple[Path, Path], column: str, value: str) -> None:
    db, keys = copy
    tamper(db, (f"UPDATE log SET {column} = ? WHERE tenant = 'demo' AND idx = 4", (value,)))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    found = [f for f in report["findings"] if f["index"] == 4 and f["kind"] == "modified"]
    assert found and repr(value) in found[0]["message"], report["findings"]


def test_stored_tree_nodes_are_compared_with_the_recomputed_tree(
        copy: tuple[Path, Path]) -> None:
    db, keys = copy
    tamper(db, ("UPDATE merkle_nodes SET hash = zeroblob(32) WHERE tenant = 'demo'"
                " AND level = 1 AND idx = 0", ()))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    (found,) = [f for f in report["findings"] if f["kind"] == "tree"]
    assert found["index"] == 0 and "level 1, index 0" in found["message"]


def test_a_stored_tree_node_beyond_the_log_is_found(copy: tuple[Path, Path]) -> None:
    db, keys = copy
    tamper(db, ("INSERT INTO merkle_nodes VALUES ('demo', 0, 99, zeroblob(32), 99)", ()))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert [f["index"] for f in report["findings"] if f["kind"] == "tree"] == [ENTRIES]


@pytest.mark.parametrize(("statement", "said"), [
    ("UPDATE checkpoints SET size = 100 WHERE tenant = 'demo' AND size = 10", "size"),
    ("UPDATE checkpoints SET root = zeroblob(32) WHERE tenant = 'demo' AND size = 20", "root"),
])
def test_checkpoint_columns_are_compared_with_their_signed_note(
        copy: tuple[Path, Path], statement: str, said: str) -> None:
    db, keys = copy
    tamper(db, (statement, ()))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert any(f["kind"] == "checkpoint" and said in f["message"]
               for f in report["findings"]), report["findings"]


# -- damaged rows are findings, never a crash ------------------------------------------------


@pytest.mark.parametrize(("statement", "index"), [
    ("INSERT INTO log SELECT tenant, 9007199254740992, kind, execution_id, receipt,"
     " receipt_hash, prev_hash, entry_hash, leaf_hash FROM log WHERE idx = 0", 9007199254740992),
    ("UPDATE log SET entry_hash = x'00ff' WHERE idx = 3", 3),
    ("INSERT INTO log SELECT tenant, 'abc', kind, execution_id, receipt,"
     " receipt_hash, prev_hash, entry_hash, leaf_hash FROM log WHERE idx = 0", None),
    ("UPDATE log SET leaf_hash = 'abc' WHERE idx = 6", 6),
    ("UPDATE log SET receipt = x'00ff' WHERE idx = 7", 7),
    ("UPDATE merkle_nodes SET idx = 'abc' WHERE level = 0 AND idx = 8", 8),
    ("UPDATE checkpoints SET note = x'00ff', root = 'abc' WHERE size = 10", None),
], ids=["unsafe-index", "binary-entry-hash", "text-index", "text-leaf", "binary-receipt",
        "text-node-index", "binary-note"])
def test_a_damaged_row_is_a_finding_not_a_traceback(copy: tuple[Path, Path], statement: str,
                                                    index: int | None) -> None:
    db, keys = copy
    tamper(db, (statement, ()))
    result = run_cli("audit", "--db", str(db), "--keys", str(keys), "--no-state", "--json",
                     check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (report,) = json.loads(result.stdout)
    assert report["findings"]
    if index is not None:
        assert any(f["index"] == index for f in report["findings"]), report["findings"]
    else:
        assert any("'abc'" in f["message"] or "note" in f["message"]
                   for f in report["findings"]), report["findings"]


def test_an_unsafe_index_is_found_on_every_backend(fresh_gateway: Gateway) -> None:
    with fresh_gateway.client() as client:
        for i in range(3):
            client.post("/execute", json={"surface": "payment.execute",
                                          "context": {**PAY, "amount": i + 1}})
        client.get("/v1/log/checkpoint")
    fresh_gateway.stop()
    fresh_gateway.remove_log_guards()
    fresh_gateway.sql("INSERT INTO log SELECT tenant, 9007199254740992, kind, execution_id,"
                      " receipt, receipt_hash, prev_hash, entry_hash, leaf_hash FROM log"
                      " WHERE idx = 0")
    result = run_cli("audit", "--db", fresh_gateway.ledger, "--no-state", "--json",
                     check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (report,) = json.loads(result.stdout)
    assert any(f["index"] == 9007199254740992 for f in report["findings"])


def test_a_stored_receipt_with_a_duplicate_key_is_refused(copy: tuple[Path, Path]) -> None:
    db, keys = copy
    tamper(db, ("""UPDATE log SET receipt = '{"decision":"PERMIT",' || substr(receipt, 2)"""
                " WHERE tenant = 'demo' AND idx = 2", ()))
    code, (report,) = audit(db, "--keys", str(keys))
    assert code == 1
    assert any(f["index"] == 2 and "duplicate key" in f["message"] for f in report["findings"])


def test_receipt_verify_refuses_a_duplicate_key(copy: tuple[Path, Path], tmp_path: Path) -> None:
    db, keys = copy
    path = tmp_path / "receipt.json"
    path.write_text('{"decision": "DENY", ' + receipt_text(db, 0)[1:])
    result = run_cli("receipt", "verify", str(path), "--keys", str(keys), check=False)
    assert result.returncode == 1 and "duplicate key 'decision'" in result.stdout
    path.write_text(receipt_text(db, 0))
    assert run_cli("receipt", "verify", str(path), "--keys", str(keys)).returncode == 0


def test_an_unknown_tenant_is_an_error(copy: tuple[Path, Path]) -> None:
    db, keys = copy
    result = run_cli("audit", "--db", str(db), "--keys", str(keys), "--no-state",
                     "--tenant", "nosuch", check=False)
    assert result.returncode == 1 and "no tenant 'nosuch'" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_log_is_clean_from_the_gateway_and_the_database(fresh_gateway: Gateway,
                                                                 tmp_path: Path) -> None:
    by_url = run_cli("audit", "--url", fresh_gateway.url, "--api-key", fresh_gateway.api_key,
                     "--no-state", check=False)
    assert by_url.returncode == 0, by_url.stdout + by_url.stderr
    assert "the log is empty" in by_url.stdout
    fresh_gateway.stop()
    by_db = run_cli("audit", "--db", fresh_gateway.ledger, "--no-state", "--tenant", "demo",
                    "--json")
    assert json.loads(by_db.stdout)[0]["ok"] is True


@pytest.mark.parametrize("content", [
    '{"format": "execguard-audit-state/1", "logs": {"execguard/demo": {"size": "abc",'
    ' "root": "x"}}}',
    '{"format": "execguard-audit-state/1", "logs": {"execguard/demo": {"size": 3}}}',
    '{"format": "execguard-audit-state/1", "logs": {"execguard/demo": 7}}',
    '{"format": "execguard-audit-state/1", "logs": []}',
    "[]", '"x"', "\xff", '{"format": "execguard-audit-state/1", "logs": {}, "logs": {}}',
], ids=["text-size", "no-root", "not-an-object", "logs-a-list", "a-list", "a-string",
        "not-json", "duplicate-key"])
def test_a_damaged_state_file_is_one_error_line(copy: tuple[Path, Path], tmp_path: Path,
                                                content: str) -> None:
    db, keys = copy
    state = tmp_path / "state.json"
    state.write_text(content, encoding="latin-1")
    result = run_cli("audit", "--db", str(db), "--keys", str(keys), "--state", str(state),
                     check=False)
    assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
    assert str(state) in result.stderr and "damaged" in result.stderr
    assert "Traceback" not in result.stderr


# -- auditor packages: the entries are what the manifest says --------------------------------


@pytest.fixture(scope="module")
def exported(recorded: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package of the whole recorded log (no --since, no --until)."""
    data, _ = recorded
    root = tmp_path_factory.mktemp("exported")
    shutil.copytree(data, root / "data")
    run_cli("export", str(root / "package"), data=root / "data")
    return root / "package"


@pytest.fixture
def package(exported: Path, tmp_path: Path) -> Path:
    target = tmp_path / "package"
    shutil.copytree(exported, target)
    return target


def audit_package(package: Path, keys: Path) -> tuple[int, dict[str, Any], str]:
    result = run_cli("audit", "--package", str(package), "--keys", str(keys), "--json",
                     check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout or "{}"), result.stderr


def edit_lines(package: Path, change: Any) -> None:
    path = package / "entries.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(change(lines)))


def test_a_whole_log_package_verifies(package: Path, recorded: tuple[Path, Path]) -> None:
    code, report, _ = audit_package(package, recorded[1])
    assert code == 0 and report["receiptsVerified"] == ENTRIES, report


@pytest.mark.parametrize(("change", "said"), [
    (lambda lines: lines[:5] + lines[6:], "receipt 5 is missing"),
    (lambda lines: [*lines[:6], *lines[5:]], "comes after receipt 5"),
    (lambda lines: [], f"receipts 0 to {ENTRIES - 1} are missing"),
    (lambda lines: lines[:-1], f"receipt {ENTRIES - 1} is missing"),
], ids=["deleted", "duplicated", "emptied", "last-deleted"])
def test_removed_or_repeated_package_entries_are_found(package: Path, recorded: tuple[Path, Path],
                                                       change: Any, said: str) -> None:
    edit_lines(package, change)
    code, report, _ = audit_package(package, recorded[1])
    assert code == 1
    assert any(said in f["message"] for f in report["findings"]), report["findings"]


def test_a_manifest_that_miscounts_is_found(package: Path, recorded: tuple[Path, Path]) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    (package / "manifest.json").write_text(json.dumps({**manifest, "receipts": 99}))
    code, report, _ = audit_package(package, recorded[1])
    assert code == 1
    assert any("lists 99 receipts" in f["message"] for f in report["findings"])


def test_a_partial_package_may_leave_entries_out_but_not_repeat_them(
        package: Path, recorded: tuple[Path, Path]) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    (package / "manifest.json").write_text(json.dumps({
        **manifest, "since": "2000-01-01T00:00:00.000Z", "receipts": ENTRIES - 1}))
    edit_lines(package, lambda lines: lines[1:])
    assert audit_package(package, recorded[1])[0] == 0
    edit_lines(package, lambda lines: lines + lines[-1:])
    (package / "manifest.json").write_text(json.dumps({
        **manifest, "since": "2000-01-01T00:00:00.000Z", "receipts": ENTRIES}))
    code, report, _ = audit_package(package, recorded[1])
    assert code == 1
    assert any(f"comes after receipt {ENTRIES - 1}" in f["message"] for f in report["findings"])


def test_package_lines_are_read_strictly(package: Path, recorded: tuple[Path, Path]) -> None:
    edit_lines(package, lambda lines: [
        *lines[:3], '{"receipt": {"decision": "DENY"}, ' + lines[3][1:], *lines[4:]])
    code, report, _ = audit_package(package, recorded[1])
    assert code == 1
    assert any("duplicate key" in f["message"] for f in report["findings"])
    path = package / "entries.jsonl"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\n\xff\xfe\n", 1))
    code, report, _ = audit_package(package, recorded[1])
    assert code == 1 and any("UTF-8" in f["message"] for f in report["findings"])


def test_a_non_canonical_proof_hash_is_refused(package: Path,
                                              recorded: tuple[Path, Path]) -> None:
    def respell(lines: list[str]) -> list[str]:
        entry = json.loads(lines[0])
        first = entry["inclusionProof"]["hashes"][0]
        # The last character of 32 bytes of base64 carries 2 unused bits: set one.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = alphabet[alphabet.index(first[-2]) | 1]
        entry["inclusionProof"]["hashes"][0] = first[:-2] + last + "="
        return [json.dumps(entry) + "\n", *lines[1:]]

    edit_lines(package, respell)
    code, report, _ = audit_package(package, recorded[1])
    assert code == 1
    assert any("receipt 0" in f["message"] and "canonical" in f["message"]
               for f in report["findings"]), report["findings"]


def test_hidden_files_are_not_part_of_a_packaged_bundle(package: Path,
                                                       recorded: tuple[Path, Path]) -> None:
    (version,) = (package / "policies").iterdir()
    (version / ".DS_Store").write_bytes(b"finder")
    (version / "policies" / ".payments.cedar.swp").write_bytes(b"vim")
    assert audit_package(package, recorded[1])[0] == 0


@pytest.mark.parametrize("manifest", ["[]", '"x"', "\xff", '{"format": "execguard-export/1",'
                                      ' "format": "execguard-export/1"}'],
                         ids=["a-list", "a-string", "not-utf8", "duplicate-key"])
def test_an_unreadable_manifest_is_one_error_line(package: Path, recorded: tuple[Path, Path],
                                                  manifest: str) -> None:
    (package / "manifest.json").write_text(manifest, encoding="latin-1")
    code, _, stderr = audit_package(package, recorded[1])
    assert code == 1 and stderr.startswith("error: ") and "manifest.json" in stderr

"""`execguard verify` on evidence exported from a real gateway, with the gateway stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from execguard.protocol.signing import Signer
from tests.conftest import Gateway, run_cli

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}


@pytest.fixture
def evidence(fresh_gateway: Gateway, tmp_path: Path) -> dict[str, Path]:
    with fresh_gateway.client() as client:
        answer = client.post("/execute", json={"surface": "payment.execute",
                                               "context": PAY}).json()
        bundle = client.get(f"/v1/receipts/{answer['execution_id']}/bundle").json()
        keys = client.get("/.well-known/trigguard/keys.json").json()
    fresh_gateway.stop()  # the network is off from here on
    files = {"keys": tmp_path / "keys.json", "bundle": tmp_path / "bundle.json",
             "response": tmp_path / "response.json", "token": tmp_path / "token.jwt"}
    files["keys"].write_text(json.dumps(keys))
    files["bundle"].write_text(json.dumps(bundle, indent=2))
    files["response"].write_text(json.dumps(answer))
    files["token"].write_text(answer["execution_token"] + "\n")
    return files


def verify(path: Path, keys: Path, *extra: str) -> tuple[int, dict[str, object]]:
    result = run_cli("verify", str(path), "--keys", str(keys), "--json", *extra, check=False)
    return result.returncode, json.loads(result.stdout)


def test_bundle_receipt_and_token_verify_offline(evidence: dict[str, Path]) -> None:
    code, result = verify(evidence["bundle"], evidence["keys"])
    assert code == 0 and result["kind"] == "bundle" and result["valid"] is True
    assert result["origin"] == "execguard/demo"
    code, result = verify(evidence["response"], evidence["keys"])
    assert code == 0 and result["kind"] == "receipt"
    code, result = verify(evidence["token"], evidence["keys"])
    assert code == 0 and result["kind"] == "token" and result["surface"] == "payment.execute"
    text = run_cli("verify", str(evidence["bundle"]), "--keys", str(evidence["keys"])).stdout
    assert text.startswith("VALID")


def test_a_token_past_its_expiry_does_not_verify(evidence: dict[str, Path]) -> None:
    code, result = verify(evidence["token"], evidence["keys"], "--at", "2999-01-01T00:00:00Z")
    assert code == 1 and result["error"] == "token_expired"


def test_every_changed_byte_of_a_bundle_is_caught(evidence: dict[str, Path],
                                                  tmp_path: Path) -> None:
    original = evidence["bundle"].read_text()
    bundle = json.loads(original)
    receipt_hash = bundle["receipt"]["receiptHash"]
    first_proof_hash = bundle["inclusionProof"]["hashes"][0] \
        if bundle["inclusionProof"]["hashes"] else None
    swaps = [(receipt_hash, receipt_hash[:-1] + ("0" if receipt_hash[-1] != "0" else "1")),
             ('"decision": "PERMIT"', '"decision": "DENY"'),
             ('"tenant": "demo"', '"tenant": "demp"'),
             ("\n42\n" if "\n42\n" in original else "demo\\n1\\n", "demo\\n2\\n")]
    if first_proof_hash:
        swaps.append((first_proof_hash, ("A" if first_proof_hash[0] != "A" else "B")
                      + first_proof_hash[1:]))
    tested = 0
    for old, new in swaps:
        if old not in original:
            continue
        path = tmp_path / f"tampered-{tested}.json"
        path.write_text(original.replace(old, new, 1))
        code, result = verify(path, evidence["keys"])
        assert code == 1, (old, new, result)
        tested += 1
    assert tested >= 4


def test_junk_and_the_wrong_keys_are_refused(evidence: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    code, result = verify(junk, evidence["keys"])
    assert code == 1 and "not a receipt" in str(result["reason"])
    stranger = Signer.generate()
    other = tmp_path / "other-keys.json"
    other.write_text(json.dumps({"authority": "execguard", "keys": [{
        "keyId": stranger.key_id, "algorithm": "Ed25519", "publicKeyPem": stranger.public_pem,
        "status": "active"}]}))
    code, result = verify(evidence["bundle"], other)
    assert code == 1 and result["error"] == "unknown_key"
    broken = tmp_path / "broken-keys.json"
    broken.write_text('{"keys": "nope"}')
    refused = run_cli("verify", str(evidence["bundle"]), "--keys", str(broken), check=False)
    assert refused.returncode == 1 and "keys" in refused.stderr
    deep = tmp_path / "deep-keys.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    refused = run_cli("verify", str(evidence["bundle"]), "--keys", str(deep), check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error:")
    assert "Traceback" not in refused.stderr and "nested too deep" in refused.stderr


def test_an_observe_receipt_does_not_read_as_a_permit(fresh_gateway: Gateway,
                                                      tmp_path: Path) -> None:
    """'VALID: ... (PERMIT on data.export)' for a receipt whose policy denied: a person
    reading the verdict took an observe-mode answer for a permit."""
    with fresh_gateway.client() as client:
        answer = client.post("/execute", json={
            "surface": "data.export", "executionMode": "observe",
            "context": {"row_count": 5_000_000, "destination": "public",
                        "contains_pii": True}}).json()
        bundle = client.get(f"/v1/receipts/{answer['execution_id']}/bundle").json()
        keys = client.get("/.well-known/trigguard/keys.json").json()
    assert (answer["decision"], answer["would_decision"]) == ("PERMIT", "DENY")
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    (tmp_path / "response.json").write_text(json.dumps(answer))
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    for name in ("response.json", "bundle.json"):
        text = run_cli("verify", str(tmp_path / name), "--keys",
                       str(tmp_path / "keys.json")).stdout
        assert text.startswith("VALID")
        assert "PERMIT (observe mode, not enforced; would be DENY)" in text, text

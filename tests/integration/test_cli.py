"""The ``execguard`` command, run as a real subprocess against real data directories."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from execguard.arbiter import demo_bundle_path
from execguard.server.gateway import POLICY_CACHE_SECONDS
from tests.conftest import Gateway, api_key_from, free_port, run_cli

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_init_creates_everything_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # an empty directory made beforehand: init closes it to others
    first = run_cli("init", data=data)
    key = api_key_from(first.stdout)
    assert first.stdout.strip().splitlines()[-1] == f"EXECGUARD_API_KEY={key}"
    assert key.startswith("egk_") and "tg_live_" not in key and "tg_test_" not in key
    key_files = list((data / "keys").glob("*.pem"))
    assert len(key_files) == 1
    assert stat.S_IMODE(key_files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "demo-api-key").stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    # The ledger holds every stored request and the webhooks' secrets.
    ledger_files = list(data.glob("execguard.db*"))
    assert data / "execguard.db" in ledger_files
    assert {stat.S_IMODE(path.stat().st_mode) for path in ledger_files} == {0o600}

    before = snapshot(data)
    again = run_cli("init", data=data)
    assert "nothing changed" in again.stdout
    assert snapshot(data) == before


def test_data_dir_from_environment(tmp_path: Path) -> None:
    data = tmp_path / "from-env"
    run_cli("init", env={"EXECGUARD_DATA": str(data)})
    assert (data / "execguard.db").exists()


def test_commands_without_a_data_dir_fail_with_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("policy", "list", data=tmp_path / "missing", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no ExecGuard data directory")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_revoked_key_stops_working_on_the_running_gateway(fresh_gateway: Gateway) -> None:
    data = fresh_gateway.data
    agent = api_key_from(run_cli("keys", "create", "--tenant", "demo", "--label", "bot",
                                 data=data).stdout)
    approver = api_key_from(run_cli("keys", "create", "--tenant", "demo", "--role",
                                    "approver", "--group", "ops", data=data).stdout)
    listed = json.loads(run_cli("keys", "list", "--json", data=data).stdout)["keys"]
    bot = next(k for k in listed if k["label"] == "bot")
    assert agent not in json.dumps(listed)  # ids, never the keys
    assert bot["id"] == hashlib.sha256(agent.encode()).hexdigest()[:16]
    assert bot["revokedAt"] is None and len(listed) == 3  # the demo's admin key too
    with fresh_gateway.client(api_key=agent) as client:
        assert client.get("/v1/audit").status_code == 200  # now cached by the gateway
        run_cli("keys", "revoke", bot["id"], data=data)
        deadline = time.monotonic() + 30
        while client.get("/v1/audit").status_code == 200:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.2)
        answer = client.post("/execute", json={"surface": "payment.execute", "context": PAY})
        assert answer.status_code == 401
    again = run_cli("keys", "revoke", bot["id"], data=data, check=False)
    assert again.returncode == 1 and "was revoked before" in again.stderr
    run_cli("keys", "revoke", approver, data=data)  # by the key itself
    unknown = run_cli("keys", "revoke", "egk_not-a-key", data=data, check=False)
    assert unknown.returncode == 1 and "no API key with id" in unknown.stderr
    assert "egk_not-a-key" not in unknown.stderr
    states = {k["label"]: k["revokedAt"] is not None for k in json.loads(
        run_cli("keys", "list", "--json", data=data).stdout)["keys"]}
    assert states == {"demo": False, "bot": True, None: True}
    with fresh_gateway.client() as client:  # the demo key is untouched
        assert client.get("/v1/audit").status_code == 200


def test_serve_listens_where_the_environment_says(tmp_path: Path) -> None:
    """EXECGUARD_PORT and EXECGUARD_HOST were read, then overridden by serve's defaults."""
    data = tmp_path / "data"
    run_cli("init", data=data)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "execguard", "serve", "--data", str(data)],
        env={**os.environ, "EXECGUARD_PORT": str(port), "EXECGUARD_HOST": "127.0.0.1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve never listened on EXECGUARD_PORT"
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    refused = run_cli("serve", data=data, check=False,
                      env={"EXECGUARD_CHECKPOINT_INTERVAL_SECONDS": "inf"})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "setting EXECGUARD_CHECKPOINT_INTERVAL_SECONDS has value inf" in refused.stderr


def test_a_tenant_name_that_could_not_name_its_log_is_refused(tmp_path: Path) -> None:
    """A tenant names its log's checkpoint origin: a newline or an edge space there made
    every checkpoint of a tenant that could decide fail."""
    data = tmp_path / "data"
    run_cli("init", data=data)
    for name in ["nl\nten", "demo ", " x", "", "a/b", "x" * 65]:
        refused = run_cli("keys", "create", "--tenant", name, data=data, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith(f"error: tenant name {name!r}")
    assert api_key_from(run_cli("keys", "create", "--tenant", "team-1.eu_x",
                                data=data).stdout)
    assert api_key_from(run_cli("keys", "create", "--tenant", "demo", data=data).stdout)


def test_a_webhook_no_delivery_could_use_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_cli("init", data=data)
    for url in ["ftp://host/x", "http://", "http:// bad host/x", "http://127.0.0.1:99999/x",
                "http://[::1", "http://h:0/x", "https://host/a b"]:
        refused = run_cli("webhooks", "add", url, data=data, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith(f"error: webhook URL {url!r}")
    assert "wh_" not in run_cli("webhooks", "list", data=data).stdout
    run_cli("webhooks", "add", "https://hooks.example.com:8443/h?x=1", data=data)
    assert "wh_" in run_cli("webhooks", "list", data=data).stdout


def test_a_serving_ledger_s_files_are_its_owner_s_alone(gateway: Gateway) -> None:
    files = list(gateway.data.glob("execguard.db*"))  # none on PostgreSQL
    assert {stat.S_IMODE(path.stat().st_mode) for path in files} <= {0o600}
    assert not files or gateway.data / "execguard.db-wal" in files


@pytest.mark.parametrize("command", [
    [], ["init"], ["serve"], ["keys", "create"], ["policy"], ["policy", "push"],
    ["policy", "list"], ["policy", "activate"], ["policy", "show"], ["decide"],
    ["receipt", "verify"], ["verify"], ["audit"], ["export"], ["run"], ["proxy"], ["replay"],
    ["keys", "rotate"], ["policy", "test"], ["policy", "impact"], ["policy", "shadow"],
    ["policy", "shadow-report"], ["approvals", "list"], ["approvals", "approve"],
    ["webhooks", "add"], ["keys", "list"], ["keys", "revoke"],
])
def test_every_command_has_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert "Usage:" in result.stdout


def test_keys_create_gives_a_working_key_for_a_new_isolated_tenant(
        fresh_gateway: Gateway) -> None:
    created = run_cli("keys", "create", "--tenant", "acme", data=fresh_gateway.data)
    acme_key = api_key_from(created.stdout)
    with fresh_gateway.client() as demo:
        demo_answer = demo.post("/execute", json={"surface": "payment.execute",
                                                  "context": PAY}).json()
    with fresh_gateway.client(api_key=acme_key) as acme:
        # acme has no policy yet: it fails closed, and sees none of demo's data.
        assert acme.post("/execute", json={"surface": "payment.execute",
                                           "context": PAY}).status_code == 503
        assert acme.get("/v1/audit").json()["entries"] == []
        assert acme.get(f"/verify/{demo_answer['execution_id']}").status_code == 404
        pushed = run_cli("policy", "push", str(demo_bundle_path()), "--tenant", "acme",
                         "--activate", data=fresh_gateway.data)
        assert "now active" in pushed.stdout
        answer = acme.post("/execute", json={"surface": "payment.execute", "context": PAY})
        assert answer.json()["decision"] == "PERMIT"
        assert answer.json()["receipt"]["logIndex"] == 0  # acme's own log
        assert [e["executionId"] for e in acme.get("/v1/audit").json()["entries"]] == [
            answer.json()["execution_id"]]


def stricter_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    for policy in (bundle / "policies").glob("*.cedar"):
        text = policy.read_text()
        policy.write_text(text.replace('decimal("10000.0")', 'decimal("100.0")'))
    return bundle


def test_push_activate_changes_decisions_and_the_version(fresh_gateway: Gateway,
                                                         tmp_path: Path) -> None:
    bundle = stricter_bundle(tmp_path)
    with fresh_gateway.client() as client:
        before = client.post("/execute", json={"surface": "payment.execute",
                                               "context": PAY}).json()
        assert before["decision"] == "PERMIT"
        version = run_cli("policy", "push", str(bundle),
                          data=fresh_gateway.data).stdout.strip().splitlines()[-1]
        assert len(version) == 64 and version != before["policyVersion"]
        listed = json.loads(run_cli("policy", "list", "--json", data=fresh_gateway.data).stdout)
        assert {(b["version"], b["active"]) for b in listed} == {
            (before["policyVersion"], True), (version, False)}
        # Pushing is not activating: decisions are unchanged.
        same = client.post("/execute", json={"surface": "payment.execute", "context": PAY})
        assert same.json()["policyVersion"] == before["policyVersion"]
        run_cli("policy", "activate", version, data=fresh_gateway.data)
        # Another process activated it: the gateway sees it within its policy cache time.
        time.sleep(POLICY_CACHE_SECONDS)
        after = client.post("/execute", json={"surface": "payment.execute",
                                              "context": PAY}).json()
        assert after["decision"] == "ESCALATE"
        assert after["receipt"]["policyVersion"] == version
    shown = run_cli("policy", "show", version, data=fresh_gateway.data).stdout
    assert "payment.execute" in shown and "(active)" in shown
    missing = run_cli("policy", "activate", "0" * 64, data=fresh_gateway.data, check=False)
    assert missing.returncode == 1 and "is not stored" in missing.stderr


@pytest.mark.parametrize(("edit", "where"), [
    (lambda b: (b / "surfaces.toml").write_text(
        (b / "surfaces.toml").read_text().replace('type = "decimal"', 'type = "decmial"', 1)),
     "surfaces.toml:"),
    (lambda b: (b / "surfaces.toml").write_text(
        (b / "surfaces.toml").read_text() + '\n[surfaces."x.y"]\nrisk = "low"\ncolour = 1\n'),
     "colour"),
    (lambda b: (b / "policies" / "broken.cedar").write_text(
        '@id("broken")\npermit(principal, action, resource) when { context.nope > 1 };\n'),
     "policies/broken.cedar:"),
    (lambda b: (b / "policies" / "payments.cedar").write_text(
        (b / "policies" / "payments.cedar").read_text().replace('@quorum("1")',
                                                                 '@quorum("zero")')),
     "@quorum('zero')"),
    # A digit to str.isdigit() but not to int(): it was a traceback.
    (lambda b: (b / "policies" / "payments.cedar").write_text(
        (b / "policies" / "payments.cedar").read_text().replace('@quorum("1")',
                                                                 '@quorum("\u00b2")')),
     "@quorum('\u00b2')"),
])
def test_invalid_bundles_are_refused_whole(tmp_path: Path, edit, where: str) -> None:
    data = tmp_path / "data"
    run_cli("init", data=data)
    before = json.loads(run_cli("policy", "list", "--json", data=data).stdout)
    bundle = tmp_path / "bad"
    shutil.copytree(demo_bundle_path(), bundle)
    edit(bundle)
    result = run_cli("policy", "push", str(bundle), data=data, check=False)
    assert result.returncode == 1
    assert where in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(run_cli("policy", "list", "--json", data=data).stdout) == before


def test_decide_evaluates_locally(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"surface": "payment.execute",
                                   "context": {**PAY, "amount": 12_000}}))
    result = run_cli("decide", str(request), "--policy", str(demo_bundle_path()),
                     "--json")
    answer = json.loads(result.stdout)
    assert answer["decision"] == "ESCALATE"
    assert answer["reasonCode"] == "HIGH_VALUE_PAYMENT"
    assert answer["determiningPolicies"]
    text = run_cli("decide", str(request), "--policy", str(demo_bundle_path())).stdout
    assert "ESCALATE" in text and "determining policies" in text
    request.write_text('{"surface": "payment.execute", "context": {"amount": NaN}}')
    bad = run_cli("decide", str(request), "--policy", str(demo_bundle_path()), check=False)
    assert bad.returncode == 1 and "expected" in bad.stderr


def test_receipt_verify_recomputes_the_hash(gateway: Gateway, tmp_path: Path) -> None:
    with gateway.client() as client:
        answer = client.post("/execute", json={"surface": "payment.execute",
                                               "context": PAY}).json()
        keys_doc = client.get("/.well-known/trigguard/keys.json").json()
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys_doc))
    response_file = tmp_path / "response.json"
    response_file.write_text(json.dumps(answer))
    ok = run_cli("receipt", "verify", str(response_file), "--keys", str(keys_file))
    assert "VALID" in ok.stdout
    by_url = run_cli("receipt", "verify", str(response_file), "--keys",
                     f"{gateway.url}/.well-known/trigguard/keys.json", "--json")
    assert json.loads(by_url.stdout)["valid"] is True

    for field, value in [("decision", "DENY"), ("policyVersion", "0" * 64),
                         ("reasonCode", "WITHIN_LIMIT_X"), ("logIndex", 999_999),
                         ("actorId", "someone-else"), ("requestHash", "1" * 64)]:
        tampered = {**answer["receipt"], field: value}
        path = tmp_path / f"tampered-{field}.json"
        path.write_text(json.dumps(tampered))
        result = run_cli("receipt", "verify", str(path), "--keys", str(keys_file), "--json",
                         check=False)
        assert result.returncode == 1, field
        assert json.loads(result.stdout)["error"] == "receipt_hash_mismatch", field

    signature = answer["receipt"]["authoritySignature"]
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    path = tmp_path / "tampered-signature.json"
    path.write_text(json.dumps({**answer["receipt"], "authoritySignature": flipped}))
    result = run_cli("receipt", "verify", str(path), "--keys", str(keys_file), check=False)
    assert result.returncode == 1 and "signature does not verify" in result.stdout


def test_decide_takes_assumed_facts(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"surface": "payment.execute", "actorId": "a",
                                   "context": {**PAY, "amount": 2_000}}))
    fresh = json.loads(run_cli("decide", str(request), "--policy", str(demo_bundle_path()),
                               "--json").stdout)
    assert fresh["decision"] == "PERMIT"
    busy = json.loads(run_cli("decide", str(request), "--policy", str(demo_bundle_path()),
                              "--facts", '{"amount_sum_24h": "51000"}', "--json").stdout)
    assert (busy["decision"], busy["reasonCode"]) == ("DENY", "SPEND_LIMIT")
    for facts, problem in (("[1]", "must be a JSON object"), ("{", "is not JSON"),
                           ('{"amount_sum_24h": "abc"}', "amount_sum_24h must be a number")):
        bad = run_cli("decide", str(request), "--policy", str(demo_bundle_path()), "--facts",
                      facts, check=False)
        assert bad.returncode == 1 and problem in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and "class" not in bad.stderr


@pytest.mark.parametrize("url", [
    "mysql://who:s3cretpw@db.example/x",  # the password was echoed in the error
    "postgresql://who:s3cretpw@127.0.0.1:notaport/x",  # a traceback
    "postgresql://who:s3cretpw@127.0.0.1:99999/x",
    "postgresql://who:s3cretpw@[::1/x",
])
def test_a_database_url_that_cannot_work_is_refused_without_its_password(
        tmp_path: Path, url: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "execguard.toml").write_text(f'[database]\nurl = "{url}"\n')
    for command in (["db", "migrate", "--db", url], ["keys", "list"],
                    ["audit", "--db", url, "--no-state"]):
        refused = run_cli(*command, data=None if "audit" in command else data, check=False)
        assert refused.returncode == 1, (command, refused.stderr)
        assert refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
        assert "s3cretpw" not in refused.stderr and "Traceback" not in refused.stderr


def test_text_others_wrote_is_printed_as_text_not_markup(fresh_gateway: Gateway,
                                                        tmp_path: Path) -> None:
    """An agent's actor id '[/]' made every approver's 'approvals list' a traceback."""
    data = fresh_gateway.data
    approver = api_key_from(run_cli("keys", "create", "--tenant", "demo", "--role", "approver",
                                    "--group", "finance", "--label", "[/]bob", data=data).stdout)
    with fresh_gateway.client() as client:
        escalated = client.post("/execute", json={
            "surface": "payment.execute", "actorId": "[/]evil [red]x",
            "context": {**PAY, "amount": 25000}}).json()
    assert escalated["decision"] == "ESCALATE"
    listed = run_cli("approvals", "list", "--url", fresh_gateway.url, "--api-key", approver)
    assert "[/]evil [red]x" in listed.stdout
    shown = run_cli("approvals", "show", escalated["execution_id"], "--url", fresh_gateway.url,
                    "--api-key", approver)
    assert "[/]evil [red]x" in shown.stdout
    assert "[/]bob" in run_cli("keys", "list", data=data).stdout
    revoked = run_cli("keys", "revoke", approver, data=data)
    assert "[/]bob" in revoked.stdout
    odd = tmp_path / "odd [/] [red]dir"
    created = run_cli("init", data=odd)
    assert f"Created ExecGuard data directory {odd}" in created.stdout
    assert api_key_from(created.stdout)


def test_an_init_that_stopped_half_way_is_finished_by_the_next(
        tmp_path: Path, database: str | None) -> None:
    """It left a ledger and no signing key; the next init said 'nothing changed'."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "keys").write_text("in the way")  # the signing key cannot be written
    db = ("--db", database) if database else ()
    failed = run_cli("init", *db, data=data, check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    refused = run_cli("keys", "list", data=data, check=False)
    assert refused.returncode == 1 and "did not finish: run it again" in refused.stderr
    (data / "keys").unlink()
    finished = run_cli("init", *db, data=data)
    assert "Created ExecGuard data directory" in finished.stdout
    key = api_key_from(finished.stdout)
    assert (data / "demo-api-key").read_text().strip() == key
    listed = json.loads(run_cli("keys", "list", "--json", data=data).stdout)["keys"]
    assert [k["id"] for k in listed] == [hashlib.sha256(key.encode()).hexdigest()[:16]]
    assert "nothing changed" in run_cli("init", data=data).stdout


def _init_after(barrier: object, data: str, results: object) -> None:
    from execguard.server.datadir import DataDir
    barrier.wait()  # type: ignore[attr-defined]
    result = DataDir(data).initialise()
    results.put((result.created, result.key_id, result.api_key))  # type: ignore[attr-defined]


def test_inits_run_at_once_set_the_directory_up_once(tmp_path: Path) -> None:
    """Two inits racing published two signing keys and two admin keys, one of them failed
    half-way, and the others said 'nothing changed' without an API key."""
    import multiprocessing
    import sqlite3
    context = multiprocessing.get_context("spawn")
    for round_ in range(4):
        data = tmp_path / f"data{round_}"
        barrier, results = context.Barrier(6), context.Queue()
        workers = [context.Process(target=_init_after, args=(barrier, str(data), results))
                   for _ in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert all(w.exitcode == 0 for w in workers)
        answers = [results.get(timeout=5) for _ in workers]
        assert sorted(created for created, _, _ in answers) == [False] * 5 + [True]
        key_ids, api_keys = {a[1] for a in answers}, {a[2] for a in answers}
        assert len(key_ids) == 1 and "" not in key_ids and len(api_keys) == 1
        with closing(sqlite3.connect(data / "execguard.db")) as ledger:
            assert ledger.execute("SELECT count(*) FROM signing_keys").fetchone() == (1,)
            assert ledger.execute("SELECT count(*) FROM api_keys").fetchone() == (1,)


def test_an_unreachable_database_is_one_line_on_stderr(tmp_path: Path) -> None:
    # The connection pool printed a warning per retry before the error line.
    refused = run_cli("db", "migrate", "--db", "postgresql://who@127.0.0.1:1/none",
                      data=tmp_path / "data", check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1


def test_listing_a_tenant_that_does_not_exist_says_so(tmp_path: Path) -> None:
    # A typo'd tenant listed nothing, exit 0: a script read it as "no bundles, no hooks".
    data = tmp_path / "data"
    run_cli("init", data=data)
    for command in (["policy", "list"], ["policy", "list", "--json"], ["webhooks", "list"],
                    ["policy", "shadow-report", "--json"]):
        refused = run_cli(*command, "--tenant", "dmeo", data=data, check=False)
        assert refused.returncode == 1, command
        assert refused.stderr == "error: tenant 'dmeo' does not exist\n"

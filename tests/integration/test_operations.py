"""Operations: Prometheus metrics on /metrics and structured JSON logs, on a real server."""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from execguard.server.metrics import Counter, Histogram, Registry
from tests.conftest import Gateway, api_key_from, free_port, run_cli, start_gateway_with_broken_key

PAY = {"amount": 250, "currency": "EUR", "beneficiary": "Acme Office Supplies"}
EXPORT = {"row_count": 5_000_000, "destination": "partner", "contains_pii": False}
SANCTIONED = "Blackwater Lagoon Trading (fictional)"

# -- a small, strict parser of the Prometheus text format 0.0.4 ----------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)(?: -?\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_UNESCAPE = re.compile(r"\\([\\\"n])")


@dataclass
class Family:
    name: str
    type: str = ""
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        assert match, f"bad label set at {text[position:]!r}"
        name, raw = match.group(1), match.group(2)
        assert name not in labels, f"label {name} repeated"
        labels[name] = _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), raw)
        position = match.end()
    return labels


def parse_value(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


def parse_exposition(text: str) -> dict[str, Family]:
    """Families by name; asserts the structure the format requires."""
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    for line in text.splitlines():
        assert line, "no blank lines expected"
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, name, *rest = line.split(" ", 3)
            family = families.setdefault(name, Family(name))
            assert not family.samples, f"{keyword} of {name} after its samples"
            if keyword == "TYPE":
                assert not family.type, f"two TYPE lines for {name}"
                family.type = rest[0]
                assert family.type in ("counter", "gauge", "histogram", "summary", "untyped")
            else:
                family.help = rest[0] if rest else ""
            continue
        assert not line.startswith("#"), line
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.group(1), parse_labels(match.group(2) or ""), \
            parse_value(match.group(3))
        owner = name
        if name not in families:
            owner = re.sub(r"_(bucket|sum|count)$", "", name)
            assert families.get(owner) and families[owner].type == "histogram", \
                f"sample {name} of no declared family"
        families[owner].samples.append((name, labels, value))
    for family in families.values():
        assert family.type, f"{family.name} has no TYPE"
        if family.type == "histogram":
            check_histogram(family)
    return families


def check_histogram(family: Family) -> None:
    children: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for name, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if name.endswith("_bucket"):
            children.setdefault(key, []).append((parse_value(labels["le"]), value))
        elif name.endswith("_count"):
            counts[key] = value
    for key, buckets in children.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, bounds
        cumulative = [n for _, n in buckets]
        assert cumulative == sorted(cumulative), f"{family.name} buckets not cumulative"
        assert cumulative[-1] == counts[key], f"{family.name}: +Inf bucket != _count"


def value(families: dict[str, Family], sample: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled child that does not exist yet."""
    owner = sample if sample in families else re.sub(r"_(bucket|sum|count)$", "", sample)
    found = [v for name, lbl, v in families[owner].samples
             if name == sample and lbl == labels]
    assert len(found) <= 1
    return found[0] if found else 0.0


def scrape(gateway: Gateway) -> dict[str, Family]:
    response = httpx.get(f"{gateway.url}/metrics", timeout=10)  # no API key
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_exposition(response.text)


def execute(client: httpx.Client, surface: str, context: dict[str, Any],
            **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", None)
    return client.post("/execute", headers=headers, json={
        "surface": surface, "actorId": f"agent-{uuid.uuid4()}", "context": context, **extra})


# -- metrics -------------------------------------------------------------------------------


def test_metrics_count_decisions_latency_batches_log_approvals_and_permits(
        fresh_gateway: Gateway) -> None:
    before = scrape(fresh_gateway)
    assert value(before, "execguard_decision_latency_seconds_count") == 0
    assert value(before, "execguard_log_entries", tenant="demo") == 0

    with fresh_gateway.client() as client:
        decisions = []
        for _ in range(2):
            decisions.append(execute(client, "payment.execute", PAY).json())
        retried = {"surface": "payment.execute", "actorId": f"agent-{uuid.uuid4()}",
                   "context": PAY}
        key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
        once = client.post("/execute", headers=key, json=retried).json()
        replay = client.post("/execute", headers=key, json=retried).json()
        decisions.append(once)
        escalated = execute(client, "payment.execute", {**PAY, "amount": 25_000}).json()
        denied = execute(client, "payment.execute", {**PAY, "beneficiary": SANCTIONED}).json()
        silent = execute(client, "payment.execute",
                         {"currency": "EUR", "beneficiary": "Acme"}).json()
        export_denied = execute(client, "data.export", EXPORT).json()
        observed = execute(client, "data.export", EXPORT, executionMode="observe").json()
        unknown = execute(client, "paymnt.execute", PAY)
        execute_calls = 10

        assert [d["decision"] for d in decisions] == ["PERMIT"] * 3
        assert (escalated["decision"], denied["decision"], silent["decision"]) == \
            ("ESCALATE", "DENY", "SILENCE")
        assert "approval" in escalated
        assert (export_denied["decision"], observed["decision"],
                observed["would_decision"]) == ("DENY", "PERMIT", "DENY")
        assert unknown.status_code == 400
        assert replay["execution_id"] == once["execution_id"]  # answered, not decided again

        consumed = client.post(f"/v1/permits/{decisions[0]['execution_id']}/consume",
                               json={"requestHash": decisions[0]["receipt"]["requestHash"]})
        assert consumed.status_code == 200
        again = client.post(f"/v1/permits/{decisions[0]['execution_id']}/consume",
                            json={"requestHash": decisions[0]["receipt"]["requestHash"]})
        assert again.status_code == 409 and again.json()["refusalReason"] == "ALREADY_CONSUMED"

    after = scrape(fresh_gateway)
    counts = {(lbl["decision"], lbl["surface"], lbl["mode"]): v
              for _, lbl, v in after["execguard_decisions_total"].samples}
    assert counts == {
        ("PERMIT", "payment.execute", "enforce"): 3,
        ("ESCALATE", "payment.execute", "enforce"): 1,
        ("DENY", "payment.execute", "enforce"): 1,
        ("SILENCE", "payment.execute", "enforce"): 1,
        ("DENY", "data.export", "enforce"): 1,
        ("PERMIT", "data.export", "observe"): 1,
    }
    assert after["execguard_decisions_total"].type == "counter"
    assert after["execguard_decision_latency_seconds"].type == "histogram"
    assert value(after, "execguard_decision_latency_seconds_count") == execute_calls
    assert value(after, "execguard_decision_latency_seconds_sum") > 0

    log_size = 8 + 2  # decisions, then a consumption and a refused one
    ((stored,),) = fresh_gateway.sql("SELECT COUNT(*) FROM log WHERE tenant = 'demo'")
    assert stored == log_size
    assert value(after, "execguard_log_entries", tenant="demo") == log_size
    batches = value(after, "execguard_group_commit_batch_size_count")
    assert batches > 0
    assert batches == value(after, "execguard_group_commit_batches_total")
    # Every entry was committed in exactly one batch.
    assert value(after, "execguard_group_commit_batch_size_sum") == log_size

    assert value(after, "execguard_approvals_pending", tenant="demo") == 1
    assert value(after, "execguard_permits_consumed_total") == 1
    assert value(after, "execguard_permit_refusals_total", reason="ALREADY_CONSUMED") == 1
    assert value(after, "execguard_permit_refusals_total", reason="EXPIRED") == 0
    assert value(after, "execguard_fail_closed_total", cause="keys_unavailable") == 0


def test_a_503_is_counted_as_failing_closed_with_its_cause(tmp_path: Path) -> None:
    gateway = start_gateway_with_broken_key(tmp_path)
    try:
        with gateway.client() as client:
            assert client.get("/readyz").status_code == 503  # not an error answer
            refused = client.post("/execute", json={"surface": "payment.execute",
                                                    "context": PAY})
            assert refused.status_code == 503
            assert refused.json()["error"] == "keys_unavailable"
        families = scrape(gateway)
        assert value(families, "execguard_fail_closed_total", cause="keys_unavailable") == 1
        assert value(families, "execguard_fail_closed_total", cause="internal_error") == 0
        assert value(families, "execguard_decision_latency_seconds_count") == 1
        assert value(families, "execguard_decisions_total", decision="PERMIT",
                     surface="payment.execute", mode="enforce") == 0
    finally:
        gateway.stop()
    # The fail-closed warning is logged with the id of the request it refused.
    lines = json_lines(gateway.log_path)
    rid = refused.headers["x-request-id"]
    assert any(line["level"] == "WARNING" and line.get("request_id") == rid
               and "failing closed" in line["msg"] for line in lines)


def test_exposition_escapes_label_values_and_help() -> None:
    registry = Registry()
    counter = registry.register(Counter("t_total", "help with \\ and\nnewline", ("v",)))
    counter.inc(2, v='quote " backslash \\ newline \n end')
    histogram = registry.register(Histogram("t_seconds", "h", (0.1, 1.0)))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(seconds)
    text = registry.render()
    assert "# HELP t_total help with \\\\ and\\nnewline\n" in text
    assert 't_total{v="quote \\" backslash \\\\ newline \\n end"} 2\n' in text
    families = parse_exposition(text)
    assert value(families, "t_total", v='quote " backslash \\ newline \n end') == 2
    assert value(families, "t_seconds_bucket", le="0.1") == 2  # le is inclusive
    assert value(families, "t_seconds_bucket", le="1.0") == 3
    assert value(families, "t_seconds_bucket", le="+Inf") == 4
    assert value(families, "t_seconds_count") == 4
    assert value(families, "t_seconds_sum") == 3.65


# -- logs ----------------------------------------------------------------------------------

_RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a server's output (its start-up banner is plain text)."""
    lines = []
    for raw in path.read_text().splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            assert _RFC3339_UTC.match(line["ts"]), line
            assert {"level", "logger", "msg"} <= set(line), line
            lines.append(line)
    return lines


def test_logs_are_json_lines_with_request_and_execution_ids_and_no_secrets(
        fresh_gateway: Gateway) -> None:
    account = "DE89370400440532013000"
    beneficiary = "Quillfeather Unique Beneficiary 7731"
    wrong_key = "egk_" + "x" * 40
    with fresh_gateway.client() as client:
        paid = client.post("/execute", json={
            "surface": "payment.execute", "actorId": "agent-logs",
            "context": {"amount": 250, "currency": "EUR", "beneficiary": beneficiary,
                        "beneficiary_account": account}})
        assert paid.status_code == 200
        answer = paid.json()
        mine = client.get("/v1/audit?surface=payment.execute&limit=5",
                          headers={"X-Request-Id": "trace-abc.123"})
        assert mine.headers["x-request-id"] == "trace-abc.123"
        looked_up = client.get(f"/verify/{answer['execution_id']}")
        assert looked_up.status_code == 200
    assert httpx.post(f"{fresh_gateway.url}/execute", json={"surface": "payment.execute"},
                      headers={"Authorization": f"Bearer {wrong_key}"}).status_code == 401
    httpx.get(f"{fresh_gateway.url}/healthz")
    fresh_gateway.stop()  # log lines are written by a thread of their own: all, by exit

    text = fresh_gateway.log_path.read_text()
    lines = json_lines(fresh_gateway.log_path)
    rid = paid.headers["x-request-id"]
    assert answer["request_id"] == rid

    decision = [ln for ln in lines if ln["logger"] == "execguard.decisions"
                and ln.get("execution_id") == answer["execution_id"]]
    assert len(decision) == 1
    assert {k: decision[0].get(k) for k in ("request_id", "tenant", "surface", "decision",
                                            "reason_code", "mode", "level")} == {
        "request_id": rid, "tenant": "demo", "surface": "payment.execute",
        "decision": "PERMIT", "reason_code": answer["reasonCode"], "mode": "enforce",
        "level": "INFO"}

    access = {ln["request_id"]: ln for ln in lines if ln["logger"] == "execguard.access"}
    assert {k: access[rid][k] for k in ("method", "path", "status", "tenant")} == {
        "method": "POST", "path": "/execute", "status": 200, "tenant": "demo"}
    assert isinstance(access[rid]["latency_ms"], float | int) and access[rid]["latency_ms"] >= 0
    audit = access["trace-abc.123"]
    assert (audit["path"], audit["status"]) == ("/v1/audit", 200)  # no query string
    verify_line = [ln for ln in lines if ln.get("path", "").startswith("/verify/")]
    assert verify_line and verify_line[0]["tenant"] == "demo"  # a handler run in a thread
    unauthorized = [ln for ln in lines if ln.get("status") == 401]
    assert unauthorized and "tenant" not in unauthorized[0]
    assert not any(ln.get("path") == "/healthz" for ln in lines)  # probes are DEBUG

    for secret in (fresh_gateway.api_key, wrong_key, account, beneficiary, "Bearer",
                   "uthorization", "surface=payment.execute"):
        assert secret not in text, f"{secret!r} is in the server's log"


def test_text_logs_on_request(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = api_key_from(run_cli("init", data=data).stdout)
    gateway = Gateway(data=data, port=free_port(), api_key=key,
                      env={"EXECGUARD_LOG_FORMAT": "text"})
    gateway.start()
    try:
        with gateway.client() as client:
            answer = client.post("/execute", json={"surface": "payment.execute",
                                                   "context": PAY}).json()
    finally:
        gateway.stop()
    text = gateway.log_path.read_text()
    assert json_lines(gateway.log_path) == []
    assert f"execution_id={answer['execution_id']}" in text
    assert " INFO execguard.access POST /execute 200 " in text
    assert key not in text

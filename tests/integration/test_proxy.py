"""``execguard proxy`` as real processes: gateway, proxy and an upstream that counts its calls.

Nothing reaches the upstream without a PERMIT whose single use the gateway recorded for
exactly the forwarded request; everything else is a 403 (or a 404 off the configured routes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from execguard.gate.proxy import ProxyConfig, create_proxy_app, load_proxy_config
from tests.conftest import REPO, Gateway, api_key_from, free_port, run_cli

# The proxy command registers itself on import (also when the CLI package imports it).
LAUNCH = "import execguard.cli.proxy; from execguard.cli import main; main()"
UPSTREAM_SECRET = "Bearer upstream-secret-7f3a"
AGENT_KEY = "Bearer agent-held-key"
SANCTIONED = "Blackwater Lagoon Trading (fictional)"

ROUTES = """
[[routes]]
method = "POST"
path = "/payments"
surface = "payment.execute"
actor = "header:X-Agent-Id"
[routes.context]
amount = "json:amount"
currency = "json:currency"
beneficiary = "json:to.name"

[[routes]]
method = "POST"
path = "/payouts/{account}"
surface = "payment.execute"
[routes.context]
amount = "json:amount"
currency = "const:EUR"
beneficiary = "path:account"

[litellm]
surface = "tool.invoke"
upstream_path = "/v1/chat/completions"
allowed_surfaces = ["tool.invoke", "memory.write"]
"""


def proxy_config(gateway_url: str, upstream_url: str, *, timeout: float = 5,
                 keys: str | None = None, routes: str = ROUTES,
                 upstream_timeout: float = 30) -> str:
    pinned = f'keys = "{keys}"\n' if keys else ""
    return f"""
[gateway]
url = "{gateway_url}"
api_key_env = "EXECGUARD_API_KEY"
timeout_seconds = {timeout}
{pinned}
[upstream]
url = "{upstream_url}"
headers = {{ Authorization = "env:PAYMENTS_API_TOKEN", X-Upstream-Client = "execguard-proxy" }}
timeout_seconds = {upstream_timeout}
{routes}"""


# -- the upstream: a real HTTP service that records every call it gets -----------------------

@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    server: ThreadingHTTPServer
    calls: list[Call] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def start_upstream(delay_seconds: float = 0) -> Upstream:
    """The upstream; with ``delay_seconds``, it records each call, then waits that long to
    answer (a slow upstream: the action ran, the answer is late)."""
    upstream: Upstream

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            upstream.calls.append(Call(self.command, self.path,
                                       {k.lower(): v for k, v in self.headers.items()}, body))
            time.sleep(delay_seconds)
            if self.path.startswith("/payouts/"):
                status, answer = 500, {"error": "ledger_unavailable"}
            elif self.path == "/v1/chat/completions":
                request = json.loads(body)
                status, answer = 200, {"id": "chatcmpl-1", "model": request["model"],
                                       "choices": [{"message": {"role": "assistant",
                                                                "content": "hello"}}]}
            else:
                status, answer = 201, {"id": f"pay_{len(upstream.calls)}", "status": "accepted"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Upstream", "payments")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = handle_one

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    upstream = Upstream(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream


# -- the proxy process ----------------------------------------------------------------------

@dataclass
class Proxy:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any = None, **headers: str) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=headers, timeout=30.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def serving(config: ProxyConfig) -> Iterator[str]:
    """``create_proxy_app(config)`` under uvicorn in this process (a configuration built in
    code, as an integrator's may be); yields its URL, stops it (and its lifespan) after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_proxy_app(config), host="127.0.0.1",
                                           port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def proxy_env(gateway: Gateway | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EXECGUARD_URL", "EXECGUARD_API_KEY", "PAYMENTS_API_TOKEN")}
    env["PAYMENTS_API_TOKEN"] = UPSTREAM_SECRET
    if gateway is not None:
        env["EXECGUARD_API_KEY"] = gateway.api_key
    return env


def run_proxy_cli(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LAUNCH, "proxy", "--config", str(config),
                           "--port", str(free_port())], capture_output=True, text=True,
                          timeout=60, env=env)


def start_proxy(directory: Path, config: str, env: dict[str, str]) -> Proxy:
    path = directory / f"proxy-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(config)
    port = free_port()
    log_path = path.with_suffix(".log")
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "proxy", "--config", str(path), "--port", str(port)],
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=env)
    proxy = Proxy(port, process, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"proxy exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{proxy.url}/healthz", timeout=1.0).status_code == 200:
                return proxy
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proxy.stop()
    raise AssertionError(f"proxy did not start:\n{log_path.read_text()}")


def start_own_gateway(tmp: Path, **env: str) -> Gateway:
    data = tmp / "data"
    gateway = Gateway(data=data, port=free_port(),
                      api_key=api_key_from(run_cli("init", data=data).stdout), env=env)
    gateway.start()
    return gateway


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = start_upstream()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def running_proxy(gateway: Gateway, upstream: Upstream,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    proxy = start_proxy(tmp_path_factory.mktemp("proxy"),
                        proxy_config(gateway.url, upstream.url), proxy_env(gateway))
    yield proxy
    proxy.stop()


@pytest.fixture
def proxy(running_proxy: Proxy, upstream: Upstream) -> Proxy:
    upstream.calls.clear()
    return running_proxy


def payment(amount: Any = 250, beneficiary: str = "Acme Office Supplies",
            **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"amount": amount, "currency": "EUR", "to": {"name": beneficiary},
                            **extra}
    if amount is None:
        del body["amount"]
    return body


def issue_token(gateway: Gateway, amount: Any = 120, actor: str = "agent-9",
                beneficiary: str = "Acme Office Supplies") -> dict[str, Any]:
    """A PERMIT asked for directly at the gateway, for the request the proxy will build."""
    with gateway.client() as client:
        answer = client.post("/execute", json={
            "surface": "payment.execute", "actorId": actor,
            "context": {"amount": amount, "currency": "EUR",
                        "beneficiary": beneficiary}}).json()
    assert answer["decision"] == "PERMIT", answer
    return answer


def story(gateway: Gateway, execution_id: str, *, outcome: bool = True) -> dict[str, Any]:
    """``/verify/{id}``; with ``outcome``, wait (briefly) for the outcome to be recorded."""
    with gateway.client() as client:
        deadline = time.monotonic() + 10
        while True:
            detail: dict[str, Any] = client.get(f"/verify/{execution_id}").json()
            if not outcome or detail.get("outcome") or time.monotonic() > deadline:
                return detail
            time.sleep(0.05)


def assert_blocked(response: httpx.Response, decision: str | None = None) -> dict[str, Any]:
    assert response.status_code == 403, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == "execution_blocked"
    assert body["reason"]
    if decision is not None:
        assert body["decision"] == decision
    return body


def test_the_proxy_shows_no_url_credentials(gateway: Gateway, upstream: Upstream,
                                            tmp_path: Path) -> None:
    """A gateway URL with user:password is refused, naming neither: it was sent as Basic
    credentials instead of the API key, so every call was refused (and the start-up line
    printed the password). And httpx logged every request's whole URL (a forwarded
    request's query too) at INFO."""
    with_password = gateway.url.replace("http://", "http://user:GWPASS@")
    with pytest.raises(AssertionError, match="exited early") as refused:
        start_proxy(tmp_path, proxy_config(with_password, upstream.url), proxy_env(gateway))
    assert "holds a user name or password" in str(refused.value)
    assert "GWPASS" not in str(refused.value)
    proxy = start_proxy(tmp_path, proxy_config(gateway.url, upstream.url), proxy_env(gateway))
    try:
        proxy.post("/payments?token=QTOKEN", payment(), **{"X-Agent-Id": "agent-7"})
    finally:
        proxy.stop()
    logged = proxy.log_path.read_text()
    for secret in ("QTOKEN", "HTTP Request:"):
        assert secret not in logged


# -- no permit, no call ---------------------------------------------------------------------

@pytest.mark.parametrize(("body", "decision", "code"), [
    (payment(beneficiary=SANCTIONED), "DENY", "SANCTIONED_BENEFICIARY"),
    (payment(amount=25_000), "ESCALATE", "HIGH_VALUE_PAYMENT"),
    (payment(amount=None), "SILENCE", "MISSING_CONTEXT"),
])
def test_no_permit_means_403_and_the_upstream_is_never_called(
        proxy: Proxy, upstream: Upstream, gateway: Gateway, body: dict[str, Any],
        decision: str, code: str) -> None:
    response = proxy.post("/payments", body, **{"X-Agent-Id": "agent-7"})
    refused = assert_blocked(response, decision)
    assert refused["reasonCode"] == code
    assert response.headers["X-Execution-Id"] == refused["executionId"]
    assert refused["request_id"]
    assert upstream.calls == []
    # The decision the proxy was refused is the gateway's own record.
    assert story(gateway, refused["executionId"], outcome=False)["decision"] == decision


def test_a_permitted_request_is_forwarded_once_with_the_proxys_credentials(
        proxy: Proxy, upstream: Upstream, gateway: Gateway) -> None:
    key = f"pay-{uuid.uuid4()}"
    body = payment(memo="office chairs")
    headers = {"Authorization": AGENT_KEY, "X-Agent-Id": "agent-7", "Idempotency-Key": key}
    # Asking the upstream to run another method than the one decided on: dropped.
    overrides = {"X-HTTP-Method-Override": "DELETE", "X-Method-Override": "DELETE",
                 "X-HTTP-Method": "DELETE"}
    response = proxy.post("/payments", body, **headers, **overrides)

    assert response.status_code == 201, response.text
    assert response.json() == {"id": "pay_1", "status": "accepted"}
    assert response.headers["X-Upstream"] == "payments"
    execution_id = response.headers["X-Execution-Id"]
    assert len(upstream.calls) == 1
    call = upstream.calls[0]
    assert (call.method, call.path) == ("POST", "/payments")
    assert call.headers["authorization"] == UPSTREAM_SECRET     # never the agent's
    assert call.headers["x-upstream-client"] == "execguard-proxy"
    assert call.headers["x-agent-id"] == "agent-7"
    assert call.headers["idempotency-key"] == key
    assert "x-execution-token" not in call.headers
    assert not {name.lower() for name in overrides} & set(call.headers)
    assert json.loads(call.body) == body

    detail = story(gateway, execution_id)
    assert detail["decision"] == "PERMIT" and detail["actorId"] == "agent-7"
    assert detail["consumption"]["consumeResult"] == "CONSUMED"
    assert detail["outcome"]["outcome"] == "SUCCESS"
    assert detail["outcome"]["resultDigest"] == \
        "sha256:" + hashlib.sha256(response.content).hexdigest()

    # A replay with the same Idempotency-Key gets the same, already used, permit.
    replay = proxy.post("/payments", body, **headers)
    refused = assert_blocked(replay, "PERMIT")
    assert refused["reasonCode"] == "ALREADY_CONSUMED"
    assert refused["executionId"] == execution_id
    assert len(upstream.calls) == 1


def test_an_upstream_failure_is_relayed_and_recorded_as_failure(
        proxy: Proxy, upstream: Upstream, gateway: Gateway) -> None:
    response = proxy.post("/payouts/Acme%20Office%20Supplies", {"amount": 40},
                          **{"Idempotency-Key": f"payout-{uuid.uuid4()}"})
    assert response.status_code == 500
    assert response.json() == {"error": "ledger_unavailable"}
    assert len(upstream.calls) == 1
    detail = story(gateway, response.headers["X-Execution-Id"])
    assert detail["surface"] == "payment.execute"
    assert detail["outcome"]["outcome"] == "FAILURE"


def test_a_header_that_cannot_be_forwarded_is_400_before_any_permit_is_used(
        proxy: Proxy, upstream: Upstream, gateway: Gateway) -> None:
    """A non-ASCII header value is text in an unknown encoding: refused, naming the header,
    before the gateway is asked or a presented permit is consumed."""
    key = f"pay-{uuid.uuid4()}"
    headers = {"X-Agent-Id": "agent-7", "Idempotency-Key": key}
    refused = httpx.post(proxy.url + "/payments", json=payment(amount=17), timeout=30.0,
                         headers={**headers, "X-Note": "caf\u00e9".encode()})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "malformed_request"
    assert "'x-note'" in refused.json()["message"].lower()
    assert upstream.calls == []
    # Two different Idempotency-Keys: which request would a retry repeat? (The gateway
    # refuses them too; the proxy took the first.)
    twice = httpx.post(proxy.url + "/payments", json=payment(amount=17), timeout=30.0,
                       headers=[("X-Agent-Id", "agent-7"), ("Idempotency-Key", key),
                                ("Idempotency-Key", f"other-{key}")])
    assert twice.status_code == 400, twice.text
    assert "Idempotency-Key" in twice.json()["message"]
    assert upstream.calls == []
    # Nothing was used up: the same request (same Idempotency-Key) with a clean header runs.
    ran = proxy.post("/payments", payment(amount=17), **headers, **{"X-Note": "cafe"})
    assert ran.status_code == 201, ran.text
    assert len(upstream.calls) == 1

    issued = issue_token(gateway)
    as_agent = {"X-Agent-Id": "agent-9", "X-Execution-Token": issued["execution_token"]}
    refused = httpx.post(proxy.url + "/payments", json=payment(amount=120), timeout=30.0,
                         headers={**as_agent, "X-Note": "caf\u00e9".encode()})
    assert refused.status_code == 400, refused.text
    assert story(gateway, issued["execution_id"], outcome=False)["consumption"] is None
    assert proxy.post("/payments", payment(amount=120), **as_agent).status_code == 201
    assert len(upstream.calls) == 2


def test_an_unforeseen_failure_to_send_is_a_502_and_a_failure_outcome(
        gateway: Gateway, upstream: Upstream, tmp_path: Path) -> None:
    """The last line of defence: an error no one planned for, once the permit is used (here
    a port the loader would refuse, in a configuration built in code), is answered with the
    proxy's error shape and recorded as FAILURE: nothing was sent."""
    path = tmp_path / "proxy.toml"
    path.write_text(proxy_config(gateway.url, upstream.url))
    config = load_proxy_config(path, env=proxy_env(gateway))
    config = replace(config, upstream=replace(config.upstream, url="http://127.0.0.1:99999"))
    upstream.calls.clear()
    with serving(config) as url:
        response = httpx.post(url + "/payments", json=payment(amount=18), timeout=30.0,
                              headers={"Idempotency-Key": f"pay-{uuid.uuid4()}"})
    assert response.status_code == 502, response.text
    answer = response.json()
    assert answer["error"] == "upstream_unavailable" and "not sent" in answer["message"]
    detail = story(gateway, answer["executionId"])
    assert detail["consumption"]["consumeResult"] == "CONSUMED"
    assert detail["outcome"]["outcome"] == "FAILURE"
    assert upstream.calls == []


def test_a_request_sent_without_an_answer_keeps_its_share_of_the_limits(
        gateway: Gateway, tmp_path: Path) -> None:
    """The upstream received each payment and answers too late: it may have paid. No FAILURE
    is recorded (it would free the amount), so the daily limit (50,000) still holds."""
    slow = start_upstream(delay_seconds=5)
    proxy = start_proxy(tmp_path, proxy_config(gateway.url, slow.url, upstream_timeout=0.5),
                        proxy_env(gateway))
    actor = f"agent-{uuid.uuid4().hex[:8]}"
    try:
        answers = [proxy.post("/payments", payment(amount=10_000), **{
            "X-Agent-Id": actor, "Idempotency-Key": f"pay-{uuid.uuid4()}"}) for _ in range(6)]
        for late in answers[:5]:
            assert late.status_code == 504, late.text
            assert late.json()["error"] == "upstream_result_unknown"
            assert "may have been executed" in late.json()["message"]
            detail = story(gateway, late.json()["executionId"], outcome=False)
            assert detail["consumption"]["consumeResult"] == "CONSUMED"
            assert detail["outcome"] is None
        assert assert_blocked(answers[5], "DENY")["reasonCode"] == "SPEND_LIMIT"
        assert len(slow.calls) == 5
    finally:
        proxy.stop()
        slow.server.shutdown()
        slow.server.server_close()


def test_a_request_never_sent_is_a_failure_that_frees_its_share(
        gateway: Gateway, tmp_path: Path) -> None:
    """Nothing listens at the upstream: the payment cannot have run, FAILURE is the truth,
    and the amount is free again."""
    closed = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(tmp_path, proxy_config(gateway.url, closed), proxy_env(gateway))
    actor = f"agent-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(6):
            answer = proxy.post("/payments", payment(amount=10_000), **{
                "X-Agent-Id": actor, "Idempotency-Key": f"pay-{uuid.uuid4()}"})
            assert answer.status_code == 502, answer.text
            assert answer.json()["error"] == "upstream_unavailable"
            assert "not sent" in answer.json()["message"]
            assert story(gateway, answer.json()["executionId"])["outcome"]["outcome"] == \
                "FAILURE"
    finally:
        proxy.stop()


# -- a permit the caller presents ------------------------------------------------------------

def test_a_presented_permit_runs_exactly_its_own_request_once(
        proxy: Proxy, upstream: Upstream, gateway: Gateway) -> None:
    request_a = payment(amount=120)
    as_agent = {"X-Agent-Id": "agent-9"}
    first = issue_token(gateway)
    token = first["execution_token"]

    ran = proxy.post("/payments", request_a, **as_agent, **{"X-Execution-Token": token})
    assert ran.status_code == 201, ran.text
    assert ran.headers["X-Execution-Id"] == first["execution_id"]
    assert len(upstream.calls) == 1
    assert "x-execution-token" not in upstream.calls[0].headers
    assert story(gateway, first["execution_id"])["consumption"]["consumeResult"] == "CONSUMED"

    again = proxy.post("/payments", request_a, **as_agent, **{"X-Execution-Token": token})
    assert assert_blocked(again, "PERMIT")["reasonCode"] == "ALREADY_CONSUMED"

    # A permit for request A does not run request B, and is not used up by trying.
    second = issue_token(gateway)
    other = proxy.post("/payments", payment(amount=121), **as_agent,
                       **{"X-Execution-Token": second["execution_token"]})
    assert "different request" in assert_blocked(other, "PERMIT")["reason"]
    other_actor = proxy.post("/payments", request_a, **{"X-Agent-Id": "agent-10"},
                             **{"X-Execution-Token": second["execution_token"]})
    assert_blocked(other_actor, "PERMIT")
    assert len(upstream.calls) == 1
    assert story(gateway, second["execution_id"], outcome=False)["consumption"] is None

    # Garbage and forgeries are refused before anything is asked of the gateway.
    garbage = proxy.post("/payments", request_a, **as_agent,
                         **{"X-Execution-Token": "not-a-token"})
    assert "does not verify" in assert_blocked(garbage)["reason"]
    forged = forge(second["execution_token"])
    refused = assert_blocked(proxy.post("/payments", request_a, **as_agent,
                                        **{"X-Execution-Token": forged}))
    assert "signature" in refused["reason"]
    tampered = tamper(second["execution_token"], amount_hash="0" * 64)
    assert_blocked(proxy.post("/payments", request_a, **as_agent,
                              **{"X-Execution-Token": tampered}))
    assert len(upstream.calls) == 1

    # The genuine permit still runs its own request.
    assert proxy.post("/payments", request_a, **as_agent,
                      **{"X-Execution-Token": second["execution_token"]}).status_code == 201
    assert len(upstream.calls) == 2


def forge(token: str) -> str:
    """The same claims and key id, signed by a key that is not the gateway's."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                      headers={"kid": header["kid"], "typ": header["typ"]})


def tamper(token: str, amount_hash: str) -> str:
    """The gateway's signature over a payload whose request_hash was replaced."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["request_hash"] = amount_hash
    changed = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{changed}.{signature}"


def test_an_expired_permit_is_refused(tmp_path: Path, upstream: Upstream) -> None:
    gateway = start_own_gateway(tmp_path, EXECGUARD_TOKEN_TTL_SECONDS="1")
    keys = tmp_path / "keys.json"
    keys.write_text(httpx.get(f"{gateway.url}/.well-known/trigguard/keys.json").text)
    proxy = start_proxy(tmp_path, proxy_config(gateway.url, upstream.url, keys="keys.json"),
                        proxy_env(gateway))
    try:
        upstream.calls.clear()
        token = issue_token(gateway)["execution_token"]
        time.sleep(2.2)
        refused = assert_blocked(proxy.post("/payments", payment(amount=120),
                                            **{"X-Agent-Id": "agent-9",
                                               "X-Execution-Token": token}))
        assert "EXPIRED" in refused["reason"] or "expired" in refused["reason"]
        assert upstream.calls == []
    finally:
        proxy.stop()
        gateway.stop()


# -- the gateway is away: fail closed --------------------------------------------------------

def test_a_stopped_gateway_means_403(tmp_path: Path, upstream: Upstream,
                                     fresh_gateway: Gateway) -> None:
    gateway = fresh_gateway
    proxy = start_proxy(tmp_path, proxy_config(gateway.url, upstream.url, timeout=2),
                        proxy_env(gateway))
    try:
        upstream.calls.clear()
        assert proxy.post("/payments", payment(amount=5)).status_code == 201
        gateway.stop()
        started = time.monotonic()
        refused = assert_blocked(proxy.post("/payments", payment(amount=6)))
        assert time.monotonic() - started < 2 + 1
        assert "could not be reached" in refused["reason"]
        assert len(upstream.calls) == 1
    finally:
        proxy.stop()


def test_a_gateway_that_does_not_answer_means_403_within_the_timeout(
        tmp_path: Path, upstream: Upstream) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are accepted by the kernel and never answered
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    env = {**proxy_env(), "EXECGUARD_API_KEY": "egk_unused"}
    proxy = start_proxy(tmp_path, proxy_config(url, upstream.url, timeout=1), env)
    try:
        upstream.calls.clear()
        started = time.monotonic()
        assert_blocked(proxy.post("/payments", payment()))
        assert time.monotonic() - started < 1 + 1.5
        assert upstream.calls == []
    finally:
        proxy.stop()
        silent.close()


# -- not an open relay -----------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/payments"), ("POST", "/admin/delete-everything"), ("POST", "/payments/"),
    ("POST", "/payouts/a%2F..%2Fadmin"), ("POST", "/payouts/.."), ("DELETE", "/payouts/x"),
    ("POST", "/"),
    # A segment an upstream could read otherwise than the policy did: a servlet container
    # cuts at ";" (the beneficiary would be "Acme"), some servers collapse "//" or read a
    # backslash as "/"; and an empty parameter.
    ("POST", "/payouts/Acme%20Office%20Supplies;jsessionid=1"),
    ("POST", "/payouts/Acme%3Bjsessionid=1"), ("POST", "/payouts/"), ("POST", "//payouts/x"),
    ("POST", "/payouts/a%5c..%5cadmin"), ("POST", "/payouts/a%5Cb"),
])
def test_unknown_routes_are_404_and_never_forwarded(proxy: Proxy, upstream: Upstream,
                                                    method: str, path: str) -> None:
    response = httpx.request(method, proxy.url + path, json=payment(), timeout=30.0)
    assert response.status_code == 404
    assert response.json()["error"] == "no_route"
    assert upstream.calls == []


def test_a_body_that_cannot_be_read_exactly_is_400_and_never_forwarded(
        proxy: Proxy, upstream: Upstream) -> None:
    for content in (b"amount=250", b'{"amount": 5, "amount": 50000, "currency": "EUR"}'):
        response = httpx.post(proxy.url + "/payments", content=content, timeout=30.0,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error"] == "malformed_request"
    assert upstream.calls == []


# -- trigguard-litellm's /proxy/execute ------------------------------------------------------

def test_litellm_protected_completion_through_the_proxy(
        proxy: Proxy, upstream: Upstream, gateway: Gateway,
        monkeypatch: pytest.MonkeyPatch) -> None:
    protected = pytest.importorskip("trigguard_litellm.protected")
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_API_KEY", "GOOGLE_API_KEY",
                 "GEMINI_API_KEY", "COHERE_API_KEY", "TOGETHER_API_KEY", "GROQ_API_KEY",
                 "MISTRAL_API_KEY", "DEEPSEEK_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    messages = [{"role": "user", "content": "Say hello"}]

    def complete(**overrides: Any) -> dict[str, Any]:
        arguments: dict[str, Any] = {"proxy_url": proxy.url, "trigguard_api_key": gateway.api_key,
                                     "model": "gpt-test", "messages": messages,
                                     "mode": "TRIGGUARD_PROTECTED", "actor_id": "agent-llm",
                                     **overrides}
        return protected.protected_completion(**arguments)  # type: ignore[no-any-return]

    result = complete()
    assert result["enforcement"] == "FULLY_ENFORCED"
    assert result["forward"]["status"] == 200
    assert result["forward"]["body"]["model"] == "gpt-test"
    assert result["authority"] == "execguard"
    assert len(upstream.calls) == 1
    call = upstream.calls[0]
    assert call.path == "/v1/chat/completions"
    assert json.loads(call.body) == {"model": "gpt-test", "messages": messages}
    assert call.headers["authorization"] == UPSTREAM_SECRET
    detail = story(gateway, result["executionId"])
    assert (detail["surface"], detail["actorId"]) == ("tool.invoke", "agent-llm")
    assert detail["consumption"]["consumeResult"] == "CONSUMED"
    assert detail["outcome"]["outcome"] == "SUCCESS"

    # The demo policy has no permit for memory.write: SILENCE, nothing forwarded.
    with pytest.raises(protected.TrigGuardProtectedError) as denied:
        complete(surface="memory.write")
    assert "403" in str(denied.value) and "SILENCE" in str(denied.value)
    # memory.read would be permitted, but this path serves only its configured surfaces.
    with pytest.raises(protected.TrigGuardProtectedError, match="not served"):
        complete(surface="memory.read")
    # The caller's key decides: a key the gateway does not know gets no permit.
    with pytest.raises(protected.TrigGuardProtectedError, match="403"):
        complete(trigguard_api_key="egk_not_a_real_key")
    assert len(upstream.calls) == 1


def test_proxy_execute_wire_shape(proxy: Proxy, upstream: Upstream, gateway: Gateway) -> None:
    """The exact request trigguard-litellm sends, and the answers it reads."""
    key = f"litellm-{uuid.uuid4().hex}"
    body = {"action": "llm.completion",
            "target": {"kind": "llm", "provider": "openai", "model": "gpt-test"},
            "payload": {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
            "context": {"orgId": "", "actorId": "agent-llm", "surface": "tool.invoke",
                        "environment": "sandbox", "provider": "openai", "model": "gpt-test",
                        "operation": "chat.completion", "idempotencyKey": key}}
    auth = {"Authorization": f"Bearer {gateway.api_key}", "Idempotency-Key": key}
    answer = proxy.post("/proxy/execute", body, **auth)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["permitted"] is True and result["forward"]["status"] == 200
    assert result["authority"] == "execguard"
    assert len(upstream.calls) == 1
    assert story(gateway, result["executionId"], outcome=False)["decision"] == "PERMIT"
    # The same idempotency key again: the permit is used up.
    again = proxy.post("/proxy/execute", body, **auth)
    assert again.status_code == 403
    assert again.json()["permitted"] is False and again.json()["error"] == "execution_blocked"
    denied = proxy.post("/proxy/execute", {**body, "context": {
        **body["context"], "surface": "memory.write", "idempotencyKey": None}},
        Authorization=f"Bearer {gateway.api_key}")
    refused = denied.json()
    assert denied.status_code == 403
    assert (refused["permitted"], refused["decision"]) == (False, "SILENCE")
    assert refused["executionId"] and refused["reason"]
    assert proxy.post("/proxy/execute", body).status_code == 401
    twice = httpx.post(proxy.url + "/proxy/execute", json=body, timeout=30.0, headers=[
        ("Authorization", f"Bearer {gateway.api_key}"), ("Idempotency-Key", key),
        ("Idempotency-Key", f"other-{key}")])
    assert twice.status_code == 400 and twice.json()["permitted"] is False, twice.text
    # A context that is not an object is refused, falsy or not (absent or null is none).
    for context in ([], 0, False, "", "abc"):
        bad = proxy.post("/proxy/execute", {**body, "context": context},
                         Authorization=f"Bearer {gateway.api_key}")
        assert bad.status_code == 400, (context, bad.text)
        assert bad.json()["error"] == "malformed_request" and "context" in bad.json()["message"]
    assert len(upstream.calls) == 1


# -- configuration errors --------------------------------------------------------------------

@pytest.mark.parametrize(("change", "env_drop", "named"), [
    (("timeout_seconds = 5", "timeout_seconds = 5\ntimeout_secs = 3"), None,
     "gateway.timeout_secs: unknown key"),
    (('surface = "payment.execute"\nactor', 'surface = "payment.execute"\nactr'), None,
     "routes[0].actr: unknown key"),
    (('"json:to.name"', '"body:to.name"'), None,
     "routes[0].context.beneficiary: unknown source 'body:to.name'"),
    (('"path:account"', '"path:acct"'), None, "routes[1].context.beneficiary"),
    (("", ""), "PAYMENTS_API_TOKEN",
     "upstream.headers.Authorization: environment variable PAYMENTS_API_TOKEN is not set"),
    (("", ""), "EXECGUARD_API_KEY",
     "gateway.api_key_env: environment variable EXECGUARD_API_KEY is not set"),
    # Values that load but could never work are refused at load, not at the first request.
    (('[upstream]\nurl = "http://127.0.0.1:9"', '[upstream]\nurl = "http://127.0.0.1:99999"'),
     None, "upstream.url: 'http://127.0.0.1:99999' is not a usable base URL: port 99999"),
    (('[upstream]\nurl = "http://127.0.0.1:9"', '[upstream]\nurl = "http://[::1"'), None,
     "upstream.url: 'http://[::1' is not a URL"),
    (('"execguard-proxy"', '"caf\\u00e9"'), None,
     "upstream.headers.X-Upstream-Client: the value holds a character that is not printable"),
    (("timeout_seconds = 5", "timeout_seconds = inf"), None,
     "gateway.timeout_seconds: expected a positive, finite number, got number inf"),
    (("timeout_seconds = 5", "timeout_seconds = nan"), None, "gateway.timeout_seconds"),
    (("timeout_seconds = 30", "timeout_seconds = inf"), None, "upstream.timeout_seconds"),
    (('path = "/payments"', 'path = "/payments;v=1"'), None,
     "routes[0].path: segment 'payments;v=1' is neither a plain name nor a {param}"),
])
def test_configuration_errors_exit_1_with_one_line_naming_the_key(
        tmp_path: Path, change: tuple[str, str], env_drop: str | None, named: str) -> None:
    text = proxy_config("http://127.0.0.1:9", "http://127.0.0.1:9")
    if change[0]:
        assert change[0] in text
        text = text.replace(change[0], change[1], 1)
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    env = proxy_env()
    env["EXECGUARD_API_KEY"] = "egk_x"
    if env_drop:
        env.pop(env_drop)
    result = run_proxy_cli(path, env)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.stderr
    assert UPSTREAM_SECRET not in result.stderr


def test_the_example_configuration_is_valid_and_keeps_its_secrets() -> None:
    config = load_proxy_config(REPO / "examples" / "proxy.toml",
                               env={"EXECGUARD_API_KEY": "egk_example",
                                    "PAYMENTS_API_TOKEN": "Bearer sk_example"})
    assert [(r.method, r.path, r.surface) for r in config.routes] == [
        ("POST", "/payments", "payment.execute"),
        ("POST", "/accounts/{account}/payouts", "payment.execute")]
    assert config.upstream.headers == {"Authorization": "Bearer sk_example"}
    assert config.litellm is not None and config.litellm.surface == "tool.invoke"
    assert "sk_example" not in repr(config) and "egk_example" not in repr(config)

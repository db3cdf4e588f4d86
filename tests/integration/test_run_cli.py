"""`execguard run`: a command runs only with a consumed permit; exit codes pass through."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from execguard.gate import digest_result
from tests.conftest import Gateway, run_cli

DEPLOY = ["--context", "environment=production", "--context", "service=api"]


class Upstream:
    """A real HTTP service that counts the deploys it receives."""

    def __init__(self) -> None:
        self.calls = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                upstream.calls += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/deploys"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    service = Upstream()
    yield service
    service.server.shutdown()


def deploy_command(upstream: Upstream, exit_code: int = 0) -> list[str]:
    script = (f"import sys, urllib.request; urllib.request.urlopen({upstream.url!r}, data=b'x');"
              f" sys.exit({exit_code})")
    return ["--", sys.executable, "-c", script]


def run(gateway: Gateway, *args: str, **env: str) -> tuple[int, str]:
    result = run_cli("run", *args, check=False,
                     env={"EXECGUARD_URL": gateway.url, "EXECGUARD_API_KEY": gateway.api_key,
                          **env})
    return result.returncode, result.stderr


def test_permitted_command_runs_once_and_its_exit_code_passes_through(
        fresh_gateway: Gateway, upstream: Upstream, tmp_path: Path) -> None:
    code, stderr = run(fresh_gateway, "--surface", "deploy.release", *DEPLOY,
                       "--context", "tests_passed=true", "--subject-digest", "abc123",
                       *deploy_command(upstream, exit_code=7))
    assert code == 7
    assert upstream.calls == 1
    execution_id = stderr.split("PERMIT ", 1)[1].split()[0]
    with fresh_gateway.client() as client:
        detail = client.get(f"/verify/{execution_id}").json()
        keys = client.get("/.well-known/trigguard/keys.json").json()
    assert detail["consumption"]["consumeResult"] == "CONSUMED"
    outcome = detail["outcome"]
    assert outcome["outcome"] == "FAILURE"
    assert outcome["resultDigest"] == digest_result({"exitCode": 7})
    assert outcome["consumeReceiptHash"] == detail["consumption"]["receiptHash"]
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    (tmp_path / "outcome.json").write_text(json.dumps(outcome))
    verified = run_cli("verify", str(tmp_path / "outcome.json"), "--keys",
                       str(tmp_path / "keys.json"))
    assert verified.stdout.startswith("VALID")

    # The same run again (a CI retry) gets the same, already used, permit: it does not run.
    code, stderr = run(fresh_gateway, "--surface", "deploy.release", *DEPLOY,
                       "--context", "tests_passed=true", "--subject-digest", "abc123",
                       *deploy_command(upstream, exit_code=7))
    assert code == 3 and "ALREADY_CONSUMED" in stderr
    assert upstream.calls == 1


def test_not_permitted_prints_why_and_does_not_run(fresh_gateway: Gateway,
                                                   upstream: Upstream) -> None:
    code, stderr = run(fresh_gateway, "--surface", "deploy.release", *DEPLOY,
                       *deploy_command(upstream))
    assert code == 3
    assert "SILENCE" in stderr and "NO_MATCHING_POLICY" in stderr
    assert "execution id" in stderr
    code, stderr = run(fresh_gateway, "--surface", "payment.execute", "--context", "amount=50000",
                       "--context", "currency=EUR", "--context", "beneficiary=Acme",
                       *deploy_command(upstream))
    assert code == 3 and "ESCALATE" in stderr
    assert upstream.calls == 0


def test_no_gateway_no_run(upstream: Upstream, gateway: Gateway) -> None:
    code, stderr = run(gateway, "--surface", "deploy.release", *DEPLOY, "--url",
                       "http://127.0.0.1:9", "--timeout", "1", *deploy_command(upstream))
    assert code == 4 and "could not be reached" in stderr
    code, stderr = run(gateway, "--surface", "deploy.release", *DEPLOY, "--api-key", "egk_no",
                       *deploy_command(upstream))
    assert code == 4 and "401" in stderr
    assert upstream.calls == 0


def test_arguments_are_checked(gateway: Gateway, upstream: Upstream) -> None:
    code, stderr = run(gateway, "--surface", "deploy.release", "--context", "novalue",
                       *deploy_command(upstream))
    assert code == 1 and "key=value" in stderr
    result = run_cli("run", "--surface", "deploy.release", *deploy_command(upstream),
                     check=False, env={"EXECGUARD_URL": "", "EXECGUARD_API_KEY": ""})
    assert result.returncode == 1 and "EXECGUARD_URL" in result.stderr
    assert upstream.calls == 0

"""`execguard run`: a command runs only with a consumed permit; exit codes pass through."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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


def test_a_command_name_is_printed_as_text(fresh_gateway: Gateway, tmp_path: Path) -> None:
    """What run prints names the command and the gateway's reason: text that others
    wrote, once read as rich markup ('[/]' ended in a traceback, not exit 127)."""
    code, stderr = run(fresh_gateway, "--surface", "deploy.release", *DEPLOY,
                       "--context", "tests_passed=true", "--", str(tmp_path / "no[/]such"))
    assert code == 127, stderr
    assert "cannot run" in stderr and "no[/]such" in stderr and "Traceback" not in stderr


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


def test_a_bad_timeout_or_url_is_a_usage_error(gateway: Gateway, upstream: Upstream) -> None:
    for option in (["--timeout", "nan"], ["--timeout", "inf"], ["--timeout", "0"],
                   ["--url", "http://[::1"], ["--url", "http://127.0.0.1:99999"],
                   ["--url", gateway.url.replace("http://", "http://user:pw@")]):
        code, stderr = run(gateway, "--surface", "deploy.release", *DEPLOY, *option,
                           *deploy_command(upstream))
        assert code == 2, (option, stderr)
        assert f"Invalid value for '{option[0]}'" in stderr and "Traceback" not in stderr
    assert upstream.calls == 0


# -- signals: the command is stopped with run, and its outcome is recorded ---------------------

def start_run(gateway: Gateway, tmp_path: Path, script: str,
              **popen: Any) -> tuple[subprocess.Popen[str], Path]:
    """``execguard run`` of a Python ``script`` (a deploy), in the background; returns once
    the command runs (it creates ``ready``, which the script finds in ``sys.argv[1]``)."""
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-m", "execguard", "run", "--surface", "deploy.release", *DEPLOY,
         "--context", "tests_passed=true", "--idempotency-key", f"run-{uuid.uuid4()}", "--",
         sys.executable, "-c", script, str(ready)],
        **{"stderr": subprocess.PIPE, "text": True, **popen},
        env={**os.environ, "EXECGUARD_URL": gateway.url, "EXECGUARD_API_KEY": gateway.api_key})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.05)
    return process, ready


def outcome_of(gateway: Gateway, stderr: str) -> dict[str, Any]:
    execution_id = stderr.split("PERMIT ", 1)[1].split()[0]
    with gateway.client() as client:
        detail: dict[str, Any] = client.get(f"/verify/{execution_id}").json()
    assert detail["consumption"]["consumeResult"] == "CONSUMED"
    return detail["outcome"]  # type: ignore[no-any-return]


#: A deploy that says it started, then works for a minute; on SIGTERM or SIGINT it cleans up
#: and stops.
DEPLOYING = ("import os, pathlib, signal, sys, time\n"
             "def stop(signum, frame):\n"
             "    pathlib.Path(sys.argv[1]).write_text('stopped')\n"
             "    os._exit(1)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             "pathlib.Path(sys.argv[1]).write_text('running')\n"
             "time.sleep(60)\n")


def test_sigterm_is_passed_on_and_the_outcome_is_failure(gateway: Gateway,
                                                         tmp_path: Path) -> None:
    process, ready = start_run(gateway, tmp_path, DEPLOYING)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert ready.read_text() == "stopped"  # the command got the signal, and ended
    outcome = outcome_of(gateway, stderr)
    assert outcome["outcome"] == "FAILURE"
    assert outcome["resultDigest"] == digest_result({"exitCode": 128 + signal.SIGTERM})


def test_sigint_to_the_process_group_records_failure(gateway: Gateway, tmp_path: Path) -> None:
    process, ready = start_run(gateway, tmp_path, DEPLOYING, start_new_session=True)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: run and the command both get it
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert ready.read_text() == "stopped" and "Traceback" not in stderr
    assert outcome_of(gateway, stderr)["outcome"] == "FAILURE"


def test_a_command_killed_by_a_signal_exits_128_plus_n(gateway: Gateway,
                                                       tmp_path: Path) -> None:
    killed = ("import os, pathlib, signal, sys\n"
              "pathlib.Path(sys.argv[1]).write_text('running')\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    process, _ = start_run(gateway, tmp_path, killed)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGKILL, stderr
    outcome = outcome_of(gateway, stderr)
    assert outcome["outcome"] == "FAILURE"
    assert outcome["resultDigest"] == digest_result({"exitCode": 128 + signal.SIGKILL})


def test_a_ctrl_c_at_a_terminal_is_the_commands_to_handle(gateway: Gateway,
                                                          tmp_path: Path) -> None:
    """At a terminal, Ctrl-C signals the whole foreground job, the command included: run
    does not pass it on again (a second Ctrl-C tells tools like terraform to stop at once,
    whatever that breaks), and how the command ends decides, as in a shell."""
    cleans_up = ("import os, pathlib, signal, sys, time\n"
                 "def stop(signum, frame):\n"
                 "    pathlib.Path(sys.argv[1] + '.sigint').open('a').write('i')\n"
                 "    os._exit(3)\n"
                 "signal.signal(signal.SIGINT, stop)\n"
                 "pathlib.Path(sys.argv[1]).write_text('running')\n"
                 "time.sleep(60)\n")
    master, terminal = os.openpty()

    def take_the_terminal() -> None:  # run is the foreground job of its own terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        process, ready = start_run(gateway, tmp_path, cleans_up, stdin=terminal,
                                   stdout=terminal, stderr=terminal, start_new_session=True,
                                   preexec_fn=take_the_terminal)
        os.write(master, b"\x03")  # Ctrl-C
        process.wait(timeout=60)
        os.close(terminal)
        output = b""
        with contextlib.suppress(OSError):  # EIO once everything written was read
            while chunk := os.read(master, 4096):
                output += chunk
    finally:
        os.close(master)
    assert Path(f"{ready}.sigint").read_text() == "i"
    assert process.returncode == 3, output  # the command's own exit code
    outcome = outcome_of(gateway, output.decode())
    assert outcome["outcome"] == "FAILURE"
    assert outcome["resultDigest"] == digest_result({"exitCode": 3})

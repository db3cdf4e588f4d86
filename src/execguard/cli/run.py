"""``execguard run``: the gate for CI/CD and scripts. The command runs only with a permit."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Annotated, Any

import typer

from execguard.cli._common import app, err
from execguard.protocol.errors import ConfigError

#: The command did not run: the gateway's decision was not a usable PERMIT.
EXIT_NOT_PERMITTED = 3
#: The command did not run: the gateway could not be asked (unreachable, timeout, bad answer).
EXIT_GATEWAY_ERROR = 4
#: The command did not run: it was permitted but could not be started.
EXIT_NOT_FOUND = 127


def parse_context(pairs: list[str], as_json: str | None) -> dict[str, Any]:
    """``key=value`` pairs; a value that is valid JSON (12, true, "x", [..]) is read as JSON."""
    context: dict[str, Any] = {}
    if as_json is not None:
        try:
            loaded = json.loads(as_json)
        except ValueError as exc:
            raise ConfigError(f"--context-json is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("--context-json must be a JSON object")
        context.update(loaded)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--context {pair!r} is not key=value")
        try:
            context[key] = json.loads(raw)
        except ValueError:
            context[key] = raw
    return context


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(metavar="-- COMMAND [ARGS]...",
                                                 help="The command to run if permitted.")],
    surface: Annotated[str, typer.Option(help="The governed surface, e.g. deploy.release.")],
    context: Annotated[list[str] | None, typer.Option(
        "--context", help="key=value (repeatable); JSON values are read as JSON.")] = None,
    context_json: Annotated[str | None, typer.Option(help="The context as a JSON object.")] = None,
    subject_digest: Annotated[str | None, typer.Option(help="Digest of what is acted on, "
                                                       "e.g. the commit SHA.")] = None,
    actor: Annotated[str | None, typer.Option(help="Who asks (default: $USER).")] = None,
    action: Annotated[str | None, typer.Option(help="A finer action name.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Makes a retry of the same run get the same (single-use) permit; default: "
             "derived from the request.")] = None,
    url: Annotated[str | None, typer.Option(help="Gateway URL (default $EXECGUARD_URL).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (default $EXECGUARD_API_KEY).")]
    = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the gateway.")] = 5.0,
) -> None:
    """Run COMMAND only after a PERMIT that was verified and consumed; record the outcome.

    Exit code: the command's own; 3 if it was not permitted (the decision, reason and
    execution id are printed); 4 if the gateway could not decide; 127 if it could not start.
    """
    from execguard.gate import ExecutionBlocked, Gate, digest_result
    values = parse_context(context or [], context_json)
    gate = Gate(url, api_key, timeout=timeout)
    try:
        try:
            permit = gate.acquire(surface, values, actor=actor or os.environ.get("USER"),
                                  action=action, subject_digest=subject_digest,
                                  idempotency_key=idempotency_key)
        except ExecutionBlocked as blocked:
            err.print(f"[red]execguard: not run[/red] — {blocked.decision or 'NO DECISION'}"
                      f": {blocked.reason}")
            if blocked.reason_code:
                err.print(f"  reason code   {blocked.reason_code}")
            if blocked.execution_id:
                err.print(f"  execution id  {blocked.execution_id}")
            raise typer.Exit(EXIT_NOT_PERMITTED if blocked.decision else EXIT_GATEWAY_ERROR)\
                from None
        err.print(f"execguard: PERMIT {permit.execution_id} for {surface}; running "
                  f"{' '.join(command)}")
        started = time.monotonic()
        try:
            code = subprocess.run(command, check=False).returncode
        except OSError as exc:
            err.print(f"[red]execguard: cannot run {command[0]}: {exc.strerror}[/red]")
            code = EXIT_NOT_FOUND
        latency = int((time.monotonic() - started) * 1000)
        gate.report(permit, code == 0, latency, digest_result({"exitCode": code}))
    finally:
        gate.close()
    raise typer.Exit(code)

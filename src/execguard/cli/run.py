"""``execguard run``: the gate for CI/CD and scripts. The command runs only with a permit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Annotated, Any

import typer
from rich.text import Text

from execguard.cli._common import app, err
from execguard.protocol.errors import ConfigError

#: The command did not run: the gateway's decision was not a usable PERMIT.
EXIT_NOT_PERMITTED = 3
#: The command did not run: the gateway could not be asked (unreachable, timeout, bad answer).
EXIT_GATEWAY_ERROR = 4
#: The command did not run: it was permitted but could not be started.
EXIT_NOT_FOUND = 127
#: Signals ``run`` passes on to the command (and then exits 128 + n, as shells do).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


def _usage_checked(check: Any) -> Any:
    """A Typer callback applying ``check`` (from the gate): its ConfigError is a usage error."""
    def callback(value: Any) -> Any:
        try:
            return None if value is None else check(value)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
    return callback


def _check_url(url: str) -> str:
    from execguard.gate._core import check_gateway_url
    return check_gateway_url(url)


def _check_timeout(seconds: float) -> float:
    from execguard.gate._core import check_timeout
    return check_timeout(seconds)


def _sigint_reaches_command() -> bool:
    """Whether a Ctrl-C reaches the command without us: we (and so the command, in our
    process group) are the foreground job of a terminal, which signals the whole group."""
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:  # not a terminal
            continue
    return False


class _SignalsPassedOn:
    """While active, SIGTERM and SIGINT are noted and passed on to the command it runs.

    Without this, a SIGTERM would end ``run`` and leave the command running with no outcome
    recorded. Kept until the outcome is recorded, so a second signal cannot lose it.

    A Ctrl-C at a terminal is the exception: the command got it too, and passing it on would
    be a second Ctrl-C, which some tools (terraform) read as "stop now, whatever it breaks".
    As in a shell, how the command then ends decides.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._terminal_sigint = _sigint_reaches_command()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalsPassedOn:
        self._previous = {sig: signal.signal(sig, self._pass_on) for sig in FORWARDED_SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _pass_on(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and self._terminal_sigint and self._process is not None:
            return
        self.received = self.received or signum
        if self._process is not None:
            self._process.send_signal(signum)

    def run(self, command: list[str]) -> int:
        """Run ``command`` to its end; its exit code, 128 + n when signal n ended it (as
        shells report it). Raises OSError when it cannot be started."""
        if self.received is not None:  # stopped before it started: it does not start
            return 128 + self.received
        self._process = subprocess.Popen(command)
        code = self._process.wait()
        return 128 - code if code < 0 else code


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
    url: Annotated[str | None, typer.Option(help="Gateway URL (default $EXECGUARD_URL).",
                                            callback=_usage_checked(_check_url))] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (default $EXECGUARD_API_KEY).")]
    = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the gateway.",
                                           callback=_usage_checked(_check_timeout))] = 5.0,
) -> None:
    """Run COMMAND only after a PERMIT that was verified and consumed; record the outcome.

    Exit code: the command's own (128 + n if signal n ended it); 3 if it was not permitted
    (the decision, reason and execution id are printed); 4 if the gateway could not decide;
    127 if it could not start. SIGTERM and SIGINT are passed on to the command; run waits
    for it, records a FAILURE outcome and exits 128 + n (a Ctrl-C at a terminal reaches the
    command itself, and how it ends decides, as in a shell). The outcome is SUCCESS only
    when run exits 0.
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
            err.print(Text("execguard: not run", style="red"),
                      f"— {blocked.decision or 'NO DECISION'}: {blocked.reason}")
            if blocked.reason_code:
                err.print(f"  reason code   {blocked.reason_code}")
            if blocked.execution_id:
                err.print(f"  execution id  {blocked.execution_id}")
            raise typer.Exit(EXIT_NOT_PERMITTED if blocked.decision else EXIT_GATEWAY_ERROR)\
                from None
        err.print(f"execguard: PERMIT {permit.execution_id} for {surface}; running "
                  f"{' '.join(command)}")
        with _SignalsPassedOn() as signals:
            started = time.monotonic()
            try:
                code = signals.run(command)
            except OSError as exc:
                err.print(f"execguard: cannot run {command[0]}: {exc.strerror}", style="red")
                code = EXIT_NOT_FOUND
            if signals.received is not None:  # stopped from outside: it did not complete
                code = 128 + signals.received
                err.print(f"execguard: stopped by {signal.Signals(signals.received).name}; "
                          "recording FAILURE")
            latency = int((time.monotonic() - started) * 1000)
            gate.report(permit, code == 0, latency, digest_result({"exitCode": code}))
    finally:
        gate.close()
    raise typer.Exit(code)

"""The ``execguard`` command. It parses, calls the library, prints, and exits.

Errors are caught once, in :func:`main`: one clear line on stderr and exit
code 1 (2 for usage errors). Lines that scripts read (``EXECGUARD_API_KEY=``)
are exact and last. Each area's commands live in their own module.
"""

from __future__ import annotations

import logging
import sys

import typer

from execguard.cli import approvals, evidence, policy, proxy, run, setup, shadow
from execguard.cli._common import app
from execguard.protocol.errors import ExecGuardError

__all__ = ["app", "main"]

# Imported for their commands, which register themselves on ``app``.
_COMMAND_MODULES = (setup, policy, evidence, run, proxy, approvals, shadow)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; ExecGuard errors (and a path that fails) become one line on stderr
    and exit code 1."""
    # A command that cannot reach PostgreSQL says why in its one error line; the pool's
    # warning at each retry came before it. (``serve`` logs them again: see setup.py.)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        code = app(args=argv, prog_name="execguard", standalone_mode=False)
    except ExecGuardError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # a path that cannot be made, read or written: not a crash
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: shown with their own exit code
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)

"""Running the app under uvicorn until SIGTERM/SIGINT, then stopping cleanly."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

__all__ = ["serve_until_signalled"]


class _Server(uvicorn.Server):
    """uvicorn's server, but a clean shutdown on a signal exits 0.

    uvicorn re-raises the signal after its graceful shutdown, so the process
    ends "killed by SIGTERM" even when every in-flight request finished and
    the ledger was drained. ExecGuard reports the clean shutdown it did.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def serve_until_signalled(app: FastAPI, host: str, port: int) -> None:
    """Serve; on SIGTERM/SIGINT stop accepting, finish in-flight requests, run shutdown."""
    # log_config=None: uvicorn's own messages go through ExecGuard's (JSON) log set-up.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30, log_config=None)
    _Server(config).run()

"""Running the app under uvicorn until SIGTERM/SIGINT, then stopping cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["REQUEST_RECEIVE_SECONDS", "serve_until_signalled"]

#: How long a connection may take to send a request's headers (from connecting, or from
#: its last answer), and at most how long a body may go without delivering
#: ``MIN_BODY_BYTES`` more. Generous for any real client; a connection that sends
#: nothing, half a request or a body one byte at a time is closed after it.
REQUEST_RECEIVE_SECONDS = 10.0
MIN_BODY_BYTES = 1024


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


class _DeadlineH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1, but a request must keep arriving (``REQUEST_RECEIVE_SECONDS``).

    uvicorn closes a connection idle after an answer only until its first byte
    arrives, and never one that has sent nothing yet or that sends slowly: each
    held a socket for good, and a thousand of them exhausted the open-file limit,
    after which no client could connect at all.
    """

    _receive_timer: asyncio.TimerHandle | None = None
    _received = 0  # bytes since the last check

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_request()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_request()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._receive_timer is not None:
            self._receive_timer.cancel()
        super().connection_lost(exc)

    def _expect_request(self) -> None:
        if self._receive_timer is not None:
            self._receive_timer.cancel()
        self._received = 0
        self._receive_timer = self.loop.call_later(REQUEST_RECEIVE_SECONDS, self._check_progress)

    def _check_progress(self) -> None:
        """Close a connection whose request has not arrived in time (one that has arrived
        whole is being answered: it is left alone)."""
        self._receive_timer = None
        state = self.conn.their_state
        if self.transport.is_closing() or state not in (h11.IDLE, h11.SEND_BODY):
            return
        if state is h11.SEND_BODY and self._received >= MIN_BODY_BYTES:
            self._received = 0  # the body keeps coming: check again later
            self._receive_timer = self.loop.call_later(REQUEST_RECEIVE_SECONDS,
                                                       self._check_progress)
            return
        self.transport.close()  # an app reading the body sees the client disconnect


def serve_until_signalled(app: FastAPI, host: str, port: int) -> None:
    """Serve; on SIGTERM/SIGINT stop accepting, finish in-flight requests, run shutdown."""
    _use_every_open_file_allowed()
    # log_config=None: uvicorn's own messages go through ExecGuard's (JSON) log set-up.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30, log_config=None,
                            http=_DeadlineH11Protocol)
    _Server(config).run()


def _use_every_open_file_allowed() -> None:
    """Raise the soft limit on open files to the hard one: every connection holds a file,
    and at a shell's default of 1,024 a burst of clients makes accept() fail, /healthz
    included. (What an operator set as the hard limit still holds.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # a platform that will not: keep it
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

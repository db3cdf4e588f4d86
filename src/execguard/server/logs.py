"""Structured logs: one JSON object per line, an access line per request, a line per decision.

Every line has ``ts`` (RFC 3339, UTC), ``level``, ``logger`` and ``msg``, plus,
when known, ``request_id``, ``tenant``, ``execution_id``, ``surface``,
``decision``, ``reason_code``, ``mode``, ``method``, ``path``, ``status`` and
``latency_ms``. The request id comes from a context variable that the
request-id middleware sets, so any line logged while serving a request carries
it; the tenant is noted once the request is authenticated.

``configure_logging`` (used by ``execguard serve``) hands records to a queue
that a thread of their own writes out, so a request never waits for a write.

Nothing secret is logged: no headers (so no Authorization header or API key),
no query strings, no request bodies and no context values. A decision line
names the decision, not what was decided on.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from typing import IO, TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from execguard.protocol.errors import ServiceUnavailable
from execguard.protocol.outcome import format_timestamp

if TYPE_CHECKING:
    from execguard.server.metrics import Metrics

__all__ = ["LOG_FORMATS", "JsonFormatter", "RequestLogMiddleware", "TextFormatter",
           "begin_request", "configure_logging", "decision_fields", "log_access",
           "log_background_failure", "log_decision", "note_tenant", "request_id_var"]

LOG_FORMATS = ("json", "text")

#: The id of the request being served (set by ``RequestIdMiddleware``).
request_id_var: ContextVar[str | None] = ContextVar("execguard_request_id", default=None)
#: Fields learned while serving the request (the tenant, once authenticated). A dict,
#: so that what a handler run in a worker thread notes is seen by the middleware.
_request_fields: ContextVar[dict[str, str] | None] = ContextVar("execguard_request_fields",
                                                                default=None)

#: Fields a record may carry (``logger.info(..., extra={...})``), in output order.
FIELDS = ("request_id", "tenant", "execution_id", "surface", "decision", "reason_code", "mode",
          "would_decision", "method", "path", "status", "latency_ms")

access_log = logging.getLogger("execguard.access")
decision_log = logging.getLogger("execguard.decisions")

#: Probes and scrapes are logged at DEBUG, so they do not drown the access log.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_MAX_PATH = 256
#: Response bodies read back for a decision or an error code: at most this much.
_MAX_SNIFF = 256 * 1024


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's fields: its own, else the current request's (request id, tenant)."""
    # A record's attributes, its extras included: a lookup, not a getattr.
    return _fields_from(record.__dict__)


def _fields_from(own: dict[str, Any]) -> dict[str, Any]:
    known = _request_fields.get() or {}
    fields: dict[str, Any] = {}
    for name in FIELDS:
        value = own.get(name)
        if value is None and name == "request_id":
            value = request_id_var.get()
        if value is None:
            value = known.get(name)
        if value is not None:
            fields[name] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = _json_line(record.created, record.levelname, record.name, record.getMessage(),
                          _fields_of(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def _json_line(created: float, level: str, logger: str, message: str,
               fields: dict[str, Any]) -> dict[str, Any]:
    return {"ts": format_timestamp(datetime.fromtimestamp(created, UTC)),
            "level": level, "logger": logger, "msg": message, **fields}


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...`` for reading in a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in _fields_of(record).items())
        if not extra:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback below the fields
        return f"{head} {extra}{sep}{tail}"


class _Enqueue(QueueHandler):
    """Queues a copy of each record with its request's fields (the writing thread has none)."""

    _exceptions = logging.Formatter()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # What copy.copy makes of a LogRecord (a new one with the same attributes), at a
        # tenth of its cost: two of these per decision run on the event loop.
        queued = logging.LogRecord.__new__(logging.LogRecord)
        queued.__dict__ = {**record.__dict__, **_fields_of(record)}
        queued.msg, queued.args = record.getMessage(), None
        if record.exc_info:
            queued.exc_text = self._exceptions.formatException(record.exc_info)
            queued.exc_info = None  # tracebacks hold frames: never queued
        return queued


#: How long a log line may wait for the ones queued after it, to be written together.
LOG_WINDOW_SECONDS = 0.005


class _BatchingListener(QueueListener):
    """Writes what has been queued in a short window, then flushes once.

    ``QueueListener`` wakes and flushes the stream for every record: under load
    that is a wake-up of this thread (which then takes the interpreter lock from
    the event loop) and a write system call per log line, two per decision.
    Woken by a record, this thread first waits ``window`` seconds, then writes
    everything queued by then: at most one wake-up and one write per window
    under load, and no line is held much longer than the window.
    """

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord | None],
                 handler: logging.StreamHandler[IO[str]],
                 window: float = LOG_WINDOW_SECONDS) -> None:
        super().__init__(records, handler)
        self.stream_handler = handler
        self.window = window

    def _monitor(self) -> None:
        records = self.queue
        handler = self.stream_handler
        stream, formatter = handler.stream, handler.formatter or logging.Formatter()
        while True:
            record = records.get()
            if record is not None and record is not self._sentinel:
                time.sleep(self.window)  # let the burst this record starts queue up
            batch = [record]
            while True:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            lines = []
            for item in batch:
                if item is None or item is self._sentinel:
                    continue
                if type(item) is tuple:  # a line from _log_line: its fields, not a record
                    lines.append(orjson.dumps(_json_line(*item), default=str).decode() + "\n")
                    continue
                if item.levelno < handler.level:
                    continue
                try:
                    lines.append(formatter.format(item) + "\n")
                except Exception:  # one bad record must not stop the log
                    handler.handleError(item)
            if lines:
                with handler.lock:  # type: ignore[union-attr]
                    try:
                        for chunk in _whole_lines(lines, _ATOMIC_WRITE):
                            stream.write(chunk)
                            stream.flush()
                    except Exception:  # a closed or broken stream: as StreamHandler does
                        handler.handleError(batch[-1])
            if any(item is None or item is self._sentinel for item in batch):
                return


#: The server and its decision process write to one stderr; on a pipe, a write of at
#: most this many bytes (POSIX PIPE_BUF) is never interleaved with another's.
_ATOMIC_WRITE = 4096


def _whole_lines(lines: list[str], limit: int) -> Iterator[str]:
    """The lines joined into writes of at most ``limit`` bytes where each fits (a longer
    line goes alone), never splitting a line."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = len(line) if line.isascii() else len(line.encode("utf-8"))
        if chunk and size + length > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "".join(chunk)


_listener: QueueListener | None = None


def _stop_listener() -> None:
    """Write what is still queued and stop the logging thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def configure_logging(log_format: str = "json", level: int = logging.INFO,
                      stream: IO[str] | None = None) -> None:
    """Send every log record to ``stream`` (stderr) in ``log_format`` (json or text).

    Records are written by a background thread, which writes what is queued
    before the process exits.
    """
    global _listener
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {log_format!r}")
    # No line shows the caller's file, thread or process: don't collect them per record.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    if _listener is None:
        atexit.register(_stop_listener)
    _stop_listener()
    _listener = _BatchingListener(records, handler)
    _listener.start()
    enqueue = _Enqueue(records)  # type: ignore[arg-type]
    root.addHandler(enqueue)
    root.setLevel(level)
    # httpx logs each request's whole URL at INFO, and a webhook's or an upstream's URL
    # can hold a credential.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    _direct[:] = [enqueue] if log_format == "json" else []


def note_tenant(tenant: str) -> None:
    """Name ``tenant`` in the current request's later log lines (once authenticated)."""
    known = _request_fields.get()
    if known is not None:
        known["tenant"] = tenant


def begin_request(request_id: str) -> None:
    """Start a request's log context (its id; the tenant once known). For the fast path."""
    request_id_var.set(request_id)
    _request_fields.set({})


#: The handler configure_logging installed, while it writes JSON (else empty).
_direct: list[_Enqueue] = []


def _only_ours(logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` would reach nothing but our JSON handler."""
    if len(_direct) != 1 or logging.root.handlers != _direct or _direct[0].filters:
        return False
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or (node.handlers and node is not logging.root) or node.disabled:
            return False
        if not node.propagate:
            return node is logging.root
        node = node.parent
    return True


def _log_line(logger: logging.Logger, level: int, message: str, fields: dict[str, Any],
              args: tuple[Any, ...]) -> None:
    """``logger.log(level, message, *args, extra=fields)``, written as the same JSON line.

    Two of these per decision run on the event loop: when nothing but our own JSON
    handler would see the record, its fields are queued for the logging thread as they
    are, without building, copying and dispatching a LogRecord (a fifth of the server's
    instructions per decision went there).
    """
    if not logger.isEnabledFor(level):
        return
    if not _only_ours(logger) or level < _direct[0].level:
        logger.log(level, message, *args, extra=fields)
        return
    _direct[0].queue.put_nowait((time.time(), logging.getLevelName(level), logger.name,
                                 message % args, _fields_from(fields)))


def log_access(method: str, path: str, status: int, seconds: float) -> None:
    """The access line of one request."""
    shown = path if len(path) <= _MAX_PATH else path[:_MAX_PATH] + "..."
    latency_ms = round(seconds * 1000, 3)
    _log_line(access_log, logging.DEBUG if path in _QUIET_PATHS else logging.INFO,
              "%s %s %s %.1fms", {"method": method, "path": shown, "status": status,
                                  "latency_ms": latency_ms},
              (method, shown, status, latency_ms))


class RequestLogMiddleware:
    """Times each request; logs its access line (and its decision); feeds the metrics.

    Runs inside ``RequestIdMiddleware``. Only two kinds of answer are read back:
    a 200 from ``POST /execute`` (for the decision line) and a 5xx (for the error
    code that ``execguard_fail_closed_total`` counts). Nothing from the request is.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Not reset afterwards: the server runs each request in a task of its own, and
        # the 500 handler (outside every middleware) logs with the request's fields.
        _request_fields.set({})
        method, path = scope.get("method", ""), scope.get("path", "")
        is_execute = method == "POST" and path == "/execute"
        status = 0
        body: list[bytes] | None = None
        size = 0
        started = time.perf_counter()

        async def observing_send(message: Message) -> None:
            nonlocal status, body, size
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status >= 500 or (is_execute and status == 200):
                    body = []
            elif message["type"] == "http.response.body" and body is not None:
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= _MAX_SNIFF:
                    body.append(chunk)
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        except Exception:
            status = 500  # answered by the catch-all handler, outside this middleware
            raise
        finally:
            seconds = time.perf_counter() - started
            answer = _json_object(body) if body is not None and size <= _MAX_SNIFF else {}
            if is_execute and status == 200 and answer:
                log_decision(decision_fields(answer))
            error = answer.get("error")
            if self.metrics is not None:
                self.metrics.observe_request(method, path, status, seconds,
                                             error if isinstance(error, str) else None)
            log_access(method, path, status, seconds)


def _json_object(chunks: list[bytes]) -> dict[str, Any]:
    try:
        value = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def decision_fields(answer: dict[str, Any]) -> dict[str, str]:
    """What the decision line says of an answer: which decision, on what, why; never the
    request's context. Plain strings (they cross from the decision process as JSON)."""
    fields = {"execution_id": answer.get("execution_id"), "surface": answer.get("surface"),
              "decision": answer.get("decision"), "reason_code": answer.get("reasonCode"),
              "mode": answer.get("executionMode"),
              "would_decision": answer.get("would_decision")}
    return {k: v for k, v in fields.items() if isinstance(v, str)}


def log_decision(fields: dict[str, str]) -> None:
    """The decision line (``fields`` from :func:`decision_fields`)."""
    _log_line(decision_log, logging.INFO, "%s %s %s execution %s", fields,
              (fields.get("decision"), fields.get("surface"), fields.get("reason_code"),
               fields.get("execution_id")))


def log_background_failure(logger: logging.Logger, what: str, exc: Exception) -> None:
    """A background task's failure: storage faults are expected and already explained
    (one line), anything else needs its traceback."""
    if isinstance(exc, ServiceUnavailable):
        logger.warning("%s: %s", what, exc)
    else:
        logger.error("%s", what, exc_info=exc)

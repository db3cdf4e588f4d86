"""ExecGuard errors → HTTP. Status codes live here and nowhere else.

Every error body is ``{"error", "message", "request_id"}`` (plus ``field``,
``expected`` and ``got`` for a malformed request). A DENY is a decision,
answered 200 with a receipt: it never passes through here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from execguard.protocol.errors import (
    AuthError,
    Conflict,
    ExecGuardError,
    Forbidden,
    IdempotencyKeyReuse,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    PermitRefused,
    RequestError,
    ServiceUnavailable,
    UnknownSurface,
)

if TYPE_CHECKING:  # the decision process uses the pure part and need not load FastAPI
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

__all__ = ["STATUS_BY_ERROR", "error_parts", "execguard_error_parts", "install_error_handlers",
           "status_for"]

log = logging.getLogger("execguard.server")

#: Looked up along the exception's MRO, so a subclass inherits its branch's status.
STATUS_BY_ERROR: dict[type[ExecGuardError], int] = {
    MalformedRequest: 422,
    PayloadTooLarge: 413,
    UnknownSurface: 400,
    IdempotencyKeyReuse: 409,
    Conflict: 409,
    NotFound: 404,
    RequestError: 400,
    Forbidden: 403,
    AuthError: 401,
    ServiceUnavailable: 503,
}


def status_for(exc: ExecGuardError) -> int:
    """The HTTP status for an ExecGuard error (500 for anything unmapped)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def request_id_of(request: Request) -> str | None:
    """The id the request-id middleware gave this request."""
    return getattr(request.state, "request_id", None)


#: Longest ``message``, and longest text in another member, a 4xx body carries. Its texts
#: quote what the caller sent (an id from the path, a key of the body, a query parameter):
#: unbounded, a 60 KB id came back in a 404, a query parameter twice over. (A 5xx says
#: the server's own trouble, whose cause must not be cut out.)
MAX_ERROR_MESSAGE = 600
MAX_ERROR_TEXT = 300


def bounded(text: str, limit: int) -> str:
    """``text``, or its beginning and end around `` ... `` when it is longer than ``limit``
    (the end too: it names the field, or says "for this tenant")."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def error_parts(request_id: str | None, status: int, code: str, message: str,
                **extra: object) -> tuple[dict[str, object], dict[str, str]]:
    """The one shape of every error: its body and its headers (also used by the fast path)."""
    if status < 500:
        message = bounded(message, MAX_ERROR_MESSAGE)
        extra = {name: bounded(value, MAX_ERROR_TEXT) if isinstance(value, str) else value
                 for name, value in extra.items()}
    body = {"error": code, "message": message, "request_id": request_id, **extra}
    headers = {"X-Request-Id": request_id} if request_id else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = "1"
    return body, headers


def execguard_error_parts(request_id: str | None, exc: ExecGuardError, *, logged: bool = True
                          ) -> tuple[int, dict[str, object], dict[str, str]]:
    """Status, body and headers answering an ExecGuard error (a 5xx is logged as failing
    closed, unless ``logged`` is False: the decision process leaves that to the server,
    whose log line carries the request id)."""
    status = status_for(exc)
    extra: dict[str, object] = {}
    if isinstance(exc, MalformedRequest):
        extra = {"field": exc.field, "expected": exc.expected, "got": exc.got}
    if isinstance(exc, PermitRefused):
        extra = {"executionId": exc.execution_id, "refusalReason": exc.reason,
                 "receipt": exc.receipt}
    if status >= 500 and logged:
        log.warning("failing closed: %s", exc)
    message = exc.diagnostics() if status < 500 else str(exc)
    body, headers = error_parts(request_id, status, exc.code, message, **extra)
    return status, body, headers


def error_response(request: Request, status: int, code: str, message: str,
                   **extra: object) -> JSONResponse:
    """An error answer in the one shape."""
    from fastapi.responses import JSONResponse

    body, headers = error_parts(request_id_of(request), status, code, message, **extra)
    return JSONResponse(body, status_code=status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Register one handler per branch of the tree, plus the framework's and a catch-all."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def on_execguard_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ExecGuardError)
        status, body, headers = execguard_error_parts(request_id_of(request), exc)
        return JSONResponse(body, status_code=status, headers=headers or None)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
        message = f"{field}: {first.get('msg', 'invalid value')}"
        return error_response(request, 422, "malformed_request", message, field=field)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error; answering 500 (no decision was issued)")
        return error_response(request, 500, "internal_error",
                              "an unexpected error occurred; no decision was issued")

    app.add_exception_handler(ExecGuardError, on_execguard_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)

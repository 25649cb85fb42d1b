"""One error type and one set of handlers, so every failure wears the envelope (API.md §1).

Services raise `AppError` subclasses; the handlers here turn them — and FastAPI's validation
errors, Starlette's routing 404/405, malformed JSON and any unexpected exception — into
`{data: null, error: {code, message, details}, meta}`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from joyhub.core.envelope import error_response

log = logging.getLogger("joyhub.errors")


class AppError(Exception):
    status: int = 500
    code: str = "INTERNAL_ERROR"
    message: str = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Sequence[dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        self.message = message or self.message
        self.details = list(details)
        self.headers = headers or {}
        if code:
            self.code = code
        if status:
            self.status = status
        super().__init__(self.message)


class MalformedJson(AppError):
    status, code, message = 400, "MALFORMED_JSON", "Request body is not valid JSON"


class NotAuthenticated(AppError):
    status, code, message = 401, "NOT_AUTHENTICATED", "Authentication required"

    def __init__(self, message: str | None = None, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class InvalidToken(NotAuthenticated):
    code, message = "INVALID_TOKEN", "Invalid or expired credentials"


class InvalidCredentials(NotAuthenticated):
    code, message = "INVALID_CREDENTIALS", "Incorrect email or password"


class InvalidRefreshToken(NotAuthenticated):
    code, message = "INVALID_REFRESH_TOKEN", "Invalid or expired refresh token"


class InvalidResetToken(AppError):
    status, code, message = 400, "INVALID_RESET_TOKEN", "Invalid or expired password-reset token"


class SubscriptionRequired(AppError):
    status, code, message = 402, "SUBSCRIPTION_REQUIRED", "An active subscription is required"


class PlanUpgradeRequired(AppError):
    status, code, message = 402, "PLAN_UPGRADE_REQUIRED", "This tool requires a higher plan"


class Forbidden(AppError):
    status, code, message = 403, "FORBIDDEN", "You are not allowed to do this"


class AccountDisabled(AppError):
    status, code, message = 403, "ACCOUNT_DISABLED", "This account has been disabled"


class NotFound(AppError):
    status, code, message = 404, "NOT_FOUND", "Not found"


class MethodNotAllowed(AppError):
    status, code, message = 405, "METHOD_NOT_ALLOWED", "Method not allowed"


class EmailTaken(AppError):
    status, code, message = 409, "EMAIL_TAKEN", "This email is already registered"


class Conflict(AppError):
    status, code, message = 409, "CONFLICT", "Conflict"


class IdempotencyConflict(AppError):
    status, code, message = 409, "IDEMPOTENCY_CONFLICT", "Idempotency key conflict"


class PayloadTooLarge(AppError):
    status, code, message = 413, "PAYLOAD_TOO_LARGE", "Request body is too large"


class ValidationFailed(AppError):
    status, code, message = 422, "VALIDATION_ERROR", "Validation failed"


class ToolInputInvalid(AppError):
    status, code, message = 422, "TOOL_INPUT_INVALID", "Tool input is invalid"


class QuotaExceeded(AppError):
    status, code, message = 429, "QUOTA_EXCEEDED", "Token quota for this period is used up"


class RateLimited(AppError):
    status, code, message = 429, "RATE_LIMITED", "Too many attempts; try again later"


class ToolBadResponse(AppError):
    status, code, message = 502, "TOOL_BAD_RESPONSE", "The tool returned an invalid response"


class ToolUnavailable(AppError):
    status, code, message = 503, "TOOL_UNAVAILABLE", "The tool is unavailable"


class ServiceUnavailable(AppError):
    status, code, message = 503, "SERVICE_UNAVAILABLE", "A required service is unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    message = "The database is unavailable"

    def __init__(self, message: str | None = None, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": "2"})
        super().__init__(message, **kw)


class ToolTimeout(AppError):
    status, code, message = 504, "TOOL_TIMEOUT", "The tool did not answer in time"


def field_error(field: str, message: str) -> dict[str, Any]:
    return {"field": field, "message": message}


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "Unknown field"
        item: dict[str, Any] = {"field": ".".join(loc), "message": msg, "type": err.get("type")}
        details.append(item)
    return details


_STATUS_CODES = {
    400: "BAD_REQUEST",
    401: "NOT_AUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMITED",
    503: "SERVICE_UNAVAILABLE",
}


# SQLSTATEs that mean "the database is not there for us right now", not "this request is wrong":
# class 08 (connection exception), too_many_connections, and the server shutting down, crashed
# or still starting up (what a restart looks like from the client side).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08",)
_UNAVAILABLE_SQLSTATES = {"53300", "57P01", "57P02", "57P03"}
_UNAVAILABLE_NAMES = {
    "ConnectionDoesNotExistError",
    "CannotConnectNowError",
    "ConnectionRefusedError",
    "ConnectionFailureError",
    "TooManyConnectionsError",
    "AdminShutdownError",
    "CrashShutdownError",
    "InterfaceError",
    # asyncpg's protocol left mid-operation by a connection the server cut (seen on the raw
    # driver during a PostgreSQL restart: "cannot switch to state 15; another operation (2) is
    # in progress")
    "InternalClientError",
}


def sqlstates(exc: BaseException) -> set[str]:
    """Every SQLSTATE along the exception's chain (SQLAlchemy wrapper, adapter, asyncpg)."""
    return {s for link in _causes(exc) if isinstance(s := getattr(link, "sqlstate", None), str)}


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception, SQLAlchemy's wrapped DBAPI error and the driver's own, in that order.

    SQLAlchemy wraps asyncpg's error in an adapter class (named plain `Error`) inside its own;
    the gateway's raw-driver statements raise asyncpg's exceptions directly. Looking down the
    chain finds the driver's real class and SQLSTATE either way.
    """
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 6:
        seen.append(current)
        current = getattr(current, "orig", None) or current.__cause__
    return seen


def is_db_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached or has cut us off (503, worth a retry later), through
    SQLAlchemy's wrappers or straight from asyncpg."""
    if isinstance(exc, PoolTimeoutError | InterfaceError):
        return True
    if isinstance(exc, OperationalError | DBAPIError) and exc.connection_invalidated:
        return True
    for link in _causes(exc):
        if isinstance(link, ConnectionError | OSError):  # e.g. refused while connecting, reset
            return True
        state = getattr(link, "sqlstate", None)
        if isinstance(state, str) and (
            state in _UNAVAILABLE_SQLSTATES or state.startswith(_UNAVAILABLE_SQLSTATE_CLASSES)
        ):
            return True
        if type(link).__name__ in _UNAVAILABLE_NAMES:
            return True
    return False


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    from starlette.routing import Match

    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def render_error(exc: AppError) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


class ErrorRenderer(Protocol):
    """Renders an error in a surface's own shape: status, code, message, details, headers."""

    def __call__(
        self, status: int, code: str, message: str, details: list[dict[str, Any]], headers: dict[str, str]
    ) -> Response: ...


def _envelope(
    status: int, code: str, message: str, details: list[dict[str, Any]], headers: dict[str, str]
) -> Response:
    return error_response(status, code, message, details, headers)


Dialects = Sequence[tuple[str, ErrorRenderer]]


def renderer_at(path: str, dialects: Dialects) -> ErrorRenderer:
    """The error shape of the surface `path` belongs to: a dialect's prefix, else the envelope."""
    return next((r for prefix, r in dialects if path.startswith(prefix)), _envelope)


def render_at(path: str, dialects: Dialects, error: AppError) -> Response:
    return renderer_at(path, dialects)(error.status, error.code, error.message, error.details, error.headers)


def install_error_handlers(app: FastAPI, dialects: Dialects = ()) -> None:
    """The handlers. Every error wears the envelope, but under a path prefix of `dialects`, whose
    surface speaks another protocol's error shape (the OpenAI surface, API.md §12): one set of
    handlers decides status and code for both, only the body differs. The request pipeline's own
    answers (413, and failures outside the routes) use them too (`app.state.error_dialects`)."""
    app.state.error_dialects = tuple(dialects)

    def respond(
        request: Request,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        render = renderer_at(request.scope.get("path", ""), dialects)
        return render(status, code, message, list(details or ()), dict(headers or {}))

    def rendered(request: Request, exc: AppError) -> Response:
        return respond(request, exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> Response:
        return rendered(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return rendered(request, MalformedJson())
        confirm = getattr(request.state, "confirm_credential", None)
        if confirm is not None:  # a credential not yet checked in the database: 401 comes first
            try:
                await confirm()
            except AppError as refused:
                return await _app_error(request, refused)
        return respond(request, 422, "VALIDATION_ERROR", "Validation failed", _validation_details(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(exc.status_code, "HTTP_ERROR")
        headers = dict(exc.headers or {})
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body it cannot decode (e.g. invalid UTF-8): not JSON
            return rendered(request, MalformedJson())
        if exc.status_code == 405:
            allowed = MethodNotAllowed(headers={**headers, "Allow": _allowed_methods(request)})
            return rendered(request, allowed)
        message = "Not found" if exc.status_code == 404 else str(exc.detail)
        return respond(request, exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        if is_db_unavailable(exc):
            log.error("database unavailable: %s", type(exc).__name__, exc_info=exc)
            return rendered(request, DatabaseUnavailable())
        log.error("unhandled exception", exc_info=exc)
        return rendered(request, AppError())

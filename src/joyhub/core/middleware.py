"""The outer request pipeline as one pure-ASGI middleware (cheaper than BaseHTTPMiddleware).

It assigns the request id (API.md §1), refuses bodies over 1 MiB without reading them whole,
turns any exception that escaped the handlers into a logged 500 envelope, writes one JSON
access line per request, and sets the security headers of every response:
`X-Content-Type-Options: nosniff` (no content sniffing of JSON or CSV into something a browser
runs), `Referrer-Policy: no-referrer`, `X-Frame-Options: DENY`, `Cache-Control: no-store` on the
API's answers (they carry tokens, keys and account data: no cache, shared or private, may keep
them) unless a route chose otherwise, and in production `Strict-Transport-Security`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from joyhub.core import metrics
from joyhub.core.context import request_id_var, user_id_var
from joyhub.core.errors import AppError, DatabaseUnavailable, PayloadTooLarge, is_db_unavailable, render_at

MAX_BODY_BYTES = 1024 * 1024
API_PREFIX = "/api/"
HSTS = b"max-age=63072000; includeSubDomains"
_ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
access_log = logging.getLogger("joyhub.access")
log = logging.getLogger("joyhub.errors")


class _BodyTooLarge(Exception):
    pass


def clean_request_id(raw: str | None) -> str:
    """The client's X-Request-ID when it is well-formed, else a fresh UUID."""
    if raw and _REQUEST_ID.match(raw):
        return raw
    return str(uuid.uuid4())


Templates = list[tuple[re.Pattern[str], str]]
_TEMPLATES_BY_ROUTE_TABLE: dict[tuple[tuple[int, str], ...], Templates] = {}


def _templates_of(app: Any) -> Templates:
    """The app's path templates, most specific first as the schema lists them.

    Generating the schema costs about half a second, and every app built from the same
    routers (the workers of one process, the many apps of a test run) has the same templates:
    they are computed once per route table, which is named by the identities of the app's
    top-level routes and included routers (module-level objects shared by those apps).
    """
    if app is None:
        return []
    routes = list(getattr(app, "routes", []))
    key = tuple(_route_key(r) for r in routes)
    cached = _TEMPLATES_BY_ROUTE_TABLE.get(key)
    if cached is None:
        paths = list(app.openapi().get("paths", {}))
        paths += [getattr(r, "path", "") for r in routes]
        cached = [(compile_path(p)[0], p) for p in dict.fromkeys(paths) if p.startswith("/")]
        _TEMPLATES_BY_ROUTE_TABLE[key] = cached
    return cached


def _route_key(route: Any) -> tuple[int, str]:
    """A router included by the app is named by the router (a module-level object) and its
    prefix; a route the app made itself (the docs) by its path."""
    router = getattr(route, "original_router", None)
    if router is not None:
        return id(router), str(getattr(getattr(route, "include_context", None), "prefix", ""))
    return 0, str(getattr(route, "path", ""))


class RequestPipelineMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES, hsts: bool = False) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.hsts = hsts
        self._templates: Templates | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        raw_rid = headers.get(b"x-request-id")
        rid = clean_request_id(raw_rid.decode("latin-1") if raw_rid else None)
        rid_token = request_id_var.set(rid)
        uid_token = user_id_var.set(None)
        scope.setdefault("state", {})["request_id"] = rid
        status_holder: dict[str, Any] = {"status": 500, "started": False, "too_large": False}

        async def emit(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message["headers"] = self._secured(
                    [*message.get("headers", []), (b"x-request-id", rid.encode())], scope.get("path", "")
                )
            await send(message)

        async def send_wrapper(message: Message) -> None:
            if status_holder["too_large"]:
                # the app answered a body it could not finish reading (FastAPI says 400): say 413
                if not status_holder["started"]:
                    await self._reply(emit, PayloadTooLarge(), scope)
                return
            await emit(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await self._reply(emit, PayloadTooLarge(), scope)
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        status_holder["too_large"] = True
                        raise _BodyTooLarge
                return message

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except _BodyTooLarge:
                if not status_holder["started"]:
                    await self._reply(emit, PayloadTooLarge(), scope)
            except Exception as exc:
                if status_holder["started"]:
                    log.error("exception after the response started", exc_info=exc)
                elif is_db_unavailable(exc):
                    log.error("database unavailable: %s", type(exc).__name__, exc_info=exc)
                    await self._reply(emit, DatabaseUnavailable(), scope)
                else:
                    log.error("unhandled exception", exc_info=exc)
                    await self._reply(emit, AppError(), scope)
        finally:
            elapsed = time.perf_counter() - started
            duration_ms = round(elapsed * 1000, 2)
            template = self._route_template(scope)
            method = scope.get("method", "-")
            metrics.HTTP_REQUESTS.labels(method, template, str(status_holder["status"])).inc()
            metrics.HTTP_LATENCY.labels(method, template).observe(elapsed)
            access_log.info(
                "%s %s %s",
                scope.get("method"),
                scope.get("path"),
                status_holder["status"],
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status_holder["status"],
                    "duration_ms": duration_ms,
                    "user_id": user_id_var.get(),
                    "client": (scope.get("client") or ("-",))[0],
                },
            )
            request_id_var.reset(rid_token)
            user_id_var.reset(uid_token)

    def _secured(self, headers: list[tuple[bytes, bytes]], path: str) -> list[tuple[bytes, bytes]]:
        """The response headers with the security headers added (a route's own value stays)."""
        present = {name.lower() for name, _ in headers}
        extra = [(name, value) for name, value in _ALWAYS if name not in present]
        if path.startswith(API_PREFIX) and b"cache-control" not in present:
            extra.append((b"cache-control", b"no-store"))
        if self.hsts and b"strict-transport-security" not in present:
            extra.append((b"strict-transport-security", HSTS))
        return [*headers, *extra]

    def _route_template(self, scope: Scope) -> str:
        """The path template that served the request ("/api/v1/tools/{tool_id}"), for metrics.

        Built once from the app's own schema and routes: FastAPI's included routers keep paths
        relative to their prefix, so `scope["route"]` alone cannot name the full template.
        """
        if self._templates is None:
            self._templates = _templates_of(scope.get("app"))
        path = scope.get("path", "")
        for regex, template in self._templates:
            if regex.match(path):
                return template
        return "unmatched"

    @staticmethod
    async def _reply(send: Send, error: AppError, scope: Scope) -> None:
        """The error, in the shape of the surface the path belongs to (`errors.render_at`)."""
        app = scope.get("app")
        dialects = getattr(getattr(app, "state", None), "error_dialects", ())
        response = render_at(scope.get("path", ""), dialects, error)
        await send({"type": "http.response.start", "status": error.status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

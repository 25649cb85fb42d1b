"""OpenAI's error body on this surface only (API.md §12): `{"error": {message, type, param,
code}}`, with the statuses of API.md §1, so the OpenAI SDKs raise what they would raise against
OpenAI — `AuthenticationError` (401), `PermissionDeniedError` (403), `NotFoundError` (404),
`UnprocessableEntityError` (422), `RateLimitError` (429), `InternalServerError` (5xx), … The
handlers of `core/errors.py` decide status and code as for every route; this only writes them.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response

# the hub's code → OpenAI's (type, code); any other code: its status's type, the code lower-cased
_KNOWN: dict[str, tuple[str, str]] = {
    "NOT_AUTHENTICATED": ("invalid_request_error", "invalid_api_key"),
    "INVALID_TOKEN": ("invalid_request_error", "invalid_api_key"),
    "NOT_FOUND": ("invalid_request_error", "model_not_found"),
    "QUOTA_EXCEEDED": ("insufficient_quota", "insufficient_quota"),
    "RATE_LIMITED": ("requests", "rate_limit_exceeded"),
}


def error_document(status: int, code: str, message: str, details: list[dict[str, Any]]) -> dict[str, Any]:
    """The body; for a validation error `param` names the first offending request field
    (`body.messages` → `messages`); the first detail's words (the upstream's own, for a request
    it rejected) end the message."""
    generic = ("server_error" if status >= 500 else "invalid_request_error", code.lower())
    kind, openai_code = _KNOWN.get(code, generic)
    param = None
    first = details[0] if details else {}
    if code == "VALIDATION_ERROR" and isinstance(field := first.get("field"), str):
        param = field.removeprefix("body.").removeprefix("query.") or None
    detail = first.get("message")
    if isinstance(detail, str) and detail and detail != message and status < 500:
        message = f"{message}: {param + ' ' if param else ''}{detail}"
    return {"error": {"message": message, "type": kind, "param": param, "code": openai_code}}


def error_body(status: int, code: str, message: str, details: list[dict[str, Any]]) -> bytes:
    return json.dumps(error_document(status, code, message, details), separators=(",", ":")).encode()


def openai_error_response(
    status: int, code: str, message: str, details: list[dict[str, Any]], headers: dict[str, str]
) -> Response:
    """`core.errors.ErrorRenderer` for the surface. A used-up quota says `x-should-retry: false`
    (the OpenAI SDKs otherwise retry a 429): waiting will not bring tokens back this period."""
    if code == "QUOTA_EXCEEDED":
        headers = {**headers, "x-should-retry": "false"}
    body = error_body(status, code, message, details)
    return Response(body, status, headers, media_type="application/json")

"""The response envelope `{data, error, meta}` every JSON answer wears (API.md §1).

Routes return `ok(...)`/`page(...)` and FastAPI serialises the model. Answers made outside a
route's return value — every error, and the gateway's invocation answers, whose exact bytes are
also stored for an idempotent replay — are encoded by `encode_envelope`, the one renderer of
those bytes.
"""

from __future__ import annotations

import json
from typing import Any, Generic, TypeVar

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from joyhub.core.context import current_request_id

T = TypeVar("T")


class Pagination(BaseModel):
    offset: int
    limit: int
    total: int


class Meta(BaseModel):
    request_id: str
    # present only on list endpoints (API.md §1)
    pagination: Pagination | None = Field(default=None, exclude_if=lambda v: v is None)
    # something the caller should know about the answer (e.g. usage history reaching into months
    # whose raw records were retired, issue 18); absent otherwise
    notice: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    field: str | None = None
    message: str


class ErrorBody(BaseModel):
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)  # always sent

    code: str
    message: str
    details: list[dict[str, Any]] = []


class Envelope(BaseModel, Generic[T]):
    """`{data, error, meta}`: the schema of every documented JSON answer.

    The three keys are always sent, so the response schema marks them required, and `data` is
    the payload's own type (`Envelope[Invocation]`: an `Invocation`, never null; the errors'
    `Envelope[None]`: null). The TypeScript client generated from the schema then reads
    `body.data.output` without a null check that could never fail.
    """

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    data: T
    error: ErrorBody | None = None
    meta: Meta


def meta(pagination: Pagination | None = None, notice: str | None = None) -> Meta:
    return Meta(request_id=current_request_id() or "-", pagination=pagination, notice=notice)


def ok(data: T, *, pagination: Pagination | None = None, notice: str | None = None) -> Envelope[T]:
    """Wrap a success payload; the route's `response_model` serialises it."""
    return Envelope[T](data=data, error=None, meta=meta(pagination, notice))


def page(
    items: list[T], *, offset: int, limit: int, total: int, notice: str | None = None
) -> Envelope[list[T]]:
    return ok(items, pagination=Pagination(offset=offset, limit=limit, total=total), notice=notice)


def encode_envelope(data: Any = None, error: dict[str, Any] | None = None) -> bytes:
    """The envelope as compact UTF-8 JSON bytes, with this request's id in `meta`."""
    doc = {"data": data, "error": error, "meta": {"request_id": current_request_id() or "-"}}
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except UnicodeEncodeError:  # lone surrogates (an upstream's): ASCII escapes are still JSON
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


def error_document(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details or []}


def json_response(body: bytes, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type="application/json", headers=headers)


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return json_response(encode_envelope(error=error_document(code, message, details)), status, headers)

"""Request and response models of the tools domain (API.md §5 and the tool parts of §7).

Request models forbid unknown fields and bound every string; text with NUL bytes (which
PostgreSQL cannot store) is refused with 422 instead of failing in the database.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from joyhub.core.urls import check_http_url
from joyhub.tools.input_validation import schema_problem

HEADER_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# headers the hub sets itself or that frame the HTTP message: a tool may not override them
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "expect",
        "x-request-id",
        "user-agent",
        "accept",
        "accept-encoding",
    }
)
MAX_SCHEMA_NODES = 20_000


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


def _walk_strings(node: Any, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("is too large")
    if isinstance(node, str):
        _no_nul(node)
    elif isinstance(node, dict):
        for key, value in node.items():
            _no_nul(key)
            _walk_strings(value, budget)
    elif isinstance(node, list):
        for value in node:
            _walk_strings(value, budget)


def check_endpoint(url: str) -> str:
    """An absolute http(s) URL with a host and no credentials (use the secret header)."""
    return check_http_url(url)


class CircuitOut(BaseModel):
    state: Literal["closed", "open", "half_open"]
    consecutive_failures: int
    opened_until: datetime | None


class ToolOut(BaseModel):
    """The user view: never the upstream URL nor any secret."""

    id: uuid.UUID
    name: str
    description: str
    category: str | None
    input_schema: dict[str, Any] | None
    min_plan: str | None
    streaming: bool
    protocol: Literal["json", "openai"] = Field(
        description="`openai`: an OpenAI-compatible model, reachable at /api/v1/openai (API.md §12); "
        "its `name` is the model id"
    )
    is_active: bool
    created_at: datetime
    updated_at: datetime


class AdminToolOut(ToolOut):
    """The admin view: endpoint and limits too, whether a secret is set — never its value."""

    api_endpoint: str
    timeout_seconds: int
    max_attempts: int
    auth_header_name: str | None
    has_auth_secret: bool
    requests_per_minute: int | None
    upstream_model: str | None
    circuit: CircuitOut


class _ToolFields(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=100)
    description: str = Field(min_length=1, max_length=10_000)
    api_endpoint: str = Field(min_length=1, max_length=2048)
    category: str | None = Field(None, min_length=1, max_length=50)
    input_schema: dict[str, Any] | None = None
    min_plan: str | None = Field(None, min_length=1, max_length=32)
    timeout_seconds: int = Field(30, ge=1, le=300)
    max_attempts: int = Field(3, ge=1, le=5)
    auth_header_name: str | None = Field(None, min_length=1, max_length=100)
    auth_header_value: str | None = Field(None, min_length=1, max_length=4096, repr=False)
    streaming: bool = Field(False, description="The upstream answers Server-Sent Events (API.md §5.1)")
    requests_per_minute: int | None = Field(
        None, ge=1, le=1_000_000, description="All callers together, to protect the upstream (API.md §4.1)"
    )
    protocol: Literal["json", "openai"] = Field(
        "json",
        description="`json`: the input is POSTed to api_endpoint (API.md §5); `openai`: api_endpoint is "
        "an OpenAI-compatible base URL with its version path (e.g. http://vllm:8000/v1) and the tool is "
        "a model of /api/v1/openai (API.md §12)",
    )
    upstream_model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The model id sent upstream for an `openai` tool (default: the tool's name)",
    )
    is_active: bool = True

    @field_validator("name", "description", "category", "min_plan", "upstream_model")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return _no_nul(value)

    @field_validator("api_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_endpoint(value)

    @field_validator("input_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        _walk_strings(value, [MAX_SCHEMA_NODES])
        problem = schema_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("auth_header_name")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not HEADER_TOKEN.match(value):
            raise ValueError("must be a valid HTTP header name")
        if value.lower() in RESERVED_HEADERS or value.lower().startswith(("proxy-", "sec-")):
            raise ValueError("is set by the hub itself and cannot be configured")
        return value

    @field_validator("auth_header_value")
    @classmethod
    def _header_value(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if any(not (ch == "\t" or 0x20 <= ord(ch) <= 0x7E) for ch in value):
            raise ValueError("must be printable ASCII (no control characters or line breaks)")
        return value


class ToolCreate(_ToolFields):
    """`POST /admin/tools`. Omitted timeout/attempts take the server defaults."""

    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "summarise",
                    "description": "Keeps the first sentences of a text",
                    # on this machine: the contract fuzzer creates and calls tools from this
                    # example, and must never send the hub's upstream calls anywhere else
                    "api_endpoint": "http://127.0.0.1:9000/summarise",
                    "category": "text",
                    "input_schema": {
                        "type": "object",
                        "properties": {"text": {"type": "string"}},
                        "required": ["text"],
                    },
                    "min_plan": "free",
                    "timeout_seconds": 30,
                    "auth_header_name": "X-Tool-Key",
                    "auth_header_value": "upstream-secret",
                }
            ]
        },
    )

    timeout_seconds: int | None = Field(None, ge=1, le=300)  # type: ignore[assignment]
    max_attempts: int | None = Field(None, ge=1, le=5)  # type: ignore[assignment]


class ToolUpdate(_ToolFields):
    """`PATCH /admin/tools/{id}`: any ToolCreate field. null clears the optional ones."""

    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        json_schema_extra={"examples": [{"timeout_seconds": 60, "max_attempts": 2, "min_plan": "pro"}]},
    )

    name: str | None = Field(None, min_length=1, max_length=100)  # type: ignore[assignment]
    description: str | None = Field(None, min_length=1, max_length=10_000)  # type: ignore[assignment]
    api_endpoint: str | None = Field(None, min_length=1, max_length=2048)  # type: ignore[assignment]
    timeout_seconds: int | None = Field(None, ge=1, le=300)  # type: ignore[assignment]
    max_attempts: int | None = Field(None, ge=1, le=5)  # type: ignore[assignment]
    streaming: bool | None = None  # type: ignore[assignment]
    protocol: Literal["json", "openai"] | None = None  # type: ignore[assignment]
    is_active: bool | None = None  # type: ignore[assignment]

    @field_validator("api_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:  # type: ignore[override]
        return None if value is None else check_endpoint(value)


class InvokeRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"input": {"text": "The hub meters every token. It is fast."}}]},
    )

    input: dict[str, Any] = Field(description="The tool's input; must satisfy its input_schema")
    stream: bool = Field(
        False,
        description="Relay a streaming tool's answer as Server-Sent Events as it arrives (API.md §5.1); "
        "only for tools with `streaming: true`",
    )


class Invocation(BaseModel):
    invocation_id: uuid.UUID
    tool_id: uuid.UUID
    status: Literal["success"]
    output: Any
    tokens_used: int
    duration_ms: int

"""Every error class of API.md §1 wears the envelope; request ids are echoed and sanitised."""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from joyhub.core import errors
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok
from joyhub.models import User

pytestmark = pytest.mark.integration


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=10)
    count: int


@functools.cache
def _test_router() -> APIRouter:
    """One router for every test's app: the access log's path templates are computed once per
    route table (`middleware._templates_of`), so a fresh router per test would cost each test a
    regenerated OpenAPI schema."""
    router = APIRouter(prefix="/_test")

    @router.post("/echo", response_model=Envelope[dict[str, Any]])
    async def echo(body: Body) -> Envelope[dict[str, Any]]:
        return ok(body.model_dump())

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    @router.get("/app-error/{kind}")
    async def app_error(kind: str) -> None:
        cls = getattr(errors, kind)
        raise cls()

    @router.post("/failing-commit", response_model=Envelope[dict[str, str]])
    async def failing_commit(session: DbSession) -> Envelope[dict[str, str]]:
        # violates the role CHECK constraint only when the dependency commits
        session.add(
            User(id=uuid.uuid4(), name="x", email=f"{uuid.uuid4()}@x.io", password_hash="x", role="bogus")
        )
        return ok({"status": "written"})

    return router


@pytest.fixture
async def tclient(client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    app = client.app  # type: ignore[attr-defined]
    app.include_router(_test_router())
    yield client


def assert_envelope(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"data", "error", "meta"}
    assert body["data"] is None
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], list)
    assert body["meta"]["request_id"]


async def test_success_envelope(tclient: httpx.AsyncClient) -> None:
    r = await tclient.post("/_test/echo", json={"name": "a", "count": 1})
    assert r.status_code == 200
    body = r.json()
    assert body == {"data": {"name": "a", "count": 1}, "error": None, "meta": body["meta"]}
    assert body["meta"]["request_id"] == r.headers["x-request-id"]


async def test_unknown_route_404(tclient: httpx.AsyncClient) -> None:
    r = await tclient.get("/api/v1/nope")
    assert r.status_code == 404
    assert_envelope(r.json(), "NOT_FOUND")


async def test_wrong_method_405(tclient: httpx.AsyncClient) -> None:
    r = await tclient.delete("/health")
    assert r.status_code == 405
    assert_envelope(r.json(), "METHOD_NOT_ALLOWED")


async def test_malformed_json_400(tclient: httpx.AsyncClient) -> None:
    r = await tclient.post(
        "/_test/echo", content=b'{"name": "a", "count":', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert_envelope(r.json(), "MALFORMED_JSON")


async def test_validation_422_names_each_field(tclient: httpx.AsyncClient) -> None:
    r = await tclient.post("/_test/echo", json={"name": "", "count": "x", "role": "admin"})
    assert r.status_code == 422
    body = r.json()
    assert_envelope(body, "VALIDATION_ERROR")
    fields = {d["field"] for d in body["error"]["details"]}
    assert {"body.name", "body.count", "body.role"} <= fields
    assert all(d["message"] for d in body["error"]["details"])


async def test_missing_body_422(tclient: httpx.AsyncClient) -> None:
    r = await tclient.post("/_test/echo")
    assert r.status_code == 422
    assert_envelope(r.json(), "VALIDATION_ERROR")


async def test_oversized_body_413_by_content_length(tclient: httpx.AsyncClient) -> None:
    big = b"x" * (1024 * 1024 + 1)
    r = await tclient.post("/_test/echo", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert_envelope(r.json(), "PAYLOAD_TOO_LARGE")


async def test_oversized_chunked_body_413_without_reading_it_all(tclient: httpx.AsyncClient) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 4 MiB offered in 64 KiB chunks
            sent += 1
            yield b" " * 65536

    r = await tclient.post("/_test/echo", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert_envelope(r.json(), "PAYLOAD_TOO_LARGE")
    assert sent < 64, "the body must not be read to its end"


async def test_unexpected_exception_500_is_logged_never_shown(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="joyhub.errors")
    r = await tclient.get("/_test/boom", headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500
    body = r.json()
    assert_envelope(body, "INTERNAL_ERROR")
    assert body["meta"]["request_id"] == "boom-1"
    assert "hunter2" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert logged, "the 500 must be logged with its traceback"


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("NotAuthenticated", 401, "NOT_AUTHENTICATED"),
        ("InvalidToken", 401, "INVALID_TOKEN"),
        ("InvalidCredentials", 401, "INVALID_CREDENTIALS"),
        ("InvalidRefreshToken", 401, "INVALID_REFRESH_TOKEN"),
        ("InvalidResetToken", 400, "INVALID_RESET_TOKEN"),
        ("SubscriptionRequired", 402, "SUBSCRIPTION_REQUIRED"),
        ("PlanUpgradeRequired", 402, "PLAN_UPGRADE_REQUIRED"),
        ("Forbidden", 403, "FORBIDDEN"),
        ("AccountDisabled", 403, "ACCOUNT_DISABLED"),
        ("NotFound", 404, "NOT_FOUND"),
        ("EmailTaken", 409, "EMAIL_TAKEN"),
        ("Conflict", 409, "CONFLICT"),
        ("IdempotencyConflict", 409, "IDEMPOTENCY_CONFLICT"),
        ("ValidationFailed", 422, "VALIDATION_ERROR"),
        ("ToolInputInvalid", 422, "TOOL_INPUT_INVALID"),
        ("QuotaExceeded", 429, "QUOTA_EXCEEDED"),
        ("RateLimited", 429, "RATE_LIMITED"),
        ("ToolBadResponse", 502, "TOOL_BAD_RESPONSE"),
        ("ToolUnavailable", 503, "TOOL_UNAVAILABLE"),
        ("ServiceUnavailable", 503, "SERVICE_UNAVAILABLE"),
        ("ToolTimeout", 504, "TOOL_TIMEOUT"),
    ],
)
async def test_app_errors_wear_the_envelope(
    tclient: httpx.AsyncClient, kind: str, status: int, code: str
) -> None:
    r = await tclient.get(f"/_test/app-error/{kind}")
    assert r.status_code == status
    assert_envelope(r.json(), code)


async def test_failing_commit_answers_500_not_200(tclient: httpx.AsyncClient) -> None:
    r = await tclient.post("/_test/failing-commit")
    assert r.status_code == 500
    assert_envelope(r.json(), "INTERNAL_ERROR")
    assert "bogus" not in r.text and "violates" not in r.text


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("abc-123_X.y", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("bad id with spaces", False),
        ("<script>", False),
        ("", False),
        ("ünïcode", False),
    ],
)
async def test_request_id_echo_and_sanitising(tclient: httpx.AsyncClient, sent: str, echoed: bool) -> None:
    headers = {"X-Request-ID": sent.encode("utf-8")} if sent else {}
    r = await tclient.get("/health", headers=headers)  # type: ignore[arg-type]
    rid = r.headers["x-request-id"]
    assert r.json()["meta"]["request_id"] == rid
    if echoed:
        assert rid == sent
    else:
        assert rid != sent
        uuid.UUID(rid)


async def test_access_log_line_has_the_fields(
    tclient: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="joyhub.access")
    await tclient.get("/health", headers={"X-Request-ID": "log-check-1"})
    from joyhub.core.logging import JsonFormatter

    lines = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records if rec.name == "joyhub.access"]
    line = next(ln for ln in lines if ln["path"] == "/health")
    assert line["request_id"] == "log-check-1"
    assert line["method"] == "GET" and line["status"] == 200
    assert isinstance(line["duration_ms"], float)
    assert {"timestamp", "level", "message", "user_id"} <= set(line)


async def test_cors_preflight_allows_configured_origin(tclient: httpx.AsyncClient) -> None:
    r = await tclient.options(
        "/health",
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = await tclient.options(
        "/health", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in r.headers


async def test_405_lists_every_method_of_the_path(tclient: httpx.AsyncClient) -> None:
    r = await tclient.request("OPTIONS", "/api/v1/users/me")
    assert r.status_code == 405
    assert_envelope(r.json(), "METHOD_NOT_ALLOWED")
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "PATCH"}


async def test_undecodable_body_is_malformed_json(tclient: httpx.AsyncClient) -> None:
    r = await tclient.post(
        "/_test/echo", content=b'{"name": "\xff\xfe"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert_envelope(r.json(), "MALFORMED_JSON")

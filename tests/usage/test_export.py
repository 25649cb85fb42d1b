"""GET /usage/export: a streamed CSV attachment of the caller's records, safe to open in a sheet."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.usage.service import EXPORT_BATCH
from tests.factories import make_account
from tests.usage.factories import make_api_key, make_tool, record_invocation, record_pending

pytestmark = pytest.mark.integration

URL = "/api/v1/usage/export"
HEADER = [
    "id",
    "timestamp",
    "tool_id",
    "tool_name",
    "status",
    "tokens_used",
    "duration_ms",
    "request_id",
    "error_code",
    "token_source",
    "input_tokens",
    "output_tokens",
]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def parse(body: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body)))


async def test_csv_content_and_headers(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine, "Summarizer, v2")
    ok_id = await record_invocation(
        engine, acc.user_id, tool, tokens=12, ts=utc(2025, 3, 1, 9), request_id="abc", duration_ms=250
    )
    err_id = await record_invocation(engine, acc.user_id, tool, status="error", ts=utc(2025, 3, 1, 10))
    await record_pending(engine, acc.user_id, tool, ts=utc(2025, 3, 1, 11))
    r = await client.get(URL, headers=acc.headers)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    disposition = r.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="usage-') and disposition.endswith('.csv"')
    rows = parse(r.text)
    assert rows[0] == HEADER
    assert rows[1] == [
        str(err_id),
        "2025-03-01T10:00:00Z",
        str(tool),
        "Summarizer, v2",
        "error",
        "0",
        "120",
        rows[2 - 1][7],
        "TOOL_UNAVAILABLE",
        "estimated",
        "",
        "",
    ]
    assert rows[2] == [
        str(ok_id),
        "2025-03-01T09:00:00Z",
        str(tool),
        "Summarizer, v2",
        "success",
        "12",
        "250",
        "abc",
        "",
        "estimated",
        "",
        "",
    ]
    assert len(rows) == 3  # the pending call is not exported
    assert r.text.endswith("\r\n")


async def test_date_range_and_filename(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    for ts in (utc(2025, 2, 28, 23, 59), utc(2025, 3, 1), utc(2025, 3, 31, 23, 59), utc(2025, 4, 1)):
        await record_invocation(engine, acc.user_id, tool, tokens=1, ts=ts)
    r = await client.get(
        URL, headers=acc.headers, params={"start_date": "2025-03-01", "end_date": "2025-03-31"}
    )
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="usage-20250301-20250331.csv"'
    stamps = [row[1] for row in parse(r.text)[1:]]
    assert stamps == ["2025-03-31T23:59:00Z", "2025-03-01T00:00:00Z"]
    r = await client.get(
        URL, headers=acc.headers, params={"start_date": "2025-04-02", "end_date": "2025-04-01"}
    )
    assert r.status_code == 422
    r = await client.get(URL, headers=acc.headers, params={"status": "success", "end_date": "2025-02-28"})
    assert len(parse(r.text)) == 2


async def test_cells_that_look_like_formulas_are_neutralised(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    evil = await make_tool(engine, '=HYPERLINK("http://evil.example","click")')
    plus = await make_tool(engine, "+SUM(A1:A9)")
    at = await make_tool(engine, "@cmd")
    await record_invocation(engine, acc.user_id, evil, tokens=1, ts=utc(2025, 3, 1, 1), request_id="-2+3")
    await record_invocation(engine, acc.user_id, plus, tokens=1, ts=utc(2025, 3, 1, 2), request_id="ok.id")
    await record_invocation(engine, acc.user_id, at, tokens=1, ts=utc(2025, 3, 1, 3), request_id="@x")
    rows = parse((await client.get(URL, headers=acc.headers)).text)[1:]
    names = {row[3] for row in rows}
    assert names == {"'@cmd", "'+SUM(A1:A9)", '\'=HYPERLINK("http://evil.example","click")'}
    assert {row[7] for row in rows} == {"'-2+3", "ok.id", "'@x"}
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@"))


async def test_large_exports_stream_in_batches(
    client: httpx.AsyncClient, engine: AsyncEngine, app: Any
) -> None:
    """Driven at the ASGI level (httpx's ASGI transport buffers bodies): the CSV leaves the app as
    several body messages — the header, then one per cursor batch — not as one built string."""
    acc = await make_account(engine)
    tool = await make_tool(engine)
    total = EXPORT_BATCH * 2 + 17
    async with engine.begin() as conn:  # bulk rows straight in: this test is about streaming
        await conn.execute(
            text(
                "INSERT INTO usage_logs (id, user_id, tool_id, plan_code, status, started_at, timestamp,"
                " tokens_used, tokens_reserved, duration_ms, request_id)"
                " SELECT gen_random_uuid(), :u, :t, 'pro', 'success', ts, ts, i, 0, 10, 'r' || i"
                " FROM generate_series(1, :n) AS i,"
                " LATERAL (SELECT CAST(:b AS timestamptz) + i * interval '1 minute' AS ts) AS x"
            ),
            {"u": acc.user_id, "t": tool, "b": utc(2025, 1, 1), "n": total},
        )
    messages: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"hub.test"), (b"authorization", f"Bearer {acc.access_token}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("hub.test", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    assert start["status"] == 200
    assert b"content-length" not in {k.lower() for k, _v in start["headers"]}
    bodies = [m for m in messages if m["type"] == "http.response.body" and m.get("body")]
    assert len(bodies) >= 4  # header + 3 batches
    assert all(m.get("more_body") for m in bodies)
    text_body = b"".join(m["body"] for m in bodies).decode()
    assert text_body.count("\r\n") == total + 1


async def test_privacy_and_auth(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    alice, bob = await make_account(engine), await make_account(engine)
    tool = await make_tool(engine)
    await record_invocation(engine, alice.user_id, tool, tokens=1, ts=utc(2025, 3, 1) + timedelta(hours=1))
    assert parse((await client.get(URL, headers=bob.headers)).text) == [HEADER]
    key = await make_api_key(engine, alice.user_id)
    r = await client.get(URL, headers={"X-API-Key": key})
    assert len(parse(r.text)) == 2
    r = await client.get(URL)
    assert r.status_code == 401 and r.json()["error"]["code"] == "NOT_AUTHENTICATED"

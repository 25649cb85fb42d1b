"""Cancelled calls and `token_source` in every usage read (API.md §5.1, §6; issue 13 part 2).

A `cancelled` call is a stream the caller hung up on: settled, charged for what was relayed. It
is listed, exported, filtered on, and counted in every total and token sum; the summary counts
it apart (`cancelled_invocations`), so `failed_invocations` stays errors + timeouts.

One mixed dataset (every status, both token sources, two tools, another user's rows that must
never show) written the way settle writes it (log + rollups in one transaction), then each read
compared with a brute-force count of the rows, over windows that hit every read path: whole days
(daily rollups), whole hours (hourly rollup) and ragged edges (raw logs).
"""

from __future__ import annotations

import csv
import io
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import iso_utc
from joyhub.models.usage import TOKEN_SOURCES, USAGE_STATUSES
from joyhub.usage.dates import DAY, HOUR, floor_to
from joyhub.usage.schemas import TokenSource
from joyhub.usage.service import CSV_HEADER, SETTLED
from tests.factories import Account, make_account
from tests.usage.factories import make_tool, record_invocation, record_pending

URL = "/api/v1/usage"
BASE = datetime(2025, 5, 1, tzinfo=UTC)
WINDOWS = [
    ("2025-05-01", "2025-05-04"),  # whole days: usage_daily / usage_user_daily only
    ("2025-05-02", "2025-05-02"),
    ("2025-05-01T13:45:00Z", "2025-05-04T03:10:00Z"),  # ragged days: raw edges (+ whole hours)
    ("2025-05-02T01:00:00Z", "2025-05-02T07:00:00Z"),  # whole hours inside one day
    ("2025-05-02T01:10:00Z", "2025-05-02T01:50:00Z"),  # inside one hour: raw only
    ("2025-05-02T23:30:00Z", "2025-05-03T00:30:00Z"),  # across midnight
]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@dataclass(frozen=True)
class Row:
    id: uuid.UUID
    ts: datetime
    tool: uuid.UUID
    status: str
    tokens: int
    source: str


@dataclass(frozen=True)
class Dataset:
    acc: Account
    tools: list[uuid.UUID]
    rows: list[Row]

    def inside(self, lo: datetime, hi: datetime) -> list[Row]:
        return [r for r in self.rows if lo <= r.ts < hi]


async def _dataset(engine: AsyncEngine, seed: int = 13) -> Dataset:
    acc, other = await make_account(engine), await make_account(engine)
    tools = [await make_tool(engine, "Stream"), await make_tool(engine, "Plain")]
    rng = random.Random(seed)
    rows: list[Row] = []
    for i in range(70):
        ts = BASE + timedelta(seconds=rng.randrange(0, 4 * 86400))
        status = ["success", "error", "timeout", "cancelled", "cancelled"][i % 5]
        # a cancelled stream is charged for what it relayed; so is an error after the first chunk
        tokens = rng.randrange(1, 90) if status in ("success", "cancelled") or i % 7 == 0 else 0
        source = rng.choice(TOKEN_SOURCES)
        tool = tools[i % 2]
        log_id = await record_invocation(
            engine, acc.user_id, tool, status=status, tokens=tokens, ts=ts, token_source=source
        )
        rows.append(Row(log_id, ts, tool, status, tokens, source))
    # at the exact boundaries of the windows above: in at the start, out at the end
    for ts in (utc(2025, 5, 2), utc(2025, 5, 2, 1, 10), utc(2025, 5, 2, 23, 30)):
        log_id = await record_invocation(engine, acc.user_id, tools[0], status="cancelled", tokens=5, ts=ts)
        rows.append(Row(log_id, ts, tools[0], "cancelled", 5, "estimated"))
    # never shown to `acc`: another user's cancelled calls, and a call not settled yet
    for h in range(3):
        await record_invocation(
            engine, other.user_id, tools[0], status="cancelled", tokens=1000, ts=utc(2025, 5, 2, h)
        )
    await record_pending(engine, acc.user_id, tools[0], ts=utc(2025, 5, 2, 12))
    return Dataset(acc, tools, rows)


async def _period(client: httpx.AsyncClient, acc: Account, start: str, end: str) -> dict[str, Any]:
    r = await client.get(f"{URL}/summary", headers=acc.headers, params={"start_date": start, "end_date": end})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def _bounds(summary: dict[str, Any]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(summary["period_start"]), datetime.fromisoformat(summary["period_end"])


def test_the_settled_statuses_are_the_models_statuses_but_pending() -> None:
    """One list of what a user sees: a status added to the model must be added to the API too."""
    assert set(SETTLED) == set(USAGE_STATUSES) - {"pending"}
    assert "cancelled" in SETTLED
    assert set(get_args(TokenSource)) == set(TOKEN_SOURCES)
    assert CSV_HEADER[-3:] == ("token_source", "input_tokens", "output_tokens")
    assert CSV_HEADER.index("error_code") == 8


@pytest.mark.integration
async def test_summary_counts_cancelled_calls_apart_and_charges_their_tokens(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    ds = await _dataset(engine)
    for start, end in WINDOWS:
        s = await _period(client, ds.acc, start, end)
        inside = ds.inside(*_bounds(s))
        where = (start, end)
        assert s["total_invocations"] == len(inside), where
        assert s["successful_invocations"] == sum(r.status == "success" for r in inside), where
        assert s["failed_invocations"] == sum(r.status in ("error", "timeout") for r in inside), where
        assert s["cancelled_invocations"] == sum(r.status == "cancelled" for r in inside), where
        assert s["total_tokens"] == sum(r.tokens for r in inside), where
        assert (
            s["successful_invocations"] + s["failed_invocations"] + s["cancelled_invocations"]
            == s["total_invocations"]
        )
        expected = {
            str(t): (sum(r.tool == t for r in inside), sum(r.tokens for r in inside if r.tool == t))
            for t in ds.tools
        }
        got = {t["tool_id"]: (t["invocations"], t["tokens"]) for t in s["by_tool"]}
        assert got == {k: v for k, v in expected.items() if v[0]}, where
    assert any(r.status == "cancelled" and r.tokens for r in ds.rows)


@pytest.mark.integration
async def test_a_summary_without_cancelled_calls_is_unchanged(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    for status in ("success", "error", "timeout"):
        await record_invocation(engine, acc.user_id, tool, status=status, tokens=3, ts=utc(2025, 5, 1, 9))
    s = await _period(client, acc, "2025-05-01T08:30:00Z", "2025-05-01")
    assert (s["total_invocations"], s["successful_invocations"], s["failed_invocations"]) == (3, 1, 2)
    assert (s["cancelled_invocations"], s["total_tokens"]) == (0, 9)


@pytest.mark.integration
async def test_history_lists_cancelled_calls_with_their_token_source_and_filters_on_them(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    ds = await _dataset(engine)
    by_id = {str(r.id): r for r in ds.rows}
    r = await client.get(URL, headers=ds.acc.headers, params={"limit": 100})
    assert r.status_code == 200, r.text
    listed = r.json()["data"]
    assert len(listed) == len(ds.rows) and {x["id"] for x in listed} == set(by_id)
    for rec in listed:
        row = by_id[rec["id"]]
        assert (rec["status"], rec["tokens_used"], rec["token_source"]) == (
            row.status,
            row.tokens,
            row.source,
        )
    cancelled = next(x for x in listed if x["status"] == "cancelled")
    assert cancelled["error_code"] is None  # hanging up is the caller's choice, not a tool failure

    for start, end in WINDOWS:
        lo, hi = _bounds(await _period(client, ds.acc, start, end))
        for status in SETTLED:
            want = sorted(
                (r for r in ds.inside(lo, hi) if r.status == status), key=lambda r: (r.ts, r.id), reverse=True
            )
            # limit 2: a full first page, so `total` comes from the rollup count (+ raw edges)
            params = {"start_date": start, "end_date": end, "status": status, "limit": "2"}
            r = await client.get(URL, headers=ds.acc.headers, params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["meta"]["pagination"]["total"] == len(want), (start, end, status)
            assert [x["id"] for x in body["data"]] == [str(r.id) for r in want[:2]]
            assert {x["status"] for x in body["data"]} <= {status}
        # and per tool, cancelled only
        tool = ds.tools[0]
        params = {
            "start_date": start,
            "end_date": end,
            "status": "cancelled",
            "tool_id": str(tool),
            "limit": "1",
        }
        total = (await client.get(URL, headers=ds.acc.headers, params=params)).json()["meta"]["pagination"]
        n = sum(1 for r in ds.inside(lo, hi) if r.status == "cancelled" and r.tool == tool)
        assert total["total"] == n


@pytest.mark.integration
@pytest.mark.parametrize("path", ["", "/export"])
@pytest.mark.parametrize("value", ["canceled", "CANCELLED", "pending", "cancelled " * 100, ""])
async def test_other_status_values_are_422(
    client: httpx.AsyncClient, engine: AsyncEngine, path: str, value: str
) -> None:
    acc = await make_account(engine)
    r = await client.get(URL + path, headers=acc.headers, params={"status": value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    assert "query.status" in [d["field"] for d in r.json()["error"]["details"]]


def _expected_buckets(
    rows: list[Row], lo: datetime, hi: datetime, unit: timedelta
) -> list[tuple[str, int, int]]:
    out = []
    b = floor_to(lo, unit)
    while b < hi:
        part = [r for r in rows if max(lo, b) <= r.ts < min(hi, b + unit)]
        out.append((iso_utc(b), len(part), sum(r.tokens for r in part)))
        b += unit
    return out


@pytest.mark.integration
async def test_timeseries_counts_cancelled_calls_in_every_bucket(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    ds = await _dataset(engine)
    for start, end in WINDOWS:
        summary = await _period(client, ds.acc, start, end)
        lo, hi = _bounds(summary)
        for granularity, unit in (("day", DAY), ("hour", HOUR)):
            params = {"start_date": start, "end_date": end, "granularity": granularity}
            r = await client.get(f"{URL}/timeseries", headers=ds.acc.headers, params=params)
            assert r.status_code == 200, r.text
            got = [(p["bucket_start"], p["invocations"], p["tokens"]) for p in r.json()["data"]]
            assert got == _expected_buckets(ds.rows, lo, hi, unit), (start, end, granularity)
            assert sum(g[1] for g in got) == summary["total_invocations"]
            assert sum(g[2] for g in got) == summary["total_tokens"]


def _csv(body: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body)))


@pytest.mark.integration
async def test_export_has_token_source_last_and_includes_cancelled_calls(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    ds = await _dataset(engine)
    by_id = {str(r.id): r for r in ds.rows}
    r = await client.get(f"{URL}/export", headers=ds.acc.headers)
    assert r.status_code == 200, r.text
    table = _csv(r.text)
    assert table[0] == list(CSV_HEADER)
    assert table[0][:9] == [
        "id",
        "timestamp",
        "tool_id",
        "tool_name",
        "status",
        "tokens_used",
        "duration_ms",
        "request_id",
        "error_code",
    ]  # the columns consumers already read keep their positions
    assert len(table) - 1 == len(ds.rows)
    for line in table[1:]:
        row = by_id[line[0]]
        assert (line[4], int(line[5]), line[9]) == (row.status, row.tokens, row.source)
        codes = {"success": "", "cancelled": "", "error": "TOOL_UNAVAILABLE", "timeout": "TOOL_TIMEOUT"}
        assert line[8] == codes[row.status]
    r = await client.get(
        f"{URL}/export",
        headers=ds.acc.headers,
        params={
            "status": "cancelled",
            "start_date": "2025-05-01T13:45:00Z",
            "end_date": "2025-05-04T03:10:00Z",
        },
    )
    lo, hi = utc(2025, 5, 1, 13, 45), utc(2025, 5, 4, 3, 10)
    want = sorted(
        (x for x in ds.inside(lo, hi) if x.status == "cancelled"), key=lambda x: (x.ts, x.id), reverse=True
    )
    assert [line[0] for line in _csv(r.text)[1:]] == [str(x.id) for x in want]


@pytest.mark.integration
async def test_the_openapi_schema_knows_cancelled_and_token_source(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    record = schemas["UsageRecord"]
    assert "token_source" in record["required"]
    assert record["properties"]["token_source"]["enum"] == ["reported", "estimated"]
    assert "cancelled" in record["properties"]["status"]["enum"]
    assert "cancelled_invocations" in schemas["UsageSummary"]["required"]
    assert "cancelled" in schemas["StatusCounts"]["required"]

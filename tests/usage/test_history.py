"""GET /usage: the caller's settled records, newest first, filters, ranges, paging and totals."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import make_account
from tests.usage.factories import make_api_key, make_tool, record_invocation, record_pending

pytestmark = pytest.mark.integration

URL = "/api/v1/usage"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


async def test_records_newest_first_with_every_field(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine, "Summarizer")
    first = await record_invocation(
        engine, acc.user_id, tool, tokens=42, ts=utc(2025, 3, 1, 10), request_id="req-1", duration_ms=321
    )
    second = await record_invocation(engine, acc.user_id, tool, status="timeout", ts=utc(2025, 3, 1, 11))
    r = await client.get(URL, headers=acc.headers)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"data", "error", "meta"}
    assert body["meta"]["pagination"] == {"offset": 0, "limit": 20, "total": 2}
    assert [x["id"] for x in body["data"]] == [str(second), str(first)]
    rec = body["data"][1]
    assert rec == {
        "id": str(first),
        "tool_id": str(tool),
        "tool_name": "Summarizer",
        "timestamp": "2025-03-01T10:00:00Z",
        "tokens_used": 42,
        "token_source": "estimated",
        "input_tokens": None,
        "output_tokens": None,
        "status": "success",
        "duration_ms": 321,
        "request_id": "req-1",
        "error_code": None,
    }
    assert body["data"][0]["status"] == "timeout"
    assert body["data"][0]["error_code"] == "TOOL_TIMEOUT"
    assert body["data"][0]["tokens_used"] == 0


async def test_tool_name_survives_the_tools_deletion(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine, "Old Tool", deleted_at=utc(2025, 1, 1))
    await record_invocation(engine, acc.user_id, tool, tokens=1, ts=utc(2024, 12, 1))
    r = await client.get(URL, headers=acc.headers)
    assert r.json()["data"][0]["tool_name"] == "Old Tool"


async def test_pending_rows_are_never_shown_or_counted(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    await record_invocation(engine, acc.user_id, tool, tokens=5, ts=utc(2025, 3, 1, 10))
    for _ in range(3):
        await record_pending(engine, acc.user_id, tool, ts=utc(2025, 3, 1, 12))
    r = await client.get(URL, headers=acc.headers, params={"limit": 1})
    assert len(r.json()["data"]) == 1
    assert r.json()["meta"]["pagination"]["total"] == 1
    r = await client.get(URL, headers=acc.headers, params={"start_date": "2025-03-01T11:00:00Z"})
    assert r.json()["data"] == [] and r.json()["meta"]["pagination"]["total"] == 0


async def test_filters_by_tool_and_status(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    a, b = await make_tool(engine, "A"), await make_tool(engine, "B")
    day = utc(2025, 3, 1)
    plan = [(a, "success"), (a, "error"), (b, "success"), (b, "timeout"), (a, "success"), (b, "success")]
    for i, (tool, status) in enumerate(plan):
        await record_invocation(
            engine,
            acc.user_id,
            tool,
            status=status,
            tokens=10 if status == "success" else 0,
            ts=day + i * HOUR,
        )

    async def ids(**params: str) -> tuple[list[str], int]:
        r = await client.get(URL, headers=acc.headers, params={"limit": 2, **params})
        assert r.status_code == 200, r.text
        body = r.json()
        return [x["status"] + ":" + x["tool_id"] for x in body["data"]], body["meta"]["pagination"]["total"]

    assert (await ids(tool_id=str(a)))[1] == 3
    assert (await ids(tool_id=str(b), status="success"))[1] == 2
    assert (await ids(status="error")) == ([f"error:{a}"], 1)
    assert (await ids(status="timeout")) == ([f"timeout:{b}"], 1)
    assert (await ids(status="success"))[1] == 4
    assert (await ids(tool_id=str(uuid.uuid4()))) == ([], 0)
    # and the same totals over a range that does not start/end on day boundaries
    rng = {"start_date": "2025-03-01T00:30:00Z", "end_date": "2025-03-01T05:30:00Z"}
    assert (await ids(**rng, tool_id=str(a)))[1] == 2
    assert (await ids(**rng, status="success"))[1] == 3


HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "pending"}, "query.status"),
        ({"status": "SUCCESS"}, "query.status"),
        ({"tool_id": "not-a-uuid"}, "query.tool_id"),
        ({"start_date": "2025-02-30"}, "query.start_date"),
        ({"end_date": "tomorrow"}, "query.end_date"),
        ({"start_date": "2025-03-02", "end_date": "2025-03-01"}, "query.start_date"),
        ({"limit": "0"}, "query.limit"),
        ({"limit": "101"}, "query.limit"),
        ({"offset": "-1"}, "query.offset"),
    ],
)
async def test_bad_filters_are_422(
    client: httpx.AsyncClient, engine: AsyncEngine, params: dict[str, str], field: str
) -> None:
    acc = await make_account(engine)
    r = await client.get(URL, headers=acc.headers, params=params)
    assert r.status_code == 422
    body = r.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert field in [d["field"] for d in body["error"]["details"]]


async def test_date_boundaries(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """00:00:00 of start_date is in; 00:00:00 of the day after end_date is out; the last
    microsecond of end_date is in."""
    acc = await make_account(engine)
    tool = await make_tool(engine)
    stamps = {
        "before": utc(2025, 2, 28, 23, 59, 59, 999999),
        "start": utc(2025, 3, 1),
        "middle": utc(2025, 3, 2, 12),
        "last": utc(2025, 3, 3, 23, 59, 59, 999999),
        "after": utc(2025, 3, 4),
    }
    by_id = {}
    for name, ts in stamps.items():
        by_id[str(await record_invocation(engine, acc.user_id, tool, tokens=1, ts=ts))] = name

    async def names(**params: str) -> list[str]:
        r = await client.get(URL, headers=acc.headers, params=params)
        assert r.status_code == 200, r.text
        got = [by_id[x["id"]] for x in r.json()["data"]]
        assert r.json()["meta"]["pagination"]["total"] == len(got)
        return got

    assert await names(start_date="2025-03-01", end_date="2025-03-03") == ["last", "middle", "start"]
    # a one-day range
    assert await names(start_date="2025-03-01", end_date="2025-03-01") == ["start"]
    assert await names(start_date="2025-03-04", end_date="2025-03-04") == ["after"]
    # timestamps: half-open [start, end)
    assert await names(start_date="2025-03-01T00:00:00Z", end_date="2025-03-04T00:00:00Z") == [
        "last",
        "middle",
        "start",
    ]
    assert await names(start_date="2025-03-02T12:00:00Z", end_date="2025-03-02T12:00:00.000001Z") == [
        "middle"
    ]
    assert await names(start_date="2025-03-02T12:00:00Z", end_date="2025-03-02T12:00:00Z") == []
    # only one side
    assert await names(start_date="2025-03-03") == ["after", "last"]
    assert await names(end_date="2025-02-28") == ["before"]
    # mixed: a timestamp start with a date end
    assert await names(start_date="2025-03-02T12:00:00+01:00", end_date="2025-03-03") == ["last", "middle"]
    # empty ranges
    assert await names(start_date="2030-01-01", end_date="2030-12-31") == []


async def test_paging_and_totals_over_many_days(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    stamps = [utc(2025, 3, 1, 6) + i * timedelta(hours=7) for i in range(25)]  # ~7 days, ragged
    ids = [
        str(await record_invocation(engine, acc.user_id, tool, tokens=i, ts=ts))
        for i, ts in enumerate(stamps)
    ]
    seen: list[str] = []
    for offset in range(0, 30, 10):
        r = await client.get(URL, headers=acc.headers, params={"offset": offset, "limit": 10})
        assert r.json()["meta"]["pagination"] == {"offset": offset, "limit": 10, "total": 25}
        seen += [x["id"] for x in r.json()["data"]]
    assert seen == ids[::-1]
    r = await client.get(URL, headers=acc.headers, params={"offset": 100})
    assert r.json()["data"] == [] and r.json()["meta"]["pagination"]["total"] == 25
    # ragged range totals agree with a brute-force count
    for start, end in [
        (stamps[3] - timedelta(minutes=1), stamps[20]),
        (stamps[0] + timedelta(minutes=1), stamps[24] + timedelta(seconds=1)),
        (stamps[2], stamps[3]),
    ]:
        params = {"start_date": start.isoformat(), "end_date": end.isoformat(), "limit": 1}
        r = await client.get(URL, headers=acc.headers, params=params)
        expected = sum(1 for ts in stamps if start <= ts < end)
        assert r.json()["meta"]["pagination"]["total"] == expected


async def test_users_only_ever_see_their_own_records(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    alice, bob = await make_account(engine), await make_account(engine)
    tool = await make_tool(engine)
    await record_invocation(engine, alice.user_id, tool, tokens=7, ts=utc(2025, 3, 1))
    r = await client.get(URL, headers=bob.headers)
    assert r.json()["data"] == [] and r.json()["meta"]["pagination"]["total"] == 0
    r = await client.get(URL, headers=bob.headers, params={"tool_id": str(tool)})
    assert r.json()["data"] == []
    r = await client.get(URL, headers=alice.headers)
    assert len(r.json()["data"]) == 1


async def test_api_keys_work_and_anonymous_is_401(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    await record_invocation(engine, acc.user_id, tool, tokens=7, ts=utc(2025, 3, 1))
    key = await make_api_key(engine, acc.user_id)
    r = await client.get(URL, headers={"X-API-Key": key})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    r = await client.get(URL, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    for path in ("", "/summary", "/timeseries", "/export"):
        r = await client.get(URL + path)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "NOT_AUTHENTICATED"

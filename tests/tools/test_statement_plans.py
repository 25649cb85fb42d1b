"""The metering statements read only the rows of the calls they decide, however many accounts exist.

An admission or a settle must cost the same with ten accounts or a million: each table it touches
is reached through an index, by the batch's own keys. A statement shaped so that PostgreSQL cannot
do that (an `IN (SELECT …)` under an `OR` once scanned every subscription to lock one) passes
every functional test on a small database and falls over in production, so this test runs the
admission, the settle and the sweep's close under `EXPLAIN ANALYZE` among thousands of other
accounts — inside a transaction it rolls back — and checks, node by node, how many rows each scan
looked at. Counts, not timings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import TextClause

from joyhub.core.clock import utcnow
from joyhub.tools.driver import DriverSession, compiled
from joyhub.tools.metering import (
    AdmitRequest,
    MeteringConnection,
    SettleRequest,
    admit_statement,
    close_stale_statement,
    settle_statement,
)
from tests.conftest import test_settings as hub_settings
from tests.tools.helpers import admit_request, mixed_callers, rolled_back, success_settle

pytestmark = pytest.mark.integration

OTHERS = 3000  # accounts that are none of the batch's business
MOST_ROWS_PER_SCAN = 20  # rows one scan of a hot table may look at, per loop

# the tables that grow with the number of users, keys, organizations and calls
GROWING = {
    "users",
    "auth_sessions",
    "api_keys",
    "subscriptions",
    "organizations",
    "organization_members",
    "usage_logs",
    "idempotency_keys",
    "usage_daily",
    "usage_user_daily",
    "usage_user_weekly",
    "usage_hourly",
    "usage_org_daily",
    "quota_alerts",
}

# Thousands of other accounts — personal ones with sessions and API keys, organizations with
# members and their own subscriptions, and their calls — then fresh statistics, so that the
# planner sees a database of that size. All inside the test's transaction.
_OTHERS_SQL = [
    f"""INSERT INTO users (id, name, email, password_hash, role, is_active, created_at, updated_at)
        SELECT gen_random_uuid(), 'Other', 'other-' || g || '-' || gen_random_uuid() || '@example.com',
               'x', 'user', true, now(), now()
        FROM generate_series(1, {OTHERS}) AS g""",  # noqa: S608 (a constant of this file)
    """CREATE TEMP TABLE others ON COMMIT DROP AS
        SELECT id, row_number() OVER (ORDER BY id) AS n FROM users WHERE name = 'Other'""",
    """INSERT INTO subscriptions (id, user_id, plan_code, status, tokens_used, tokens_reserved, inflight,
                                  current_period_start, current_period_end, cancel_at_period_end,
                                  created_at, updated_at)
        SELECT gen_random_uuid(), id, 'pro', 'active', 0, 0, 0, now(), now() + interval '30 days', false,
               now(), now()
        FROM others""",
    "INSERT INTO auth_sessions (id, user_id, created_at) SELECT gen_random_uuid(), id, now() FROM others",
    """INSERT INTO api_keys (id, user_id, name, key_prefix, key_hash, is_active, created_at)
        SELECT gen_random_uuid(), id, 'k', 'jfui_other', sha256(CAST(id AS text)::bytea), true, now()
        FROM others""",
    """INSERT INTO organizations (id, name, created_by, created_at, updated_at)
        SELECT gen_random_uuid(), 'Other org', id, now(), now() FROM others WHERE n % 10 = 0""",
    """INSERT INTO organization_members (org_id, user_id, role, token_limit, tokens_used, tokens_reserved,
                                         joined_at)
        SELECT o.id, u.id, 'member', NULL, 0, 0, now()
        FROM organizations AS o JOIN others AS c ON c.id = o.created_by
        JOIN others AS u ON u.n BETWEEN c.n - 9 AND c.n""",
    """INSERT INTO subscriptions (id, org_id, plan_code, status, tokens_used, tokens_reserved, inflight,
                                  current_period_start, current_period_end, cancel_at_period_end,
                                  created_at, updated_at)
        SELECT gen_random_uuid(), id, 'pro', 'active', 0, 0, 0, now(), now() + interval '30 days', false,
               now(), now()
        FROM organizations WHERE name = 'Other org'""",
    """INSERT INTO usage_logs (id, user_id, tool_id, subscription_id, plan_code, status, started_at,
                               "timestamp", tokens_used, tokens_reserved, token_source)
        SELECT gen_random_uuid(), s.user_id, t.id, s.id, 'pro', 'success', now(), now(), 5, 0, 'reported'
        FROM subscriptions AS s JOIN others AS o ON o.id = s.user_id
        CROSS JOIN (SELECT id FROM tools LIMIT 1) AS t""",
    """ANALYZE users, auth_sessions, api_keys, subscriptions, organizations, organization_members,
               usage_logs""",
    # where a table *can* be reached by an index, take it even when a scan of a few hundred rows
    # would be cheaper: what is left is what no index could serve, the shape this test is after
    "SET LOCAL enable_seqscan = off",
]


def _scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child)


def _wide_scans(explained: Any) -> list[str]:
    """The scans of growing tables that looked at more than a few rows per loop."""
    document = json.loads(explained) if isinstance(explained, str) else explained
    wide = []
    for node in _scans(document[0]["Plan"]):
        relation = node.get("Relation Name")
        if relation not in GROWING:
            continue
        seen = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
        seen += node.get("Rows Removed by Index Recheck", 0)
        if seen > MOST_ROWS_PER_SCAN:
            wide.append(f"{node['Node Type']} on {relation}: {seen} rows per loop")
    return wide


async def _mixed_batch(engine: AsyncEngine) -> list[AdmitRequest]:
    """Three calls to one tool: a personal one with an access token, one with an API key, and an
    organization member's billing the organization."""
    return list((await mixed_callers(engine)).calls.values())


async def _settles_of(driver: Any, batch: list[AdmitRequest]) -> list[SettleRequest]:
    """The batch's calls admitted (as new calls) in the transaction, to be settled."""
    results = await MeteringConnection(DriverSession(driver)).admit_many([_again(r) for r in batch])
    settles = [success_settle(r.admission) for r in results if r.admission is not None]
    assert len(settles) == len(batch)
    return settles


async def test_admission_and_settle_read_only_their_own_rows_among_thousands(engine: AsyncEngine) -> None:
    batch = await _mixed_batch(engine)
    async with rolled_back(engine) as driver:
        for sql in _OTHERS_SQL:
            await driver.execute(sql)
        # the admission, explained while it runs (it admits the batch in this transaction)
        assert await _wide_scans_of(driver, *admit_statement(batch)) == []
        # the settle, explained on calls admitted the same way
        assert await _wide_scans_of(driver, *settle_statement(await _settles_of(driver, batch))) == []
        # the sweep, closing the first batch's calls (still pending) a day later
        closed = await _wide_scans_of(
            driver, *close_stale_statement(hub_settings(), utcnow() + timedelta(days=1))
        )
        assert closed == []


async def _wide_scans_of(driver: Any, statement: TextClause, params: dict[str, Any]) -> list[str]:
    sql, names = compiled(statement)
    return _wide_scans(
        await driver.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *(params[n] for n in names))
    )


def _again(req: AdmitRequest) -> AdmitRequest:
    """The same call, as a new one (its own usage log)."""
    return admit_request(req.tool_id, req.tool_version or utcnow(), req.credential, reserve=req.reserve)


def test_the_check_sees_a_scan_of_every_row() -> None:
    """The check itself: a plan that scanned every subscription to lock one is reported."""
    plan = [{"Plan": {"Node Type": "LockRows", "Plans": [
        {"Node Type": "Index Scan", "Relation Name": "subscriptions", "Actual Rows": 1,
         "Rows Removed by Filter": OTHERS},
        {"Node Type": "Seq Scan", "Relation Name": "plans", "Actual Rows": 3, "Rows Removed by Filter": 0},
    ]}}]  # fmt: skip
    assert _wide_scans(plan) == [f"Index Scan on subscriptions: {OTHERS + 1} rows per loop"]


# the rollups' rows are shared by many accounts (the platform's by all of them): two statements
# upserting some of the same rows must do it in one order, or they deadlock
ROLLUPS = {
    "usage_daily",
    "usage_user_daily",
    "usage_user_weekly",
    "usage_hourly",
    "usage_org_daily",
    "usage_platform_daily",
}
# nodes that pass their input on in its order
_ORDER_KEEPING = {"Result", "Subquery Scan", "Limit", "ProjectSet"}


def _unordered_upserts(explained: Any) -> list[str]:
    """The rollup upserts whose rows do not arrive sorted (by an explicit ORDER BY)."""
    document = json.loads(explained) if isinstance(explained, str) else explained
    unordered = []
    for node in _scans(document[0]["Plan"]):
        if node["Node Type"] != "ModifyTable" or node.get("Relation Name") not in ROLLUPS:
            continue
        source = node["Plans"][0]
        while source["Node Type"] in _ORDER_KEEPING or (
            source["Node Type"] == "Aggregate" and source.get("Strategy") == "Sorted"
        ):
            source = source["Plans"][0]
        if source["Node Type"] != "Sort":
            unordered.append(f"{node['Relation Name']} ({node.get('Subplan Name', '')})")
    return unordered


async def test_rollup_upserts_write_their_rows_in_key_order(engine: AsyncEngine) -> None:
    """In the admission (the refused calls' counters) and in the settle, personal and
    organization calls alike. Found missing for the admission's counters: under a storm of
    refusals from two workers, their statements deadlocked on the platform's rows once a second."""
    batch = await _mixed_batch(engine)
    async with rolled_back(engine) as driver:  # the admissions only give the settle calls to settle
        assert _unordered_upserts(await _explained(driver, *admit_statement(batch))) == []
        assert (
            _unordered_upserts(await _explained(driver, *settle_statement(await _settles_of(driver, batch))))
            == []
        )


async def _explained(driver: Any, statement: TextClause, params: dict[str, Any]) -> Any:
    sql, names = compiled(statement)
    return await driver.fetchval("EXPLAIN (FORMAT JSON) " + sql, *(params[n] for n in names))


def test_the_order_check_sees_an_upsert_fed_by_a_hash() -> None:
    plan = [{"Plan": {"Node Type": "Sort", "Plans": [
        {"Node Type": "ModifyTable", "Relation Name": "usage_platform_daily", "Subplan Name": "CTE limited",
         "Plans": [{"Node Type": "Aggregate", "Strategy": "Hashed", "Plans": [{"Node Type": "CTE Scan"}]}]},
        {"Node Type": "ModifyTable", "Relation Name": "usage_daily", "Subplan Name": "CTE daily",
         "Plans": [{"Node Type": "Aggregate", "Strategy": "Sorted", "Plans": [
             {"Node Type": "Sort", "Plans": [{"Node Type": "CTE Scan"}]}]}]},
    ]}}]  # fmt: skip
    assert _unordered_upserts(plan) == ["usage_platform_daily (CTE limited)"]

"""A lone call's metering statements are the batch statements without the adding up and the
ordering (`core/batch_sql.py`): rendered either way, one call must be admitted, refused, charged
and counted exactly alike. Each call here runs both ways on the same rows, each in a transaction
that is rolled back, and everything the two wrote — accounts, members, keys, the tool's limit,
the usage log, every rollup, quota alerts and their events — and answered is compared."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.tools import metering
from joyhub.tools.driver import DriverSession, compiled
from joyhub.tools.metering import AdmitRequest, AdmitShape, MeteringConnection, SettleShape, settle_statement
from tests.tools.helpers import (
    MixedCallers,
    admit_request,
    mixed_callers,
    rolled_back,
    run_sql,
    success_settle,
)

pytestmark = pytest.mark.integration

# What one call may write, narrowed to this test's users, organization and tool (other tests
# commit rows of their own meanwhile). Ids drawn at random and the clock's columns are left out.
_WRITTEN = """
    WITH p AS (SELECT CAST($1 AS uuid[]) AS users, CAST($2 AS uuid) AS tool, CAST($3 AS uuid) AS org)
    SELECT to_jsonb(t) - 'id' - 'created_at' - 'updated_at' FROM {table} AS t, p WHERE {where}
    ORDER BY (to_jsonb(t) - 'id' - 'created_at' - 'updated_at')::text
"""
_TABLES = {
    "subscriptions": "t.user_id = ANY(p.users) OR t.org_id = p.org",
    "organization_members": "t.org_id = p.org",
    "api_keys": "t.user_id = ANY(p.users)",
    "tools": "t.id = p.tool",
    "usage_logs": "t.tool_id = p.tool",
    "usage_daily": "t.tool_id = p.tool",
    "usage_user_daily": "t.user_id = ANY(p.users)",
    "usage_user_weekly": "t.user_id = ANY(p.users)",
    "usage_hourly": "t.user_id = ANY(p.users)",
    "usage_org_daily": "t.org_id = p.org",
    "usage_platform_daily": "t.tool_id = p.tool",
    "quota_alerts": "t.subscription_id IN (SELECT s.id FROM subscriptions AS s"
    " WHERE s.user_id = ANY(p.users) OR s.org_id = p.org)",
    "webhook_events": "t.user_id = ANY(p.users) OR t.org_id = p.org",
}


@pytest.fixture
async def scene(engine: AsyncEngine) -> MixedCallers:
    """The three kinds of caller, with limits on the plan, the key and the tool that a call
    never reaches."""
    callers = await mixed_callers(engine, requests_per_minute=100_000)
    await run_sql(
        engine, "UPDATE api_keys SET requests_per_minute = 100000 WHERE user_id = :u", u=callers.users[1]
    )
    return callers


async def _written(scene: MixedCallers, driver: Any) -> dict[str, list[Any]]:
    """Every row of `_TABLES` the scene's calls may have written."""
    args = (scene.users, scene.tool_id, scene.org_id)
    return {
        table: [row[0] for row in await driver.fetch(_WRITTEN.format(table=table, where=where), *args)]
        for table, where in _TABLES.items()
    }


def _again(req: AdmitRequest) -> AdmitRequest:
    """The same call, as a new one."""
    return admit_request(req.tool_id, req.tool_version or req.now, req.credential, reserve=req.reserve)


Setup = Callable[[Any], Awaitable[Any]]


async def _both_ways(
    engine: AsyncEngine,
    scene: MixedCallers,
    statement: Callable[[bool], tuple[Any, dict[str, Any]]],
    setup: Setup,
) -> list[tuple[list[dict[str, Any]], dict[str, list[Any]]]]:
    """The statement rendered for a lone call and for a batch, each run on the same rows after
    `setup`: what each answered and what each wrote."""
    outcomes = []
    for many in (False, True):
        async with rolled_back(engine) as driver:
            await setup(driver)
            sql, names = compiled(statement(many)[0])
            params = statement(many)[1]
            answered = [dict(row) for row in await driver.fetch(sql, *(params[n] for n in names))]
            outcomes.append((answered, await _written(scene, driver)))
    return outcomes


def _admission(req: AdmitRequest) -> Callable[[bool], tuple[Any, dict[str, Any]]]:
    def rendered(many: bool) -> tuple[Any, dict[str, Any]]:
        _, params = metering.admit_statement([req])
        return metering._admit_sql(dataclasses.replace(AdmitShape.of([req]), many=many)), params

    return rendered


@pytest.mark.parametrize("who", ["personal", "api key", "organization"])
async def test_a_lone_admission_admits_alike_either_way(
    engine: AsyncEngine, scene: MixedCallers, who: str
) -> None:
    async def nothing(driver: Any) -> None:
        return None

    (lone, lone_wrote), (batch, batch_wrote) = await _both_ways(
        engine, scene, _admission(scene.calls[who]), nothing
    )
    assert lone[0]["admitted"] is True
    assert lone == batch
    assert lone_wrote == batch_wrote


@pytest.mark.parametrize("who", ["personal", "api key", "organization"])
async def test_a_lone_refusal_is_counted_alike_either_way(
    engine: AsyncEngine, scene: MixedCallers, who: str
) -> None:
    """The tool's rate limit spent for the next hour: the call is refused and counted in the
    rollups' refusals (the personal or the organization's, and the platform's)."""
    req = scene.calls[who]

    async def spent(driver: Any) -> None:
        await driver.execute(
            "UPDATE tools SET rate_tat = $2 WHERE id = $1", scene.tool_id, req.now + timedelta(hours=1)
        )

    (lone, lone_wrote), (batch, batch_wrote) = await _both_ways(engine, scene, _admission(req), spent)
    assert lone[0]["admitted"] is False and lone[0]["tool_rate_ok"] is False
    assert lone == batch
    assert lone_wrote == batch_wrote
    assert any(row["rate_limited"] == 1 for row in lone_wrote["usage_platform_daily"])


@pytest.mark.parametrize("who", ["personal", "api key", "organization"])
async def test_a_lone_settle_charges_and_counts_alike_either_way(
    engine: AsyncEngine, scene: MixedCallers, who: str
) -> None:
    """Admitted in the transaction, then settled — with the account so near its limit that the
    charge crosses a quota threshold (an alert and its event are written too)."""
    req = _again(scene.calls[who])
    settles = []

    async def admitted_near_the_limit(driver: Any) -> None:
        await driver.execute(
            """UPDATE subscriptions AS s SET tokens_used = p.token_limit * 8 / 10 - 2 FROM plans AS p
               WHERE p.code = s.plan_code AND (s.user_id = ANY($1) OR s.org_id = $2)""",
            scene.users,
            scene.org_id,
        )
        [result] = await MeteringConnection(DriverSession(driver)).admit_many([req])
        assert result.admission is not None
        settles[:] = [
            dataclasses.replace(success_settle(result.admission), now=req.now + timedelta(milliseconds=5))
        ]

    def rendered(many: bool) -> tuple[Any, dict[str, Any]]:
        _, params = settle_statement(settles)
        return metering._settle_sql(dataclasses.replace(SettleShape.of(settles), many=many)), params

    (lone, lone_wrote), (batch, batch_wrote) = await _both_ways(
        engine, scene, rendered, admitted_near_the_limit
    )
    assert len(lone) == 1 and lone == batch
    assert lone_wrote == batch_wrote
    assert [log["status"] for log in lone_wrote["usage_logs"]] == ["success"]
    assert len(lone_wrote["quota_alerts"]) == 1 and len(lone_wrote["webhook_events"]) == 1

"""A lone call's metering statements are the batch statements without the adding up and the
ordering (`core/batch_sql.py`): rendered either way, one call must be admitted, refused, charged
and counted exactly alike. Each call here runs both ways on the same rows, each in a transaction
that is rolled back, and everything the two wrote — accounts, members, keys, the tool's limit,
the usage log, every rollup, quota alerts and their events — and answered is compared."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.auth.credentials import Credential
from joyhub.core.security import token_digest
from joyhub.tools import metering
from joyhub.tools.driver import DriverSession, compiled
from joyhub.tools.metering import AdmitRequest, AdmitShape, MeteringConnection, SettleShape, settle_statement
from tests.orgs.helpers import make_org
from tests.subscriptions.helpers import make_api_key
from tests.tools.helpers import admit_request, make_caller, make_tool, tool_version
from tests.tools.test_statement_plans import _rolled_back, _settle

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


@dataclasses.dataclass
class Scene:
    """Three callers of one tool — a personal caller with an access token, one with an API key of
    its own limit, an organization member billing the organization — with limits on the plan, the
    key and the tool that a call never reaches."""

    tool_id: uuid.UUID
    org_id: uuid.UUID
    users: list[uuid.UUID]
    calls: dict[str, AdmitRequest]

    def again(self, who: str) -> AdmitRequest:
        """The caller's call, as a new one."""
        req = self.calls[who]
        return admit_request(req.tool_id, req.tool_version or req.now, req.credential, reserve=req.reserve)

    async def written(self, driver: Any) -> dict[str, list[Any]]:
        args = (self.users, self.tool_id, self.org_id)
        return {
            table: [row[0] for row in await driver.fetch(_WRITTEN.format(table=table, where=where), *args)]
            for table, where in _TABLES.items()
        }


@pytest.fixture
async def scene(engine: AsyncEngine) -> Scene:
    tool = await make_tool(engine, "http://127.0.0.1:9/unused", requests_per_minute=100_000)
    version = await tool_version(engine, tool)
    plain = await make_caller(engine, "pro")
    keyed = await make_caller(engine, "pro")
    key = await make_api_key(engine, keyed.user_id)
    org = await make_org(engine, admins=1, members=1, token_limit=1000)
    member = org.of("member")
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE api_keys SET requests_per_minute = 100000 WHERE user_id = :u"),
                           {"u": keyed.user_id})  # fmt: skip
    return Scene(
        tool,
        org.id,
        [plain.user_id, keyed.user_id, member.user_id],
        {
            "personal": admit_request(
                tool,
                version,
                Credential(user_id=plain.user_id, session_id=plain.account.session_id),
                reserve=10,
            ),
            "api key": admit_request(tool, version, Credential(api_key_digest=token_digest(key)), reserve=10),
            "organization": admit_request(
                tool,
                version,
                Credential(user_id=member.user_id, session_id=member.session_id, org_id=org.id),
                reserve=10,
            ),
        },
    )


Setup = Callable[[Any], Awaitable[Any]]


async def _both_ways(
    engine: AsyncEngine, scene: Scene, statement: Callable[[bool], tuple[Any, dict[str, Any]]], setup: Setup
) -> list[tuple[list[dict[str, Any]], dict[str, list[Any]]]]:
    """The statement rendered for a lone call and for a batch, each run on the same rows after
    `setup`: what each answered and what each wrote."""
    outcomes = []
    for many in (False, True):
        async with _rolled_back(engine) as driver:
            await setup(driver)
            sql, names = compiled(statement(many)[0])
            params = statement(many)[1]
            answered = [dict(row) for row in await driver.fetch(sql, *(params[n] for n in names))]
            outcomes.append((answered, await scene.written(driver)))
    return outcomes


def _admission(req: AdmitRequest) -> Callable[[bool], tuple[Any, dict[str, Any]]]:
    def rendered(many: bool) -> tuple[Any, dict[str, Any]]:
        _, params = metering.admit_statement([req])
        return metering._admit_sql(dataclasses.replace(AdmitShape.of([req]), many=many)), params

    return rendered


@pytest.mark.parametrize("who", ["personal", "api key", "organization"])
async def test_a_lone_admission_admits_alike_either_way(engine: AsyncEngine, scene: Scene, who: str) -> None:
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
    engine: AsyncEngine, scene: Scene, who: str
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
    engine: AsyncEngine, scene: Scene, who: str
) -> None:
    """Admitted in the transaction, then settled — with the account so near its limit that the
    charge crosses a quota threshold (an alert and its event are written too)."""
    req = scene.again(who)
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
        settles[:] = [dataclasses.replace(_settle(result.admission), now=req.now + timedelta(milliseconds=5))]

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

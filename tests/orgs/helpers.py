"""Helpers of the teams tests: organizations, members and their subscription straight into the
database (fast, for many members), and readers of the organization's ledger."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from tests.factories import Account, make_account

API = "/api/v1"


@dataclass
class Org:
    id: uuid.UUID
    owner: Account
    members: dict[str, list[Account]] = field(default_factory=dict)

    def of(self, role: str) -> Account:
        return self.owner if role == "owner" else self.members[role][0]


async def make_org(
    engine: AsyncEngine,
    *,
    admins: int = 1,
    members: int = 1,
    plan: str | None = "pro",
    tokens_used: int = 0,
    token_limit: int | None = None,
) -> Org:
    """An organization with an owner, `admins` admins and `members` members (each member with
    `token_limit`), subscribed to `plan`."""
    owner = await make_account(engine, name="Owner")
    org = Org(uuid.uuid4(), owner, {"admin": [], "member": []})
    now = utcnow()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO organizations (id, name, created_by, created_at, updated_at)"
                " VALUES (:id, 'Acme', :u, :now, :now)"
            ),
            {"id": org.id, "u": owner.user_id, "now": now},
        )
    await add_member(engine, org.id, owner, "owner")
    for role, n in (("admin", admins), ("member", members)):
        for _ in range(n):
            acct = await make_account(engine)
            limit = token_limit if role == "member" else None
            await add_member(engine, org.id, acct, role, token_limit=limit)
            org.members[role].append(acct)
    if plan is not None:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO subscriptions (id, org_id, plan_code, status, tokens_used,"
                    " tokens_reserved, inflight, current_period_start, current_period_end,"
                    " cancel_at_period_end, created_at, updated_at)"
                    " VALUES (:id, :org, :plan, 'active', :used, 0, 0, :now, :end, false, :now, :now)"
                ),
                {
                    "id": uuid.uuid4(),
                    "org": org.id,
                    "plan": plan,
                    "used": tokens_used,
                    "now": now,
                    "end": now + timedelta(days=30),
                },
            )
    return org


async def add_member(
    engine: AsyncEngine, org_id: uuid.UUID, acct: Account, role: str, *, token_limit: int | None = None
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO organization_members (org_id, user_id, role, token_limit, tokens_used,"
                " tokens_reserved, joined_at) VALUES (:o, :u, :r, :l, 0, 0, now())"
            ),
            {"o": org_id, "u": acct.user_id, "r": role, "l": token_limit},
        )


@dataclass
class OrgLedger:
    tokens_used: int
    tokens_reserved: int
    inflight: int
    member_used: dict[uuid.UUID, int]
    member_reserved: int
    log_tokens: int
    rollup_tokens: int


async def org_ledger(engine: AsyncEngine, org_id: uuid.UUID) -> OrgLedger:
    async with engine.connect() as conn:
        sub = (
            await conn.execute(
                text("SELECT tokens_used, tokens_reserved, inflight FROM subscriptions WHERE org_id = :o"),
                {"o": org_id},
            )
        ).one()
        members = (
            await conn.execute(
                text(
                    "SELECT user_id, tokens_used, tokens_reserved FROM organization_members WHERE org_id = :o"
                ),
                {"o": org_id},
            )
        ).all()
        logs = (
            await conn.execute(
                text("SELECT COALESCE(SUM(tokens_used), 0) FROM usage_logs WHERE org_id = :o"), {"o": org_id}
            )
        ).scalar_one()
        rollup = (
            await conn.execute(
                text("SELECT COALESCE(SUM(tokens), 0) FROM usage_org_daily WHERE org_id = :o"), {"o": org_id}
            )
        ).scalar_one()
    return OrgLedger(
        sub.tokens_used,
        sub.tokens_reserved,
        sub.inflight,
        {m.user_id: m.tokens_used for m in members},
        sum(m.tokens_reserved for m in members),
        int(logs),
        int(rollup),
    )


async def invoke(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    tool_id: uuid.UUID,
    *,
    org_id: uuid.UUID | None = None,
    value: object = None,
) -> httpx.Response:
    hdrs = dict(headers)
    if org_id is not None:
        hdrs["X-Org-ID"] = str(org_id)
    body = {"input": {"text": "hello"} if value is None else value}
    return await client.post(f"{API}/tools/{tool_id}/invoke", json=body, headers=hdrs)


async def org_key(client: httpx.AsyncClient, org_id: uuid.UUID, acct: Account) -> str:
    r = await client.post(f"{API}/orgs/{org_id}/api-keys", json={"name": "ci"}, headers=acct.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["data"]["key"])

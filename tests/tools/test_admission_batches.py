"""Admissions of many callers share statements (issue 15, and issue 19's organizations): a batch
holds calls to one tool of any callers — personal and organization accounts, sessions and API
keys, each with their own limits — and decides each call exactly as if the calls had come one by
one, in order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.auth.credentials import Credential
from joyhub.core.clock import utcnow
from joyhub.core.errors import (
    AppError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    SubscriptionRequired,
)
from joyhub.core.security import token_digest
from joyhub.tools.admit import sql_refusal
from joyhub.tools.metering import AdmitRequest, AdmitResult, MeteringConnection, MeteringStore
from tests.factories import make_account
from tests.orgs.helpers import make_org, org_ledger
from tests.subscriptions.helpers import make_api_key
from tests.tools.helpers import (
    admit_request,
    assert_settled,
    invoke,
    make_caller,
    make_tool,
    run_sql,
    sub_state,
    tool_version,
)
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration

RESERVE = 10


@dataclass(frozen=True)
class Cast:
    """The callers of one scenario, each a credential with its own situation."""

    quota_edge: Credential  # personal; tokens left for two calls
    key_limited: Credential  # personal API key of 2 requests a minute
    member_limited: Credential  # organization member with tokens for one call
    member_free: Credential  # another member of that organization, no limit of their own
    plain: Credential  # personal session, nothing near a limit
    unsubscribed: Credential  # no subscription
    revoked: Credential  # a session that does not exist
    org_id: uuid.UUID
    users: dict[str, uuid.UUID]


async def _cast(engine: AsyncEngine) -> Cast:
    async with engine.connect() as conn:
        limit = (await conn.execute(text("SELECT token_limit FROM plans WHERE code = 'pro'"))).scalar_one()
    edge = await make_caller(engine, "pro", tokens_used=limit - 2 * RESERVE)
    keyed = await make_caller(engine, "pro")
    key = await make_api_key(engine, keyed.user_id)
    await run_sql(engine, "UPDATE api_keys SET requests_per_minute = 2 WHERE user_id = :u", u=keyed.user_id)
    org = await make_org(engine, admins=1, members=1, token_limit=RESERVE)
    plain = await make_caller(engine, "pro")
    nobody = await make_account(engine)
    limited, free = org.of("member"), org.of("admin")
    return Cast(
        quota_edge=Credential(user_id=edge.user_id, session_id=edge.account.session_id),
        key_limited=Credential(api_key_digest=token_digest(key)),
        member_limited=Credential(user_id=limited.user_id, session_id=limited.session_id, org_id=org.id),
        member_free=Credential(user_id=free.user_id, session_id=free.session_id, org_id=org.id),
        plain=Credential(user_id=plain.user_id, session_id=plain.account.session_id),
        unsubscribed=Credential(user_id=nobody.user_id, session_id=nobody.session_id),
        revoked=Credential(user_id=plain.user_id, session_id=uuid.uuid4()),
        org_id=org.id,
        users={
            "quota_edge": edge.user_id,
            "key_limited": keyed.user_id,
            "member_limited": limited.user_id,
            "member_free": free.user_id,
            "plain": plain.user_id,
        },
    )


def _order(cast: Cast) -> list[tuple[str, Credential]]:
    """Four rounds of every caller, interleaved."""
    names = ["quota_edge", "key_limited", "member_limited", "member_free", "plain", "unsubscribed", "revoked"]
    return [(name, getattr(cast, name)) for _ in range(4) for name in names]


def _request(tool: uuid.UUID, version: Any, credential: Credential) -> AdmitRequest:
    return admit_request(tool, version, credential, reserve=RESERVE)


def _outcome(result: AdmitResult) -> str:
    """What the call got: admitted, or its refusal as the client would see it."""
    if result.admission is not None:
        return "admitted"
    if result.read.user_id is None:
        return "401"
    refusal: AppError | None = sql_refusal(result.read, utcnow())
    assert refusal is not None, result.read
    scope = (refusal.details or [{}])[0].get("scope") if refusal.details else None
    return f"{type(refusal).__name__}:{scope}" if scope else type(refusal).__name__


def _count_statements(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    real = MeteringConnection._admit_statement
    seen = [0]

    async def counted(self: MeteringConnection, reqs: list[AdmitRequest]) -> list[AdmitResult]:
        seen[0] += 1
        return await real(self, reqs)

    monkeypatch.setattr(MeteringConnection, "_admit_statement", counted)
    return lambda: seen[0]


async def test_one_statement_admits_many_callers_exactly_as_one_by_one(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = await make_tool(engine, "http://127.0.0.1:9/unused")
    version = await tool_version(engine, tool)
    store = MeteringStore(engine)
    statements = _count_statements(monkeypatch)

    # the same scenario twice: once as one batch, once call by call
    batched, single = await _cast(engine), await _cast(engine)
    together = await store.admit_batch([_request(tool, version, c) for _, c in _order(batched)])
    assert statements() == 1
    alone = [(await store.admit_batch([_request(tool, version, c)]))[0] for _, c in _order(single)]

    got = [(name, _outcome(r)) for (name, _), r in zip(_order(batched), together, strict=True)]
    assert got == [(name, _outcome(r)) for (name, _), r in zip(_order(single), alone, strict=True)]
    by_caller: dict[str, list[str]] = {}
    for name, outcome in got:
        by_caller.setdefault(name, []).append(outcome)
    assert by_caller == {
        "quota_edge": ["admitted"] * 2 + ["QuotaExceeded"] * 2,
        "key_limited": ["admitted"] * 2 + ["RateLimited:api_key"] * 2,
        "member_limited": ["admitted"] + ["QuotaExceeded:member"] * 3,
        "member_free": ["admitted"] * 4,
        "plain": ["admitted"] * 4,
        "unsubscribed": ["SubscriptionRequired"] * 4,
        "revoked": ["401"] * 4,
    }

    # each account holds exactly what its own admitted calls reserved, and nothing else moved
    for cast in (batched, single):
        for name, calls in (("quota_edge", 2), ("key_limited", 2), ("plain", 4)):
            state = await sub_state(engine, cast.users[name])
            assert (state.tokens_reserved, state.inflight) == (calls * RESERVE, calls), name
        ledger = await org_ledger(engine, cast.org_id)
        assert (ledger.tokens_reserved, ledger.inflight) == (5 * RESERVE, 5)
        async with engine.connect() as conn:
            members = dict(
                (
                    await conn.execute(
                        text("SELECT user_id, tokens_reserved FROM organization_members WHERE org_id = :o"),
                        {"o": cast.org_id},
                    )
                ).all()
            )
            limited = (
                await conn.execute(
                    text("SELECT COALESCE(sum(rate_limited), 0) FROM usage_daily WHERE user_id = :u"),
                    {"u": cast.users["key_limited"]},
                )
            ).scalar_one()
            logs = (
                await conn.execute(
                    text(
                        "SELECT user_id, org_id, count(*) FROM usage_logs WHERE status = 'pending'"
                        " AND user_id = ANY(:users) GROUP BY 1, 2"
                    ),
                    {"users": list(cast.users.values())},
                )
            ).all()
        assert members[cast.users["member_limited"]] == RESERVE
        assert members[cast.users["member_free"]] == 4 * RESERVE
        assert limited == 2  # the key's refusals are counted, once each
        assert sorted((u, o, n) for u, o, n in logs) == sorted(
            [
                (cast.users["quota_edge"], None, 2),
                (cast.users["key_limited"], None, 2),
                (cast.users["member_limited"], cast.org_id, 1),
                (cast.users["member_free"], cast.org_id, 4),
                (cast.users["plain"], None, 4),
            ]
        )


async def test_a_key_billing_two_accounts_in_one_batch_is_decided_in_order(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A personal key of 2 requests a minute, sent without `X-Org-ID` (its user's own account has
    no tokens left) and then twice with it: one by one, the first call is refused for the quota
    and takes no place under the key's limit, so both organization calls pass."""
    tool = await make_tool(engine, "http://127.0.0.1:9/unused")
    version = await tool_version(engine, tool)
    org = await make_org(engine, admins=0, members=1)
    member = org.of("member")
    async with engine.connect() as conn:
        limit = (await conn.execute(text("SELECT token_limit FROM plans WHERE code = 'pro'"))).scalar_one()
    await run_sql(
        engine,
        "INSERT INTO subscriptions (id, user_id, plan_code, status, tokens_used, tokens_reserved, inflight,"
        " current_period_start, current_period_end, cancel_at_period_end, created_at, updated_at)"
        " VALUES (:id, :u, 'pro', 'active', :used, 0, 0, now(), now() + interval '30 days', false,"
        " now(), now())",
        id=uuid.uuid4(),
        u=member.user_id,
        used=limit,
    )
    key = await make_api_key(engine, member.user_id)
    await run_sql(engine, "UPDATE api_keys SET requests_per_minute = 2 WHERE user_id = :u", u=member.user_id)
    personal = Credential(api_key_digest=token_digest(key))
    billed = Credential(api_key_digest=token_digest(key), org_id=org.id)
    statements = _count_statements(monkeypatch)
    results = await MeteringStore(engine).admit_batch(
        [_request(tool, version, c) for c in (personal, billed, billed)]
    )
    assert [_outcome(r) for r in results] == ["QuotaExceeded", "admitted", "admitted"]
    assert statements() == 2  # the key's calls to each account in a statement of their own, in order


async def test_many_callers_in_parallel_share_admission_statements_and_stay_exact(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    hubs = [await make_client(), await make_client()]
    callers = [await make_caller(engine, "pro") for _ in range(24)]
    tool = await make_tool(engine, upstream.url("/tokens_used?n=3"))
    results = await asyncio.gather(
        *(invoke(hubs[i % 2], callers[i % 24], tool, {"i": i}) for i in range(24 * 8))
    )
    assert {r.status_code for r in results} == {200}, [r.text for r in results if r.status_code != 200][:3]
    for caller in callers:
        await assert_settled(engine, caller)
        assert (await sub_state(engine, caller.user_id)).tokens_used == 8 * 3
    batched = sum(h.app.state.gateway.admissions.items - h.app.state.gateway.admissions.batches for h in hubs)
    assert batched > 0  # separate callers' calls went in shared statements


async def test_an_unknown_org_in_a_batch_refuses_only_its_own_call(engine: AsyncEngine) -> None:
    tool = await make_tool(engine, "http://127.0.0.1:9/unused")
    version = await tool_version(engine, tool)
    plain = await make_caller(engine, "pro")
    session = Credential(user_id=plain.user_id, session_id=plain.account.session_id)
    asked = Credential(user_id=plain.user_id, session_id=plain.account.session_id, org_id=uuid.uuid4())
    results = await MeteringStore(engine).admit_batch(
        [_request(tool, version, c) for c in (session, asked, session)]
    )
    assert [r.admission is not None for r in results] == [True, False, True]
    assert isinstance(sql_refusal(results[1].read, utcnow()), NotFound)
    assert not isinstance(
        sql_refusal(results[1].read, utcnow()), (QuotaExceeded, RateLimited, SubscriptionRequired)
    )

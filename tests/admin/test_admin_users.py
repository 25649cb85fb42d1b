"""GET/PATCH /admin/users: the operator's view of accounts, the last-admin rule, disabling."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import iso_utc, utcnow
from tests.factories import make_account, make_admin, make_subscription
from tests.usage.factories import make_api_key

pytestmark = pytest.mark.integration

URL = "/api/v1/admin/users"


async def test_list_rows_carry_subscription_last_login_and_key_count(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine, email="root@example.com")
    user = await make_account(engine, email="alice@example.com", name="Alice")
    now = utcnow()
    await make_subscription(engine, user.user_id, "pro", tokens_used=1234)
    await make_api_key(engine, user.user_id)  # counted
    await make_api_key(engine, user.user_id, is_active=False, revoked_at=now)  # revoked
    await make_api_key(engine, user.user_id, expires_at=now - timedelta(minutes=1))  # expired
    await make_api_key(engine, user.user_id, expires_at=now + timedelta(days=1))  # counted
    login = now - timedelta(hours=2)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE users SET last_login_at = :t WHERE id = :u"), {"t": login, "u": user.user_id}
        )

    r = await client.get(URL, headers=admin.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["meta"]["pagination"] == {"offset": 0, "limit": 20, "total": 2}
    rows = {row["email"]: row for row in body["data"]}
    alice = rows["alice@example.com"]
    assert set(alice) == {
        "id",
        "name",
        "email",
        "role",
        "is_active",
        "created_at",
        "updated_at",
        "subscription",
        "last_login_at",
        "api_key_count",
    }
    assert alice["id"] == str(user.user_id) and alice["name"] == "Alice" and alice["role"] == "user"
    assert alice["is_active"] is True and alice["api_key_count"] == 2
    assert alice["last_login_at"] == iso_utc(login)
    sub = alice["subscription"]
    assert (sub["plan"], sub["status"], sub["tokens_used"], sub["token_limit"]) == (
        "pro",
        "active",
        1234,
        50000,
    )
    assert sub["current_period_end"].endswith("Z")
    assert rows["root@example.com"]["subscription"] is None
    assert rows["root@example.com"]["api_key_count"] == 0
    assert "password_hash" not in r.text and "$2b$" not in r.text

    r = await client.get(f"{URL}/{user.user_id}", headers=admin.headers)
    assert r.status_code == 200 and r.json()["data"] == alice


async def test_a_due_subscription_is_shown_as_of_now_without_writing(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    start = utcnow() - timedelta(days=35)
    await make_subscription(
        engine,
        user.user_id,
        "pro",
        tokens_used=900,
        current_period_start=start,
        current_period_end=start + timedelta(days=30),
    )
    cancelled = await make_account(engine)
    await make_subscription(
        engine,
        cancelled.user_id,
        "pro",
        tokens_used=10,
        current_period_start=start,
        current_period_end=start + timedelta(days=30),
        cancel_at_period_end=True,
    )
    data = (await client.get(f"{URL}/{user.user_id}", headers=admin.headers)).json()["data"]["subscription"]
    assert data["tokens_used"] == 0 and data["status"] == "active"
    assert data["current_period_end"] == iso_utc(start + timedelta(days=60))
    data = (await client.get(f"{URL}/{cancelled.user_id}", headers=admin.headers)).json()["data"][
        "subscription"
    ]
    assert data["status"] == "cancelled"
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT tokens_used FROM subscriptions WHERE user_id = :u"), {"u": user.user_id}
            )
        ).scalar_one()
    assert stored == 900


async def test_newest_first_and_paging(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    made = [admin.user_id]
    for _ in range(6):
        made.append((await make_account(engine)).user_id)
    seen = []
    for offset in (0, 3, 6):
        r = await client.get(URL, headers=admin.headers, params={"offset": offset, "limit": 3})
        assert r.json()["meta"]["pagination"]["total"] == 7
        seen += [row["id"] for row in r.json()["data"]]
    assert seen == [str(u) for u in reversed(made)]


async def test_search_role_and_active_filters(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine, email="boss@corp.example", name="The Boss")
    await make_account(engine, email="carol@example.com", name="Carol 100% Real")
    await make_account(engine, email="dave@example.com", name="Dave 1000 Real")
    await make_account(engine, email="a_b@example.com", name="Underscore")
    await make_account(engine, email="axb@example.com", name="Lookalike")
    await make_account(engine, email="erin@example.com", name="Erin", is_active=False)
    await make_admin(engine, email="ops@corp.example", name="Ops", is_active=False)

    async def emails(**params: str) -> set[str]:
        r = await client.get(URL, headers=admin.headers, params=params)
        assert r.status_code == 200, r.text
        assert r.json()["meta"]["pagination"]["total"] == len(r.json()["data"])
        return {row["email"] for row in r.json()["data"]}

    assert await emails(search="CAROL") == {"carol@example.com"}
    assert await emails(search="corp.EXAMPLE") == {"boss@corp.example", "ops@corp.example"}
    assert await emails(search="0%") == {"carol@example.com"}  # % is literal
    assert await emails(search="a_b") == {"a_b@example.com"}  # _ is literal
    assert await emails(search="\\") == set()
    assert await emails(search="  real ") == {"carol@example.com", "dave@example.com"}
    assert await emails(role="admin") == {"boss@corp.example", "ops@corp.example"}
    assert await emails(is_active="false") == {"erin@example.com", "ops@corp.example"}
    assert await emails(role="admin", is_active="true") == {"boss@corp.example"}
    assert await emails(role="user", search="erin", is_active="false") == {"erin@example.com"}
    assert len(await emails()) == 7
    assert await emails(search=str(admin.user_id)) == {"boss@corp.example"}
    for params in ({"role": "root"}, {"is_active": "maybe"}, {"search": "x" * 101}, {"search": "a\x00b"}):
        r = await client.get(URL, headers=admin.headers, params=params)
        assert r.status_code == 422, params
        assert r.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_detail_unknown_and_malformed_ids(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    r = await client.get(f"{URL}/{uuid.uuid4()}", headers=admin.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    r = await client.get(f"{URL}/not-a-uuid", headers=admin.headers)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "path.user_id"
    r = await client.patch(f"{URL}/{uuid.uuid4()}", headers=admin.headers, json={"name": "x"})
    assert r.status_code == 404
    r = await client.patch(f"{URL}/nope", headers=admin.headers, json={"name": "x"})
    assert r.status_code == 422


async def test_patch_updates_and_audits(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine, name="Before")
    r = await client.patch(
        f"{URL}/{user.user_id}",
        headers={**admin.headers, "X-Request-ID": "req-patch-1"},
        json={"name": "  After  ", "role": "admin"},
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["name"], data["role"], data["is_active"]) == ("After", "admin", True)
    assert data["updated_at"] > data["created_at"]
    logs = (await client.get("/api/v1/admin/audit-logs", headers=admin.headers)).json()["data"]
    assert len(logs) == 1
    entry = logs[0]
    assert entry["action"] == "user.update" and entry["target_type"] == "user"
    assert entry["target_id"] == str(user.user_id)
    assert entry["actor_id"] == str(admin.user_id) and entry["actor_email"] == admin.email
    assert entry["request_id"] == "req-patch-1"
    assert entry["changes"] == {
        "name": {"before": "Before", "after": "After"},
        "role": {"before": "user", "after": "admin"},
    }
    # a PATCH that changes nothing writes nothing
    r = await client.patch(f"{URL}/{user.user_id}", headers=admin.headers, json={"name": "After"})
    assert r.status_code == 200
    r = await client.patch(f"{URL}/{user.user_id}", headers=admin.headers, json={})
    assert r.status_code == 200
    logs = (await client.get("/api/v1/admin/audit-logs", headers=admin.headers)).json()["data"]
    assert len(logs) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"email": "x@example.com"},
        {"password": "Sneaky-Pass-1"},
        {"name": None},
        {"role": None},
        {"is_active": None},
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 101},
        {"name": "a\x00b"},
        {"role": "superuser"},
        {"is_active": "false"},
        {"is_active": 0},
    ],
)
async def test_patch_rejects_bad_bodies(
    client: httpx.AsyncClient, engine: AsyncEngine, body: dict[str, object]
) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    r = await client.patch(f"{URL}/{user.user_id}", headers=admin.headers, json=body)
    assert r.status_code == 422, body
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    assert r.json()["error"]["details"][0]["field"].startswith("body")


async def test_the_last_active_admin_cannot_demote_or_disable_themselves(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    await make_admin(engine, is_active=False)  # a disabled admin does not count
    for body in ({"role": "user"}, {"is_active": False}, {"role": "user", "is_active": False}):
        r = await client.patch(f"{URL}/{admin.user_id}", headers=admin.headers, json=body)
        assert r.status_code == 409, body
        assert r.json()["error"]["code"] == "CONFLICT"
    # renaming oneself is fine
    r = await client.patch(f"{URL}/{admin.user_id}", headers=admin.headers, json={"name": "Still Admin"})
    assert r.status_code == 200
    # with a second active admin, stepping down is allowed
    other = await make_admin(engine)
    r = await client.patch(f"{URL}/{admin.user_id}", headers=admin.headers, json={"role": "user"})
    assert r.status_code == 200
    r = await client.patch(f"{URL}/{other.user_id}", headers=other.headers, json={"is_active": False})
    assert r.status_code == 409


async def test_two_admins_demoting_each_other_at_once_leave_one_admin(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    for body in ({"role": "user"}, {"is_active": False}):
        a, b = await make_admin(engine), await make_admin(engine)
        ra, rb = await asyncio.gather(
            client.patch(f"{URL}/{b.user_id}", headers=a.headers, json=body),
            client.patch(f"{URL}/{a.user_id}", headers=b.headers, json=body),
        )
        statuses = sorted([ra.status_code, rb.status_code])
        # the winner demotes the other; the loser is refused: last admin (409) or, once demoted
        # before its own request got the locks, no longer an admin (403, or 401 once disabled)
        assert statuses[0] == 200 and statuses[1] in (401, 403, 409), (body, statuses)
        async with engine.connect() as conn:
            remaining = (
                await conn.execute(
                    text("SELECT count(*) FROM users WHERE role = 'admin' AND is_active AND id IN (:a, :b)"),
                    {"a": a.user_id, "b": b.user_id},
                )
            ).scalar_one()
        assert remaining == 1
        async with engine.begin() as conn:  # reset for the next round
            await conn.execute(text("UPDATE users SET role = 'user', is_active = false WHERE role = 'admin'"))


async def test_two_admins_stepping_down_at_once_leave_one_admin(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Each sees two admins if it reads without locking; the row locks make the second one see
    the first one's demotion and refuse with 409."""
    for round_ in range(3):
        a, b = await make_admin(engine), await make_admin(engine)
        body = {"role": "user"} if round_ % 2 == 0 else {"is_active": False}
        results = await asyncio.gather(
            client.patch(f"{URL}/{a.user_id}", headers=a.headers, json=body),
            client.patch(f"{URL}/{b.user_id}", headers=b.headers, json=body),
        )
        assert sorted(r.status_code for r in results) == [200, 409]
        assert [r.json()["error"]["code"] for r in results if r.status_code == 409] == ["CONFLICT"]
        async with engine.begin() as conn:
            remaining = (
                await conn.execute(text("SELECT count(*) FROM users WHERE role = 'admin' AND is_active"))
            ).scalar_one()
            assert remaining == 1
            await conn.execute(text("UPDATE users SET role = 'user', is_active = false WHERE role = 'admin'"))


async def test_three_admins_in_a_circle(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    a, b, c = await make_admin(engine), await make_admin(engine), await make_admin(engine)
    results = await asyncio.gather(
        client.patch(f"{URL}/{b.user_id}", headers=a.headers, json={"role": "user"}),
        client.patch(f"{URL}/{c.user_id}", headers=b.headers, json={"role": "user"}),
        client.patch(f"{URL}/{a.user_id}", headers=c.headers, json={"role": "user"}),
    )
    assert all(r.status_code in (200, 403, 409) for r in results)
    async with engine.connect() as conn:
        remaining = (
            await conn.execute(text("SELECT count(*) FROM users WHERE role = 'admin' AND is_active"))
        ).scalar_one()
    assert remaining >= 1


async def test_disabling_kills_sessions_and_api_keys_at_once(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    key = await make_api_key(engine, user.user_id)
    assert (await client.get("/api/v1/usage", headers=user.headers)).status_code == 200
    assert (await client.get("/api/v1/usage", headers={"X-API-Key": key})).status_code == 200

    r = await client.patch(f"{URL}/{user.user_id}", headers=admin.headers, json={"is_active": False})
    assert r.status_code == 200 and r.json()["data"]["is_active"] is False
    for headers in (user.headers, {"X-API-Key": key}):
        r = await client.get("/api/v1/usage", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_TOKEN"
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT revoked_at, revoke_reason FROM auth_sessions WHERE user_id = :u"),
                {"u": user.user_id},
            )
        ).all()
    assert rows and all(row.revoked_at is not None and row.revoke_reason == "disabled" for row in rows)
    entry = (await client.get("/api/v1/admin/audit-logs", headers=admin.headers)).json()["data"][0]
    assert entry["changes"]["is_active"] == {"before": True, "after": False}
    assert entry["changes"]["sessions_revoked"] == 1

    # enabling again: the key works again, the old login stays dead
    r = await client.patch(f"{URL}/{user.user_id}", headers=admin.headers, json={"is_active": True})
    assert r.status_code == 200
    assert (await client.get("/api/v1/usage", headers={"X-API-Key": key})).status_code == 200
    assert (await client.get("/api/v1/usage", headers=user.headers)).status_code == 401


async def test_no_secret_ever_reaches_an_audit_row(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    key = await make_api_key(engine, user.user_id)
    for body in (
        {"name": "New Name"},
        {"role": "admin"},
        {"role": "user"},
        {"is_active": False},
        {"is_active": True},
    ):
        r = await client.patch(f"{URL}/{user.user_id}", headers=admin.headers, json=body)
        assert r.status_code == 200
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT changes::text, actor_email FROM audit_logs"))).all()
        hashes = (await conn.execute(text("SELECT password_hash FROM users"))).scalars().all()
    assert len(rows) == 5
    dump = " ".join(row[0] for row in rows)
    for secret in [key, user.access_token, admin.access_token, user.password, *hashes]:
        assert secret not in dump
    assert "password" not in dump and "$2b$" not in dump


async def test_disabling_also_kills_refresh_tokens_and_blocks_login(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    r = await client.post("/api/v1/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 200, r.text
    pair = r.json()["data"]
    r = await client.patch(f"{URL}/{user.user_id}", headers=admin.headers, json={"is_active": False})
    assert r.status_code == 200
    assert r.json()["data"]["is_active"] is False
    r = await client.get("/api/v1/usage", headers={"Authorization": f"Bearer {pair['access_token']}"})
    assert r.status_code == 401
    r = await client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert r.status_code == 401
    r = await client.post("/api/v1/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 403 and r.json()["error"]["code"] == "ACCOUNT_DISABLED"

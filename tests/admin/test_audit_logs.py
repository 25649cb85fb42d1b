"""GET /admin/audit-logs: newest first, filters, paging; entries as written by core.audit."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core import audit
from joyhub.core.clock import clock
from joyhub.core.db import make_sessionmaker
from joyhub.models import User
from tests.factories import make_admin

pytestmark = pytest.mark.integration

URL = "/api/v1/admin/audit-logs"


async def write(
    engine: AsyncEngine, actor: uuid.UUID | None, action: str, target_type: str, target_id: str
) -> None:
    async with make_sessionmaker(engine)() as db, db.begin():
        user = await db.get(User, actor) if actor else None
        audit.record(
            db,
            actor=user,
            action=action,
            target_type=target_type,
            target_id=target_id,
            changes={"name": {"before": "a", "after": "b"}, "auth_header_value": "s3cr3t"},
        )
    clock.advance(timedelta(seconds=1))


async def test_entries_newest_first_with_filters_and_paging(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine, email="boss@example.com")
    other = await make_admin(engine)
    tool_id = str(uuid.uuid4())
    await write(engine, admin.user_id, "tool.create", "tool", tool_id)
    await write(engine, admin.user_id, "tool.update", "tool", tool_id)
    await write(engine, other.user_id, "plan.update", "plan", "pro")
    await write(engine, None, "subscription.renew", "subscription", str(uuid.uuid4()))
    await write(engine, other.user_id, "user.update", "user", str(admin.user_id))

    r = await client.get(URL, headers=admin.headers)
    assert r.status_code == 200
    data = r.json()["data"]
    assert [e["action"] for e in data] == [
        "user.update",
        "subscription.renew",
        "plan.update",
        "tool.update",
        "tool.create",
    ]
    assert r.json()["meta"]["pagination"] == {"offset": 0, "limit": 20, "total": 5}
    first = data[-1]
    assert set(first) == {
        "id",
        "actor_id",
        "actor_email",
        "action",
        "target_type",
        "target_id",
        "changes",
        "request_id",
        "created_at",
    }
    assert (first["actor_id"], first["actor_email"]) == (str(admin.user_id), "boss@example.com")
    assert first["changes"] == {"name": {"before": "a", "after": "b"}, "auth_header_value": "***"}
    assert first["created_at"].endswith("Z")
    assert data[1]["actor_id"] is None and data[1]["actor_email"] is None

    async def actions(**params: str) -> list[str]:
        r = await client.get(URL, headers=admin.headers, params=params)
        assert r.status_code == 200, r.text
        return [e["action"] for e in r.json()["data"]]

    assert await actions(actor_id=str(admin.user_id)) == ["tool.update", "tool.create"]
    assert await actions(action="plan.update") == ["plan.update"]
    assert await actions(target_type="tool") == ["tool.update", "tool.create"]
    assert await actions(target_type="tool", action="tool.create") == ["tool.create"]
    assert await actions(target_type="user", target_id=str(admin.user_id)) == ["user.update"]
    assert await actions(target_type="subscription") == ["subscription.renew"]
    assert await actions(action="user.delete") == []
    assert await actions(actor_id=str(uuid.uuid4())) == []

    r = await client.get(URL, headers=admin.headers, params={"offset": 2, "limit": 2})
    assert [e["action"] for e in r.json()["data"]] == ["plan.update", "tool.update"]
    assert r.json()["meta"]["pagination"] == {"offset": 2, "limit": 2, "total": 5}


@pytest.mark.parametrize(
    "params",
    [
        {"target_type": "session"},
        {"target_type": "USER"},
        {"actor_id": "not-a-uuid"},
        {"action": "x" * 65},
        {"action": "user\x00.update"},
        {"limit": "500"},
    ],
)
async def test_bad_filters_are_422(
    client: httpx.AsyncClient, engine: AsyncEngine, params: dict[str, str]
) -> None:
    admin = await make_admin(engine)
    r = await client.get(URL, headers=admin.headers, params=params)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"

"""Admin-only everywhere: 401 anonymous, 403 for a user (access token or API key), 200 for admins."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import make_account, make_admin
from tests.usage.factories import make_api_key

pytestmark = pytest.mark.integration


def routes(target: uuid.UUID) -> list[tuple[str, str, dict[str, object] | None]]:
    return [
        ("GET", "/api/v1/admin/users", None),
        ("GET", f"/api/v1/admin/users/{target}", None),
        ("PATCH", f"/api/v1/admin/users/{target}", {"name": "Renamed"}),
        ("GET", "/api/v1/admin/usage/stats", None),
        ("GET", "/api/v1/admin/audit-logs", None),
    ]


async def test_anonymous_is_401_everywhere(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    target = await make_account(engine)
    for method, path, body in routes(target.user_id):
        r = await client.request(method, path, json=body)
        assert r.status_code == 401, (method, path)
        assert r.json()["error"]["code"] == "NOT_AUTHENTICATED"
        r = await client.request(method, path, json=body, headers={"Authorization": "Bearer not-a-token"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "INVALID_TOKEN"


async def test_a_user_is_403_everywhere_with_a_token_or_an_api_key(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    key = await make_api_key(engine, user.user_id)
    for method, path, body in routes(user.user_id):
        for headers in (user.headers, {"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
            r = await client.request(method, path, json=body, headers=headers)
            assert r.status_code == 403, (method, path, headers)
            assert r.json()["error"]["code"] == "FORBIDDEN"
    # nothing was changed by the refused PATCH
    admin = await make_admin(engine)
    r = await client.get(f"/api/v1/admin/users/{user.user_id}", headers=admin.headers)
    assert r.json()["data"]["name"] == "Test User"


async def test_admins_get_through_with_a_token_or_an_api_key(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    key = await make_api_key(engine, admin.user_id)
    target = await make_account(engine)
    for method, path, body in routes(target.user_id):
        for headers in (admin.headers, {"X-API-Key": key}):
            r = await client.request(method, path, json=body, headers=headers)
            assert r.status_code == 200, (method, path, r.text)


async def test_a_demoted_admin_loses_access_at_once(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    first, second = await make_admin(engine), await make_admin(engine)
    r = await client.patch(
        f"/api/v1/admin/users/{second.user_id}", headers=first.headers, json={"role": "user"}
    )
    assert r.status_code == 200
    r = await client.get("/api/v1/admin/users", headers=second.headers)
    assert r.status_code == 403

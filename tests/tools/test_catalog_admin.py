"""The catalog (API.md §5) and the admin tool endpoints (API.md §7)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from tests.factories import make_account, make_admin
from tests.tools.helpers import make_tool

pytestmark = pytest.mark.integration

ADMIN = "/api/v1/admin/tools"
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
USER_FIELDS = {
    "id",
    "name",
    "description",
    "category",
    "input_schema",
    "min_plan",
    "streaming",  # API.md §5.1
    "protocol",  # API.md §12
    "is_active",
    "created_at",
    "updated_at",
}


def _new(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": f"Tool {uuid.uuid4().hex[:6]}",
        "description": "does things",
        "api_endpoint": "http://127.0.0.1:9/run",
    }
    body.update(over)
    return body


async def test_catalog_lists_active_live_tools_by_name_without_secrets(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await make_tool(
        engine,
        "http://x.test/a",
        name="beta",
        category="text",
        auth_header_name="X-K",
        auth_header_value="topsecret",
    )
    await make_tool(engine, "http://x.test/b", name="Alpha", category="Images")
    await make_tool(engine, "http://x.test/c", name="gamma-off", is_active=False)
    await make_tool(
        engine,
        "http://x.test/d",
        name="delta-gone",
        deleted_at=utcnow(),
    )
    r = await client.get("/api/v1/tools", headers=user.headers)
    assert r.status_code == 200
    body = r.json()
    assert [t["name"] for t in body["data"]] == ["Alpha", "beta"]
    assert body["meta"]["pagination"] == {"offset": 0, "limit": 20, "total": 2}
    for item in body["data"]:
        assert set(item) == USER_FIELDS
    assert "topsecret" not in r.text and "x.test" not in r.text
    # one tool
    tool_id = body["data"][1]["id"]
    r = await client.get(f"/api/v1/tools/{tool_id}", headers=user.headers)
    assert r.status_code == 200 and set(r.json()["data"]) == USER_FIELDS
    assert "topsecret" not in r.text and "x.test" not in r.text


async def test_catalog_search_category_pagination(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    await make_tool(engine, "http://x.test/", name="Summariser", description="shortens text", category="text")
    await make_tool(engine, "http://x.test/", name="100% Real", description="percent", category="fun")
    await make_tool(engine, "http://x.test/", name="under_score", description="x", category="fun")
    await make_tool(engine, "http://x.test/", name="underXscore", description="x", category="FUN")

    async def names(**params: Any) -> list[str]:
        r = await client.get("/api/v1/tools", params=params, headers=user.headers)
        assert r.status_code == 200, r.text
        return [t["name"] for t in r.json()["data"]]

    assert await names(search="SHORTENS") == ["Summariser"]
    assert await names(search="%") == ["100% Real"]  # % is literal
    assert await names(search="_") == ["under_score"]  # _ is literal
    assert await names(category="fun") == ["100% Real", "under_score", "underXscore"]
    assert await names(category="fun", limit=1, offset=1) == ["under_score"]
    r = await client.get("/api/v1/tools", params={"limit": 1}, headers=user.headers)
    assert r.json()["meta"]["pagination"]["total"] == 4
    for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"search": "x" * 101}, {"search": "a\x00b"}):
        r = await client.get("/api/v1/tools", params=bad, headers=user.headers)
        assert r.status_code == 422, bad


async def test_catalog_needs_authentication_and_hides_inactive(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    assert (await client.get("/api/v1/tools")).status_code == 401
    user = await make_account(engine)
    off = await make_tool(engine, "http://x.test/", is_active=False)
    r = await client.get(f"/api/v1/tools/{off}", headers=user.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "NOT_FOUND")
    r = await client.get("/api/v1/tools/not-a-uuid", headers=user.headers)
    assert r.status_code == 422


async def test_admin_routes_are_admin_only(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    tool = await make_tool(engine, "http://x.test/")
    calls = [
        ("GET", ADMIN, None),
        ("POST", ADMIN, _new()),
        ("GET", f"{ADMIN}/{tool}", None),
        ("PATCH", f"{ADMIN}/{tool}", {"name": "x"}),
        ("DELETE", f"{ADMIN}/{tool}", None),
        ("POST", f"{ADMIN}/{tool}/circuit/reset", None),
    ]
    for method, url, body in calls:
        r = await client.request(method, url, json=body)
        assert r.status_code == 401, (method, url)
        r = await client.request(method, url, json=body, headers=user.headers)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "FORBIDDEN"), (method, url)


async def test_create_get_update_delete_with_audit(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    h = admin.headers
    r = await client.post(
        ADMIN,
        json=_new(
            name="Translator",
            category="text",
            input_schema=SCHEMA,
            min_plan="pro",
            auth_header_name="X-Api-Token",
            auth_header_value="very-secret-123",
        ),
        headers=h,
    )
    assert r.status_code == 201, r.text
    tool = r.json()["data"]
    assert tool["has_auth_secret"] is True
    assert tool["auth_header_name"] == "X-Api-Token"
    assert tool["timeout_seconds"] == 30 and tool["max_attempts"] == 3
    assert tool["circuit"] == {"state": "closed", "consecutive_failures": 0, "opened_until": None}
    assert tool["min_plan"] == "pro"
    assert "very-secret-123" not in r.text and "auth_header_value" not in tool
    tid = tool["id"]

    r = await client.get(f"{ADMIN}/{tid}", headers=h)
    assert r.status_code == 200 and r.json()["data"]["api_endpoint"] == "http://127.0.0.1:9/run"

    # PATCH: partial, null clears optional fields, clearing the header name clears the secret
    r = await client.patch(f"{ADMIN}/{tid}", json={"description": "new words", "category": None}, headers=h)
    assert r.status_code == 200
    data = r.json()["data"]
    assert (data["description"], data["category"], data["has_auth_secret"]) == ("new words", None, True)
    assert data["updated_at"] > tool["updated_at"]
    r = await client.patch(f"{ADMIN}/{tid}", json={"auth_header_value": None}, headers=h)
    assert r.json()["data"]["has_auth_secret"] is False
    r = await client.patch(f"{ADMIN}/{tid}", json={"auth_header_value": "another-secret"}, headers=h)
    assert r.json()["data"]["has_auth_secret"] is True
    r = await client.patch(f"{ADMIN}/{tid}", json={"auth_header_name": None}, headers=h)
    assert (r.json()["data"]["auth_header_name"], r.json()["data"]["has_auth_secret"]) == (None, False)
    r = await client.patch(f"{ADMIN}/{tid}", json={"is_active": False, "input_schema": None}, headers=h)
    assert r.json()["data"]["is_active"] is False and r.json()["data"]["input_schema"] is None

    # listing includes inactive tools, filters by is_active and search
    r = await client.get(ADMIN, params={"is_active": "false"}, headers=h)
    assert [t["id"] for t in r.json()["data"]] == [tid]
    r = await client.get(ADMIN, params={"search": "transl"}, headers=h)
    assert [t["id"] for t in r.json()["data"]] == [tid]
    assert "another-secret" not in r.text

    # DELETE: soft, 204, then 404 everywhere; the name is free again
    r = await client.delete(f"{ADMIN}/{tid}", headers=h)
    assert r.status_code == 204 and r.content == b""
    assert (await client.get(f"{ADMIN}/{tid}", headers=h)).status_code == 404
    assert (await client.delete(f"{ADMIN}/{tid}", headers=h)).status_code == 404
    assert (await client.patch(f"{ADMIN}/{tid}", json={"name": "x"}, headers=h)).status_code == 404
    r = await client.post(ADMIN, json=_new(name="translator"), headers=h)
    assert r.status_code == 201

    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT action, changes, actor_id FROM audit_logs"
                    " WHERE target_id = :t ORDER BY created_at"
                ),
                {"t": tid},
            )
        ).all()
    actions = [row.action for row in rows]
    assert actions[0] == "tool.create" and actions[-1] == "tool.delete"
    assert actions.count("tool.update") == 5
    assert all(row.actor_id == admin.user_id for row in rows)
    create = rows[0].changes
    assert create["auth_header_value"] == {"before": "***", "after": "***"}
    assert create["name"] == {"before": None, "after": "Translator"}
    for row in rows:
        assert "very-secret-123" not in str(row.changes)
        assert "another-secret" not in str(row.changes)


async def test_name_conflicts_are_409_case_insensitive(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    assert (await client.post(ADMIN, json=_new(name="Echo"), headers=admin.headers)).status_code == 201
    r = await client.post(ADMIN, json=_new(name="ECHO"), headers=admin.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "CONFLICT")
    other = (await client.post(ADMIN, json=_new(name="Other"), headers=admin.headers)).json()["data"]["id"]
    r = await client.patch(f"{ADMIN}/{other}", json={"name": "echo"}, headers=admin.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "CONFLICT")


@pytest.mark.parametrize(
    "override",
    [
        {"name": ""},
        {"name": "   "},
        {"name": "n" * 101},
        {"name": "nul\x00name"},
        {"name": 5},
        {"description": ""},
        {"description": "a\x00b"},
        {"api_endpoint": "ftp://x.test/"},
        {"api_endpoint": "not a url"},
        {"api_endpoint": "http:///nohost"},
        {"api_endpoint": "http://user:pw@x.test/"},
        {"api_endpoint": "http://x.test:99999/"},
        {"api_endpoint": "http://x.test/\x00"},
        {"category": "c" * 51},
        {"input_schema": []},
        {"input_schema": "object"},
        {"input_schema": {"type": "nonsense"}},
        {"input_schema": {"type": "object", "minProperties": -1}},
        {"input_schema": {"$ref": "https://evil.test/schema.json"}},
        {"input_schema": {"type": "object", "description": "nul\x00"}},
        {"min_plan": "platinum"},
        {"timeout_seconds": 0},
        {"timeout_seconds": 301},
        {"timeout_seconds": "abc"},
        {"max_attempts": 0},
        {"max_attempts": 6},
        {"auth_header_name": "Bad Header"},
        {"auth_header_name": "Host"},
        {"auth_header_name": "X-Request-ID"},
        {"auth_header_name": "X-K", "auth_header_value": "line\r\nbreak"},
        {"auth_header_value": "no-name"},
        {"is_active": "maybe"},
        {"unknown_field": 1},
    ],
)
async def test_bad_tool_definitions_are_422(
    client: httpx.AsyncClient, engine: AsyncEngine, override: dict[str, Any]
) -> None:
    admin = await make_admin(engine)
    r = await client.post(ADMIN, json=_new(**override), headers=admin.headers)
    assert r.status_code == 422, (override, r.text)
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    assert r.json()["error"]["details"]


async def test_bad_patches_are_422(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    tool = await make_tool(engine, "http://x.test/")
    for body in (
        {"name": None},
        {"api_endpoint": None},
        {"timeout_seconds": None},
        {"is_active": None},
        {"min_plan": "nope"},
        {"input_schema": {"type": 1}},
        {"oops": 1},
        {"auth_header_value": "x"},
    ):
        r = await client.patch(f"{ADMIN}/{tool}", json=body, headers=admin.headers)
        assert r.status_code == 422, (body, r.text)


async def test_huge_or_malformed_bodies_never_500(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    r = await client.post(
        ADMIN, content=b"{not json", headers={**admin.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    r = await client.post(ADMIN, json=_new(description="d" * 2_000_000), headers=admin.headers)
    assert r.status_code == 413
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"x": deep}}
    r = await client.post(ADMIN, json=_new(input_schema=deep), headers=admin.headers)
    assert r.status_code == 422


async def test_https_only_in_production(make_client: Callable[..., Any], engine: AsyncEngine) -> None:
    # a documentation address made reachable: production refuses what is not public (egress)
    prod = await make_client(
        environment="production", email_backend="smtp", tool_allowed_networks="198.51.100.0/24"
    )
    admin = await make_admin(engine)
    r = await prod.post(ADMIN, json=_new(api_endpoint="http://198.51.100.7/"), headers=admin.headers)
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body.api_endpoint"
    r = await prod.post(ADMIN, json=_new(api_endpoint="https://198.51.100.7/"), headers=admin.headers)
    assert r.status_code == 201
    tid = r.json()["data"]["id"]
    r = await prod.patch(
        f"{ADMIN}/{tid}", json={"api_endpoint": "http://198.51.100.7/"}, headers=admin.headers
    )
    assert r.status_code == 422

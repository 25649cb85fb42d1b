"""Every role on every route of API.md §13: an outsider gets 404, a role that may not gets 403,
the least role that may gets its answer (and every role above it too)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import Account, make_account
from tests.orgs.helpers import API, Org, make_org

pytestmark = pytest.mark.integration

ROLES = ("member", "admin", "owner")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # {org}, {target} (a plain member), {invitation}, {key}
    least: str
    body: dict[str, Any] | None = None


ROUTES = [
    Route("GET", "/orgs/{org}", "member"),
    Route("PATCH", "/orgs/{org}", "admin", {"name": "Renamed"}),
    Route("DELETE", "/orgs/{org}", "owner"),
    Route("GET", "/orgs/{org}/members", "member"),
    Route("PATCH", "/orgs/{org}/members/{target}", "admin", {"token_limit": 100}),
    Route("DELETE", "/orgs/{org}/members/{target}", "admin"),
    Route("POST", "/orgs/{org}/invitations", "admin", {"email": "new-person@example.com", "role": "member"}),
    Route("GET", "/orgs/{org}/invitations", "admin"),
    Route("DELETE", "/orgs/{org}/invitations/{invitation}", "admin"),
    Route("GET", "/orgs/{org}/subscription", "member"),
    Route("POST", "/orgs/{org}/subscription", "owner", {"plan": "enterprise"}),
    Route("POST", "/orgs/{org}/subscription/cancel", "owner"),
    Route("POST", "/orgs/{org}/subscription/resume", "owner"),
    Route("GET", "/orgs/{org}/usage", "member"),
    Route("GET", "/orgs/{org}/usage/summary", "member"),
    Route("GET", "/orgs/{org}/usage/timeseries", "member"),
    Route("GET", "/orgs/{org}/usage/export", "member"),
    Route("GET", "/orgs/{org}/api-keys", "admin"),
    Route("POST", "/orgs/{org}/api-keys", "admin", {"name": "ci"}),
    Route("DELETE", "/orgs/{org}/api-keys/{key}", "admin"),
]


@dataclass
class World:
    org: Org
    target: Account
    invitation: str
    key: str

    def url(self, route: Route) -> str:
        return API + route.path.format(
            org=self.org.id, target=self.target.user_id, invitation=self.invitation, key=self.key
        )


async def _world(client: httpx.AsyncClient, engine: AsyncEngine) -> World:
    org = await make_org(engine, admins=1, members=2)
    owner = org.owner.headers
    inv = await client.post(
        f"{API}/orgs/{org.id}/invitations",
        json={"email": f"{uuid.uuid4().hex[:8]}@example.com"},
        headers=owner,
    )
    assert inv.status_code == 201, inv.text
    key = await client.post(f"{API}/orgs/{org.id}/api-keys", json={"name": "k"}, headers=owner)
    assert key.status_code == 201, key.text
    return World(org, org.members["member"][1], inv.json()["data"]["id"], key.json()["data"]["id"])


async def _call(client: httpx.AsyncClient, route: Route, url: str, headers: dict[str, str]) -> httpx.Response:
    return await client.request(route.method, url, json=route.body, headers=headers)


async def test_outsiders_get_404_and_lower_roles_403_on_every_route(client: Any, engine: AsyncEngine) -> None:
    world = await _world(client, engine)
    outsider = await make_account(engine)
    platform_admin = await make_account(engine, role="admin")
    for route in ROUTES:
        url = world.url(route)
        for who in (outsider, platform_admin):
            r = await _call(client, route, url, who.headers)
            assert (r.status_code, r.json()["error"]["code"]) == (404, "NOT_FOUND"), (route, r.text)
        for role in ROLES[: ROLES.index(route.least)]:
            r = await _call(client, route, url, world.org.of(role).headers)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "FORBIDDEN"), (route, role, r.text)
        anonymous = await client.request(route.method, url, json=route.body)
        assert anonymous.status_code == 401, (route, anonymous.text)
    # nothing the refused calls asked for happened
    org = await client.get(f"{API}/orgs/{world.org.id}", headers=world.org.owner.headers)
    assert org.json()["data"]["name"] == "Acme" and org.json()["data"]["member_count"] == 4


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_the_least_role_and_those_above_may(client: Any, engine: AsyncEngine, route: Route) -> None:
    for role in ROLES[ROLES.index(route.least) :]:
        world = await _world(client, engine)  # a fresh organization each time: some routes destroy
        r = await _call(client, route, world.url(route), world.org.of(role).headers)
        assert r.status_code in (200, 201, 204), (role, r.text)


async def test_an_api_key_cannot_manage_org_keys(client: Any, engine: AsyncEngine) -> None:
    world = await _world(client, engine)
    made = await client.post(
        f"{API}/users/me/api-keys", json={"name": "personal"}, headers=world.org.owner.headers
    )
    key = {"Authorization": f"Bearer {made.json()['data']['key']}"}
    r = await client.post(f"{API}/orgs/{world.org.id}/api-keys", json={"name": "x"}, headers=key)
    assert r.status_code == 403
    # but an API key acts as its user on the other routes
    assert (await client.get(f"{API}/orgs/{world.org.id}", headers=key)).status_code == 200

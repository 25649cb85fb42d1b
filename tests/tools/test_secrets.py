"""The tool's secret header value never shows: not in responses, log lines or audit rows."""

from __future__ import annotations

import logging

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.logging import JsonFormatter
from tests.factories import make_admin
from tests.tools.helpers import invoke, make_caller
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration

SECRET = "sk-live-DO-NOT-LEAK-8f3a9c"
SECRET2 = "sk-live-ALSO-SECRET-77b1"


async def test_secret_never_leaks(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = await make_admin(engine)
    h = admin.headers
    seen: list[str] = []

    r = await client.post(
        "/api/v1/admin/tools",
        json={
            "name": "Secretive",
            "description": "d",
            "api_endpoint": upstream.url("/fast"),
            "auth_header_name": "X-Secret",
            "auth_header_value": SECRET,
            "max_attempts": 2,
        },
        headers=h,
    )
    assert r.status_code == 201
    seen.append(r.text)
    tid = r.json()["data"]["id"]
    for url in (f"/api/v1/admin/tools/{tid}", "/api/v1/admin/tools", f"/api/v1/tools/{tid}", "/api/v1/tools"):
        seen.append((await client.get(url, headers=h)).text)
    caller = await make_caller(engine, "pro")
    seen.append((await invoke(client, caller, tid)).text)
    # failures log warnings: they must not carry the secret either
    for target in ("/flap?key=s&fail=9", "/status?code=401&msg=denied", "/nonjson"):
        r = await client.patch(
            f"/api/v1/admin/tools/{tid}", json={"api_endpoint": upstream.url(target)}, headers=h
        )
        seen.append(r.text)
        seen.append((await invoke(client, caller, tid)).text)
    r = await client.patch(f"/api/v1/admin/tools/{tid}", json={"auth_header_value": SECRET2}, headers=h)
    seen.append(r.text)
    seen.append((await client.post(f"/api/v1/admin/tools/{tid}/circuit/reset", headers=h)).text)
    assert (await client.delete(f"/api/v1/admin/tools/{tid}", headers=h)).status_code == 204

    # the upstream did receive it
    assert upstream.last["/fast"].headers["x-secret"] == SECRET
    for body in seen:
        assert SECRET not in body and SECRET2 not in body
    formatter = JsonFormatter()
    for record in caplog.records:
        line = formatter.format(record)
        assert SECRET not in line and SECRET2 not in line, line
    async with engine.connect() as conn:
        audit = (await conn.execute(text("SELECT action, changes::text FROM audit_logs"))).all()
    assert {a for a, _ in audit} >= {"tool.create", "tool.update", "tool.delete", "tool.circuit_reset"}
    for _, changes in audit:
        assert SECRET not in changes and SECRET2 not in changes
    assert any('"auth_header_value": {"after": "***", "before": "***"}' in c for _, c in audit)

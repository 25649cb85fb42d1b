"""Whose X-Forwarded-For is believed (issue 12, lower list): nobody's unless FORWARDED_ALLOW_IPS
names the proxy, so a client cannot choose the address its throttles and sessions are keyed by."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.cli import uvicorn_options
from joyhub.core.config import ConfigError, load_settings
from tests.auth.support import API, register, scalar
from tests.conftest import test_settings as hub_settings
from tests.served_hub import served_in_process

ARGS = argparse.Namespace(host="127.0.0.1", port=8000, graceful_timeout=30, keep_alive=75)
FORGED = "203.0.113.9"


@pytest.mark.unit
def test_serve_trusts_no_proxy_by_default() -> None:
    options = uvicorn_options(ARGS, hub_settings())
    assert options["proxy_headers"] is False
    options = uvicorn_options(ARGS, hub_settings(forwarded_allow_ips="10.0.0.5, 10.1.0.0/16"))
    assert options["proxy_headers"] is True and options["forwarded_allow_ips"] == "10.0.0.5, 10.1.0.0/16"


@pytest.mark.unit
def test_a_bad_proxy_list_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.5,not-an-address")
    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS"):
        load_settings(_env_file=None)


@pytest.mark.integration
@pytest.mark.parametrize(("proxies", "seen"), [("", "127.0.0.1"), ("127.0.0.1", FORGED)])
async def test_the_client_address_over_real_http(
    make_client: Callable[..., Any], engine: AsyncEngine, proxies: str, seen: str
) -> None:
    settings = hub_settings(forwarded_allow_ips=proxies)
    options = {
        k: v
        for k, v in uvicorn_options(ARGS, settings).items()
        if k in ("proxy_headers", "forwarded_allow_ips")
    }
    c: httpx.AsyncClient = await make_client(forwarded_allow_ips=proxies)
    account = await register(c)
    login = {"email": account.email, "password": account.password}
    async with (
        served_in_process(c.app, **options) as port,  # type: ignore[attr-defined]
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as real,
    ):
        r = await real.post(f"{API}/auth/login", json=login, headers={"X-Forwarded-For": FORGED})
        assert r.status_code == 200
    recorded = await scalar(engine, "SELECT client_ip FROM auth_sessions ORDER BY created_at DESC LIMIT 1")
    assert recorded == seen

"""The identity sweep job: throttle rows, dead tokens and sessions go; anything still usable stays."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock
from joyhub.core.db import make_sessionmaker
from joyhub.ops.sweeper import sweep_once
from tests.auth.support import API, login, register, scalar
from tests.conftest import test_settings as make_settings

pytestmark = pytest.mark.integration


async def _sweep(engine: AsyncEngine, tmp_path: Path, **overrides: Any) -> int:
    results = await sweep_once(make_sessionmaker(engine), make_settings(tmp_path, **overrides))
    return results["identity_cleanup"]


async def test_sweep_keeps_live_rows_and_deletes_dead_ones(
    client: httpx.AsyncClient, make_client: Callable[..., Any], engine: AsyncEngine, tmp_path: Path
) -> None:
    c = await make_client(login_max_failures=50)
    account = await register(c)
    await login(c, account.email, "Wrong-Pass-123!")  # one throttle hit (PostgreSQL mode)
    logged_out = (await login(c, account.email, account.password)).json()["data"]
    await c.post(f"{API}/auth/logout", json={"refresh_token": logged_out["refresh_token"]})
    rotated = (await c.post(f"{API}/auth/refresh", json={"refresh_token": account.refresh_token})).json()[
        "data"
    ]
    await c.post(f"{API}/auth/password-reset", json={"email": account.email})

    # nothing is old yet: only rows nobody needs may go, and there are none
    assert await _sweep(engine, tmp_path) == 0

    # two days later: throttle hits (any window), the logged-out session, used reset tokens... but
    # the rotated session is live and its retired token is kept for replay detection
    clock.advance(timedelta(days=2))
    removed = await _sweep(engine, tmp_path)
    assert removed >= 2
    assert await scalar(engine, "SELECT count(*) FROM throttle_hits") == 0
    assert await scalar(engine, "SELECT count(*) FROM auth_sessions WHERE revoked_at IS NOT NULL") == 0
    assert await scalar(engine, "SELECT count(*) FROM refresh_tokens WHERE used_at IS NOT NULL") == 1
    assert (
        await c.post(f"{API}/auth/refresh", json={"refresh_token": rotated["refresh_token"]})
    ).status_code == 200

    # past every refresh token's expiry, the whole idle family goes
    clock.advance(timedelta(days=9))
    assert await _sweep(engine, tmp_path) > 0
    assert await scalar(engine, "SELECT count(*) FROM auth_sessions") == 0
    assert await scalar(engine, "SELECT count(*) FROM refresh_tokens") == 0
    assert await scalar(engine, "SELECT count(*) FROM password_reset_tokens") == 0


async def test_throttle_rows_inside_the_window_are_kept(
    make_client: Callable[..., Any], engine: AsyncEngine, tmp_path: Path
) -> None:
    c = await make_client(login_max_failures=50, login_failure_window_seconds=7200)
    account = await register(c)
    await login(c, account.email, "Wrong-Pass-123!")
    clock.advance(timedelta(minutes=90))
    await _sweep(engine, tmp_path, login_failure_window_seconds=7200)
    in_postgres = c.app.state.redis is None  # type: ignore[attr-defined]
    failures = "SELECT count(*) FROM throttle_hits WHERE bucket LIKE 'login:%'"
    assert await scalar(engine, failures) == (1 if in_postgres else 0)

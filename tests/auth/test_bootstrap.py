"""Admin bootstrap: ADMIN_EMAIL/ADMIN_PASSWORD at start-up, and `joyhub create-admin`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.auth.bootstrap import create_admin_cli, ensure_admin_from_settings
from joyhub.core.config import ConfigError
from joyhub.core.db import make_sessionmaker
from tests.auth.support import (
    API,
    STRONG_PASSWORD,
    bearer,
    execute,
    issue_reset_token,
    login,
    register,
    scalar,
)
from tests.conftest import test_settings as make_settings
from tests.factories import make_admin

pytestmark = pytest.mark.integration

ADMIN_PW = "Admin-Secret-Pass-42"


def _url(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=False)


async def test_start_up_creates_the_admin_once(make_client: Callable[..., Any], engine: AsyncEngine) -> None:
    c = await make_client(admin_email="Boss@Example.com", admin_password=ADMIN_PW)
    r = await login(c, "boss@example.com", ADMIN_PW)
    assert r.status_code == 200
    assert await scalar(engine, "SELECT role FROM users WHERE email = 'boss@example.com'") == "admin"
    # a restart (another instance) neither duplicates it nor touches a changed password
    await execute(engine, "UPDATE users SET name = 'Renamed'")
    await make_client(admin_email="boss@example.com", admin_password="Different-Pass-42")
    assert await scalar(engine, "SELECT count(*) FROM users") == 1
    assert (await login(c, "boss@example.com", ADMIN_PW)).status_code == 200
    assert await scalar(engine, "SELECT name FROM users") == "Renamed"


async def test_start_up_never_promotes_an_existing_account(
    client: Any, make_client: Callable[..., Any], engine: AsyncEngine
) -> None:
    """Someone registered ADMIN_EMAIL before the operator set it: start-up refuses in one line
    naming ADMIN_EMAIL, and the account stays a plain user with its own credentials."""
    account = await register(client)
    with pytest.raises(ConfigError) as info:
        await make_client(admin_email=account.email.upper(), admin_password=ADMIN_PW)
    message = str(info.value)
    assert "ADMIN_EMAIL" in message and "--promote-existing" in message and "\n" not in message
    assert await scalar(engine, "SELECT role FROM users") == "user"
    assert (await client.get(f"{API}/users/me", headers=account.headers)).status_code == 200
    assert await scalar(engine, "SELECT count(*) FROM audit_logs") == 0


async def test_start_up_leaves_an_existing_admin_alone(
    make_client: Callable[..., Any], engine: AsyncEngine
) -> None:
    admin = await make_admin(engine, email="ops@example.com")
    c = await make_client(admin_email="ops@example.com", admin_password=ADMIN_PW)
    assert (await c.get(f"{API}/users/me", headers=admin.headers)).status_code == 200
    assert (await login(c, "ops@example.com", ADMIN_PW)).status_code == 401  # its own password stays


async def test_parallel_workers_agree(engine: AsyncEngine, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, admin_email="boss@example.com", admin_password=ADMIN_PW)
    app = SimpleNamespace(state=SimpleNamespace(settings=settings, sessionmaker=make_sessionmaker(engine)))
    await asyncio.gather(*(ensure_admin_from_settings(app) for _ in range(5)))  # type: ignore[arg-type]
    assert await scalar(engine, "SELECT count(*) FROM users WHERE role = 'admin'") == 1


async def test_weak_admin_password_stops_start_up(make_client: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError, match="ADMIN_PASSWORD"):
        await make_client(admin_email="boss@example.com", admin_password="Password1!")


async def test_no_settings_no_admin(client: Any, engine: AsyncEngine) -> None:
    assert await scalar(engine, "SELECT count(*) FROM users") == 0


async def test_cli_creates_an_admin(
    engine: AsyncEngine, client: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc = await create_admin_cli(_url(engine), make_settings(tmp_path), "Root@Example.com", ADMIN_PW, "Root")
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["admin created: root@example.com"]
    assert ADMIN_PW not in "\n".join(out)
    r = await login(client, "root@example.com", ADMIN_PW)
    assert r.status_code == 200
    me = await client.get(
        f"{API}/users/me", headers={"Authorization": f"Bearer {r.json()['data']['access_token']}"}
    )
    assert me.json()["data"]["role"] == "admin" and me.json()["data"]["name"] == "Root"
    assert await scalar(engine, "SELECT count(*) FROM audit_logs WHERE action = 'user.create_admin'") == 1


async def test_cli_refuses_to_promote_without_the_flag(
    engine: AsyncEngine, client: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    account = await register(client)
    rc = await create_admin_cli(_url(engine), make_settings(tmp_path), account.email, ADMIN_PW, "x")
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--promote-existing" in err[0] and account.email in err[0]
    assert await scalar(engine, "SELECT role FROM users") == "user"
    assert (await login(client, account.email, STRONG_PASSWORD)).status_code == 200


async def test_cli_promotes_with_the_flag_and_revokes_every_credential(
    engine: AsyncEngine, client: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The attacker's account becomes admin only on purpose, and then nothing of the attacker's
    works: not the password, not a session, not an API key, not a pending reset link."""
    account = await register(client)
    second = (await login(client, account.email, STRONG_PASSWORD)).json()["data"]
    keys = [
        (
            await client.post(f"{API}/users/me/api-keys", json={"name": f"k{i}"}, headers=account.headers)
        ).json()["data"]["key"]
        for i in range(2)
    ]
    reset_token = await issue_reset_token(engine, account.user_id)
    await execute(engine, "UPDATE users SET is_active = false")
    rc = await create_admin_cli(
        _url(engine), make_settings(tmp_path), account.email, ADMIN_PW, "ignored", promote_existing=True
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "promoted" in out and "2 sessions and 2 API keys revoked" in out and ADMIN_PW not in out
    assert await scalar(engine, "SELECT role || ':' || is_active::text FROM users") == "admin:true"
    assert (await login(client, account.email, STRONG_PASSWORD)).status_code == 401
    for credential in (account.access_token, second["access_token"], *keys):
        assert (await client.get(f"{API}/users/me", headers=bearer(credential))).status_code == 401
    r = await client.post(f"{API}/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert r.status_code == 401
    r = await client.post(
        f"{API}/auth/password-reset/confirm", json={"token": reset_token, "new_password": "Attacker-Pw-77!"}
    )
    assert r.status_code == 400
    assert (await login(client, account.email, ADMIN_PW)).status_code == 200  # the only way in
    changes = await scalar(engine, "SELECT changes FROM audit_logs WHERE action = 'user.promote_admin'")
    assert changes["role"] == {"before": "user", "after": "admin"}
    assert changes["password"] == "***" or changes["password"] == {"before": "***", "after": "***"}
    assert (changes["sessions_revoked"], changes["api_keys_revoked"]) == (2, 2)
    assert (
        await scalar(
            engine,
            "SELECT count(*) FROM audit_logs WHERE action = 'user.api_key_revoke' AND actor_id IS NULL",
        )
        == 2
    )


async def test_cli_on_an_existing_admin_sets_the_password_and_revokes_credentials(
    engine: AsyncEngine, client: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    admin = await make_admin(engine, email="root@example.com")
    key = (await client.post(f"{API}/users/me/api-keys", json={"name": "k"}, headers=admin.headers)).json()
    rc = await create_admin_cli(_url(engine), make_settings(tmp_path), "root@example.com", ADMIN_PW, "Root")
    assert rc == 0 and "admin password set, 1 sessions and 1 API keys revoked" in capsys.readouterr().out
    assert (await client.get(f"{API}/users/me", headers=bearer(key["data"]["key"]))).status_code == 401
    assert (await login(client, "root@example.com", ADMIN_PW)).status_code == 200


async def test_serve_refuses_an_admin_email_taken_by_a_user_in_one_line(
    engine: AsyncEngine, client: Any, tmp_path: Path
) -> None:
    """`joyhub serve` checks before serving: one line naming ADMIN_EMAIL, exit status 2."""
    import os
    import subprocess
    import sys

    from tests.served_hub import free_port

    account = await register(client)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ADMIN_", "DATABASE_URL", "REDIS_"))},
        "ADMIN_EMAIL": account.email,
        "ADMIN_PASSWORD": ADMIN_PW,
        "DATABASE_URL": _url(engine),
        "DATA_DIR": str(tmp_path),
        "JWT_SECRET_KEY": "x" * 40,
    }
    exe = Path(sys.executable).with_name("joyhub")
    done = subprocess.run(
        [str(exe), "serve", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ADMIN_EMAIL" in lines[0] and "Traceback" not in done.stderr
    assert await scalar(engine, "SELECT role FROM users") == "user"


@pytest.mark.parametrize(
    ("email", "password", "message"),
    [
        ("root@example.com", "short", "password rejected"),
        ("root@example.com", "Password1!", "too common"),
        ("not-an-email", ADMIN_PW, "--email"),
    ],
)
async def test_cli_refuses_bad_input(
    engine: AsyncEngine,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    email: str,
    password: str,
    message: str,
) -> None:
    rc = await create_admin_cli(_url(engine), make_settings(tmp_path), email, password, "Root")
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert await scalar(engine, "SELECT count(*) FROM users") == 0


def test_serve_refuses_a_weak_admin_password_in_one_line(tmp_path: Path) -> None:
    """`joyhub serve` checks ADMIN_* before serving: one line naming the variable, no traceback."""
    import os
    import subprocess
    import sys

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ADMIN_", "DATABASE_URL"))},
        "ADMIN_EMAIL": "boss@example.com",
        "ADMIN_PASSWORD": "Welcome123!",
        "DATA_DIR": str(tmp_path),
        "JWT_SECRET_KEY": "x" * 40,
    }
    exe = Path(sys.executable).with_name("joyhub")
    done = subprocess.run(
        [str(exe), "serve", "--port", "1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ADMIN_PASSWORD" in lines[0] and "Traceback" not in done.stderr
    assert "Welcome123!" not in done.stderr + done.stdout

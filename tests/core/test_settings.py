"""Settings (API.md §9): defaults, and one clear line naming the variable for a bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from joyhub.core.config import ConfigError, Settings, load_settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith(("JWT_", "DATABASE_", "ACCESS_", "ENVIRONMENT", "REDIS_", "ADMIN_", "LOG_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_match_the_contract() -> None:
    s = Settings()
    assert s.environment == "development"
    assert s.database_url is None
    assert s.access_token_expire_minutes == 30
    assert s.refresh_token_expire_days == 7
    assert s.password_reset_expire_hours == 24
    assert s.bcrypt_rounds == 12
    assert (s.login_max_failures, s.login_failure_window_seconds) == (5, 900)
    assert s.email_backend == "console"
    assert s.password_reset_url == "http://localhost:3000/reset-password?token={token}"
    assert s.cors_origin_list == ["http://localhost:3000"]
    assert (s.circuit_failure_threshold, s.circuit_recovery_seconds) == (5, 60)
    assert (s.tool_default_timeout_seconds, s.tool_default_max_attempts) == (30, 3)
    assert (s.db_pool_size, s.db_max_overflow, s.db_pool_recycle) == (10, 20, 3600)
    assert (s.log_level, s.log_format) == ("INFO", "json")


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"ACCESS_TOKEN_EXPIRE_MINUTES": "5"}, "ACCESS_TOKEN_EXPIRE_MINUTES"),
        ({"ACCESS_TOKEN_EXPIRE_MINUTES": "abc"}, "ACCESS_TOKEN_EXPIRE_MINUTES"),
        ({"JWT_SECRET_KEY": "short"}, "JWT_SECRET_KEY"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"EMAIL_BACKEND": "pigeon"}, "EMAIL_BACKEND"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"PASSWORD_RESET_URL": "http://x/reset"}, "PASSWORD_RESET_URL"),
        ({"ENVIRONMENT": "production"}, "JWT_SECRET_KEY"),
        ({"ADMIN_EMAIL": "a@b.io"}, "ADMIN_PASSWORD"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_plain_postgres_url_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    assert load_settings().database_url == "postgresql+asyncpg://u@h/db"


def test_dev_secret_generated_once_and_kept(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "d")
    first = s.secret_key()
    assert len(first.encode()) >= 32
    assert Settings(data_dir=tmp_path / "d").secret_key() == first


def test_cli_fails_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "ACCESS_TOKEN_EXPIRE_MINUTES": "999"}
    proc = subprocess.run(
        [sys.executable, "-m", "joyhub.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ACCESS_TOKEN_EXPIRE_MINUTES" in lines[0]

"""Reset tokens never reach a log (issue 12, item 7): the console backend redacts them in every
environment, production refuses the console backend, and the compose file does not use it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.auth import service as auth_service
from joyhub.cli import main
from joyhub.core.config import ConfigError, get_settings, load_settings
from joyhub.core.email import ConsoleEmailSender, OutgoingEmail
from joyhub.core.logging import JsonFormatter
from tests.auth.support import API, register, scalar

ROOT = Path(__file__).resolve().parents[2]


def _rendered(caplog: pytest.LogCaptureFixture) -> str:
    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)


@pytest.mark.parametrize("environment", ["development", "test"])
async def test_the_console_backend_never_logs_a_reset_token(
    make_client: Callable[..., Any],
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    environment: str,
) -> None:
    issued: list[str] = []
    real = auth_service.new_opaque_token

    def recording(nbytes: int = 32) -> str:
        issued.append(real(nbytes))
        return issued[-1]

    monkeypatch.setattr(auth_service, "new_opaque_token", recording)
    caplog.set_level(logging.DEBUG)
    c: httpx.AsyncClient = await make_client(environment=environment, email_backend="console")
    account = await register(c)
    assert (await c.post(f"{API}/auth/password-reset", json={"email": account.email})).status_code == 202
    assert await scalar(engine, "SELECT count(*) FROM password_reset_tokens") == 1
    assert len(issued) == 1
    logged = _rendered(caplog)
    assert issued[0] not in logged
    # what is logged: that a reset email went out, to whom, with the link redacted
    sent = [r for r in caplog.records if r.name == "joyhub.email" and "Reset your" in r.getMessage()]
    assert len(sent) == 1
    line = sent[0].getMessage()
    assert account.email in line and "[redacted]" in line and "token=" not in line


async def test_redaction_covers_every_secret_of_a_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="joyhub.email")
    message = OutgoingEmail(
        to="a@example.com",
        subject="s",
        body="link https://x/r?t=abc123 and abc123 again; code 998877",
        kind="password_reset",
        secrets=("https://x/r?t=abc123", "abc123", "998877"),
    )
    assert "abc123" not in repr(message)
    await ConsoleEmailSender().send(message)
    logged = _rendered(caplog)
    assert "abc123" not in logged and "998877" not in logged
    assert logged.count("[redacted]") == 3  # the link whole, the bare token, the code


def test_production_refuses_the_console_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("JWT_SECRET_KEY", "x" * 40)
    monkeypatch.delenv("EMAIL_BACKEND", raising=False)
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    assert "EMAIL_BACKEND" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv("EMAIL_BACKEND", "smtp")
    assert load_settings(_env_file=None).email_backend == "smtp"


def test_the_command_stops_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in {
        "ENVIRONMENT": "production",
        "JWT_SECRET_KEY": "x" * 40,
        "EMAIL_BACKEND": "console",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as done:
            main(["sweep"])
    finally:
        get_settings.cache_clear()
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "EMAIL_BACKEND" in err[0]


def test_compose_does_not_run_production_with_the_console_backend() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["hub"]["environment"]
    assert env["ENVIRONMENT"] == "production"
    assert env.get("EMAIL_BACKEND") == "smtp"
    assert "SMTP_HOST" in env

"""Settings: one pydantic-settings class, validated once at start-up (API.md §9).

A bad value must stop start-up with one line naming the variable, so `load_settings` turns
pydantic's ValidationError into `ConfigError` whose message is that line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_SECRET_BYTES = 32
MIN_METRICS_TOKEN_CHARS = 16


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message is one line for the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    environment: Literal["development", "test", "production"] = "development"
    database_url: str | None = None
    data_dir: Path = Path("./var")
    jwt_secret_key: str | None = None
    access_token_expire_minutes: int = Field(30, ge=15, le=60)
    refresh_token_expire_days: int = Field(7, ge=1, le=365)
    password_reset_expire_hours: int = Field(24, ge=1, le=168)
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    bcrypt_max_pending: int = Field(64, ge=1, le=10_000)
    login_max_failures: int = Field(5, ge=1, le=1000)
    login_failure_window_seconds: int = Field(900, ge=1, le=86400)
    password_reset_max_per_hour: int = Field(3, ge=1, le=1000)
    # per client address (auth/throttle.py): requests that cost a password hash (login, token,
    # register, reset confirm, password change), accounts created, reset emails asked for
    password_work_max_per_address: int = Field(30, ge=1, le=1_000_000)
    password_work_window_seconds: int = Field(60, ge=1, le=86400)
    register_max_per_address_per_hour: int = Field(20, ge=1, le=1_000_000)
    password_reset_max_per_address_per_hour: int = Field(20, ge=1, le=1_000_000)
    redis_url: str | None = None
    email_backend: Literal["console", "smtp"] = "console"
    smtp_host: str = "localhost"
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_from: str = "Joyfull UI Hub <no-reply@joyfull.local>"
    password_reset_url: str = "http://localhost:3000/reset-password?token={token}"  # noqa: S105
    org_invite_url: str = "http://localhost:3000/invitations/accept?token={token}"
    admin_email: str | None = None
    admin_password: str | None = None
    cors_origins: str = "http://localhost:3000"
    circuit_failure_threshold: int = Field(5, ge=1, le=1000)
    circuit_recovery_seconds: float = Field(60, gt=0, le=86400)
    tool_default_timeout_seconds: int = Field(30, ge=1, le=300)
    tool_default_max_attempts: int = Field(3, ge=1, le=5)
    db_pool_size: int = Field(10, ge=1, le=500)
    db_max_overflow: int = Field(20, ge=0, le=500)
    db_pool_recycle: int = Field(3600, ge=1)
    db_pool_timeout: float = Field(10, gt=0, le=300)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    sweep_interval_seconds: float = Field(60, gt=0)
    stale_invocation_seconds: int = Field(600, ge=10)
    # per worker: invocations in their admission phase at once, and how long one waits in line
    gateway_max_admissions: int = Field(16, ge=1, le=1024)
    gateway_queue_timeout_seconds: float = Field(30, gt=0, le=300)
    # streamed invocations (API.md §5.1): the longest a stream may run, and how often a silent
    # upstream's stream carries a keep-alive comment to the caller
    tool_stream_max_seconds: float = Field(600, gt=0, le=86400)
    # per worker: connections to tool upstreams open at once (a stream holds one for its life)
    upstream_max_connections: int = Field(4096, ge=1, le=100_000)
    stream_ping_seconds: float = Field(15, gt=0, le=300)
    # webhooks (API.md §11): run the dispatcher inside `serve` (else run `joyhub deliver`), its
    # deliveries in flight per process, and the safety-net poll when no NOTIFY wakes it
    webhook_dispatch_in_serve: bool = True
    webhook_concurrency: int = Field(64, ge=1, le=1024)
    webhook_poll_seconds: float = Field(10, gt=0, le=3600)
    # egress policy (core/egress.py): CIDRs tool and webhook endpoints may reach in production
    # although they are not public addresses
    tool_allowed_networks: str = ""
    # proxies whose X-Forwarded-For/-Proto uvicorn believes (comma-separated IPs/CIDRs, or "*");
    # empty: none, the client address is the TCP peer's
    forwarded_allow_ips: str = ""
    # when set, /metrics answers only `Authorization: Bearer <METRICS_TOKEN>`
    metrics_token: str | None = Field(None, repr=False)
    # the lifecycle of growing tables (issue 18): raw usage logs are retired by whole months
    # once older than this (rollups are kept forever), archived first when the dir is set;
    # audit entries are kept forever unless AUDIT_RETENTION_DAYS is set
    usage_retention_days: int = Field(400, ge=31, le=36_500)
    usage_archive_dir: Path | None = None
    audit_retention_days: int | None = Field(None, ge=1, le=36_500)
    # analytics reads (usage history, summaries, timeseries, export, admin stats) go to this
    # streaming replica when set and not lagging past REPLICA_MAX_LAG_SECONDS (`core/replica.py`)
    database_replica_url: str | None = Field(None, repr=False)
    replica_max_lag_seconds: float = Field(5, gt=0, le=3600)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url", "database_replica_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if value.startswith(("postgresql://", "postgres://")):
            value = "postgresql+asyncpg://" + value.split("://", 1)[1]
        if not value.startswith("postgresql+asyncpg://"):
            raise ValueError("must be a postgresql+asyncpg:// URL")
        return value

    @field_validator("jwt_secret_key")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if len(value.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return value

    @field_validator("password_reset_url", "org_invite_url")
    @classmethod
    def _check_reset_url(cls, value: str) -> str:
        if "{token}" not in value:
            raise ValueError("must contain {token}")
        return value

    @field_validator("tool_allowed_networks")
    @classmethod
    def _check_networks(cls, value: str) -> str:
        for item in _items(value):
            try:
                ip_network(item, strict=True)
            except ValueError as exc:
                raise ValueError(f"{item[:60]!r} is not a CIDR network ({exc})") from None
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _check_proxies(cls, value: str) -> str:
        for item in _items(value):
            if item == "*":
                continue
            try:
                ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item[:60]!r} is not an IP address or network (or *)") from None
        return value

    @field_validator("metrics_token")
    @classmethod
    def _check_metrics_token(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if len(value) < MIN_METRICS_TOKEN_CHARS or any(ch.isspace() for ch in value):
            raise ValueError(f"must be at least {MIN_METRICS_TOKEN_CHARS} characters without spaces")
        return value

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.environment == "production" and not self.jwt_secret_key:
            raise ValueError("JWT_SECRET_KEY is required when ENVIRONMENT=production")
        if self.environment == "production" and self.email_backend == "console":
            raise ValueError(
                "EMAIL_BACKEND=console is not allowed when ENVIRONMENT=production (it writes emails to"
                " the log); set EMAIL_BACKEND=smtp and SMTP_HOST"
            )
        if bool(self.admin_email) != bool(self.admin_password):
            raise ValueError("ADMIN_EMAIL and ADMIN_PASSWORD must be set together")
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return _items(self.cors_origins)

    @property
    def allowed_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return tuple(ip_network(item) for item in _items(self.tool_allowed_networks))

    def secret_key(self) -> str:
        """The JWT signing key; in development a random one is generated once under DATA_DIR."""
        if self.jwt_secret_key:
            return self.jwt_secret_key
        path = self.data_dir / "jwt_secret"
        if not path.exists():
            _create_secret_file(path, secrets.token_urlsafe(48))
        return path.read_text().strip()


def _create_secret_file(path: Path, secret: str) -> None:
    """Write `secret` to `path`, readable by the owner only from the first byte, atomically.

    The file is created with mode 0600 (`os.open` with O_EXCL: never a moment with looser
    permissions, whatever happens next), written and synced under a temporary name, then
    hard-linked into place: a reader sees the whole secret or no file, and of several processes
    starting at once (workers) the first link wins and every one reads the same secret.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secret)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: keep its secret
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _items(value: str) -> list[str]:
    """A comma-separated setting's items, trimmed, empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = "".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc:
        return f"invalid configuration: {loc.upper()}: {msg}"
    return f"invalid configuration: {msg}"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment (and `.env`), raising ConfigError with one line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()

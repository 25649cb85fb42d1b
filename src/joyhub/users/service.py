"""The rules of the caller's own account (API.md §3): profile, password change, API keys.

Services flush, never commit (the request's session commits once after the route returns),
except that the password change ends its read transaction before bcrypt
(`auth.service.release_connection`).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.auth import sessions
from joyhub.auth.dependencies import ClientInfo
from joyhub.auth.passwords import enforce_policy
from joyhub.auth.service import charge_password_work, release_connection
from joyhub.auth.sessions import IssuedTokens
from joyhub.auth.throttle import Throttle, login_bucket
from joyhub.core import audit
from joyhub.core.config import Settings
from joyhub.core.errors import (
    Conflict,
    InvalidCredentials,
    NotFound,
    RateLimited,
    ValidationFailed,
    field_error,
)
from joyhub.core.pagination import Page
from joyhub.core.security import (
    ensure_bcrypt_capacity,
    hash_password,
    new_api_key,
    token_digest,
    verify_password,
)
from joyhub.models import ApiKey, User
from joyhub.users.schemas import ApiKeyOut

log = logging.getLogger("joyhub.users")

MAX_ACTIVE_API_KEYS = 20
KEY_PREFIX_LENGTH = 12


async def update_profile(db: AsyncSession, user: User, *, name: str | None, now: datetime) -> User:
    if name is not None and name != user.name:
        user.name = name
        user.updated_at = now
        await db.flush()
    return user


async def change_password(
    db: AsyncSession,
    user: User,
    *,
    current_password: str,
    new_password: str,
    settings: Settings,
    throttle: Throttle,
    client: ClientInfo,
    now: datetime,
) -> IssuedTokens:
    """Change the password, end EVERY session (the caller's included) and open a fresh one.

    API.md says every *other* session is revoked. We revoke the current one too and return a
    new TokenPair on a new session: the caller carries on with the new pair, while the access
    and refresh tokens issued before the change — wherever they may have leaked — stop working
    at once. A wrong current password counts as a failed login of (email, client address), so
    a stolen access token cannot be used to guess the password faster than the login allows.

    API keys are kept: the caller proved the current password, and scripts should not break on
    a routine change (a password *reset*, account recovery, revokes them). The attempt takes a
    unit of the client address's password-work budget first (`auth.service.charge_password_work`).

    Both bcrypt steps (checking the current password, hashing the new one) run with no pooled
    connection held: the transaction that read the caller's session and user row ends first
    (nothing is written before), and the writes open a new one after the hash. When bcrypt's
    queue is full the attempt is refused (503) before it counts as a failure.
    """
    enforce_policy(new_password, "body.new_password")
    ensure_bcrypt_capacity()
    user_id, email, password_hash = user.id, user.email, user.password_hash
    await release_connection(db)
    await charge_password_work(throttle, client, settings, now)
    bucket = login_bucket(email, client.address)
    decision = await throttle.acquire(
        bucket,
        limit=settings.login_max_failures,
        window=timedelta(seconds=settings.login_failure_window_seconds),
        now=now,
    )
    if not decision.allowed:
        raise RateLimited(
            "Too many failed attempts; try again later", headers={"Retry-After": str(decision.retry_after)}
        )
    if not await verify_password(current_password, password_hash):
        log.info("password change refused", extra={"reason": "credentials", "user_id": str(user_id)})
        raise InvalidCredentials("Current password is incorrect")
    await throttle.clear(bucket)
    new_hash = await hash_password(new_password, settings.bcrypt_rounds)
    return await sessions.replace_password(
        db,
        user,
        new_hash,
        reason="password_change",
        settings=settings,
        user_agent=client.user_agent,
        client_ip=client.address,
        now=now,
    )


def api_key_out(key: ApiKey, now: datetime) -> ApiKeyOut:
    expired = key.expires_at is not None and key.expires_at <= now
    return ApiKeyOut(
        id=key.id,
        name=key.name,
        key_prefix=key.key_prefix,
        is_active=key.is_active and not expired,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        expires_at=key.expires_at,
        requests_per_minute=key.requests_per_minute,
    )


async def list_api_keys(db: AsyncSession, user_id: uuid.UUID, *, page: Page) -> tuple[list[ApiKey], int]:
    """The user's personal keys (not their organization keys, API.md §13), revoked and expired
    ones included, newest first."""
    mine = (ApiKey.user_id == user_id, ApiKey.org_id.is_(None))
    total = int((await db.execute(select(func.count()).select_from(ApiKey).where(*mine))).scalar_one())
    rows = (
        await db.execute(
            select(ApiKey)
            .where(*mine)
            .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
            .offset(page.offset)
            .limit(page.limit)
        )
    ).scalars()
    return list(rows), total


async def create_api_key(
    db: AsyncSession,
    user: User,
    *,
    name: str,
    expires_at: datetime | None,
    now: datetime,
    requests_per_minute: int | None = None,
    org_id: uuid.UUID | None = None,
) -> tuple[ApiKey, str]:
    """Create a key and return it with the raw key (shown this once; only its hash is kept).
    With `org_id`, an organization's key made by `user` (API.md §13): it bills the organization,
    and counts against the organization's key limit rather than the user's.

    The user row is locked (`SELECT … FOR UPDATE`) before counting, so parallel creations
    cannot push the number of active keys past the limit (the organization's keys are counted
    under its row lock, taken by the caller).
    """
    if expires_at is not None and expires_at <= now:
        raise ValidationFailed(details=[field_error("body.expires_at", "Must be in the future")])
    await db.execute(select(User.id).where(User.id == user.id).with_for_update())
    active = (
        await db.execute(
            select(func.count())
            .select_from(ApiKey)
            .where(
                ApiKey.user_id == user.id if org_id is None else ApiKey.org_id == org_id,
                ApiKey.org_id.is_(None) if org_id is None else ApiKey.org_id == org_id,
                ApiKey.is_active.is_(True),
                or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
            )
        )
    ).scalar_one()
    if active >= MAX_ACTIVE_API_KEYS:
        owner = "user" if org_id is None else "organization"
        raise Conflict(f"At most {MAX_ACTIVE_API_KEYS} active API keys per {owner}; revoke one first")
    raw = new_api_key()
    key = ApiKey(
        id=uuid.uuid4(),
        user_id=user.id,
        name=name,
        key_prefix=raw[:KEY_PREFIX_LENGTH],
        key_hash=token_digest(raw),
        is_active=True,
        created_at=now,
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        org_id=org_id,
    )
    db.add(key)
    await db.flush()
    audit.record(
        db,
        actor=user,
        action="user.api_key_create" if org_id is None else "organization.api_key_create",
        target_type="user" if org_id is None else "organization",
        target_id=user.id if org_id is None else org_id,
        changes={
            "api_key_id": str(key.id),
            "user_id": str(user.id),
            "name": name,
            "key_prefix": key.key_prefix,
            "requests_per_minute": requests_per_minute,
        },
    )
    log.info("api key created", extra={"user_id": str(user.id), "key_id": str(key.id)})
    return key, raw


async def revoke_api_key(db: AsyncSession, user: User, key_id: uuid.UUID, *, now: datetime) -> None:
    """Revoke one of the caller's keys (it stops working at once); another user's key is 404."""
    found = (
        await db.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.user_id == user.id, ApiKey.org_id.is_(None))
            .values(is_active=False, revoked_at=func.coalesce(ApiKey.revoked_at, now))
            .returning(ApiKey.id)
            .execution_options(synchronize_session=False)
        )
    ).scalar_one_or_none()
    if found is None:
        raise NotFound("No such API key")
    audit.record(
        db,
        actor=user,
        action="user.api_key_revoke",
        target_type="user",
        target_id=user.id,
        changes={"api_key_id": str(key_id)},
    )
    log.info("api key revoked", extra={"user_id": str(user.id), "key_id": str(key_id)})

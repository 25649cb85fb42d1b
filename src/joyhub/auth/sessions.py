"""Login sessions and their refresh tokens: start, rotate, revoke, clean up.

A login starts a session (a refresh-token *family*). Access tokens carry the session id
(`sid`) and are checked against it on every request (auth/dependencies.py), so revoking the
session kills every token descended from that login at once.

Refresh tokens are opaque (`secrets.token_urlsafe(32)`), stored as SHA-256, single-use.
Rotation is one atomic consume — `UPDATE … SET used_at WHERE token_hash = … AND used_at IS NULL
AND expires_at > now AND <session live, user active> RETURNING session_id` — so of many parallel
refreshes with one token at most one wins (PostgreSQL re-checks the row after the winner
commits). A token that exists but was already used is a replay: the whole session is revoked
(reason "reuse") in a transaction of its own, so the revocation sticks although the request
itself answers 401 and rolls back.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Delete, delete, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.auth import throttle
from joyhub.core import audit
from joyhub.core.config import Settings
from joyhub.core.db import after_commit
from joyhub.core.errors import InvalidRefreshToken
from joyhub.core.security import create_access_token, new_opaque_token, token_digest
from joyhub.models import ApiKey, AuthSession, PasswordResetToken, RefreshToken, User

log = logging.getLogger("joyhub.auth")

USER_AGENT_MAX = 256
CLIENT_IP_MAX = 64
RETENTION = timedelta(days=1)


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    expires_in: int
    session_id: uuid.UUID


def access_token_for(user: User, session_id: uuid.UUID, settings: Settings) -> tuple[str, int]:
    """A signed access token for this session, and its lifetime in seconds."""
    ttl = timedelta(minutes=settings.access_token_expire_minutes)
    token = create_access_token(
        user_id=user.id, session_id=session_id, role=user.role, secret=settings.secret_key(), ttl=ttl
    )
    return token, int(ttl.total_seconds())


async def _new_refresh_token(
    db: AsyncSession, session_id: uuid.UUID, settings: Settings, now: datetime
) -> str:
    raw = new_opaque_token(32)
    db.add(
        RefreshToken(
            id=uuid.uuid4(),
            session_id=session_id,
            token_hash=token_digest(raw),
            created_at=now,
            expires_at=now + timedelta(days=settings.refresh_token_expire_days),
        )
    )
    await db.flush()
    return raw


async def open_session(
    db: AsyncSession,
    user: User,
    *,
    now: datetime,
    user_agent: str | None,
    client_ip: str | None,
) -> uuid.UUID:
    """Insert a new session row for `user` and return its id."""
    session = AuthSession(
        id=uuid.uuid4(),
        user_id=user.id,
        created_at=now,
        user_agent=(user_agent or None) and user_agent[:USER_AGENT_MAX],
        client_ip=(client_ip or None) and client_ip[:CLIENT_IP_MAX],
    )
    db.add(session)
    await db.flush()
    return session.id


async def start_session(
    db: AsyncSession,
    user: User,
    settings: Settings,
    *,
    now: datetime,
    user_agent: str | None,
    client_ip: str | None,
) -> IssuedTokens:
    """A new session with its first refresh token and an access token (login, register, reset)."""
    session_id = await open_session(db, user, now=now, user_agent=user_agent, client_ip=client_ip)
    refresh = await _new_refresh_token(db, session_id, settings, now)
    access, expires_in = access_token_for(user, session_id, settings)
    return IssuedTokens(access, refresh, expires_in, session_id)


async def rotate(
    db: AsyncSession,
    raw_token: str,
    settings: Settings,
    *,
    now: datetime,
    factory: async_sessionmaker[AsyncSession],
) -> IssuedTokens:
    """Consume a refresh token and issue the next pair in the same session.

    Unknown, expired, revoked-session or disabled-user tokens answer 401; a token that was
    already used revokes its whole session first (theft detection), then answers 401.
    """
    digest = token_digest(raw_token)
    session_is_live = exists().where(
        AuthSession.id == RefreshToken.session_id,
        AuthSession.revoked_at.is_(None),
        User.id == AuthSession.user_id,
        User.is_active.is_(True),
    )
    consumed = (
        await db.execute(
            update(RefreshToken)
            .where(
                RefreshToken.token_hash == digest,
                RefreshToken.used_at.is_(None),
                RefreshToken.expires_at > now,
                session_is_live,
            )
            .values(used_at=now)
            .returning(RefreshToken.session_id)
            .execution_options(synchronize_session=False)
        )
    ).scalar_one_or_none()
    if consumed is None:
        await _handle_unusable(db, digest, now=now, factory=factory)
        raise InvalidRefreshToken()
    user = (
        await db.execute(
            select(User).join(AuthSession, AuthSession.user_id == User.id).where(AuthSession.id == consumed)
        )
    ).scalar_one()
    refresh = await _new_refresh_token(db, consumed, settings, now)
    access, expires_in = access_token_for(user, consumed, settings)
    return IssuedTokens(access, refresh, expires_in, consumed)


async def _handle_unusable(
    db: AsyncSession, digest: bytes, *, now: datetime, factory: async_sessionmaker[AsyncSession]
) -> None:
    """Work out why a refresh token could not be consumed; revoke its session on replay."""
    found = (
        await db.execute(
            select(RefreshToken.session_id, RefreshToken.used_at, AuthSession.revoked_at)
            .join(AuthSession, AuthSession.id == RefreshToken.session_id)
            .where(RefreshToken.token_hash == digest)
        )
    ).one_or_none()
    if found is None:
        return
    session_id, used_at, revoked_at = found
    if used_at is None or revoked_at is not None:
        return  # expired, or the session is already over / the user disabled: a plain 401
    # Replay of a retired token: treat as theft and end the whole family. Own transaction,
    # because the request answers 401 and its own transaction is rolled back.
    async with factory() as own, own.begin():
        revoked = await revoke_session(own, session_id, reason="reuse", now=now)
    if revoked:
        log.warning("refresh token reuse detected; session revoked", extra={"session_id": str(session_id)})


async def revoke_session(db: AsyncSession, session_id: uuid.UUID, *, reason: str, now: datetime) -> bool:
    """Revoke one session (idempotent); True when it was live until now."""
    result = await db.execute(
        update(AuthSession)
        .where(AuthSession.id == session_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


async def revoke_user_sessions(db: AsyncSession, user_id: uuid.UUID, *, reason: str, now: datetime) -> int:
    """Revoke every live session of a user (logout-all, password change/reset, account disabled).

    Their access tokens stop working on the next request; their refresh tokens cannot rotate.
    """
    result = await db.execute(
        update(AuthSession)
        .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def revoke_user_api_keys(
    db: AsyncSession, user_id: uuid.UUID, *, reason: str, actor: User | None, now: datetime
) -> int:
    """Revoke every active API key of a user (account recovery, logout-all with keys, admin
    bootstrap): they stop working on the next request. One audit row per key revoked, naming
    the reason, so the trail shows which automation lost its key and why."""
    revoked = list(
        (
            await db.execute(
                update(ApiKey)
                .where(ApiKey.user_id == user_id, ApiKey.is_active.is_(True))
                .values(is_active=False, revoked_at=now)
                .returning(ApiKey.id, ApiKey.key_prefix)
                .execution_options(synchronize_session=False)
            )
        ).all()
    )
    for key_id, prefix in revoked:
        audit.record(
            db,
            actor=actor,
            action="user.api_key_revoke",
            target_type="user",
            target_id=user_id,
            changes={"api_key_id": str(key_id), "key_prefix": prefix, "reason": reason},
        )
    return len(revoked)


async def replace_password(
    db: AsyncSession,
    user: User,
    new_hash: str,
    *,
    reason: str,
    settings: Settings,
    user_agent: str | None,
    client_ip: str | None,
    now: datetime,
    revoke_api_keys: bool = False,
) -> IssuedTokens:
    """The one rule for a new password (change or reset): store its hash, end every session of
    the user (so every old access and refresh token dies at once), audit it with the password
    masked, and open a fresh session for the caller.

    `revoke_api_keys` (a reset: account recovery assumes the account was compromised) revokes
    every API key too; a password change keeps them (the caller proved the current password).

    `new_hash` is the bcrypt hash of the new password, computed by the caller *before* its write
    transaction, so bcrypt never runs while a pooled connection is held. The "password replaced"
    log line is written when the transaction commits, never for a change that was rolled back.
    """
    user.password_hash = new_hash
    user.updated_at = now
    revoked = await revoke_user_sessions(db, user.id, reason=reason, now=now)
    keys = (
        await revoke_user_api_keys(db, user.id, reason=reason, actor=user, now=now) if revoke_api_keys else 0
    )
    audit.record(
        db,
        actor=user,
        action=f"user.{reason}",
        target_type="user",
        target_id=user.id,
        changes={
            "password": {"before": "***", "after": "***"},
            "sessions_revoked": revoked,
            "api_keys_revoked": keys,
        },
    )
    issued = await start_session(db, user, settings, now=now, user_agent=user_agent, client_ip=client_ip)
    details = {
        "user_id": str(user.id),
        "reason": reason,
        "sessions_revoked": revoked,
        "api_keys_revoked": keys,
    }
    after_commit(db, lambda: log.info("password replaced", extra=details))
    return issued


async def logout(db: AsyncSession, raw_token: str, *, now: datetime) -> None:
    """Revoke the session a refresh token belongs to; unknown tokens are silently ignored."""
    session_id = (
        await db.execute(
            select(RefreshToken.session_id).where(RefreshToken.token_hash == token_digest(raw_token))
        )
    ).scalar_one_or_none()
    if session_id is not None:
        await revoke_session(db, session_id, reason="logout", now=now)


# rows each identity cleanup deletes per pass at most (issue 18): a pass stays short after a long
# outage too, and the next pass takes the rest
CLEANUP_BATCH = 10_000

_Swept = type[RefreshToken] | type[AuthSession] | type[PasswordResetToken]


def _bounded(model: _Swept, condition: ColumnElement[bool]) -> Delete:
    """DELETE of at most CLEANUP_BATCH rows matching `condition` (rows another sweeper holds are
    skipped, not waited for)."""
    batch = select(model.id).where(condition).limit(CLEANUP_BATCH).with_for_update(skip_locked=True)
    return delete(model).where(model.id.in_(batch.scalar_subquery()))


async def sweep_expired(db: AsyncSession, settings: Settings, now: datetime) -> int:
    """Sweep job: delete identity rows nobody can use any more; returns rows deleted.

    - throttle hits older than the largest window (login window, or the reset hour);
    - refresh tokens expired more than a day ago. Used tokens are kept until then on purpose:
      a retired token replayed while it would still be valid must still be recognised as a
      replay (and revoke its session), which needs its row;
    - sessions revoked more than a day ago (their tokens go with them), and sessions older than
      a day with no refresh token left (their access tokens expired long ago);
    - reset tokens used or expired more than a day ago.
    """
    cutoff = now - RETENTION
    largest_window = max(
        timedelta(seconds=settings.login_failure_window_seconds),
        timedelta(seconds=settings.password_work_window_seconds),
        throttle.RESET_WINDOW,
    )
    total = await throttle.prune(db, older_than=now - largest_window)

    def _count(result: object) -> int:
        return int(getattr(result, "rowcount", 0) or 0)

    total += _count(await db.execute(_bounded(RefreshToken, RefreshToken.expires_at < cutoff)))
    total += _count(
        await db.execute(
            _bounded(
                AuthSession,
                or_(
                    AuthSession.revoked_at < cutoff,
                    (AuthSession.created_at < cutoff)
                    & ~exists().where(RefreshToken.session_id == AuthSession.id),
                ),
            )
        )
    )
    total += _count(
        await db.execute(
            _bounded(
                PasswordResetToken,
                or_(PasswordResetToken.used_at < cutoff, PasswordResetToken.expires_at < cutoff),
            )
        )
    )
    return total

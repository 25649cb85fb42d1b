"""Making sure an administrator exists: `joyhub create-admin`, and ADMIN_EMAIL/ADMIN_PASSWORD at start-up.

The threat: anyone can register any email. An attacker who registers `ops@example.com` before
the operator sets ADMIN_EMAIL=ops@example.com must not be handed an admin account — neither by
start-up nor by a `create-admin` run that keeps the attacker's sessions or API keys alive.

- `ensure_admin_from_settings` (every start-up, every worker): creates the admin when that email
  is not registered yet (`INSERT … ON CONFLICT DO NOTHING`, so parallel workers agree); leaves an
  existing *admin* as it is (an admin who changed the password or was disabled on purpose is not
  undone by a restart); and **refuses to start** (ConfigError naming ADMIN_EMAIL) when the email
  belongs to an account that is not an admin — whoever registered it, start-up never promotes.
  `joyhub serve` makes the same check before serving (`check_admin_account`), so the operator
  gets one line instead of a lifespan traceback.
- `create_admin_cli` (`joyhub create-admin`, by hand): creates the admin; for an existing admin,
  sets the given password; promotes an existing non-admin account only with
  `--promote-existing`, and refuses (one line, exit status 2) without it.

Whenever bootstrap sets the password of an existing account (a promotion, or a reset of an
admin's password), the configured password becomes the only way in: every session, every API
key and every outstanding password-reset token of the account is revoked, and the change is
audited (`user.promote_admin`, or `user.update`) with the counts, the password masked.

Both check the password against the policy; the admin email gets only a light check (no
deliverability, special-use domains such as `localhost` allowed) because operators pick it.
"""

from __future__ import annotations

import logging
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.auth import sessions
from joyhub.auth.passwords import violations
from joyhub.core import audit
from joyhub.core.clock import utcnow
from joyhub.core.config import ConfigError, Settings
from joyhub.core.security import hash_password
from joyhub.models import PasswordResetToken, User
from joyhub.users.schemas import normalize_email

log = logging.getLogger("joyhub.auth.bootstrap")

EMAIL_MAX = 320
NAME_MAX = 100
REVOKE_REASON = "admin_bootstrap"


class PromotionRefused(Exception):
    """The email belongs to an existing account that is not an admin, and nobody said to promote
    it (`--promote-existing`); the message is one line for the operator."""


@dataclass(frozen=True)
class Outcome:
    kind: Literal["created", "promoted", "updated", "unchanged"]
    sessions_revoked: int = 0
    api_keys_revoked: int = 0


def _email_problem(email: str) -> str | None:
    local, at, domain = email.partition("@")
    if not at or not local or not domain or len(email) > EMAIL_MAX or any(c.isspace() for c in email):
        return "not a valid email address"
    if "\x00" in email:
        return "must not contain NUL characters"
    return None


def _password_problem(password: str) -> str | None:
    found = violations(password)
    if not found:
        return None
    return "; ".join(v.message.lower() for v in found)


def _refusal(email: str) -> str:
    return (
        f"{email} is already registered by an account that is not an admin; it is not promoted"
        " unless you run `joyhub create-admin --email <that email> --promote-existing` (which sets"
        " the password and revokes its sessions and API keys)"
    )


async def _locked_user(db: AsyncSession, email: str) -> User | None:
    return (await db.execute(select(User).where(User.email == email).with_for_update())).scalar_one_or_none()


async def _insert_admin(
    db: AsyncSession, *, email: str, name: str, password_hash: str, now: datetime
) -> bool:
    """Insert the admin unless the email is taken (another worker, or a registration, won)."""
    inserted = (
        await db.execute(
            pg_insert(User)
            .values(
                id=uuid.uuid4(),
                name=name[:NAME_MAX] or "Administrator",
                email=email,
                password_hash=password_hash,
                role="admin",
                is_active=True,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=[User.email])
            .returning(User.id)
        )
    ).scalar_one_or_none()
    if inserted is not None:
        audit.record(
            db,
            actor=None,
            action="user.create_admin",
            target_type="user",
            target_id=inserted,
            changes={"email": email, "role": "admin"},
        )
    return inserted is not None


async def _take_over(db: AsyncSession, user: User, password_hash: str, now: datetime) -> Outcome:
    """Make `user` an enabled admin whose only way in is the configured password: new hash, and
    every session, API key and outstanding reset token revoked. Audited with the counts."""
    promoted = user.role != "admin"
    before = {"role": user.role, "is_active": user.is_active}
    user.role, user.is_active, user.password_hash, user.updated_at = "admin", True, password_hash, now
    revoked = await sessions.revoke_user_sessions(db, user.id, reason=REVOKE_REASON, now=now)
    keys = await sessions.revoke_user_api_keys(db, user.id, reason=REVOKE_REASON, actor=None, now=now)
    await db.execute(
        update(PasswordResetToken)
        .where(PasswordResetToken.user_id == user.id, PasswordResetToken.used_at.is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    changes = audit.diff(before, {"role": user.role, "is_active": user.is_active})
    changes |= {
        "password": {"before": "***", "after": "***"},
        "sessions_revoked": revoked,
        "api_keys_revoked": keys,
        "via": "create-admin --promote-existing" if promoted else "create-admin",
    }
    audit.record(
        db,
        actor=None,
        action="user.promote_admin" if promoted else "user.update",
        target_type="user",
        target_id=user.id,
        changes=changes,
    )
    return Outcome("promoted" if promoted else "updated", revoked, keys)


async def _bootstrap(
    db: AsyncSession,
    *,
    email: str,
    password: str,
    name: str,
    settings: Settings,
    take_over_existing: bool,
    promote_existing: bool,
    now: datetime,
    password_hash: str | None,
) -> Outcome:
    """The one rule of both entry points (see the module's note).

    `take_over_existing` (the CLI) sets the password of an existing admin; `promote_existing`
    (its flag) lets it promote a non-admin. `password_hash` is hashed by the caller *before* the
    transaction, so the row lock is not held across bcrypt; None when the caller found the email
    registered and needs no hash. Only if that account vanished in between is the hash made here.
    """
    user = await _locked_user(db, email)
    if user is None:
        password_hash = password_hash or await hash_password(password, settings.bcrypt_rounds)
        if await _insert_admin(db, email=email, name=name, password_hash=password_hash, now=now):
            return Outcome("created")
        user = await _locked_user(db, email)  # taken in the meantime: judge that account
        assert user is not None
    if user.role != "admin" and not promote_existing:
        raise PromotionRefused(_refusal(email))
    if not take_over_existing:
        return Outcome("unchanged")
    return await _take_over(
        db, user, password_hash or await hash_password(password, settings.bcrypt_rounds), now
    )


async def create_admin_cli(
    url: str, settings: Settings, email: str, password: str, name: str, *, promote_existing: bool = False
) -> int:
    """`joyhub create-admin`: create the admin, reset an existing admin's password, or (with
    `--promote-existing`) promote an existing account; prints one line."""
    from joyhub.core.db import make_engine, make_sessionmaker

    email = normalize_email(email)
    problem = _email_problem(email)
    if problem:
        print(f"joyhub: --email: {problem}", file=sys.stderr)
        return 2
    problem = _password_problem(password)
    if problem:
        print(f"joyhub: password rejected: {problem}", file=sys.stderr)
        return 2
    password_hash = await hash_password(password, settings.bcrypt_rounds)  # before the lock
    engine = make_engine(url, settings, pool_size=1, max_overflow=0)
    try:
        async with make_sessionmaker(engine)() as db, db.begin():
            outcome = await _bootstrap(
                db,
                email=email,
                password=password,
                name=name.strip(),
                settings=settings,
                take_over_existing=True,
                promote_existing=promote_existing,
                now=utcnow(),
                password_hash=password_hash,
            )
    except PromotionRefused as exc:
        print(f"joyhub: {exc}", file=sys.stderr)
        return 2
    finally:
        await engine.dispose()
    revoked = f"{outcome.sessions_revoked} sessions and {outcome.api_keys_revoked} API keys revoked"
    lines = {
        "created": f"admin created: {email}",
        "promoted": f"existing user promoted to admin, password set, {revoked}: {email}",
        "updated": f"admin password set, {revoked}: {email}",
    }
    print(lines.get(outcome.kind, f"admin unchanged: {email}"))
    return 0


def check_admin_settings(settings: Settings) -> None:
    """Raise ConfigError (one line naming the variable) when ADMIN_EMAIL/ADMIN_PASSWORD are unusable.

    `joyhub serve` calls this before starting uvicorn, so a weak ADMIN_PASSWORD stops it with
    that one line instead of a lifespan traceback.
    """
    if not (settings.admin_email and settings.admin_password):
        return
    problem = _email_problem(normalize_email(settings.admin_email))
    if problem:
        raise ConfigError(f"invalid configuration: ADMIN_EMAIL: {problem}")
    problem = _password_problem(settings.admin_password)
    if problem:
        raise ConfigError(f"invalid configuration: ADMIN_PASSWORD: {problem}")


async def check_admin_account(url: str, settings: Settings) -> None:
    """ConfigError (one line naming ADMIN_EMAIL) when ADMIN_EMAIL belongs to an account that is
    not an admin: `joyhub serve` asks before serving, so the refusal is one line, not a
    traceback from every worker's start-up."""
    if not (settings.admin_email and settings.admin_password):
        return
    from joyhub.core.db import make_engine

    email = normalize_email(settings.admin_email)
    engine = make_engine(url, settings, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            role = (await conn.execute(select(User.role).where(User.email == email))).scalar_one_or_none()
    finally:
        await engine.dispose()
    if role is not None and role != "admin":
        raise ConfigError(f"invalid configuration: ADMIN_EMAIL: {_refusal(email)}")


async def ensure_admin_from_settings(app: FastAPI) -> None:
    """Start-up hook: when ADMIN_EMAIL and ADMIN_PASSWORD are set, make sure that admin exists.

    A password that breaks the policy, or an email registered by a non-admin account, stops
    start-up with one line naming the variable.
    """
    settings: Settings = app.state.settings
    if not (settings.admin_email and settings.admin_password):
        return
    check_admin_settings(settings)
    email = normalize_email(settings.admin_email)
    factory: async_sessionmaker[AsyncSession] = app.state.sessionmaker
    async with factory() as db:
        registered = (await db.execute(select(User.id).where(User.email == email))).first() is not None
    # an existing account keeps its password: hash only when the admin is about to be created,
    # and before the transaction, so its row lock and connection never wait on bcrypt
    password_hash = (
        None if registered else await hash_password(settings.admin_password, settings.bcrypt_rounds)
    )
    try:
        async with factory() as db, db.begin():
            outcome = await _bootstrap(
                db,
                email=email,
                password=settings.admin_password,
                name="Administrator",
                settings=settings,
                take_over_existing=False,
                promote_existing=False,
                now=utcnow(),
                password_hash=password_hash,
            )
    except PromotionRefused as exc:
        raise ConfigError(f"invalid configuration: ADMIN_EMAIL: {exc}") from None
    if outcome.kind != "unchanged":
        log.info("bootstrap admin %s", outcome.kind, extra={"outcome": outcome.kind})

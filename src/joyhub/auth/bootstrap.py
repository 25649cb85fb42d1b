"""Making sure an administrator exists: `joyhub create-admin`, and ADMIN_EMAIL/ADMIN_PASSWORD at start-up.

- `create_admin_cli` (by hand): creates the admin, or promotes an existing user to admin,
  re-enables them and sets the given password (ending their sessions). Prints one line.
- `ensure_admin_from_settings` (every start-up, every worker): creates the admin when that
  email is not registered yet (`INSERT … ON CONFLICT DO NOTHING`, so parallel workers agree),
  and promotes an existing user with that email to admin. It never changes the password or the
  status of an existing account: an admin who later changed the password or was disabled on
  purpose is not silently undone by a restart.

Both check the password against the policy; the admin email gets only a light check (no
deliverability, special-use domains such as `localhost` allowed) because operators pick it.
"""

from __future__ import annotations

import logging
import sys
import uuid
from datetime import datetime

from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.auth import sessions
from joyhub.auth.passwords import violations
from joyhub.core import audit
from joyhub.core.clock import utcnow
from joyhub.core.config import ConfigError, Settings
from joyhub.core.security import hash_password
from joyhub.models import User
from joyhub.users.schemas import normalize_email

log = logging.getLogger("joyhub.auth.bootstrap")

EMAIL_MAX = 320
NAME_MAX = 100


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


async def _create_or_promote(
    db: AsyncSession,
    *,
    email: str,
    password: str,
    name: str,
    settings: Settings,
    reset_existing: bool,
    now: datetime,
    password_hash: str | None,
) -> str:
    """'created', 'promoted', 'updated' (password reset on an existing admin) or 'unchanged'.

    `password_hash` is the password hashed by the caller *before* the transaction began, so the
    row lock is not held across bcrypt; None when the caller found the email registered and
    needs no hash. Only if that account vanished in between is the hash made here.
    """
    user = (await db.execute(select(User).where(User.email == email).with_for_update())).scalar_one_or_none()
    if user is None:
        if password_hash is None:
            password_hash = await hash_password(password, settings.bcrypt_rounds)
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
            return "created"
        # another worker created it in the meantime
        user = (await db.execute(select(User).where(User.email == email).with_for_update())).scalar_one()
    before = {"role": user.role, "is_active": user.is_active}
    outcome = "unchanged"
    if user.role != "admin":
        user.role = "admin"
        outcome = "promoted"
    if reset_existing:
        user.is_active = True
        user.password_hash = password_hash or await hash_password(password, settings.bcrypt_rounds)
        await sessions.revoke_user_sessions(db, user.id, reason="password_reset", now=now)
        if outcome == "unchanged":
            outcome = "updated"
    if outcome != "unchanged":
        user.updated_at = now
        changes = audit.diff(before, {"role": user.role, "is_active": user.is_active})
        if reset_existing:
            changes["password"] = {"before": "***", "after": "***"}
        audit.record(
            db, actor=None, action="user.update", target_type="user", target_id=user.id, changes=changes
        )
    return outcome


async def create_admin_cli(url: str, settings: Settings, email: str, password: str, name: str) -> int:
    """`joyhub create-admin`: create the admin, or promote an existing user and set the password."""
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
            outcome = await _create_or_promote(
                db,
                email=email,
                password=password,
                name=name.strip(),
                settings=settings,
                reset_existing=True,
                now=utcnow(),
                password_hash=password_hash,
            )
    finally:
        await engine.dispose()
    lines = {
        "created": f"admin created: {email}",
        "promoted": f"existing user promoted to admin, password set and sessions ended: {email}",
        "updated": f"admin password set and sessions ended: {email}",
    }
    print(lines.get(outcome, f"admin unchanged: {email}"))
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


async def ensure_admin_from_settings(app: FastAPI) -> None:
    """Start-up hook: when ADMIN_EMAIL and ADMIN_PASSWORD are set, make sure that admin exists.

    A password that breaks the policy stops start-up with one line naming ADMIN_PASSWORD.
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
    async with factory() as db, db.begin():
        outcome = await _create_or_promote(
            db,
            email=email,
            password=settings.admin_password,
            name="Administrator",
            settings=settings,
            reset_existing=False,
            now=utcnow(),
            password_hash=password_hash,
        )
    if outcome != "unchanged":
        log.info("bootstrap admin %s", outcome, extra={"outcome": outcome})

"""The rules of registration, login, refresh, logout and password reset (API.md §2).

Services flush, never commit: the request's session commits once after the route returns.
The one exception is `release_connection`: before a bcrypt wait, a service that has only *read*
so far ends that read transaction, so no pooled connection waits on bcrypt's queue.
Two things deliberately escape that transaction because they must stick although the request
answers with an error: throttle hits (auth/throttle.py) and the revocation of a session whose
refresh token was replayed (auth/sessions.py).

Emails are not sent here: functions return the message and the route queues it to go out
after the response (core/email.py). A password-reset request is handled entirely after the
response (`process_password_reset`), so known and unknown emails cost the caller the same.

Password work is budgeted per client address (`charge_password_work`) before the bcrypt queue:
every request that would cost a hash — login, the OAuth2 token form, registration, reset
confirmation, password change — takes one unit of its address's budget first, whatever email
it names, so one address sending junk is refused with 429 before it costs a hash and before it
can fill the queue that everybody else's logins wait in.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.auth import sessions
from joyhub.auth import throttle as buckets
from joyhub.auth.dependencies import ClientInfo
from joyhub.auth.passwords import enforce_policy
from joyhub.auth.sessions import IssuedTokens
from joyhub.auth.throttle import Throttle, login_bucket, reset_bucket
from joyhub.core import audit
from joyhub.core.config import Settings
from joyhub.core.email import OutgoingEmail, deliver, sender_for
from joyhub.core.errors import (
    AccountDisabled,
    EmailTaken,
    InvalidCredentials,
    InvalidResetToken,
    RateLimited,
)
from joyhub.core.security import (
    ensure_bcrypt_capacity,
    hash_password,
    new_opaque_token,
    token_digest,
    verify_dummy,
    verify_password,
)
from joyhub.models import PasswordResetToken, User

log = logging.getLogger("joyhub.auth")

EMAIL_MAX = 320
RESET_REQUEST_MESSAGE = "If an account exists for this email, a password-reset link has been sent."
HOUR = timedelta(hours=1)


async def _limit(
    throttle: Throttle, bucket: str, limit: int, window: timedelta, now: datetime, why: str
) -> None:
    decision = await throttle.acquire(bucket, limit=limit, window=window, now=now)
    if not decision.allowed:
        raise RateLimited(why, headers={"Retry-After": str(decision.retry_after)})


async def charge_password_work(
    throttle: Throttle, client: ClientInfo, settings: Settings, now: datetime
) -> None:
    """Take one unit of the client address's password-work budget, or refuse (429) before any
    hash is computed. Counted for every attempt, successful or not: it is a CPU budget."""
    await _limit(
        throttle,
        buckets.address_bucket("password_work", client.address),
        settings.password_work_max_per_address,
        timedelta(seconds=settings.password_work_window_seconds),
        now,
        "Too many password attempts from this address; try again later",
    )


async def register(
    db: AsyncSession,
    *,
    name: str,
    email: str,
    password: str,
    settings: Settings,
    throttle: Throttle,
    client: ClientInfo,
    now: datetime,
) -> tuple[User, IssuedTokens, OutgoingEmail]:
    """Create a user (role `user`, no subscription) and log them in.

    The insert is `ON CONFLICT (email) DO NOTHING`: of many parallel registrations of one email
    exactly one inserts, the others see no row and answer 409 EMAIL_TAKEN. The password is
    hashed before the first statement, so no pooled connection waits on bcrypt's queue. One
    client address may create REGISTER_MAX_PER_ADDRESS_PER_HOUR accounts an hour, and each
    attempt takes a unit of its password-work budget (429 past either, before the hash).
    """
    enforce_policy(password, "body.password")
    ensure_bcrypt_capacity()
    await _limit(
        throttle,
        buckets.address_bucket("register", client.address),
        settings.register_max_per_address_per_hour,
        HOUR,
        now,
        "Too many accounts created from this address; try again later",
    )
    await charge_password_work(throttle, client, settings, now)
    password_hash = await hash_password(password, settings.bcrypt_rounds)
    user_id = uuid.uuid4()
    inserted = (
        await db.execute(
            pg_insert(User)
            .values(
                id=user_id,
                name=name,
                email=email,
                password_hash=password_hash,
                role="user",
                is_active=True,
                created_at=now,
                updated_at=now,
                last_login_at=now,
            )
            .on_conflict_do_nothing(index_elements=[User.email])
            .returning(User.id)
        )
    ).scalar_one_or_none()
    if inserted is None:
        raise EmailTaken()
    user = (await db.execute(select(User).where(User.id == user_id))).scalar_one()
    tokens = await sessions.start_session(
        db, user, settings, now=now, user_agent=client.user_agent, client_ip=client.address
    )
    log.info("user registered", extra={"user_id": str(user.id)})
    welcome = OutgoingEmail(
        to=user.email,
        subject="Welcome to Joyfull UI Hub",
        body=(
            f"Hello {user.name},\n\n"
            "your Joyfull UI Hub account is ready. Pick a plan and start using the AI tools.\n\n"
            "If you did not create this account, you can ignore this message.\n"
        ),
        kind="welcome",
    )
    return user, tokens, welcome


async def release_connection(db: AsyncSession) -> None:
    """End the session's transaction so its pooled connection goes back before a bcrypt wait.

    bcrypt queues on a small thread pool (core/security.py); a request holding a connection
    while it waits there would, under a login burst, drain the pool and turn every other
    request into 503 after DB_POOL_TIMEOUT. Called only after reads (nothing of the request is
    written yet), so committing changes nothing in the database. The session's
    `expire_on_commit=False` (core/db.py) keeps the loaded rows usable without a reload; the
    next statement on the session opens a new transaction on a connection taken anew.
    """
    await db.commit()


async def authenticate(
    db: AsyncSession,
    *,
    email: str,
    password: str,
    settings: Settings,
    throttle: Throttle,
    client: ClientInfo,
    now: datetime,
) -> User:
    """Check email and password, within the client address's password-work budget and throttled
    per (email, client address).

    The attempt reserves a slot in its bucket *before* bcrypt runs, so the limit holds under a
    burst; when the bucket is full the answer is 429 with Retry-After without looking at the
    password. The right password clears the bucket; a wrong one leaves its hit counted. Unknown
    emails are checked against a dummy hash so they take as long as wrong passwords.

    No database connection is held while bcrypt waits: the user row is read, the values needed
    afterwards are copied, and the read transaction ends before the hash is checked. When
    bcrypt's queue is full the attempt is refused (503) before its throttle slot is taken, so
    an overloaded server does not count failures nobody made.
    """
    ensure_bcrypt_capacity()
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
            "Too many failed login attempts; try again later",
            headers={"Retry-After": str(decision.retry_after)},
        )
    user = None
    if len(email) <= EMAIL_MAX and "\x00" not in email:  # else: unknown, without asking the DB
        user = (await db.execute(select(User).where(User.email == email))).scalar_one_or_none()
    await release_connection(db)
    if user is None:
        await verify_dummy(password, settings.bcrypt_rounds)
        log.info("login failed", extra={"reason": "credentials"})
        raise InvalidCredentials()
    user_id, password_hash, is_active = user.id, user.password_hash, user.is_active
    if not await verify_password(password, password_hash):
        log.info("login failed", extra={"reason": "credentials", "user_id": str(user_id)})
        raise InvalidCredentials()
    await throttle.clear(bucket)
    if not is_active:
        log.info("login refused", extra={"reason": "disabled", "user_id": str(user_id)})
        raise AccountDisabled()
    return user


async def login(
    db: AsyncSession,
    *,
    email: str,
    password: str,
    settings: Settings,
    throttle: Throttle,
    client: ClientInfo,
    now: datetime,
    with_refresh: bool = True,
) -> tuple[str, str | None, int]:
    """Authenticate, record the login, open a session: (access, refresh or None, expires_in).

    `with_refresh=False` is the OAuth2 form endpoint (`/auth/token`), which hands out an access
    token only (still bound to a session of its own, so logout-all ends it).
    """
    user = await authenticate(
        db, email=email, password=password, settings=settings, throttle=throttle, client=client, now=now
    )
    user.last_login_at = now
    if with_refresh:
        issued = await sessions.start_session(
            db, user, settings, now=now, user_agent=client.user_agent, client_ip=client.address
        )
        log.info("login succeeded", extra={"user_id": str(user.id), "session_id": str(issued.session_id)})
        return issued.access_token, issued.refresh_token, issued.expires_in
    session_id = await sessions.open_session(
        db, user, now=now, user_agent=client.user_agent, client_ip=client.address
    )
    access, expires_in = sessions.access_token_for(user, session_id, settings)
    log.info("login succeeded", extra={"user_id": str(user.id), "session_id": str(session_id)})
    return access, None, expires_in


async def refresh(
    db: AsyncSession,
    *,
    refresh_token: str,
    settings: Settings,
    factory: async_sessionmaker[AsyncSession],
    now: datetime,
) -> IssuedTokens:
    return await sessions.rotate(db, refresh_token, settings, now=now, factory=factory)


async def logout(db: AsyncSession, *, refresh_token: str, now: datetime) -> None:
    await sessions.logout(db, refresh_token, now=now)


async def logout_all(db: AsyncSession, *, user: User, include_api_keys: bool, now: datetime) -> None:
    """End every session of the user, and every API key too when asked; audited either way."""
    count = await sessions.revoke_user_sessions(db, user.id, reason="logout_all", now=now)
    keys = 0
    if include_api_keys:
        keys = await sessions.revoke_user_api_keys(db, user.id, reason="logout_all", actor=user, now=now)
    audit.record(
        db,
        actor=user,
        action="user.logout_all",
        target_type="user",
        target_id=user.id,
        changes={"sessions_revoked": count, "api_keys_revoked": keys},
    )
    log.info("all sessions revoked", extra={"user_id": str(user.id), "sessions": count, "api_keys": keys})


async def limit_reset_requests(
    throttle: Throttle, client: ClientInfo, settings: Settings, now: datetime
) -> None:
    """PASSWORD_RESET_MAX_PER_ADDRESS_PER_HOUR reset requests per client address (429 past it),
    so one address cannot mail every user. Decided before the email is looked at, so the answer
    says nothing about the account."""
    await _limit(
        throttle,
        buckets.address_bucket("reset_request", client.address),
        settings.password_reset_max_per_address_per_hour,
        HOUR,
        now,
        "Too many password-reset requests from this address; try again later",
    )


async def process_password_reset(
    factory: async_sessionmaker[AsyncSession],
    *,
    email: str,
    settings: Settings,
    throttle: Throttle,
    now: datetime,
) -> None:
    """After the response (both for known and unknown emails, so timing reveals nothing): make
    the token in a transaction of its own, then send the email. Never raises: the caller has
    had its 202 already; a failure is logged without the email address or any token."""
    try:
        async with factory() as db, db.begin():
            message = await request_password_reset(
                db, email=email, settings=settings, throttle=throttle, now=now
            )
        if message is not None:
            await deliver(sender_for(settings), message)
    except Exception as exc:  # nothing may escape into the server after the response
        log.error("password reset request failed", extra={"error": type(exc).__name__}, exc_info=exc)


async def request_password_reset(
    db: AsyncSession,
    *,
    email: str,
    settings: Settings,
    throttle: Throttle,
    now: datetime,
) -> OutgoingEmail | None:
    """Make a reset token and the email carrying it, when the account exists and is active.

    The caller answers the same 202 whatever happens here. More than
    PASSWORD_RESET_MAX_PER_HOUR requests for one email in an hour are dropped silently (counted
    for unknown emails too, so the behaviour reveals nothing). Only the newest token works:
    older unused ones are retired under a lock on the user row, so two parallel requests
    cannot leave two live tokens.
    """
    decision = await throttle.acquire(
        reset_bucket(email),
        limit=settings.password_reset_max_per_hour,
        window=HOUR,
        now=now,
    )
    if not decision.allowed:
        log.info("password reset request dropped (rate limit)")
        return None
    user = (await db.execute(select(User).where(User.email == email).with_for_update())).scalar_one_or_none()
    if user is None or not user.is_active:
        log.info("password reset requested for no usable account")
        return None
    await db.execute(
        update(PasswordResetToken)
        .where(PasswordResetToken.user_id == user.id, PasswordResetToken.used_at.is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    raw = new_opaque_token(32)
    ttl = timedelta(hours=settings.password_reset_expire_hours)
    db.add(
        PasswordResetToken(
            id=uuid.uuid4(),
            user_id=user.id,
            token_hash=token_digest(raw),
            created_at=now,
            expires_at=now + ttl,
        )
    )
    await db.flush()
    log.info("password reset token issued", extra={"user_id": str(user.id)})
    link = settings.password_reset_url.replace("{token}", raw)
    hours = settings.password_reset_expire_hours
    return OutgoingEmail(
        to=user.email,
        subject="Reset your Joyfull UI Hub password",
        body=(
            f"Hello {user.name},\n\n"
            "someone (hopefully you) asked to reset the password of your Joyfull UI Hub account.\n"
            f"Open this link within {hours} hours to choose a new password:\n\n{link}\n\n"
            "Setting a new password this way signs the account out everywhere and revokes every\n"
            "API key of the account (account recovery assumes it may have been compromised):\n"
            "create new keys for your scripts afterwards.\n\n"
            "The link works once. If you did not ask for this, ignore this message; your password\n"
            "and keys stay as they are.\n"
        ),
        kind="password_reset",
        secrets=(raw, link),
    )


def _usable_reset_token(digest: bytes, now: datetime) -> tuple[ColumnElement[bool], ...]:
    return (
        PasswordResetToken.token_hash == digest,
        PasswordResetToken.used_at.is_(None),
        PasswordResetToken.expires_at > now,
    )


async def _newer_reset_token_exists(db: AsyncSession, user_id: uuid.UUID, created_at: datetime) -> bool:
    newer = (
        await db.execute(
            select(PasswordResetToken.id)
            .where(PasswordResetToken.user_id == user_id, PasswordResetToken.created_at > created_at)
            .limit(1)
        )
    ).scalar_one_or_none()
    return newer is not None


async def _reset_token_owner(db: AsyncSession, digest: bytes, now: datetime) -> User:
    """The active user a reset token would reset, read without writing or locking anything."""
    found = (
        await db.execute(
            select(PasswordResetToken.user_id, PasswordResetToken.created_at).where(
                *_usable_reset_token(digest, now)
            )
        )
    ).one_or_none()
    if found is None:
        raise InvalidResetToken()
    user_id, created_at = found
    if await _newer_reset_token_exists(db, user_id, created_at):
        raise InvalidResetToken()
    user = (await db.execute(select(User).where(User.id == user_id))).scalar_one()
    if not user.is_active:
        raise AccountDisabled()
    return user


async def confirm_password_reset(
    db: AsyncSession,
    *,
    token: str,
    new_password: str,
    settings: Settings,
    throttle: Throttle,
    client: ClientInfo,
    now: datetime,
) -> IssuedTokens:
    """Set a new password with a reset token: consume it atomically, revoke every session and
    every API key (account recovery), log in.

    The policy is checked first, so a weak password does not burn the token. Then the token is
    checked by reading only, and that read transaction ends before bcrypt hashes the new
    password, so no pooled connection waits on bcrypt's queue (and a bad token costs no hash).
    The writes follow in one new transaction, as registration's do after its hash. The user row
    is locked first (the order of every writer of a user's reset tokens, so a confirm cannot
    deadlock with a reset request), then the token is consumed — a conditional UPDATE, so it
    is single use even under parallel confirms: the loser finds it used and answers 400 before
    writing anything. A token that is not the user's newest is refused even if it somehow
    escaped retirement, and the account must still be active under the lock. Only then, with
    nothing left to refuse, are the new password, the revoked sessions and the new session
    written (and the change logged).
    """
    enforce_policy(new_password, "body.new_password")
    digest = token_digest(token)
    user = await _reset_token_owner(db, digest, now)
    await release_connection(db)
    ensure_bcrypt_capacity()
    await charge_password_work(throttle, client, settings, now)
    password_hash = await hash_password(new_password, settings.bcrypt_rounds)
    user_id = user.id
    # the write transaction: lock the user row, then the account's state as it is now
    active = (
        await db.execute(select(User.is_active).where(User.id == user_id).with_for_update())
    ).scalar_one()
    consumed = (
        await db.execute(
            update(PasswordResetToken)
            .where(*_usable_reset_token(digest, now), PasswordResetToken.user_id == user_id)
            .values(used_at=now)
            .returning(PasswordResetToken.created_at)
            .execution_options(synchronize_session=False)
        )
    ).scalar_one_or_none()
    if consumed is None or await _newer_reset_token_exists(db, user_id, consumed):
        raise InvalidResetToken()
    if not active:
        raise AccountDisabled()
    user.last_login_at = now
    return await sessions.replace_password(
        db,
        user,
        password_hash,
        reason="password_reset",
        settings=settings,
        user_agent=client.user_agent,
        client_ip=client.address,
        now=now,
        revoke_api_keys=True,
    )

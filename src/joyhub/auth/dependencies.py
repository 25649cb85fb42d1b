"""Who is calling: the principal dependencies every protected route names in its signature.

`CurrentUser` accepts an access token or an API key; `AccessTokenUser` refuses API keys (the
credential-management endpoints); `AdminUser` requires the *current* role from the database.
An access token is checked against its session on every request with one indexed query, so a
revoked session (logout, password change, reuse, disabled account) stops it at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, OAuth2PasswordBearer
from sqlalchemy import bindparam, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.context import user_id_var
from joyhub.core.db import DbSession
from joyhub.core.errors import Forbidden, InvalidToken, NotAuthenticated
from joyhub.core.security import API_KEY_PREFIX, TokenError, decode_access_token, token_digest
from joyhub.models import ApiKey, AuthSession, User

API_KEY_TOUCH_INTERVAL = timedelta(minutes=1)

# OAuth2 password flow, so the docs' Authorize button can log in through POST /auth/token;
# on the wire it is plain `Authorization: Bearer <access token or API key>`.
bearer_scheme = OAuth2PasswordBearer(
    tokenUrl="/api/v1/auth/token",
    auto_error=False,
    scheme_name="BearerAuth",
    description="Access token (JWT) from /auth/login or /auth/token, or an API key (jfui_…)",
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="ApiKeyAuth", description="API key (jfui_…)"
)


@dataclass
class Principal:
    """The authenticated caller: the user row as it is now, and how they authenticated."""

    user: User
    session_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None

    @property
    def id(self) -> uuid.UUID:
        return self.user.id

    @property
    def via_api_key(self) -> bool:
        return self.api_key_id is not None

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"


# Built once: every authenticated request runs it, and a statement object built per request costs
# more Python than the indexed lookup costs PostgreSQL (the compiled form is cached by its key).
_SESSION_USER = (
    select(User)
    .join(AuthSession, AuthSession.user_id == User.id)
    .where(
        AuthSession.id == bindparam("session_id"),
        AuthSession.revoked_at.is_(None),
        User.id == bindparam("user_id"),
    )
)


@dataclass(frozen=True)
class Credential:
    """The credential a request presents, checked as far as it can be without the database.

    An access token's signature and expiry are verified (`user_id`, `session_id` set); an API key
    is only well-formed (`api_key_digest` set, the form stored at rest). Whether the session is
    still live, the key still active and the user still enabled is the database's to say: the
    principal dependencies below ask it, and so does the gateway's admission statement, which
    folds that check into its one round trip (`tools/ledger.py`).
    """

    user_id: uuid.UUID | None = None
    session_id: uuid.UUID | None = None
    api_key_digest: bytes | None = None


def credential_user_sql(session_id: str, user_id: str, key_digest: str, now: str) -> str:
    """The rule `current_principal` applies, as SQL for statements that check a credential
    themselves: the user of a live session of that very user, or of an active, unexpired API
    key; the user enabled. At most one row: a credential has a session or a key digest, not both,
    and both lookups are by unique key. The arguments are the statement's placeholders."""
    return f"""
        SELECT u.id AS user_id FROM auth_sessions AS a JOIN users AS u ON u.id = a.user_id
        WHERE a.id = {session_id} AND u.id = {user_id} AND a.revoked_at IS NULL AND u.is_active
        UNION ALL
        SELECT u.id FROM api_keys AS k JOIN users AS u ON u.id = k.user_id
        WHERE k.key_hash = {key_digest} AND k.is_active
          AND (k.expires_at IS NULL OR k.expires_at > {now}) AND u.is_active
    """  # noqa: S608 (placeholders only: every value is a bound parameter)


_CONFIRM = text(credential_user_sql(":session_id", ":user_id", ":key_digest", ":now"))


async def confirm_credential(engine: AsyncEngine, credential: Credential) -> None:
    """401 unless the credential is still good: for a request refused before its own statement
    could check it (a validation error), so authentication still answers first (API.md §5)."""
    async with engine.connect() as conn:
        found = (
            await conn.execute(
                _CONFIRM,
                {
                    "session_id": credential.session_id,
                    "user_id": credential.user_id,
                    "key_digest": credential.api_key_digest,
                    "now": utcnow(),
                },
            )
        ).first()
    if found is None:
        raise InvalidToken()


async def presented_credential(
    request: Request,
    bearer: Annotated[str | None, Depends(bearer_scheme)],
    x_api_key: Annotated[str | None, Depends(api_key_scheme)],
) -> Credential:
    """The caller's `Authorization: Bearer …` (token or key) or `X-API-Key`; 401 when absent or bad."""
    if bearer:
        credential = bearer
    elif x_api_key:
        credential = x_api_key
    else:
        if request.headers.get("authorization"):
            raise InvalidToken()
        raise NotAuthenticated()
    if credential.startswith(API_KEY_PREFIX):
        if len(credential) > 200:
            raise InvalidToken()
        return Credential(api_key_digest=token_digest(credential))
    try:
        claims = decode_access_token(credential, request.app.state.settings.secret_key())
    except TokenError:
        raise InvalidToken() from None
    return Credential(user_id=claims.user_id, session_id=claims.session_id)


async def deferred_credential(
    request: Request, credential: Annotated[Credential, Depends(presented_credential)]
) -> Credential:
    """`presented_credential` for a route whose own statement checks it in the database; a
    validation error raised before that statement runs confirms it first (`confirm_credential`,
    called by the error handler through `request.state.confirm_credential`)."""

    # a partial, not a closure over `request`: that would make request and state a reference
    # cycle, which only the cyclic GC frees (seen as RSS growth under load)
    request.state.confirm_credential = partial(confirm_credential, request.app.state.engine, credential)
    return credential


async def _from_access_token(session: DbSession, credential: Credential) -> Principal:
    row = (
        await session.execute(
            _SESSION_USER, {"session_id": credential.session_id, "user_id": credential.user_id}
        )
    ).scalar_one_or_none()
    if row is None or not row.is_active:
        raise InvalidToken()
    return Principal(user=row, session_id=credential.session_id)


async def _from_api_key(session: DbSession, digest: bytes) -> Principal:
    now = utcnow()
    found = (
        await session.execute(
            select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash == digest)
        )
    ).one_or_none()
    if found is None:
        raise InvalidToken()
    api_key, user = found
    if (
        not api_key.is_active
        or (api_key.expires_at is not None and api_key.expires_at <= now)
        or not user.is_active
    ):
        raise InvalidToken()
    if api_key.last_used_at is None or api_key.last_used_at < now - API_KEY_TOUCH_INTERVAL:
        # at most one write a minute per key, not one per request
        await session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == api_key.id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - API_KEY_TOUCH_INTERVAL),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
    return Principal(user=user, api_key_id=api_key.id)


async def current_principal(
    request: Request,
    session: DbSession,
    credential: Annotated[Credential, Depends(presented_credential)],
) -> Principal:
    """Authenticate the caller from `Authorization: Bearer …` or `X-API-Key`."""
    if credential.api_key_digest is not None:
        principal = await _from_api_key(session, credential.api_key_digest)
    else:
        principal = await _from_access_token(session, credential)
    user_id_var.set(str(principal.user.id))
    request.state.principal = principal
    return principal


async def access_token_principal(
    principal: Annotated[Principal, Depends(current_principal)],
) -> Principal:
    """Credential-management endpoints: an API key may not manage credentials."""
    if principal.via_api_key:
        raise Forbidden("API keys cannot manage credentials; use an access token")
    return principal


async def require_admin(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if principal.user.role != "admin":
        raise Forbidden("Administrator role required")
    return principal


@dataclass(frozen=True)
class ClientInfo:
    """Where a request came from: recorded on a new session and part of the login throttle key.

    The address is the peer address as uvicorn reports it (`request.client.host`), which honours
    X-Forwarded-For only from trusted proxies (uvicorn's `forwarded_allow_ips`).
    """

    address: str
    user_agent: str | None


async def client_info(request: Request) -> ClientInfo:
    return ClientInfo(
        address=request.client.host if request.client else "unknown",
        user_agent=request.headers.get("user-agent"),
    )


Client = Annotated[ClientInfo, Depends(client_info)]
CurrentUser = Annotated[Principal, Depends(current_principal)]
# the credential as presented, for the one route whose own statement checks it against the
# database (the gateway's admission): see `Credential`
PresentedCredential = Annotated[Credential, Depends(deferred_credential)]
AccessTokenUser = Annotated[Principal, Depends(access_token_principal)]
AdminUser = Annotated[Principal, Depends(require_admin)]

"""Who is calling: the principal dependencies every protected route names in its signature.

`CurrentUser` accepts an access token or an API key; `AccessTokenUser` refuses API keys (the
credential-management endpoints); `AdminUser` requires the *current* role from the database.
Every request's credential is checked by the one rule of `credentials.py` (a session still live,
a key still active, the user enabled) in one indexed query, so a revoked session (logout,
password change, reuse, disabled account) stops it at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from functools import partial
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import APIKeyHeader, OAuth2PasswordBearer
from sqlalchemy import DateTime, Uuid, column, select, text

from joyhub.auth.credentials import API_KEY_TOUCH_INTERVAL, CREDENTIAL_USERS, Credential, confirm
from joyhub.core.clock import utcnow
from joyhub.core.context import user_id_var
from joyhub.core.db import DbSession
from joyhub.core.errors import Forbidden, InvalidToken, NotAuthenticated
from joyhub.core.security import API_KEY_PREFIX, TokenError, decode_access_token, token_digest
from joyhub.models import User

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
# The user row joined to the one credential rule.
_CREDENTIAL = (
    text(CREDENTIAL_USERS)
    .columns(
        column("user_id", Uuid()),
        column("api_key_id", Uuid()),
        column("key_last_used_at", DateTime(timezone=True)),
        column("org_id", Uuid()),
    )
    .subquery("cred")
)
_PRINCIPAL = select(User, _CREDENTIAL.c.api_key_id, _CREDENTIAL.c.key_last_used_at).join_from(
    _CREDENTIAL, User, User.id == _CREDENTIAL.c.user_id
)
_TOUCH_KEY = text(
    "UPDATE api_keys SET last_used_at = :now"
    " WHERE id = :key_id AND (last_used_at IS NULL OR last_used_at < :stale)"
)


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
    validation error raised before that statement runs confirms it first (`credentials.confirm`,
    called by the error handler through `request.state.confirm_credential`)."""

    # a partial, not a closure over `request`: that would make request and state a reference
    # cycle, which only the cyclic GC frees (seen as RSS growth under load)
    request.state.confirm_credential = partial(confirm, request.app.state.engine, credential)
    return credential


async def billing_credential(
    credential: Annotated[Credential, Depends(deferred_credential)],
    x_org_id: Annotated[
        uuid.UUID | None,
        Header(
            alias="X-Org-ID",
            description="Bill this organization's subscription instead of your own (you must be a "
            "member; otherwise 404). An organization's API key bills its organization without it.",
        ),
    ] = None,
) -> Credential:
    """`deferred_credential` with the account the call bills (API.md §13): the gateway's admission
    statement checks the membership in the same round trip as everything else."""
    return credential if x_org_id is None else replace(credential, org_id=x_org_id)


async def _principal(session: DbSession, credential: Credential) -> Principal:
    """The caller by the one credential rule; 401 when it no longer holds."""
    now = utcnow()
    found = (await session.execute(_PRINCIPAL, credential.params(now))).one_or_none()
    if found is None:
        raise InvalidToken()
    user, api_key_id, last_used_at = found
    if api_key_id is not None and (last_used_at is None or last_used_at < now - API_KEY_TOUCH_INTERVAL):
        # at most one write a minute per key, not one per request
        await session.execute(
            _TOUCH_KEY, {"now": now, "key_id": api_key_id, "stale": now - API_KEY_TOUCH_INTERVAL}
        )
    return Principal(user=user, session_id=credential.session_id, api_key_id=api_key_id)


async def current_principal(
    request: Request,
    session: DbSession,
    credential: Annotated[Credential, Depends(presented_credential)],
) -> Principal:
    """Authenticate the caller from `Authorization: Bearer …` or `X-API-Key`."""
    principal = await _principal(session, credential)
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
# the same, with the organization an `X-Org-ID` header asks to bill (every invocation surface)
BillingCredential = Annotated[Credential, Depends(billing_credential)]
AccessTokenUser = Annotated[Principal, Depends(access_token_principal)]
AdminUser = Annotated[Principal, Depends(require_admin)]

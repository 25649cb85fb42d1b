"""HTTP routes of the users domain (API.md §3): thin — parse, call the service, wrap in the envelope.

`CurrentUser` (access token or API key) may read and rename the account; the credential
endpoints (`/me/password`, `/me/api-keys*`) take `AccessTokenUser`, which answers 403 to an API key.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response

from joyhub.auth.dependencies import AccessTokenUser, Client, CurrentUser
from joyhub.auth.schemas import TokenPair
from joyhub.auth.throttle import throttle_for
from joyhub.core.clock import utcnow
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok, page
from joyhub.core.pagination import PageParams
from joyhub.users import service
from joyhub.users.schemas import (
    ApiKeyCreatedOut,
    ApiKeyCreateIn,
    ApiKeyOut,
    PasswordChangeIn,
    UserOut,
    UserUpdateIn,
)

router = APIRouter()


def _doc(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": Envelope[None], "description": description}}


_AUTH = {**_doc(401, "Not authenticated or invalid token")}
_CREDENTIALS = {**_AUTH, **_doc(403, "API keys cannot manage credentials")}
_BODY = {
    **_doc(400, "Malformed JSON"),
    **_doc(413, "Request body too large"),
    **_doc(422, "Validation error"),
}


@router.get("/me", response_model=Envelope[UserOut], summary="The caller's account", responses=_AUTH)
async def get_me(principal: CurrentUser) -> Envelope[UserOut]:
    return ok(UserOut.model_validate(principal.user))


@router.patch(
    "/me",
    response_model=Envelope[UserOut],
    summary="Rename the caller's account",
    responses={**_AUTH, **_BODY},
)
async def update_me(body: UserUpdateIn, principal: CurrentUser, db: DbSession) -> Envelope[UserOut]:
    user = await service.update_profile(db, principal.user, name=body.name, now=utcnow())
    return ok(UserOut.model_validate(user))


@router.post(
    "/me/password",
    response_model=Envelope[TokenPair],
    summary="Change the password: ends every session, returns a pair for a new one",
    responses={
        **_CREDENTIALS,
        **_BODY,
        **_doc(401, "Wrong current password, or not authenticated"),
        **_doc(429, "Too many failed attempts (has Retry-After)"),
    },
)
async def change_password(
    body: PasswordChangeIn,
    principal: AccessTokenUser,
    client: Client,
    request: Request,
    db: DbSession,
) -> Envelope[TokenPair]:
    issued = await service.change_password(
        db,
        principal.user,
        current_password=body.current_password,
        new_password=body.new_password,
        settings=request.app.state.settings,
        throttle=throttle_for(request.app.state),
        client=client,
        now=utcnow(),
    )
    return ok(
        TokenPair(
            access_token=issued.access_token, refresh_token=issued.refresh_token, expires_in=issued.expires_in
        )
    )


@router.get(
    "/me/api-keys",
    response_model=Envelope[list[ApiKeyOut]],
    summary="The caller's API keys, newest first (revoked and expired ones included)",
    responses={**_CREDENTIALS, **_doc(422, "Validation error")},
)
async def list_api_keys(
    principal: AccessTokenUser, db: DbSession, paging: PageParams
) -> Envelope[list[ApiKeyOut]]:
    keys, total = await service.list_api_keys(db, principal.id, page=paging)
    now = utcnow()
    return page(
        [service.api_key_out(k, now) for k in keys], offset=paging.offset, limit=paging.limit, total=total
    )


@router.post(
    "/me/api-keys",
    status_code=201,
    response_model=Envelope[ApiKeyCreatedOut],
    summary="Create an API key; the full key is in this response only",
    responses={**_CREDENTIALS, **_BODY, **_doc(409, "At most 20 active keys")},
)
async def create_api_key(
    body: ApiKeyCreateIn, principal: AccessTokenUser, db: DbSession
) -> Envelope[ApiKeyCreatedOut]:
    now = utcnow()
    key, raw = await service.create_api_key(
        db,
        principal.user,
        name=body.name,
        expires_at=body.expires_at,
        now=now,
        requests_per_minute=body.requests_per_minute,
    )
    listed = service.api_key_out(key, now)
    return ok(ApiKeyCreatedOut(**listed.model_dump(), key=raw))


@router.delete(
    "/me/api-keys/{key_id}",
    status_code=204,
    response_class=Response,
    summary="Revoke an API key; it stops working at once",
    responses={**_CREDENTIALS, **_doc(404, "No such key (or another user's)"), **_doc(422, "Malformed id")},
)
async def revoke_api_key(key_id: uuid.UUID, principal: AccessTokenUser, db: DbSession) -> Response:
    await service.revoke_api_key(db, principal.user, key_id, now=utcnow())
    return Response(status_code=204)

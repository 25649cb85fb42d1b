"""HTTP routes of the auth domain (API.md §2): thin — parse, call the service, wrap in the envelope."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Depends, Request, Response
from fastapi.security import OAuth2PasswordRequestForm

from joyhub.auth import service
from joyhub.auth.dependencies import AccessTokenUser, Client
from joyhub.auth.schemas import (
    AccessTokenOut,
    LoginIn,
    LogoutAllIn,
    MessageOut,
    PasswordResetConfirmIn,
    PasswordResetIn,
    RefreshIn,
    RegisterIn,
    RegisterOut,
    TokenPair,
)
from joyhub.auth.sessions import IssuedTokens
from joyhub.auth.throttle import throttle_for
from joyhub.core.clock import utcnow
from joyhub.core.config import Settings
from joyhub.core.db import DbSession
from joyhub.core.email import send_in_background
from joyhub.core.envelope import Envelope, ok
from joyhub.users.schemas import UserOut, normalize_email

router = APIRouter()

_ERR: dict[int | str, dict[str, Any]] = {
    400: {"model": Envelope[None], "description": "Malformed JSON"},
    401: {"model": Envelope[None], "description": "Not authenticated / invalid credentials"},
    403: {"model": Envelope[None], "description": "Forbidden"},
    409: {"model": Envelope[None], "description": "Conflict"},
    413: {"model": Envelope[None], "description": "Request body too large"},
    422: {"model": Envelope[None], "description": "Validation error"},
    429: {"model": Envelope[None], "description": "Too many attempts (has Retry-After)"},
    503: {
        "model": Envelope[None],
        "description": "SERVICE_UNAVAILABLE: the database is unreachable, or too many passwords are"
        " waiting to be checked in this process (then with Retry-After)",
    },
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: _ERR[code] for code in (400, 413, 422, *codes)}


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _pair(issued: IssuedTokens) -> TokenPair:
    return TokenPair(
        access_token=issued.access_token, refresh_token=issued.refresh_token, expires_in=issued.expires_in
    )


@router.post(
    "/register",
    status_code=201,
    response_model=Envelope[RegisterOut],
    summary="Create an account (role user, no subscription) and log in",
    responses=_errors(409, 429, 503),
)
async def register(
    body: RegisterIn, request: Request, client: Client, db: DbSession, background: BackgroundTasks
) -> Envelope[RegisterOut]:
    settings = _settings(request)
    user, issued, welcome = await service.register(
        db,
        name=body.name,
        email=body.email,
        password=body.password,
        settings=settings,
        throttle=throttle_for(request.app.state),
        client=client,
        now=utcnow(),
    )
    send_in_background(background, settings, welcome)
    return ok(RegisterOut(user=UserOut.model_validate(user), tokens=_pair(issued)))


@router.post(
    "/login",
    response_model=Envelope[TokenPair],
    summary="Log in with email and password",
    responses=_errors(401, 403, 429, 503),
)
async def login(body: LoginIn, request: Request, client: Client, db: DbSession) -> Envelope[TokenPair]:
    access, refresh, expires_in = await service.login(
        db,
        email=body.email,
        password=body.password,
        settings=_settings(request),
        throttle=throttle_for(request.app.state),
        client=client,
        now=utcnow(),
    )
    assert refresh is not None
    return ok(TokenPair(access_token=access, refresh_token=refresh, expires_in=expires_in))


@router.post(
    "/token",
    response_model=AccessTokenOut,
    summary="OAuth2 password flow (for the docs' Authorize button); answers without the envelope",
    responses=_errors(401, 403, 429, 503),
    # the form's schema is FastAPI's (OAuth2PasswordRequestForm): its example goes on the media type
    openapi_extra={
        "requestBody": {
            "content": {
                "application/x-www-form-urlencoded": {
                    "example": {"username": "ada@example.com", "password": "Analytical-Engine-1843"}
                }
            }
        }
    },
)
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], request: Request, client: Client, db: DbSession
) -> AccessTokenOut:
    access, _, _ = await service.login(
        db,
        email=normalize_email(form.username),
        password=form.password,
        settings=_settings(request),
        throttle=throttle_for(request.app.state),
        client=client,
        now=utcnow(),
        with_refresh=False,
    )
    return AccessTokenOut(access_token=access)


@router.post(
    "/refresh",
    response_model=Envelope[TokenPair],
    summary="Rotate a refresh token (single use; a replay revokes the whole session)",
    responses=_errors(401),
)
async def refresh(body: RefreshIn, request: Request, db: DbSession) -> Envelope[TokenPair]:
    issued = await service.refresh(
        db,
        refresh_token=body.refresh_token,
        settings=_settings(request),
        factory=request.app.state.sessionmaker,
        now=utcnow(),
    )
    return ok(_pair(issued))


@router.post(
    "/logout",
    status_code=204,
    response_class=Response,
    summary="End the session of this refresh token (204 even when unknown)",
    responses=_errors(),
)
async def logout(body: RefreshIn, db: DbSession) -> Response:
    await service.logout(db, refresh_token=body.refresh_token, now=utcnow())
    return Response(status_code=204)


@router.post(
    "/logout-all",
    status_code=204,
    response_class=Response,
    summary="End every session of the caller (access token only); with include_api_keys, every API key too",
    responses={401: _ERR[401], 403: _ERR[403], 422: _ERR[422]},
)
async def logout_all(
    principal: AccessTokenUser,
    db: DbSession,
    body: Annotated[LogoutAllIn | None, Body(examples=[{"include_api_keys": True}])] = None,
) -> Response:
    include = body is not None and body.include_api_keys
    await service.logout_all(db, user=principal.user, include_api_keys=include, now=utcnow())
    return Response(status_code=204)


@router.post(
    "/password-reset",
    status_code=202,
    response_model=Envelope[MessageOut],
    summary="Email a password-reset link (same answer, and the same time, for known and unknown emails)",
    responses=_errors(429),
)
async def password_reset(
    body: PasswordResetIn, request: Request, client: Client, background: BackgroundTasks
) -> Envelope[MessageOut]:
    settings = _settings(request)
    throttle = throttle_for(request.app.state)
    now = utcnow()
    await service.limit_reset_requests(throttle, client, settings, now)
    # everything that depends on the email happens after the response, for every email alike
    background.add_task(
        service.process_password_reset,
        request.app.state.sessionmaker,
        email=body.email,
        settings=settings,
        throttle=throttle,
        now=now,
    )
    return ok(MessageOut(message=service.RESET_REQUEST_MESSAGE))


@router.post(
    "/password-reset/confirm",
    response_model=Envelope[TokenPair],
    summary="Set a new password with a reset token; revokes every session and API key, and logs in",
    responses={
        **_errors(403, 429, 503),
        400: {"model": Envelope[None], "description": "Invalid reset token"},
    },
)
async def password_reset_confirm(
    body: PasswordResetConfirmIn, request: Request, client: Client, db: DbSession
) -> Envelope[TokenPair]:
    issued = await service.confirm_password_reset(
        db,
        token=body.token,
        new_password=body.new_password,
        settings=_settings(request),
        throttle=throttle_for(request.app.state),
        client=client,
        now=utcnow(),
    )
    return ok(_pair(issued))

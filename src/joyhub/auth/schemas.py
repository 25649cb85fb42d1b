"""Request and response models of the auth domain (API.md §2).

Every request model forbids unknown fields (nobody can smuggle `role` into a registration) and
bounds every string; the field types (users/schemas.py) refuse NUL in every text field and any
control character in names, with a 422. The password *policy* is not checked here but in the
service, so that one 422 names every unmet rule; these models only cap the length.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from joyhub.users.schemas import Email, LoginEmail, Name, Password, Secret, UserOut


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterIn(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "Ada Lovelace", "email": "ada@example.com", "password": "Analytical-Engine-1843"}
            ]
        },
    )

    name: Name
    email: Email
    password: Password


class LoginIn(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"email": "ada@example.com", "password": "Analytical-Engine-1843"}]},
    )

    # Not EmailStr: a login with any string is just an unknown email (same 401), and an
    # operator-made admin may use an address such as admin@localhost.
    email: LoginEmail
    password: Password


class RefreshIn(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"refresh_token": "f3Jq0cXkq4oH3uN1Ck8a7bVxY2w5eZr9TtLmPdQsGhA"}]},
    )

    refresh_token: Secret


class LogoutAllIn(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"include_api_keys": True}]})

    # strict: a destructive switch must be a JSON boolean, not "yes" or 1
    include_api_keys: StrictBool = Field(False, description="Revoke every API key of the account too")


class PasswordResetIn(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"email": "ada@example.com"}]})

    email: Email


class PasswordResetConfirmIn(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"token": "Zp4vR8yTq1LmN6cW0eXb3Hs7KdGj2Fa9", "new_password": "Difference-Engine-1822"}
            ]
        },
    )

    token: Secret
    new_password: Password


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int = Field(description="Seconds until the access token expires")


class AccessTokenOut(BaseModel):
    """`POST /auth/token`: the plain OAuth2 shape (no envelope), for the docs' Authorize button."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret


class RegisterOut(BaseModel):
    user: UserOut
    tokens: TokenPair


class MessageOut(BaseModel):
    message: str

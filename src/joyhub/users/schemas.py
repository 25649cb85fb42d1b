"""Request and response models of the users domain (API.md §3), and the bounded text field
types shared with the auth domain (auth imports from here, never the other way round).

Every string is bounded; NUL bytes (and, in names, any control character) answer 422 rather
than reaching PostgreSQL, which would refuse them with a 500.
"""

from __future__ import annotations

import unicodedata
import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    field_validator,
)

PASSWORD_INPUT_MAX = 1024  # the policy's own maximum (128) is reported as a rule; this is a hard cap
TOKEN_INPUT_MAX = 512


def reject_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def reject_control(value: str) -> str:
    """Names and labels: no NUL, no line breaks or other control characters."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters")
    return value


def normalize_email(value: str) -> str:
    """The stored form of an email address: NFC, trimmed, lower-cased."""
    return unicodedata.normalize("NFC", value).strip().lower()


Password = Annotated[str, Field(max_length=PASSWORD_INPUT_MAX), AfterValidator(reject_nul)]
Secret = Annotated[str, Field(min_length=1, max_length=TOKEN_INPUT_MAX), AfterValidator(reject_nul)]
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(reject_control),
]
Email = Annotated[EmailStr, AfterValidator(normalize_email)]
LoginEmail = Annotated[
    str, Field(min_length=1, max_length=320), AfterValidator(reject_nul), AfterValidator(normalize_email)
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    email: str
    role: Literal["user", "admin"]
    is_active: bool
    created_at: datetime
    updated_at: datetime


class UserUpdateIn(_Strict):
    """PATCH semantics: an omitted field is left as it is; `null` is refused."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "Ada King"}]})

    name: Name | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # only an explicit null gets here; the default is not validated
            raise ValueError("may not be null")
        return value


class PasswordChangeIn(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"current_password": "Analytical-Engine-1843", "new_password": "Difference-Engine-1822"}
            ]
        },
    )

    current_password: Password
    new_password: Password


class ApiKeyCreateIn(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "CI pipeline", "expires_at": "2030-01-01T00:00:00Z", "requests_per_minute": 60}
            ]
        },
    )

    name: Name
    expires_at: AwareDatetime | None = Field(
        None, description="Optional expiry, in the future, with an explicit UTC offset"
    )
    requests_per_minute: int | None = Field(
        None,
        strict=True,
        ge=1,
        le=1_000_000,
        description="The key's own limit (API.md §4.1); the plan's applies too, so set it below that",
    )


class ApiKeyOut(BaseModel):
    """An API key as listed: never the key itself, only its first 12 characters.

    `is_active` is false once the key was revoked *or* has expired.
    """

    id: uuid.UUID
    name: str
    key_prefix: str
    is_active: bool
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    requests_per_minute: int | None


class ApiKeyCreatedOut(ApiKeyOut):
    key: str = Field(description="The full key; shown this once and never again")

"""Request and response models of notifications and webhooks (API.md §11).

Request models forbid unknown fields and take strict types: `"80"` for a threshold or `1` for a
flag is a typo to report (422 naming the field), not a value to coerce.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from joyhub.core.urls import check_http_url
from joyhub.users.schemas import reject_control, reject_nul
from joyhub.webhooks.events import ADMIN_EVENT_TYPES

URL_MAX = 2048
DESCRIPTION_MAX = 500
MAX_THRESHOLDS = 10

WebhookUrl = Annotated[
    str,
    StringConstraints(min_length=1, max_length=URL_MAX, strict=True),
    AfterValidator(check_http_url),
]
Description = Annotated[
    str, StringConstraints(max_length=DESCRIPTION_MAX, strict=True), AfterValidator(reject_control)
]
EventType = Annotated[
    str, StringConstraints(min_length=1, max_length=64, strict=True), AfterValidator(reject_nul)
]
EventTypes = Annotated[list[EventType], Field(min_length=1, max_length=len(ADMIN_EVENT_TYPES))]
StrictFlag = Annotated[bool, Field(strict=True)]
Threshold = Annotated[int, Field(strict=True, ge=1, le=100)]


def _known_types(value: list[str]) -> list[str]:
    """Known event types, each once, in the order given (`webhook.test` is not one: it is only
    ever sent by `POST …/test`). Which types a scope may use is the service's rule."""
    unknown = [t for t in value if t not in ADMIN_EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown event type(s): {', '.join(sorted(set(unknown)))[:300]}")
    return list(dict.fromkeys(value))


def _reject_null(value: Any) -> Any:
    if value is None:
        raise ValueError("must not be null; omit the field to leave it unchanged")
    return value


class EndpointCreateIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://billing.example.com/hooks/joyhub",
                    "events": ["quota.threshold_reached", "subscription.renewed"],
                    "description": "Billing alerts",
                }
            ]
        },
    )

    url: WebhookUrl
    events: EventTypes
    description: Description | None = None

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        return _known_types(value)


class EndpointUpdateIn(BaseModel):
    """PATCH: only the fields sent change; `description: null` clears it, other nulls are refused."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"events": ["quota.threshold_reached"], "is_active": True}]},
    )

    url: WebhookUrl | None = None
    events: EventTypes | None = None
    description: Description | None = None
    is_active: StrictFlag | None = None

    @field_validator("url", "events", "is_active", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        return _reject_null(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _known_types(value)


class EndpointOut(BaseModel):
    """API.md §11 `WebhookEndpoint`: never the secret."""

    id: uuid.UUID
    url: str
    events: list[str]
    description: str | None
    is_active: bool
    disabled_reason: str | None
    created_at: datetime


class EndpointWithSecretOut(EndpointOut):
    """Creation and rotation: the endpoint, and its new secret — the only time it is shown."""

    secret: str = Field(description="whsec_… — shown once; the receiver verifies signatures with it")


class DeliveryOut(BaseModel):
    """API.md §11 `Delivery`."""

    id: uuid.UUID
    event_id: str
    event_type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime


DeliveryStatus = Literal["pending", "succeeded", "failed"]


class NotificationsOut(BaseModel):
    quota_email: bool
    thresholds: list[int]


class NotificationsUpdateIn(BaseModel):
    """PATCH: `thresholds` are whole percentages 1-100 (at most 10; kept sorted and unique; an
    empty list turns quota alerts off); `quota_email` turns the emails on or off."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"quota_email": True, "thresholds": [50, 80, 100]}]}
    )

    quota_email: StrictFlag | None = None
    thresholds: Annotated[list[Threshold], Field(max_length=MAX_THRESHOLDS)] | None = None

    @field_validator("quota_email", "thresholds", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        return _reject_null(value)

    @field_validator("thresholds")
    @classmethod
    def _sorted_unique(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else sorted(set(value))

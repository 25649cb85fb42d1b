"""Request and response models of the admin console's users, stats and audit routes (API.md §7)."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from joyhub.usage.dates import UtcDateTime
from joyhub.usage.schemas import DailyRefusals, ToolUsage
from joyhub.users.schemas import Name

Role = Literal["user", "admin"]
TargetType = Literal["user", "tool", "plan", "subscription", "webhook", "organization"]


class AdminSubscription(BaseModel):
    plan: str
    status: Literal["active", "cancelled", "expired"]
    tokens_used: int
    token_limit: int
    current_period_end: UtcDateTime


class AdminUserOut(BaseModel):
    """`User` plus what an operator needs at a glance (API.md §7 `AdminUser`)."""

    id: uuid.UUID
    name: str
    email: str
    role: Role
    is_active: bool
    created_at: UtcDateTime
    updated_at: UtcDateTime
    subscription: AdminSubscription | None
    last_login_at: UtcDateTime | None
    api_key_count: int


class AdminUserUpdate(BaseModel):
    """PATCH semantics: an omitted field is left as it is; `null` and unknown fields are refused."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"role": "user", "is_active": False}]}
    )

    name: Name | None = None
    role: Role | None = None
    is_active: StrictBool | None = None

    @field_validator("name", "role", "is_active", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # only an explicit null reaches a before-validator; defaults are not validated
            raise ValueError("may not be null")
        return value


class StatusCounts(BaseModel):
    """Settled calls by outcome (API.md §7); together they make `total_invocations`."""

    success: int
    error: int
    timeout: int
    cancelled: int


class PlanUsage(BaseModel):
    plan: str | None
    invocations: int
    tokens: int


class TopUser(BaseModel):
    user_id: uuid.UUID
    email: str
    invocations: int
    tokens: int


class DailyUsage(BaseModel):
    date: date
    invocations: int
    tokens: int


class SubscriptionStats(BaseModel):
    by_plan: dict[str, int]
    by_status: dict[str, int]
    monthly_recurring_revenue_cents: int
    currency: str


class PlatformStats(BaseModel):
    period_start: UtcDateTime
    period_end: UtcDateTime
    total_invocations: int
    total_tokens: int
    active_users: int
    by_status: StatusCounts
    by_tool: list[ToolUsage]
    by_plan: list[PlanUsage]
    top_users: list[TopUser]
    daily: list[DailyUsage]
    rate_limited: list[DailyRefusals] = Field(
        description="Calls refused by a rate or concurrency limit (API.md §4.1), per UTC day that had any"
    )
    subscriptions: SubscriptionStats


class AuditEntry(BaseModel):
    id: uuid.UUID
    actor_id: uuid.UUID | None
    actor_email: str | None
    action: str
    target_type: str
    target_id: str | None
    changes: dict[str, Any]
    request_id: str | None
    created_at: UtcDateTime

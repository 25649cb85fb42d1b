"""Request and response models of plans and subscriptions (API.md §4, §7).

Request models forbid unknown fields and use strict numbers and booleans: `"100"` or `true`
for a token limit is a typo to report, not a value to coerce.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from joyhub.models import Plan, Subscription

PLAN_CODE_MAX = 32
MAX_FEATURES = 50
FEATURE_MAX = 200
# Bounds that keep values inside their columns (price_cents is a 32-bit integer) and keep
# period arithmetic far from datetime's year-9999 limit.
PRICE_CENTS_MAX = 2_147_483_647
TOKEN_LIMIT_MAX = 10**15
PERIOD_DAYS_MAX = 3_660


def _no_nul(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL; refuse it as bad input (422), never a 500."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if isinstance(value, list):
        for item in value:
            _no_nul(item)
    return value


def _sent_fields_not_nullable(schema: dict[str, JsonValue]) -> None:
    """OpenAPI: show `X | None = None` fields as plain optional `X` (null is refused), but for the
    limits, whose null means "no limit"."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return
    for name, prop in properties.items():
        if name in NULLABLE_LIMITS:
            continue
        variants = prop.get("anyOf") if isinstance(prop, dict) else None
        if not isinstance(prop, dict) or not isinstance(variants, list):
            continue
        kept = [v for v in variants if v != {"type": "null"}]
        if len(kept) == 1 and isinstance(kept[0], dict):
            del prop["anyOf"]
            prop.pop("default", None)
            prop.update(kept[0])


def _plan_update_schema(schema: dict[str, JsonValue]) -> None:
    """PlanUpdate's schema: sent fields not nullable, and a request example (every body has one)."""
    _sent_fields_not_nullable(schema)
    schema["examples"] = [
        {"token_limit": 75_000, "features": ["All tools", "Priority support"], "requests_per_minute": 600}
    ]


PlanCode = Annotated[str, StringConstraints(min_length=1, max_length=PLAN_CODE_MAX, strict=True)]
Feature = Annotated[str, StringConstraints(min_length=1, max_length=FEATURE_MAX, strict=True)]
PlanName = Annotated[str, StringConstraints(min_length=1, max_length=100, strict=True)]
PlanDescription = Annotated[str, StringConstraints(max_length=2_000, strict=True)]
PriceCents = Annotated[int, Field(strict=True, ge=0, le=PRICE_CENTS_MAX)]
TokenLimit = Annotated[int, Field(strict=True, ge=0, le=TOKEN_LIMIT_MAX)]
PeriodDays = Annotated[int, Field(strict=True, ge=1, le=PERIOD_DAYS_MAX)]
Features = Annotated[list[Feature], Field(max_length=MAX_FEATURES)]
StrictFlag = Annotated[bool, Field(strict=True)]
# a rate or concurrency limit (API.md §4.1): null is no limit
Limit = Annotated[int, Field(strict=True, ge=1, le=1_000_000)]
NULLABLE_LIMITS = frozenset({"requests_per_minute", "max_concurrent"})


class PlanOut(BaseModel):
    """A plan as the public catalog shows it (API.md §4 `Plan`)."""

    code: str
    name: str
    description: str
    price_cents: int
    currency: str
    token_limit: int
    period_days: int
    features: list[str]
    rank: int
    requests_per_minute: int | None = Field(description="Requests a minute per subscription; null: no limit")
    max_concurrent: int | None = Field(description="Calls of a subscription running at once; null: no limit")

    @classmethod
    def of(cls, plan: Plan) -> PlanOut:
        return cls(
            code=plan.code,
            name=plan.name,
            description=plan.description,
            price_cents=plan.price_cents,
            currency=plan.currency,
            token_limit=plan.token_limit,
            period_days=plan.period_days,
            features=list(plan.features or []),
            rank=plan.rank,
            requests_per_minute=plan.requests_per_minute,
            max_concurrent=plan.max_concurrent,
        )


class AdminPlanOut(PlanOut):
    """A plan as admins see it: inactive plans included, so the flag is shown."""

    is_active: bool

    @classmethod
    def of(cls, plan: Plan) -> AdminPlanOut:
        return cls(**PlanOut.of(plan).model_dump(), is_active=plan.is_active)


class PlanUpdate(BaseModel):
    """`PATCH /admin/plans/{code}`: only the fields sent change; none of them may be null but the
    limits, where null means "no limit".

    None otherwise only means "not sent" (read the body with `model_dump(exclude_unset=True)`);
    an explicit null is refused, and the OpenAPI schema says so. `code`, `currency` and `rank` are
    identity, not settings: not editable here.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_plan_update_schema)

    name: PlanName | None = None
    description: PlanDescription | None = None
    price_cents: PriceCents | None = None
    token_limit: TokenLimit | None = None
    period_days: PeriodDays | None = None
    features: Features | None = None
    requests_per_minute: Limit | None = None
    max_concurrent: Limit | None = None
    is_active: StrictFlag | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _not_null_nor_nul(cls, value: Any, info: ValidationInfo) -> Any:
        # Validators run only for fields that were sent, so "absent" stays allowed.
        if value is None and info.field_name not in NULLABLE_LIMITS:
            raise ValueError("must not be null; omit the field to leave it unchanged")
        return _no_nul(value)


class SubscribeIn(BaseModel):
    """`POST /subscriptions`: the plan to be on."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"plan": "pro"}]})

    plan: PlanCode

    @field_validator("plan", mode="before")
    @classmethod
    def _nul(cls, value: Any) -> Any:
        return _no_nul(value)


class GrantIn(BaseModel):
    """`PUT /admin/users/{user_id}/subscription`: a plan from now, optionally until `expires_at`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"plan": "enterprise", "expires_at": "2030-01-01T00:00:00Z"}]},
    )

    plan: PlanCode
    expires_at: AwareDatetime | None = Field(
        default=None, description="When the grant ends (must be in the future, with a UTC offset)"
    )

    @field_validator("plan", mode="before")
    @classmethod
    def _nul(cls, value: Any) -> Any:
        return _no_nul(value)


class SubscriptionOut(BaseModel):
    """API.md §4 `Subscription`. `token_limit` is the plan's, read live, never a copy."""

    id: uuid.UUID
    plan: str
    status: str
    token_limit: int
    tokens_used: int
    tokens_remaining: int
    current_period_start: datetime
    current_period_end: datetime
    cancel_at_period_end: bool
    scheduled_plan: str | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, sub: Subscription, plan: Plan) -> SubscriptionOut:
        return cls(
            id=sub.id,
            plan=sub.plan_code,
            status=sub.status,
            token_limit=plan.token_limit,
            tokens_used=sub.tokens_used,
            tokens_remaining=max(0, plan.token_limit - sub.tokens_used),
            current_period_start=sub.current_period_start,
            current_period_end=sub.current_period_end,
            cancel_at_period_end=sub.cancel_at_period_end,
            scheduled_plan=sub.scheduled_plan_code,
            expires_at=sub.expires_at,
            created_at=sub.created_at,
            updated_at=sub.updated_at,
        )

"""Request and response bodies of the teams domain (API.md §13)."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from joyhub.subscriptions.schemas import SubscriptionOut
from joyhub.usage.dates import UtcDateTime
from joyhub.usage.schemas import UsageSummary
from joyhub.users.schemas import Email, Name, Secret

OrgRole = Literal["owner", "admin", "member"]
# a member's own limit: tokens per period of the organization's subscription (null: no limit)
TokenLimit = int | None


class OrgCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "Acme Research"}]})

    name: Name


class OrgUpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "Acme Research Lab"}]})

    name: Name


class OrganizationOut(BaseModel):
    id: uuid.UUID
    name: str
    created_at: UtcDateTime
    role: OrgRole = Field(description="The caller's role in the organization")
    member_count: int
    subscription: SubscriptionOut | None


class MemberOut(BaseModel):
    user_id: uuid.UUID
    email: str
    name: str
    role: OrgRole
    token_limit: int | None = Field(description="The member's own tokens per period; null for no limit")
    tokens_used: int = Field(description="This period, within the organization")
    joined_at: UtcDateTime


class MemberUpdateIn(BaseModel):
    """Only the fields sent change; `token_limit: null` removes the member's limit."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"role": "admin", "token_limit": 20000}]}
    )

    role: OrgRole | None = None
    token_limit: int | None = Field(None, strict=True, ge=0, le=10**15)


class InvitationIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"email": "ada@example.com", "role": "member"}]}
    )

    email: Email
    role: OrgRole = "member"


class InvitationOut(BaseModel):
    id: uuid.UUID
    email: str
    role: OrgRole
    expires_at: UtcDateTime
    created_at: UtcDateTime


class AcceptIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"token": "Zr0yV4u5bM1x3QeJ9n2sK8pT6wH7aL0c"}]}
    )

    token: Secret


class MemberUsage(BaseModel):
    user_id: uuid.UUID
    email: str
    invocations: int
    tokens: int


class OrgUsageSummary(UsageSummary):
    """`UsageSummary` (API.md §6) of the organization's calls, `by_tool` with the prompt and
    completion tokens and `rate_limited` with the refusals of §4.1 like the personal one;
    `by_member` for admins and owners."""

    by_member: list[MemberUsage] | None = None


class AdminOrganizationOut(BaseModel):
    id: uuid.UUID
    name: str
    created_at: UtcDateTime
    deleted_at: UtcDateTime | None
    member_count: int
    owners: list[str] = Field(description="The owners' emails")
    subscription: SubscriptionOut | None

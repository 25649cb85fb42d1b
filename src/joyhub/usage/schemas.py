"""Response shapes of the usage domain (API.md §6)."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel

from joyhub.usage.dates import UtcDateTime

UsageStatus = Literal["success", "error", "timeout"]
Granularity = Literal["hour", "day"]


class UsageRecord(BaseModel):
    id: uuid.UUID
    tool_id: uuid.UUID
    tool_name: str
    timestamp: UtcDateTime
    tokens_used: int
    status: UsageStatus
    duration_ms: int | None
    request_id: str | None
    error_code: str | None


class ToolUsage(BaseModel):
    tool_id: uuid.UUID
    tool_name: str
    invocations: int
    tokens: int


class Quota(BaseModel):
    plan: str
    token_limit: int
    tokens_used: int
    tokens_remaining: int
    period_end: UtcDateTime


class UsageSummary(BaseModel):
    period_start: UtcDateTime
    period_end: UtcDateTime
    total_invocations: int
    successful_invocations: int
    failed_invocations: int
    total_tokens: int
    by_tool: list[ToolUsage]
    quota: Quota | None


class TimeseriesPoint(BaseModel):
    bucket_start: UtcDateTime
    invocations: int
    tokens: int

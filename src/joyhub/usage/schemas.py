"""Response shapes of the usage domain (API.md §6)."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Literal

from pydantic import BaseModel, Field

from joyhub.usage.dates import UtcDateTime

# A settled call's outcome (pending rows are never shown). `cancelled`: the caller hung up
# mid-stream; the call is charged for what was relayed until then (API.md §5.1).
UsageStatus = Literal["success", "error", "timeout", "cancelled"]
# Where `tokens_used` came from: the upstream's own count, or the hub's estimate.
TokenSource = Literal["reported", "estimated"]
Granularity = Literal["hour", "day"]


class UsageRecord(BaseModel):
    id: uuid.UUID
    tool_id: uuid.UUID
    tool_name: str
    timestamp: UtcDateTime
    tokens_used: int
    token_source: TokenSource
    input_tokens: int | None = Field(
        description="Prompt tokens the upstream reported (OpenAI-compatible tools, API.md §12); "
        "null otherwise"
    )
    output_tokens: int | None = Field(
        description="Completion tokens the upstream reported (API.md §12); null otherwise"
    )
    status: UsageStatus
    duration_ms: int | None
    request_id: str | None
    error_code: str | None


class ToolUsage(BaseModel):
    tool_id: uuid.UUID
    tool_name: str
    invocations: int
    tokens: int


class ToolUsageTokens(ToolUsage):
    """A `by_tool` row of a user's or an organization's summary (API.md §6, §13): with the
    upstream's reported prompt and completion tokens summed (0 when none were reported, §12)."""

    input_tokens: int = Field(description="Sum of the reported prompt tokens (API.md §12)")
    output_tokens: int = Field(description="Sum of the reported completion tokens (API.md §12)")


class Quota(BaseModel):
    plan: str
    token_limit: int
    tokens_used: int
    tokens_remaining: int
    period_end: UtcDateTime


class DailyRefusals(BaseModel):
    date: date
    refusals: int


class UsageSummary(BaseModel):
    period_start: UtcDateTime
    period_end: UtcDateTime
    total_invocations: int
    successful_invocations: int
    failed_invocations: int  # errors and timeouts
    cancelled_invocations: int  # hung up mid-stream: neither successful nor failed, still charged
    total_tokens: int
    by_tool: list[ToolUsageTokens]
    quota: Quota | None
    rate_limited: list[DailyRefusals] = Field(
        description="Calls refused by a rate or concurrency limit (API.md §4.1), per UTC day of the "
        "range that had any (counted by day: a partial first or last day counts whole)"
    )


class TimeseriesPoint(BaseModel):
    bucket_start: UtcDateTime
    invocations: int
    tokens: int

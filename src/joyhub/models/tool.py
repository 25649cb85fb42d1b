"""The tool catalog. Soft-deleted rows stay so usage history keeps the tool's name."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.models.base import Base, Timestamps, UUIDPk


class Tool(UUIDPk, Timestamps, Base):
    __tablename__ = "tools"
    __table_args__ = (
        Index(
            "uq_tools_name_live",
            text("lower(name)"),
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
        ),
        CheckConstraint(
            "requests_per_minute IS NULL OR requests_per_minute >= 1", name="requests_per_minute_positive"
        ),
        CheckConstraint("protocol IN ('json', 'openai')", name="protocol_known"),
    )

    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(50))
    input_schema: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    min_plan_code: Mapped[str | None] = mapped_column(ForeignKey("plans.code"))
    api_endpoint: Mapped[str] = mapped_column(String(2048))
    timeout_seconds: Mapped[int] = mapped_column(Integer, default=30)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    auth_header_name: Mapped[str | None] = mapped_column(String(100))
    auth_header_value: Mapped[str | None] = mapped_column(String(4096))
    # the upstream answers Server-Sent Events (API.md §5.1)
    streaming: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # how the upstream is spoken to: `json` (API.md §5) or `openai` (an OpenAI-compatible base
    # URL, §12), and the model id sent to it (the tool's name when null)
    protocol: Mapped[str] = mapped_column(String(16), default="json", server_default="json")
    upstream_model: Mapped[str | None] = mapped_column(String(200))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # all callers together, to protect the upstream (API.md §4.1), and its GCRA state
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    rate_tat: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]

"""Attempts counted for throttling (failed logins, reset requests) when Redis is not in use.

One row per attempt in a sliding window; rows older than any window are deleted by the sweep.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.core.clock import utcnow
from joyhub.models.base import Base


class ThrottleHit(Base):
    __tablename__ = "throttle_hits"
    __table_args__ = (Index("ix_throttle_hits_bucket_at", "bucket", "hit_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    bucket: Mapped[str] = mapped_column(String(400))
    hit_at: Mapped[datetime] = mapped_column(default=utcnow)

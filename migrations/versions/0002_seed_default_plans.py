"""seed the three default plans (API.md §4); admins edit them afterwards

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 03:10:00+00:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_plans = sa.table(
    "plans",
    sa.column("code", sa.String),
    sa.column("name", sa.String),
    sa.column("description", sa.Text),
    sa.column("price_cents", sa.Integer),
    sa.column("currency", sa.String),
    sa.column("token_limit", sa.BigInteger),
    sa.column("period_days", sa.Integer),
    sa.column("features", postgresql.JSONB),
    sa.column("rank", sa.Integer),
    sa.column("is_active", sa.Boolean),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)

DEFAULT_PLANS = [
    {
        "code": "free",
        "name": "Free",
        "description": "Try every free tool with a small monthly allowance.",
        "price_cents": 0,
        "token_limit": 1_000,
        "features": ["1,000 tokens a month", "Free-tier tools", "Community support"],
        "rank": 0,
    },
    {
        "code": "pro",
        "name": "Pro",
        "description": "For individuals who use AI tools every day.",
        "price_cents": 1_900,
        "token_limit": 50_000,
        "features": ["50,000 tokens a month", "Pro tools", "API keys", "Email support"],
        "rank": 1,
    },
    {
        "code": "enterprise",
        "name": "Enterprise",
        "description": "For teams with heavy usage and every tool.",
        "price_cents": 9_900,
        "token_limit": 500_000,
        "features": ["500,000 tokens a month", "All tools", "Priority support"],
        "rank": 2,
    },
]


def upgrade() -> None:
    now = datetime.now(UTC)
    op.bulk_insert(
        _plans,
        [
            {
                **p,
                "currency": "USD",
                "period_days": 30,
                "is_active": True,
                "created_at": now,
                "updated_at": now,
            }
            for p in DEFAULT_PLANS
        ],
    )


def downgrade() -> None:
    op.execute(_plans.delete().where(_plans.c.code.in_([p["code"] for p in DEFAULT_PLANS])))

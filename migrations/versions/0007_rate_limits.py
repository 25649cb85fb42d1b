"""rate and concurrency limits (API.md §4.1): per plan, per API key, per tool

Plans get `requests_per_minute` and `max_concurrent` (null: no limit) with the contract's
defaults — free 20 / 2, pro 300 / 10, enterprise none — an API key and a tool their own
`requests_per_minute`. Each limited thing keeps its GCRA state as one timestamp, `rate_tat` (the
theoretical arrival time of the next request), on its own row: the subscription (for its plan's
limit), the key, the tool. The per-day rollups count the refusals (`rate_limited`), so summaries
and platform stats can show them without a row per refusal.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 19:40:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULTS = {"free": (20, 2), "pro": (300, 10), "enterprise": (None, None)}


def upgrade() -> None:
    op.add_column("plans", sa.Column("requests_per_minute", sa.Integer(), nullable=True))
    op.add_column("plans", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.create_check_constraint(
        op.f("ck_plans_limits_positive"),
        "plans",
        "(requests_per_minute IS NULL OR requests_per_minute >= 1) AND (max_concurrent IS NULL OR max_concurrent >= 1)",
    )
    plans = sa.table(
        "plans",
        sa.column("code", sa.String),
        sa.column("requests_per_minute", sa.Integer),
        sa.column("max_concurrent", sa.Integer),
    )
    for code, (rpm, concurrent) in DEFAULTS.items():
        op.execute(
            plans.update()
            .where(plans.c.code == code)
            .values(requests_per_minute=rpm, max_concurrent=concurrent)
        )
    op.add_column("subscriptions", sa.Column("rate_tat", sa.DateTime(timezone=True), nullable=True))
    for table in ("api_keys", "tools"):
        op.add_column(table, sa.Column("requests_per_minute", sa.Integer(), nullable=True))
        op.add_column(table, sa.Column("rate_tat", sa.DateTime(timezone=True), nullable=True))
        op.create_check_constraint(
            op.f(f"ck_{table}_requests_per_minute_positive"),
            table,
            "requests_per_minute IS NULL OR requests_per_minute >= 1",
        )
    for table in ("usage_daily", "usage_platform_daily"):
        op.add_column(table, sa.Column("rate_limited", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    for table in ("usage_daily", "usage_platform_daily"):
        op.drop_column(table, "rate_limited")
    for table in ("api_keys", "tools"):
        op.drop_constraint(op.f(f"ck_{table}_requests_per_minute_positive"), table, type_="check")
        op.drop_column(table, "rate_tat")
        op.drop_column(table, "requests_per_minute")
    op.drop_column("subscriptions", "rate_tat")
    op.drop_constraint(op.f("ck_plans_limits_positive"), "plans", type_="check")
    op.drop_column("plans", "max_concurrent")
    op.drop_column("plans", "requests_per_minute")

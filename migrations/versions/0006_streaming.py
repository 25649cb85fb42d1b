"""streaming invocations: tools.streaming, usage_logs.token_source, status `cancelled`

API.md §5.1: a tool may stream; every usage record says where its token count came from
(`reported` by the upstream or `estimated` by the hub; existing rows are marked `estimated`, as
nothing recorded which they were); a call whose caller hung up mid-stream is `cancelled`, and the
per-status rollups count those too.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-06 18:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tools", sa.Column("streaming", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column(
        "usage_logs",
        sa.Column("token_source", sa.String(length=16), server_default="estimated", nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_usage_logs_token_source"), "usage_logs", "token_source IN ('reported', 'estimated')"
    )
    op.drop_constraint(op.f("ck_usage_logs_status"), "usage_logs", type_="check")
    op.create_check_constraint(
        op.f("ck_usage_logs_status"),
        "usage_logs",
        "status IN ('pending', 'success', 'error', 'timeout', 'cancelled')",
    )
    for table in ("usage_daily", "usage_platform_daily"):
        op.add_column(table, sa.Column("cancelled", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    for table in ("usage_daily", "usage_platform_daily"):
        op.drop_column(table, "cancelled")
    # a cancelled call becomes what the older schema can say: an error (its tokens stay charged)
    op.execute(
        "UPDATE usage_logs SET status = 'error', error_code = COALESCE(error_code, 'CANCELLED')"
        " WHERE status = 'cancelled'"
    )
    op.drop_constraint(op.f("ck_usage_logs_status"), "usage_logs", type_="check")
    op.create_check_constraint(
        op.f("ck_usage_logs_status"), "usage_logs", "status IN ('pending', 'success', 'error', 'timeout')"
    )
    op.drop_constraint(op.f("ck_usage_logs_token_source"), "usage_logs", type_="check")
    op.drop_column("usage_logs", "token_source")
    op.drop_column("tools", "streaming")

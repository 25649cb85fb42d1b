"""input/output tokens and rate-limited refusals on the organization rollup (API.md §13 "as §6")

`usage_org_daily` gains what `usage_daily` already carries for personal calls: the sums of the
upstream's reported prompt and completion tokens (API.md §12), so an organization's summary shows
them per tool, and the day's refusals by a rate or concurrency limit (API.md §4.1), counted at
admission as a counter (a refused call leaves no usage log to count later). Existing rows start
at 0: nothing was recorded for them. A constant default makes each `ADD COLUMN` a catalog change
only (PostgreSQL 11+), not a rewrite of the table.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 10:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("input_tokens", "output_tokens", "rate_limited")


def upgrade() -> None:
    for name in _COLUMNS:
        op.add_column("usage_org_daily", sa.Column(name, sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    for name in reversed(_COLUMNS):
        op.drop_column("usage_org_daily", name)

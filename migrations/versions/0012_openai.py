"""tools.protocol and tools.upstream_model; input/output tokens on usage logs and daily rollups
(API.md §12)

`protocol` says how the hub speaks to a tool's upstream: `json` (API.md §5) or `openai` (an
OpenAI-compatible server whose base URL is `api_endpoint`). `upstream_model` is the model id sent
upstream (the tool's name when null). Usage logs keep the upstream's reported prompt and
completion tokens (null for older rows and when none were reported); `usage_daily` carries their
sums so summaries read them from the rollup.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 21:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tools", sa.Column("protocol", sa.String(16), server_default="json", nullable=False))
    op.add_column("tools", sa.Column("upstream_model", sa.String(200), nullable=True))
    op.create_check_constraint(op.f("ck_tools_protocol_known"), "tools", "protocol IN ('json', 'openai')")
    op.add_column("usage_logs", sa.Column("input_tokens", sa.BigInteger(), nullable=True))
    op.add_column("usage_logs", sa.Column("output_tokens", sa.BigInteger(), nullable=True))
    op.add_column(
        "usage_daily", sa.Column("input_tokens", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column(
        "usage_daily", sa.Column("output_tokens", sa.BigInteger(), server_default="0", nullable=False)
    )


def downgrade() -> None:
    op.drop_column("usage_daily", "output_tokens")
    op.drop_column("usage_daily", "input_tokens")
    op.drop_column("usage_logs", "output_tokens")
    op.drop_column("usage_logs", "input_tokens")
    op.drop_constraint(op.f("ck_tools_protocol_known"), "tools", type_="check")
    op.drop_column("tools", "upstream_model")
    op.drop_column("tools", "protocol")

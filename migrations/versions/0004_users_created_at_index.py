"""users (created_at, id) index: the admin console lists users newest first

Without it every page of `GET /admin/users` sorts the whole users table (7 ms at 10k users,
linear beyond); with it a page is an index scan of `limit` rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 04:25:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_users_created_at_id", "users", ["created_at", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_users_created_at_id", table_name="users")

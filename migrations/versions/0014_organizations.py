"""organizations, members, invitations; organization subscriptions, keys and usage (API.md §13)

Personal rows are unchanged: `subscriptions.user_id` becomes nullable only so that a row can
belong to an organization instead (`org_id`, exactly one of the two); `api_keys.org_id` and
`usage_logs.org_id` are null for every personal key and call. `usage_org_daily` is the rollup of
organization calls by member.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 21:10:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_organizations_created_by_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
    )
    op.create_index("ix_organizations_created_at", "organizations", ["created_at"], unique=False)
    op.create_table(
        "organization_members",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_limit", sa.BigInteger(), nullable=True),
        sa.Column("tokens_used", sa.BigInteger(), nullable=False),
        sa.Column("tokens_reserved", sa.BigInteger(), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("joined_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('owner', 'admin', 'member')", name=op.f("ck_organization_members_role")),
        sa.CheckConstraint(
            "token_limit IS NULL OR token_limit >= 0",
            name=op.f("ck_organization_members_token_limit_nonnegative"),
        ),
        sa.CheckConstraint("tokens_used >= 0", name=op.f("ck_organization_members_tokens_used_nonnegative")),
        sa.CheckConstraint(
            "tokens_reserved >= 0", name=op.f("ck_organization_members_tokens_reserved_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_organization_members_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_organization_members_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("org_id", "user_id", name=op.f("pk_organization_members")),
    )
    op.create_index("ix_organization_members_user_id", "organization_members", ["user_id"], unique=False)
    op.create_table(
        "organization_invitations",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("invited_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.CheckConstraint(
            "role IN ('owner', 'admin', 'member')", name=op.f("ck_organization_invitations_role")
        ),
        sa.ForeignKeyConstraint(
            ["invited_by"],
            ["users.id"],
            name=op.f("fk_organization_invitations_invited_by_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_organization_invitations_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organization_invitations")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_organization_invitations_token_hash")),
    )
    op.create_index(
        "ix_organization_invitations_org_created",
        "organization_invitations",
        ["org_id", "created_at"],
        unique=False,
    )
    # subscriptions: owned by a user or by an organization
    op.add_column("subscriptions", sa.Column("org_id", sa.Uuid(), nullable=True))
    op.alter_column("subscriptions", "user_id", existing_type=sa.Uuid(), nullable=True)
    op.create_foreign_key(
        op.f("fk_subscriptions_org_id_organizations"),
        "subscriptions",
        "organizations",
        ["org_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_unique_constraint(op.f("uq_subscriptions_org_id"), "subscriptions", ["org_id"])
    op.create_check_constraint(
        op.f("ck_subscriptions_one_owner"), "subscriptions", "(user_id IS NULL) <> (org_id IS NULL)"
    )
    # api keys: an organization's key
    op.add_column("api_keys", sa.Column("org_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        op.f("fk_api_keys_org_id_organizations"),
        "api_keys",
        "organizations",
        ["org_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_index(
        "ix_api_keys_org_created",
        "api_keys",
        ["org_id", "created_at"],
        unique=False,
        postgresql_where=sa.text("org_id IS NOT NULL"),
    )
    # usage logs: the organization a call billed
    # no foreign key on purpose (models/usage.py): its check would lock the organization's row
    # in every admission
    op.add_column("usage_logs", sa.Column("org_id", sa.Uuid(), nullable=True))
    op.create_index(
        "ix_usage_logs_org_ts",
        "usage_logs",
        ["org_id", "timestamp"],
        unique=False,
        postgresql_where=sa.text("org_id IS NOT NULL"),
    )
    op.create_table(
        "usage_org_daily",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("tool_id", sa.Uuid(), nullable=False),
        sa.Column("invocations", sa.BigInteger(), nullable=False),
        sa.Column("successes", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("timeouts", sa.BigInteger(), nullable=False),
        sa.Column("cancelled", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_usage_org_daily_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["tool_id"], ["tools.id"], name=op.f("fk_usage_org_daily_tool_id_tools")),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_usage_org_daily_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("org_id", "day", "user_id", "tool_id", name="pk_usage_org_daily"),
    )
    # organization webhooks (API.md §11 with §13): endpoints owned by an organization, events
    # about an organization's subscription
    op.add_column("webhook_endpoints", sa.Column("org_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        op.f("fk_webhook_endpoints_org_id_organizations"),
        "webhook_endpoints",
        "organizations",
        ["org_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_index(
        "ix_webhook_endpoints_org_created",
        "webhook_endpoints",
        ["org_id", "created_at"],
        unique=False,
        postgresql_where=sa.text("org_id IS NOT NULL"),
    )
    op.drop_constraint(op.f("ck_webhook_endpoints_scope"), "webhook_endpoints", type_="check")
    op.create_check_constraint(
        op.f("ck_webhook_endpoints_scope"), "webhook_endpoints", "scope IN ('user', 'admin', 'org')"
    )
    op.add_column("webhook_events", sa.Column("org_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        op.f("fk_webhook_events_org_id_organizations"),
        "webhook_events",
        "organizations",
        ["org_id"],
        ["id"],
        ondelete="CASCADE",
    )


def downgrade() -> None:
    op.execute("DELETE FROM webhook_events WHERE org_id IS NOT NULL")
    op.drop_constraint(op.f("fk_webhook_events_org_id_organizations"), "webhook_events", type_="foreignkey")
    op.drop_column("webhook_events", "org_id")
    op.drop_index(
        "ix_webhook_endpoints_org_created",
        table_name="webhook_endpoints",
        postgresql_where=sa.text("org_id IS NOT NULL"),
    )
    op.execute("DELETE FROM webhook_endpoints WHERE org_id IS NOT NULL OR scope = 'org'")
    op.drop_constraint(
        op.f("fk_webhook_endpoints_org_id_organizations"), "webhook_endpoints", type_="foreignkey"
    )
    op.drop_column("webhook_endpoints", "org_id")
    op.drop_constraint(op.f("ck_webhook_endpoints_scope"), "webhook_endpoints", type_="check")
    op.create_check_constraint(
        op.f("ck_webhook_endpoints_scope"), "webhook_endpoints", "scope IN ('user', 'admin')"
    )
    op.drop_table("usage_org_daily")
    op.drop_index(
        "ix_usage_logs_org_ts", table_name="usage_logs", postgresql_where=sa.text("org_id IS NOT NULL")
    )
    # organization calls go with their organizations; personal ones stay
    op.execute("DELETE FROM usage_logs WHERE org_id IS NOT NULL")
    op.drop_column("usage_logs", "org_id")
    op.drop_index(
        "ix_api_keys_org_created", table_name="api_keys", postgresql_where=sa.text("org_id IS NOT NULL")
    )
    op.execute("DELETE FROM api_keys WHERE org_id IS NOT NULL")
    op.drop_constraint(op.f("fk_api_keys_org_id_organizations"), "api_keys", type_="foreignkey")
    op.drop_column("api_keys", "org_id")
    op.execute("DELETE FROM subscriptions WHERE org_id IS NOT NULL")
    op.drop_constraint(op.f("ck_subscriptions_one_owner"), "subscriptions", type_="check")
    op.drop_constraint(op.f("uq_subscriptions_org_id"), "subscriptions", type_="unique")
    op.drop_constraint(op.f("fk_subscriptions_org_id_organizations"), "subscriptions", type_="foreignkey")
    op.drop_column("subscriptions", "org_id")
    op.alter_column("subscriptions", "user_id", existing_type=sa.Uuid(), nullable=False)
    op.drop_index("ix_organization_invitations_org_created", table_name="organization_invitations")
    op.drop_table("organization_invitations")
    op.drop_index("ix_organization_members_user_id", table_name="organization_members")
    op.drop_table("organization_members")
    op.drop_index("ix_organizations_created_at", table_name="organizations")
    op.drop_table("organizations")

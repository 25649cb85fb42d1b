"""notification_preferences, quota_alerts, notification_emails (API.md §11)

`quota_alerts` holds the thresholds fired per subscription and period (its primary key makes a
threshold fire at most once per period); `notification_emails` is the email outbox the
dispatcher sends from.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 18:00:01+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notification_preferences",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("quota_email", sa.Boolean(), nullable=False),
        sa.Column("thresholds", postgresql.ARRAY(sa.SmallInteger()), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_notification_preferences_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_notification_preferences")),
    )
    op.create_table(
        "quota_alerts",
        sa.Column("subscription_id", sa.Uuid(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("threshold", sa.SmallInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_quota_alerts_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("subscription_id", "period_start", "threshold", name="pk_quota_alerts"),
    )
    op.create_table(
        "notification_emails",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=True),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed')", name=op.f("ck_notification_emails_status")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_notification_emails_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_emails")),
        sa.UniqueConstraint("event_id", name=op.f("uq_notification_emails_event_id")),
    )
    op.create_index("ix_notification_emails_created_at", "notification_emails", ["created_at"], unique=False)
    op.create_index(
        "ix_notification_emails_due",
        "notification_emails",
        ["next_attempt_at"],
        unique=False,
        postgresql_where="status = 'pending'",
    )
    op.create_index(op.f("ix_notification_emails_user_id"), "notification_emails", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_notification_emails_user_id"), table_name="notification_emails")
    op.drop_index(
        "ix_notification_emails_due", table_name="notification_emails", postgresql_where="status = 'pending'"
    )
    op.drop_index("ix_notification_emails_created_at", table_name="notification_emails")
    op.drop_table("notification_emails")
    op.drop_table("quota_alerts")
    op.drop_table("notification_preferences")

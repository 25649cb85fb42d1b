"""Every ORM model, imported in one place so Alembic and relationships have one entry point."""

from joyhub.models.api_key import ApiKey
from joyhub.models.audit import AuditLog
from joyhub.models.base import Base
from joyhub.models.notification import NotificationEmail, NotificationPreference, QuotaAlert
from joyhub.models.organization import Organization, OrganizationInvitation, OrganizationMember
from joyhub.models.plan import Plan
from joyhub.models.session import AuthSession, PasswordResetToken, RefreshToken
from joyhub.models.subscription import Subscription
from joyhub.models.throttle import ThrottleHit
from joyhub.models.tool import Tool
from joyhub.models.usage import (
    IdempotencyRecord,
    UsageDaily,
    UsageHourly,
    UsageLog,
    UsageOrgDaily,
    UsagePlatformDaily,
    UsageRetirement,
    UsageUserDaily,
    UsageUserWeekly,
)
from joyhub.models.user import User
from joyhub.models.webhook import WebhookDelivery, WebhookEndpoint, WebhookEvent

__all__ = [
    "ApiKey",
    "AuditLog",
    "AuthSession",
    "Base",
    "IdempotencyRecord",
    "NotificationEmail",
    "NotificationPreference",
    "Organization",
    "OrganizationInvitation",
    "OrganizationMember",
    "PasswordResetToken",
    "Plan",
    "QuotaAlert",
    "RefreshToken",
    "Subscription",
    "ThrottleHit",
    "Tool",
    "UsageDaily",
    "UsageHourly",
    "UsageLog",
    "UsageOrgDaily",
    "UsagePlatformDaily",
    "UsageRetirement",
    "UsageUserDaily",
    "UsageUserWeekly",
    "User",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
]

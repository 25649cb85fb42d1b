"""The admin console API (API.md §7): every route here requires the admin role.

Each concern has its own module; this one only mounts them.
"""

from __future__ import annotations

from fastapi import APIRouter

from joyhub.admin.audit_router import router as audit_router
from joyhub.admin.plans_router import router as plans_router
from joyhub.admin.stats_router import router as stats_router
from joyhub.admin.subscriptions_router import router as subscriptions_router
from joyhub.admin.tools_router import router as tools_router
from joyhub.admin.users_router import router as users_router
from joyhub.webhooks.router import admin_router as webhooks_router

router = APIRouter()
router.include_router(users_router, prefix="/users")
router.include_router(subscriptions_router, prefix="/users")
router.include_router(tools_router, prefix="/tools")
router.include_router(plans_router, prefix="/plans")
router.include_router(stats_router, prefix="/usage")
router.include_router(audit_router, prefix="/audit-logs")
router.include_router(webhooks_router, prefix="/webhooks")

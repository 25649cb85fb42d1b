"""Admin routes: platform usage statistics (API.md §7, `GET /admin/usage/stats`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from joyhub.admin import service
from joyhub.admin.schemas import PlatformStats
from joyhub.auth.dependencies import AdminUser
from joyhub.core.clock import utcnow
from joyhub.core.envelope import Envelope, ok
from joyhub.usage.dates import RangeParams
from joyhub.usage.reads import PlatformAnalytics

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated"},
    403: {"model": Envelope[None], "description": "Not an admin"},
    422: {"model": Envelope[None], "description": "Malformed or inverted range, or over 366 days"},
}


@router.get(
    "/stats",
    response_model=Envelope[PlatformStats],
    summary="Platform-wide usage over whole UTC days (default: the last 30 days, today included)",
    description=(
        "Read from the daily rollups. A timestamp bound is widened to the UTC day containing it; "
        "`period_start`/`period_end` give the days actually covered. At most 366 days."
    ),
    responses=_ERRORS,
)
async def usage_stats(
    admin: AdminUser, reads: PlatformAnalytics, dates: RangeParams
) -> Envelope[PlatformStats]:
    start, end = dates
    return ok(await service.platform_stats(reads.session, start, end, utcnow()))

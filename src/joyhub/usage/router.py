"""HTTP routes of the usage domain (API.md §6): thin — parse, call the service, wrap the envelope.

Every route takes `CurrentUser` (an access token or an API key) and only ever shows the
caller's own records.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from joyhub.auth.dependencies import CurrentUser
from joyhub.core.clock import utcnow
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok, page
from joyhub.core.leases import Lease, Leases, kept, leases_for
from joyhub.core.pagination import PageParams
from joyhub.usage import retention, service
from joyhub.usage.dates import RangeParams
from joyhub.usage.reads import UserAnalytics
from joyhub.usage.schemas import Granularity, TimeseriesPoint, UsageRecord, UsageStatus, UsageSummary

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated, or invalid credentials"},
    422: {"model": Envelope[None], "description": "Malformed or inverted date range, bad filter"},
}


class LeasedStreamingResponse(StreamingResponse):
    """A StreamingResponse that holds a lease (an export slot) while it is being sent, renewed
    meanwhile, and gives it back however the sending ends: done, client gone, or an error.

    The response, not the body generator, holds it: a generator abandoned by a disconnect is
    only closed when it is garbage-collected, and until then would keep renewing its slot.
    (If the response is never sent at all, the lease runs out after its ttl.)
    """

    def __init__(self, content: Any, *, leases: Leases, lease: Lease, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._leases = leases
        self._lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with kept(self._leases, self._lease):
            try:
                await super().__call__(scope, receive, send)
            finally:
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    await close()  # ends the batch loop (a no-op when it finished)


def csv_export(
    body: Any, *, leases: Leases, lease: Lease, filename: str, notice: str | None = None
) -> LeasedStreamingResponse:
    """A usage export as a CSV attachment holding its export slot; one shape for the personal and
    the organization export. `notice`: the range reaches into months whose raw records were
    retired (issue 18)."""
    return LeasedStreamingResponse(
        body,
        leases=leases,
        lease=lease,
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            **({"Joyhub-Notice": notice} if notice else {}),
        },
    )


ToolIdParam = Annotated[uuid.UUID | None, Query(description="Only this tool's records")]
StatusParam = Annotated[UsageStatus | None, Query(description="Only records with this outcome")]


@router.get(
    "",
    response_model=Envelope[list[UsageRecord]],
    summary="Your usage history, newest first",
    responses=_ERRORS,
)
async def list_usage(
    session: DbSession,
    principal: CurrentUser,
    reads: UserAnalytics,
    dates: RangeParams,
    paging: PageParams,
    tool_id: ToolIdParam = None,
    status: StatusParam = None,
) -> Envelope[list[UsageRecord]]:
    start, end = dates
    items, total = await service.history(
        reads.session, principal.id, start, end, service.LogFilter(tool_id, status), paging
    )
    notice = await retention.notice_for(session, service.export_range(start, end).start)
    return page(items, offset=paging.offset, limit=paging.limit, total=total, notice=notice)


@router.get(
    "/summary",
    response_model=Envelope[UsageSummary],
    summary="Totals, per-tool usage and quota over a range (default: the current billing period)",
    responses=_ERRORS,
)
async def usage_summary(
    session: DbSession, principal: CurrentUser, reads: UserAnalytics, dates: RangeParams
) -> Envelope[UsageSummary]:
    start, end = dates
    return ok(await service.summary(session, principal.id, start, end, utcnow(), reads.session))


@router.get(
    "/timeseries",
    response_model=Envelope[list[TimeseriesPoint]],
    summary="Invocations and tokens per hour or day, empty buckets included",
    description=(
        "Default range: the current billing period (or the last 30 days). At most 366 days with "
        "`day`, 31 days with `hour`. Buckets are whole UTC hours/days; a bucket cut by the range "
        "counts only its part inside the range."
    ),
    responses=_ERRORS,
)
async def usage_timeseries(
    session: DbSession,
    principal: CurrentUser,
    reads: UserAnalytics,
    dates: RangeParams,
    granularity: Annotated[Granularity, Query(description="Bucket size")] = "day",
) -> Envelope[list[TimeseriesPoint]]:
    start, end = dates
    _rng, points = await service.timeseries(
        session, principal.id, start, end, granularity, utcnow(), reads.session
    )
    return ok(points)


@router.get(
    "/export",
    response_class=StreamingResponse,
    summary="Your usage records as a CSV download, streamed",
    description=(
        "Columns: id, timestamp, tool_id, tool_name, status, tokens_used, duration_ms, request_id, "
        "error_code, token_source; newest first. Text cells starting with = + - @ are prefixed with "
        "an apostrophe. At most 2 exports of one user run at once (429 RATE_LIMITED with "
        "Retry-After past that)."
    ),
    responses={
        200: {"content": {"text/csv": {}}, "description": "CSV attachment"},
        **_ERRORS,
        429: {"model": Envelope[None], "description": "Two exports of this user are already running"},
    },
)
async def usage_export(
    request: Request,
    principal: CurrentUser,
    reads: UserAnalytics,
    dates: RangeParams,
    tool_id: ToolIdParam = None,
    status: StatusParam = None,
) -> StreamingResponse:
    start, end = dates
    rng = service.export_range(start, end)
    now = utcnow()
    filename = service.export_filename(rng, now)
    leases = leases_for(request.app.state)
    notice = await retention.notice_for(reads.session, rng.start)
    lease = await service.start_export(leases, principal.id, now)
    # the batches open sessions of their own, on the replica when the rules allow it
    body = service.export_csv(reads.factory, principal.id, rng, service.LogFilter(tool_id, status))
    return csv_export(body, leases=leases, lease=lease, filename=filename, notice=notice)

"""HTTP routes of the tools domain (API.md §5): the catalog and the invocation endpoint.

The only module of the domain that knows FastAPI: it takes the process's `Gateway` from the app
(built in the lifespan), hands it the request as domain values, and renders what it answers.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from joyhub.auth.dependencies import BillingCredential, CurrentUser
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, json_response, ok, page
from joyhub.core.event_stream import EventStreamResponse
from joyhub.core.pagination import PageParams
from joyhub.tools import service
from joyhub.tools.admission import AdmissionSlot
from joyhub.tools.gateway import Gateway
from joyhub.tools.idempotency import JSON, MAX_KEY_LENGTH
from joyhub.tools.outcomes import InvocationRequest, Replay, Stream
from joyhub.tools.schemas import Invocation, InvokeRequest, ToolOut

router = APIRouter()


async def the_gateway(request: Request) -> Gateway:
    """The process's gateway, built once in the lifespan (`ops/startup.py`)."""
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(the_gateway)]


async def admission_slot(gateway: GatewayDep) -> AsyncIterator[AdmissionSlot]:
    """The invoke route's first dependency: a slot of the admission line (`admission.py`) before
    authentication touches the database, given back when the admission commits (the gateway
    releases it) or at the latest when the request ends."""
    slot = await gateway.gate.enter()
    try:
        yield slot
    finally:
        slot.release()


AdmissionSlotDep = Annotated[AdmissionSlot, Depends(admission_slot, scope="function")]

_ERR: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated"},
    404: {"model": Envelope[None], "description": "No such tool, or inactive/deleted"},
    422: {"model": Envelope[None], "description": "Validation failed"},
}

_RATE_HEADERS = {
    "X-RateLimit-Limit": {
        "description": "Requests a minute of the tightest per-minute limit (API.md §4.1); absent without one",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Remaining": {"description": "Requests left under that limit", "schema": {"type": "integer"}},
    "X-RateLimit-Reset": {
        "description": "Seconds until that limit's bucket is full again",
        "schema": {"type": "integer"},
    },
}
_QUOTA_HEADERS = {
    "X-Quota-Limit": {"description": "Tokens allowed this billing period", "schema": {"type": "integer"}},
    "X-Quota-Remaining": {"description": "Tokens left this period", "schema": {"type": "integer"}},
    "X-Quota-Reset": {
        "description": "End of the billing period (ISO 8601, UTC)",
        "schema": {"type": "string", "format": "date-time"},
    },
}


# A streamed invocation's answer (API.md §5.1), described for readers and client generators.
_EVENT_STREAM_SCHEMA: dict[str, Any] = {
    "type": "string",
    "description": (
        "Server-Sent Events, as the tool produces them:\n"
        "- `event: chunk` / `data: <the upstream's chunk, a JSON object>` — one per upstream event, "
        "in order;\n"
        '- `event: done` / `data: {invocation_id, tool_id, status: "success", tokens_used, '
        "token_source, duration_ms}` — the end;\n"
        "- `event: error` / `data: {code, message, invocation_id, tokens_used}` — a failure after "
        "the first chunk (TOOL_TIMEOUT, TOOL_UNAVAILABLE, TOOL_BAD_RESPONSE, QUOTA_EXCEEDED, "
        "SERVICE_UNAVAILABLE);\n"
        "- `: ping` comments every 15 s while the tool is silent."
    ),
    "example": 'event: chunk\ndata: {"text":"Hello"}\n\nevent: done\ndata: {"invocation_id":"…",'
    '"tool_id":"…","status":"success","tokens_used":12,"token_source":"reported","duration_ms":840}\n\n',
}


@router.get(
    "",
    response_model=Envelope[list[ToolOut]],
    summary="The tool catalog (active tools, by name)",
    responses={401: _ERR[401], 422: _ERR[422]},
)
async def list_tools(
    session: DbSession,
    principal: CurrentUser,
    paging: PageParams,
    search: Annotated[str | None, Query(max_length=100, description="Matches name or description")] = None,
    category: Annotated[str | None, Query(max_length=50)] = None,
) -> Envelope[list[ToolOut]]:
    tools, total = await service.list_catalog(
        session,
        search=service.clean_filter("query.search", search),
        category=service.clean_filter("query.category", category),
        page=paging,
    )
    return page([service.tool_out(t) for t in tools], offset=paging.offset, limit=paging.limit, total=total)


@router.get(
    "/{tool_id}",
    response_model=Envelope[ToolOut],
    summary="One tool of the catalog",
    responses={401: _ERR[401], 404: _ERR[404], 422: _ERR[422]},
)
async def get_tool(tool_id: uuid.UUID, session: DbSession, principal: CurrentUser) -> Envelope[ToolOut]:
    return ok(service.tool_out(await service.get_catalog_tool(session, tool_id)))


@router.post(
    "/{tool_id}/invoke",
    response_model=Envelope[Invocation],
    summary="Invoke a tool (metered)",
    description=(
        "Order of checks: authentication → tool exists and is active (404) → active subscription "
        "(402 SUBSCRIPTION_REQUIRED) → plan rank (402 PLAN_UPGRADE_REQUIRED) → rate and concurrency "
        "limits of the plan, the API key and the tool (429 RATE_LIMITED) → tokens left (429 "
        "QUOTA_EXCEEDED) → input against the tool's input_schema (422 TOOL_INPUT_INVALID) → circuit "
        "closed (503 TOOL_UNAVAILABLE with Retry-After) → upstream call. Failed calls cost 0 tokens. "
        "A repeated `Idempotency-Key` (24 h) replays the first response (header "
        "`Idempotent-Replayed: true`); a different tool/input or a repeat still running → 409. "
        "With `stream: true` (tools with `streaming: true`) the answer is `text/event-stream`: the "
        "tool's chunks as they arrive, then `done` (or `error`); refusals and failures before the "
        "first chunk still answer the JSON envelope. The caller is charged for what they received."
    ),
    responses={
        200: {
            "headers": {**_QUOTA_HEADERS, **_RATE_HEADERS},
            "description": "The invocation; with `stream: true`, its events as they arrive",
            "content": {"text/event-stream": {"schema": _EVENT_STREAM_SCHEMA}},
        },
        401: _ERR[401],
        402: {"model": Envelope[None], "description": "SUBSCRIPTION_REQUIRED / PLAN_UPGRADE_REQUIRED"},
        404: _ERR[404],
        409: {"model": Envelope[None], "description": "IDEMPOTENCY_CONFLICT"},
        413: {"model": Envelope[None], "description": "Request body over 1 MiB"},
        422: {"model": Envelope[None], "description": "VALIDATION_ERROR / TOOL_INPUT_INVALID"},
        429: {
            "model": Envelope[None],
            "description": "QUOTA_EXCEEDED; RATE_LIMITED (a rate or concurrency limit, §4.1: Retry-After, "
            "details[0].scope and .limit)",
            "headers": {
                **_QUOTA_HEADERS,
                **_RATE_HEADERS,
                "Retry-After": {
                    "description": "Seconds until the request would pass",
                    "schema": {"type": "integer"},
                },
            },
        },
        502: {"model": Envelope[None], "description": "TOOL_BAD_RESPONSE"},
        503: {
            "model": Envelope[None],
            "description": "TOOL_UNAVAILABLE (Retry-After when the circuit is open); "
            "SERVICE_UNAVAILABLE (Retry-After) when the gateway's admission line is full",
        },
        504: {"model": Envelope[None], "description": "TOOL_TIMEOUT"},
    },
)
async def invoke_tool(
    slot: AdmissionSlotDep,  # first: the line forms before authentication touches the database
    tool_id: uuid.UUID,
    payload: InvokeRequest,
    gateway: GatewayDep,
    # authentication: the credential's signature or form here; its session or key, and the
    # user, checked by the admission statement itself (`MeteringConnection.admit`) — 401 first
    caller: BillingCredential,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_KEY_LENGTH,
            description="Makes retries safe: the same key within 24 h replays the first response",
        ),
    ] = None,
) -> Response:
    outcome = await gateway.invoke(
        InvocationRequest(caller, tool_id, payload.input, idempotency_key, stream=payload.stream),
        admission_slot=slot,
    )
    if isinstance(outcome, Stream):
        return EventStreamResponse(outcome.relay, headers=outcome.headers())
    if isinstance(outcome, Replay) and outcome.media_type != JSON:  # a streamed call's events
        return Response(outcome.body, outcome.status, outcome.headers(), media_type=outcome.media_type)
    return json_response(outcome.body, outcome.status, outcome.headers())

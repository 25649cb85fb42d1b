"""HTTP routes of the OpenAI-compatible surface (API.md §12), mounted at `/api/v1/openai`.

Each invocation route is the JSON API's invoke (`tools/router.py`) with another adapter: the
model id is resolved to its tool, the OpenAI body becomes the `InvocationRequest`'s input, and
the same `Gateway.invoke` runs admission (limits, quota, Idempotency-Key), breaker, retries,
relay and settle; `OpenAIPresenter` renders the answer and errors take OpenAI's shape
(`errors.py`, installed for this prefix by the app).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from joyhub.auth.credentials import Credential, confirm
from joyhub.auth.dependencies import BillingCredential, CurrentUser
from joyhub.core.db import DbSession
from joyhub.core.envelope import json_response
from joyhub.core.errors import NotFound
from joyhub.core.event_stream import EventStreamResponse
from joyhub.openai_compat import catalog
from joyhub.openai_compat.presenter import OpenAIPresenter
from joyhub.openai_compat.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Model,
    ModelList,
    OpenAIError,
)
from joyhub.tools.gateway import Gateway
from joyhub.tools.idempotency import JSON, MAX_KEY_LENGTH
from joyhub.tools.outcomes import InvocationRequest, Replay, Stream
from joyhub.tools.protocols import Operation
from joyhub.tools.router import AdmissionSlotDep, GatewayDep

router = APIRouter()

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        description="Makes retries safe: the same key within 24 h replays the first response",
    ),
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": text}
    for status, text in {
        400: "invalid_request_error: the body is not valid JSON",
        401: "invalid_api_key",
        402: "subscription_required / plan_upgrade_required",
        404: "model_not_found: no such model, or inactive",
        409: "idempotency_conflict",
        413: "the body is over 1 MiB",
        422: "validation_error / tool_input_invalid (the upstream rejected the request)",
        429: "insufficient_quota (x-should-retry: false); rate_limit_exceeded (Retry-After)",
        500: "internal_error",
        502: "tool_bad_response",
        503: "tool_unavailable (Retry-After when the circuit is open); service_unavailable",
        504: "tool_timeout",
    }.items()
}

_STREAM_DOC: dict[str, Any] = {
    "description": "OpenAI's answer; with `stream: true`, its chunks as Server-Sent Events "
    "(`data: {chunk}` … `data: [DONE]`). Carries X-Quota-* and X-RateLimit-* headers.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def _catalog(request: Request) -> catalog.ModelCatalog:
    found: catalog.ModelCatalog = request.app.state.openai_models
    return found


async def _invoke(
    request: Request,
    gateway: Gateway,
    slot: Any,
    caller: Credential,
    payload: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
    operation: Operation,
    idempotency_key: str | None,
) -> Response:
    """Resolve the model, invoke through the gateway, render in OpenAI's shape."""
    ref = None
    if "\x00" not in payload.model:
        ref = await _catalog(request).resolve(gateway.store.engine, payload.model)
    if ref is None:
        await confirm(gateway.store.engine, caller)  # 401 comes first (API.md §5's order)
        raise NotFound(f"The model `{payload.model[:200]}` does not exist or you do not have access to it.")
    stream = include_usage = False  # embeddings never stream
    if isinstance(payload, ChatCompletionRequest | CompletionRequest):
        stream, include_usage = bool(payload.stream), payload.include_usage
    outcome = await gateway.invoke(
        InvocationRequest(
            caller, ref.tool_id, payload.body(), idempotency_key, stream=stream, operation=operation
        ),
        admission_slot=slot,
        presenter=OpenAIPresenter(ref.name, include_usage),
    )
    if isinstance(outcome, Stream):
        return EventStreamResponse(outcome.relay, headers=outcome.headers())
    if isinstance(outcome, Replay) and outcome.media_type != JSON:  # a streamed call's events
        return Response(outcome.body, outcome.status, outcome.headers(), media_type=outcome.media_type)
    return json_response(outcome.body, outcome.status, outcome.headers())


@router.get(
    "/models",
    response_model=ModelList,
    summary="The models the caller's plan may use (OpenAI's list shape)",
    responses={401: _ERRORS[401]},
)
async def list_models(session: DbSession, principal: CurrentUser) -> ModelList:
    return ModelList(data=await catalog.list_models(session, principal.user.id))


@router.get(
    "/models/{model}",
    response_model=Model,
    summary="One model the caller's plan may use (OpenAI's shape)",
    responses={401: _ERRORS[401], 404: _ERRORS[404], 422: _ERRORS[422]},
)
async def retrieve_model(model: str, session: DbSession, principal: CurrentUser) -> Model:
    found = [
        m for m in await catalog.list_models(session, principal.user.id) if m.id.lower() == model.lower()
    ]
    if not found:
        raise NotFound(f"The model `{model[:200]}` does not exist or you do not have access to it.")
    return found[0]


@router.post(
    "/chat/completions",
    summary="Chat completion through the hub (OpenAI-compatible, metered)",
    description="OpenAI's chat completion request, passed to the model's upstream with `model` "
    "replaced by its upstream model id; §5's checks, limits and Idempotency-Key apply.",
    responses={200: _STREAM_DOC, **_ERRORS},
)
async def chat_completions(
    slot: AdmissionSlotDep,  # first: the line forms before authentication touches the database
    request: Request,
    payload: ChatCompletionRequest,
    gateway: GatewayDep,
    caller: BillingCredential,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    return await _invoke(request, gateway, slot, caller, payload, "chat/completions", idempotency_key)


@router.post(
    "/completions",
    summary="Text completion through the hub (OpenAI-compatible, metered)",
    responses={200: _STREAM_DOC, **_ERRORS},
)
async def completions(
    slot: AdmissionSlotDep,
    request: Request,
    payload: CompletionRequest,
    gateway: GatewayDep,
    caller: BillingCredential,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    return await _invoke(request, gateway, slot, caller, payload, "completions", idempotency_key)


@router.post(
    "/embeddings",
    summary="Embeddings through the hub (OpenAI-compatible, billed by the reported usage)",
    responses={200: {"description": "OpenAI's embedding answer"}, **_ERRORS},
)
async def embeddings(
    slot: AdmissionSlotDep,
    request: Request,
    payload: EmbeddingRequest,
    gateway: GatewayDep,
    caller: BillingCredential,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    return await _invoke(request, gateway, slot, caller, payload, "embeddings", idempotency_key)

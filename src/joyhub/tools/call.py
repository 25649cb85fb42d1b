"""Steps 4 and 5 of an invocation (the whole flow: `gateway.py`): the upstream call under the
tool's circuit breaker, then the settle — the answer rendered once (by the request's presenter),
stored for an idempotent replay, and returned (`Completed`) or raised (a failed call's `AppError`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.errors import AppError, ToolBadResponse, ToolInputInvalid, ToolTimeout, ToolUnavailable
from joyhub.tools import protocols, token_count, upstream
from joyhub.tools.breaker import Breakers, Permit
from joyhub.tools.metering import Admission, Quota, SettleRequest, ToolRead
from joyhub.tools.outcomes import CallResult, Completed, Presenter, Stream, account_headers
from joyhub.tools.relay import StreamRelay

if TYPE_CHECKING:
    from joyhub.tools.gateway import Gateway

log = logging.getLogger("joyhub.tools.gateway")

# what each way an upstream call can fail answers (API.md §5, "Upstream call"); the messages are
# the error classes' own, but for a rejected input
_FAILURES: dict[str, type[AppError]] = {
    "rejected": ToolInputInvalid,
    "bad_response": ToolBadResponse,
    "timeout": ToolTimeout,
    "unavailable": ToolUnavailable,
    "internal": AppError,  # a bug of ours: 500 INTERNAL_ERROR
}
_REJECTED_MESSAGE = "The tool rejected the input"
NOTHING = token_count.Charge(0, "estimated")  # a failed call costs nothing


def failure(outcome: str, result: upstream.UpstreamResult, invocation_id: str) -> AppError:
    """The error a failed call answers, with the call's id and attempts in its details."""
    error_class = _FAILURES[outcome]
    message = _REJECTED_MESSAGE if outcome == "rejected" else error_class.message
    detail: dict[str, object] = {
        "field": "body.input" if outcome == "rejected" else None,
        "message": result.message or message,
        "invocation_id": invocation_id,
        "attempts": result.attempts,
    }
    if result.upstream_status is not None:
        detail["upstream_status"] = result.upstream_status
    return error_class(message, details=[detail])


async def collect(
    opened: upstream.UpstreamResult, tool: ToolRead, input_bytes: int, gateway: Gateway, started: float
) -> upstream.UpstreamResult:
    """A streaming tool's whole answer, for a caller who did not ask for a stream: its chunks
    in order as `{"chunks": [...]}`, charged like a stream (API.md §5.1). The tool's timeout
    bounds every gap between chunks, TOOL_STREAM_MAX_SECONDS the whole; a stream that breaks
    after it started is a failed call (502/504, 0 tokens: the caller received nothing)."""
    stream = opened.stream
    if stream is None:
        return opened
    chunks: list[Any] = []
    size = 0
    usage: int | None = None
    try:
        while True:
            left = started + gateway.stream_max_seconds - time.perf_counter()
            try:
                async with asyncio.timeout(min(tool.timeout_seconds, max(left, 0.0))):
                    item = await stream.next()
            except TimeoutError:
                return upstream.UpstreamResult(
                    "timeout", attempts=opened.attempts, message="The tool's stream stalled or ran too long"
                )
            if isinstance(item, upstream.StreamEnd):
                break
            if isinstance(item, upstream.StreamBroken):
                return upstream.UpstreamResult("bad_response", attempts=opened.attempts, message=item.message)
            chunks.append(json.loads(item.data))
            size += len(item.data)
            if item.usage is not None:
                usage = item.usage
    finally:
        await stream.aclose()
    charge = (
        token_count.Charge(usage, "reported")
        if usage is not None
        else token_count.Charge(token_count.estimate(input_bytes, size), "estimated")
    )
    return upstream.UpstreamResult(
        "success", output={"chunks": chunks}, output_bytes=size, attempts=opened.attempts, charge=charge
    )


def target_for(
    tool: ToolRead, permit: Permit, operation: protocols.Operation | None = None
) -> upstream.Target:
    """The call an admission made: the target as the statement read the tool (a half-open
    circuit's trial gets one attempt), at the operation's URL for an openai tool."""
    return upstream.Target(
        url=protocols.upstream_url(tool, operation),
        timeout_seconds=tool.timeout_seconds,
        max_attempts=1 if permit.trial else tool.max_attempts,
        label=str(tool.id),
        secret_header=tool.secret_header,
    )


class _Hooks:
    """Reports each attempt to the breaker and remembers whether the last one failed."""

    def __init__(self, breakers: Breakers, tool_key: str, trial: bool) -> None:
        self.breakers = breakers
        self.tool_key = tool_key
        self.trial = trial
        self.failures = 0

    async def failed(self) -> bool:
        self.failures += 1
        opened = await self.breakers.record_failure(self.tool_key, trial=self.trial)
        if opened:
            metrics.CIRCUIT_STATE.labels(self.tool_key).set(metrics.CIRCUIT_STATE_VALUES["open"])
        return opened

    async def may_retry(self) -> bool:
        return (await self.breakers.view(self.tool_key)).state == "closed"


@dataclass
class Call:
    """Steps 4 and 5 for one admitted invocation; run shielded from the request's cancellation."""

    gateway: Gateway
    admission: Admission
    permit: Permit
    body: bytes
    presenter: Presenter
    request_id: str
    operation: protocols.Operation | None = None  # an openai tool's endpoint (API.md §12)

    @property
    def tool_key(self) -> str:
        return str(self.admission.tool.id)

    async def run(self) -> Completed:
        """Call, report to the breaker, settle; a failed call's error is raised after its settle.
        A streaming tool's answer is read whole (`collect`): `output` is `{"chunks": [...]}`."""
        started = time.perf_counter()
        breakers = self.gateway.breakers
        hooks = _Hooks(breakers, self.tool_key, self.permit.trial)
        internal = False
        target = target_for(self.admission.tool, self.permit, self.operation)
        try:
            if self.admission.tool.streaming and self.admission.tool.protocol != protocols.OPENAI:
                opened = await self.gateway.upstream.open_stream(target, self.body, self.request_id, hooks)
                result = await collect(opened, self.admission.tool, len(self.body), self.gateway, started)
                if opened.stream is not None and result.outcome != "success":
                    await hooks.failed()  # it broke after it started: the upstream's failure
            else:
                result = await self.gateway.upstream.call(target, self.body, self.request_id, hooks)
        except Exception:
            # a bug of ours, not the upstream's: settle as an error all the same (0 tokens)
            log.exception("upstream call failed unexpectedly", extra={"tool_id": self.tool_key})
            result = upstream.UpstreamResult("unavailable", attempts=hooks.failures)
            internal = True
        duration_ms = int((time.perf_counter() - started) * 1000)
        try:
            if internal:
                await breakers.release(self.tool_key, self.permit)
            elif hooks.failures < result.attempts:
                # the last attempt reached a live upstream: success, 4xx or a garbled 2xx
                await breakers.record_success(self.tool_key, trial=self.permit.trial, clean=self.permit.clean)
                if not self.permit.clean:
                    metrics.CIRCUIT_STATE.labels(self.tool_key).set(metrics.CIRCUIT_STATE_VALUES["closed"])
        finally:
            outcome = "internal" if internal else result.outcome
            metrics.INVOCATIONS.labels(self.tool_key, outcome).inc()
            completed = await self._settle(result, duration_ms, outcome)
        return completed

    async def stream(self, keep_events: bool) -> Stream:
        """Open the upstream's stream up to its first event: the relay (`relay.py`) takes it from
        there. A failure before the first event is settled and raised like any failed call."""
        started = time.perf_counter()
        hooks = _Hooks(self.gateway.breakers, self.tool_key, self.permit.trial)
        target = target_for(self.admission.tool, self.permit, self.operation)
        try:
            result = await self.gateway.upstream.open_stream(target, self.body, self.request_id, hooks)
        except Exception:
            log.exception("upstream stream failed to open unexpectedly", extra={"tool_id": self.tool_key})
            await self.gateway.breakers.release(self.tool_key, self.permit)
            metrics.INVOCATIONS.labels(self.tool_key, "internal").inc()
            await self._settle(upstream.UpstreamResult("unavailable", attempts=hooks.failures), 0, "internal")
            raise AssertionError("unreachable: a failed call's settle raises") from None
        if result.stream is None:
            metrics.INVOCATIONS.labels(self.tool_key, result.outcome).inc()
            duration_ms = int((time.perf_counter() - started) * 1000)
            await self._settle(result, duration_ms, result.outcome)  # raises the failure
        assert result.stream is not None
        relay = StreamRelay(
            gateway=self.gateway,
            admission=self.admission,
            permit=self.permit,
            stream=result.stream,
            input_bytes=len(self.body),
            keep_events=keep_events,
            started=time.monotonic() - (time.perf_counter() - started),
            max_seconds=self.gateway.stream_max_seconds,
            ping_seconds=self.gateway.stream_ping_seconds,
            format=self.presenter.stream_format,
        )
        return Stream(relay, self.admission.quota, self.admission.limits)

    async def _settle(self, result: upstream.UpstreamResult, duration_ms: int, outcome: str) -> Completed:
        if outcome == "success":
            charge = (
                result.charge
                if result.charge is not None
                else token_count.charge_for(result.output, len(self.body), result.output_bytes)
            )
            call_result = CallResult(
                invocation_id=self.admission.log_id,
                tool_id=self.admission.tool.id,
                output=result.output,
                tokens_used=charge.tokens,
                duration_ms=duration_ms,
            )
            body = self.presenter.completed(call_result)
            quota = await self._write(
                status="success",
                charge=charge,
                duration_ms=duration_ms,
                error=None,
                body=body,
                http_status=200,
            )
            return Completed(call_result, body, quota, self.admission.limits)
        error = failure(outcome, result, str(self.admission.log_id))
        retry_after = await self._retry_after() if result.circuit_open else None
        self._log_failure(result, duration_ms)
        quota = await self._write(
            status="timeout" if outcome == "timeout" else "error",
            charge=NOTHING,
            duration_ms=duration_ms,
            error=error,
            body=self.presenter.failed(error),
            http_status=error.status,
        )
        error.headers = account_headers(quota, self.admission.limits)
        if retry_after is not None:
            error.headers["Retry-After"] = retry_after
        raise error

    async def _write(
        self,
        *,
        status: str,
        charge: token_count.Charge,
        duration_ms: int,
        error: AppError | None,
        body: bytes,
        http_status: int,
    ) -> Quota | None:
        """The settle; the quota after it (or as admitted, when the sweep closed the call first)."""
        settlement = await self.gateway.store.settle(
            SettleRequest(
                admission=self.admission,
                status=status,
                tokens=charge.tokens,
                token_source=charge.source,
                duration_ms=duration_ms,
                error_code=error.code if error is not None else None,
                now=utcnow(),
                input_tokens=charge.input_tokens,
                output_tokens=charge.output_tokens,
                response_status=http_status,
                response_body=body,
            )
        )
        return settlement.quota if settlement.quota is not None else self.admission.quota

    async def _retry_after(self) -> str | None:
        """Seconds until the circuit this call opened lets a trial through."""
        breakers = self.gateway.breakers
        view = await breakers.view(self.tool_key)
        if view.opened_until is None:
            return None
        return str(max(1, math.ceil(view.opened_until.timestamp() - breakers.clock())))

    def _log_failure(self, result: upstream.UpstreamResult, duration_ms: int) -> None:
        level = logging.INFO if result.outcome == "rejected" else logging.WARNING
        log.log(
            level,
            "tool invocation failed",
            extra={
                "tool_id": self.tool_key,
                "invocation_id": str(self.admission.log_id),
                "outcome": result.outcome,
                "attempts": result.attempts,
                "upstream_status": result.upstream_status,
                "reason": result.message,
                "duration_ms": duration_ms,
            },
        )

"""Steps 4 and 5 of an invocation (the whole flow: `gateway.py`): the upstream call under the
tool's circuit breaker, then the settle — the response rendered once, sent and stored for an
idempotent replay.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.context import current_request_id
from joyhub.tools import ledger, token_count, upstream
from joyhub.tools.admit import AdmissionRun, Admitted, Quota, quota_of
from joyhub.tools.breaker import Breakers, Permit
from joyhub.tools.runtime import Runtime

log = logging.getLogger("joyhub.tools.gateway")

# outcome -> (usage status, HTTP status, error code, message)
_FAILURES: dict[str, tuple[str, int, str, str]] = {
    "rejected": ("error", 422, "TOOL_INPUT_INVALID", "The tool rejected the input"),
    "bad_response": ("error", 502, "TOOL_BAD_RESPONSE", "The tool returned an invalid response"),
    "timeout": ("timeout", 504, "TOOL_TIMEOUT", "The tool did not answer in time"),
    "unavailable": ("error", 503, "TOOL_UNAVAILABLE", "The tool is unavailable"),
    "internal": ("error", 500, "INTERNAL_ERROR", "Internal server error"),
}


def render(status: int, data: Any = None, error: dict[str, Any] | None = None) -> bytes:
    """The envelope as bytes, once: the same bytes are sent and stored for idempotent replay."""
    doc = {"data": data, "error": error, "meta": {"request_id": current_request_id() or "-"}}
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except UnicodeEncodeError:  # lone surrogates from the upstream: ASCII escapes are still JSON
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


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


def call_for(run: AdmissionRun, admitted: Admitted) -> Call:
    """The call an admission made: the target as the statement read the tool, at this version."""
    row, permit = admitted.row, admitted.permit
    target = upstream.Target(
        url=row["api_endpoint"],
        timeout_seconds=row["timeout_seconds"],
        max_attempts=1 if permit.trial else row["max_attempts"],
        label=run.tool_key,
        secret_header=(row["auth_header_name"], row["auth_header_value"])
        if row["auth_header_name"] and row["auth_header_value"]
        else None,
    )
    assert run.user_id is not None
    return Call(
        app=run.app,
        rt=run.rt,
        admission=ledger.Admission(admitted.log_id, row["admitted_plan"], row.get("idem_id")),
        permit=permit,
        target=target,
        body=run.body,
        user_id=run.user_id,
        tool_id=run.tool_id,
        tool_key=run.tool_key,
        quota=quota_of(row),
        request_id=current_request_id() or "-",
    )


@dataclass
class Call:
    """Steps 4 and 5 for one admitted invocation; run shielded from the request's cancellation."""

    app: FastAPI
    rt: Runtime
    admission: ledger.Admission
    permit: Permit
    target: upstream.Target
    body: bytes
    user_id: uuid.UUID
    tool_id: uuid.UUID
    tool_key: str
    quota: Quota | None
    request_id: str

    async def run(self) -> Response:
        started = time.perf_counter()
        hooks = _Hooks(self.rt.breakers, self.tool_key, self.permit.trial)
        internal = False
        try:
            result = await upstream.call(self.rt.http, self.target, self.body, self.request_id, hooks)
        except Exception:
            # a bug of ours, not the upstream's: settle as an error all the same (0 tokens)
            log.exception("upstream call failed unexpectedly", extra={"tool_id": self.tool_key})
            result = upstream.UpstreamResult("unavailable", attempts=hooks.failures)
            internal = True
        duration_ms = int((time.perf_counter() - started) * 1000)
        try:
            if internal:
                await self.rt.breakers.release(self.tool_key, self.permit)
            elif hooks.failures < result.attempts:
                # the last attempt reached a live upstream: success, 4xx or a garbled 2xx
                await self.rt.breakers.record_success(
                    self.tool_key, trial=self.permit.trial, clean=self.permit.clean
                )
                if not self.permit.clean:
                    metrics.CIRCUIT_STATE.labels(self.tool_key).set(metrics.CIRCUIT_STATE_VALUES["closed"])
        finally:
            outcome = "internal" if internal else result.outcome
            metrics.INVOCATIONS.labels(self.tool_key, outcome).inc()
            response = await self._settle(result, duration_ms, outcome)
        return response

    async def _settle(self, result: upstream.UpstreamResult, duration_ms: int, outcome: str) -> Response:
        invocation_id = str(self.admission.log_id)
        retry_after: str | None = None
        if outcome == "success":
            tokens = token_count.tokens_for(result.output, len(self.body), result.output_bytes)
            status, http_status, error_code = "success", 200, None
            payload = render(
                200,
                data={
                    "invocation_id": invocation_id,
                    "tool_id": str(self.tool_id),
                    "status": "success",
                    "output": result.output,
                    "tokens_used": tokens,
                    "duration_ms": duration_ms,
                },
            )
        else:
            status, http_status, error_code, message = _FAILURES[outcome]
            tokens = 0
            detail: dict[str, Any] = {
                "field": "body.input" if outcome == "rejected" else None,
                "message": result.message or message,
                "invocation_id": invocation_id,
                "attempts": result.attempts,
            }
            if result.upstream_status is not None:
                detail["upstream_status"] = result.upstream_status
            payload = render(http_status, error={"code": error_code, "message": message, "details": [detail]})
            if result.circuit_open:
                view = await self.rt.breakers.view(self.tool_key)
                if view.opened_until is not None:
                    left = view.opened_until.timestamp() - self.rt.breakers.clock()
                    retry_after = str(max(1, math.ceil(left)))
            self._log_failure(result, duration_ms)
        settlement = await ledger.settle(
            self.app.state.engine,
            admission=self.admission,
            user_id=self.user_id,
            status=status,
            tokens=tokens,
            duration_ms=duration_ms,
            error_code=error_code,
            now=utcnow(),
            response_status=http_status,
            response_body=payload,
        )
        headers: dict[str, str] = {}
        if settlement.tokens_used is not None and settlement.token_limit is not None:
            assert settlement.period_end is not None
            headers = Quota(settlement.token_limit, settlement.tokens_used, settlement.period_end).headers()
        elif self.quota is not None:
            headers = self.quota.headers()
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return Response(
            content=payload, status_code=http_status, media_type="application/json", headers=headers
        )

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
                "duration_ms": duration_ms,
            },
        )

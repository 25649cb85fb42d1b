"""One delivery attempt over HTTP: sign, POST, classify (API.md §11).

A 2xx answer within ATTEMPT_TIMEOUT_SECONDS is a success; anything else — a 3xx (redirects are
never followed: the receiver's URL is the one the owner registered and the egress policy
checked), a 4xx or 5xx, a timeout, a refused or reset connection, an address the egress policy
denies — is a failed attempt. The receiver's answer body is read only so far as to keep the
connection reusable, and never stored: it is the receiver's, not ours to keep.

The `webhook-timestamp` is the real wall clock, not the hub's injectable one: it is checked
against the receiver's clock (Standard Webhooks libraries refuse more than 5 minutes of skew).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime

import aiohttp

from joyhub import __version__
from joyhub.core.clock import iso_utc
from joyhub.webhooks import signing

USER_AGENT = f"JoyfullUIHub-Webhooks/{__version__}"
READ_LIMIT_BYTES = 64 * 1024
ERROR_MAX = 300


def payload(event_id: str, event_type: str, created_at: datetime, data_json: str) -> bytes:
    """The event as the receiver gets it: `{id, type, created_at, data}` (data as stored)."""
    head = json.dumps({"id": event_id, "type": event_type, "created_at": iso_utc(created_at)})
    return (head[:-1] + ', "data": ' + data_json + "}").encode()


@dataclass(frozen=True)
class Attempted:
    ok: bool
    status_code: int | None
    error: str | None
    outcome: str  # for metrics: success, http_3xx, http_4xx, http_5xx, timeout, connection_error


def _by_status(code: int) -> Attempted:
    if 200 <= code < 300:
        return Attempted(True, code, None, "success")
    if 300 <= code < 400:
        return Attempted(False, code, f"HTTP {code}: redirects are not followed", "http_3xx")
    return Attempted(False, code, f"HTTP {code}", "http_4xx" if code < 500 else "http_5xx")


async def post(
    session: aiohttp.ClientSession, url: str, event_id: str, body: bytes, keys: list[bytes]
) -> Attempted:
    """POST the signed event once; never raises for anything the receiver or network does."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **signing.headers(event_id, int(time.time()), body, keys),
    }
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            code = resp.status
            await resp.content.read(READ_LIMIT_BYTES)
            if not resp.content.at_eof():
                resp.close()  # a large answer: drop the connection rather than read it all
        return _by_status(code)
    except TimeoutError:
        return Attempted(False, None, "no answer within the timeout", "timeout")
    except (aiohttp.ClientError, OSError) as exc:
        message = str(exc) or type(exc).__name__
        return Attempted(False, None, f"connection failed: {message}"[:ERROR_MAX], "connection_error")

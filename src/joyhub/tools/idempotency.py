"""Idempotency keys for invocations (API.md §5, guarantee 4): the rules; the statements that keep
them in PostgreSQL are the metering store's (`metering.py`).

A key belongs to one user for 24 hours. The first request with it *claims* it (an INSERT that a
unique constraint arbitrates, in the admission transaction); settling stores the final response
(status and the exact response text). A repeat with the same tool and input gets that response
back byte for byte without touching the upstream or the quota; a repeat with a different tool or
input, or while the first is still running, gets 409 IDEMPOTENCY_CONFLICT.

The response is stored as its exact text inside the JSONB column (`{"body": "..."}`) rather than
as a JSON document: the replay is then byte-identical, and an upstream answer containing
`\\u0000` (which PostgreSQL's JSONB refuses as a document) is stored safely as an escaped string.

Refusals before admission (404, 402, 429, 422, 503 circuit open) claim nothing, so retrying the
same key after fixing the cause works.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from joyhub.core.errors import IdempotencyConflict

KEY_TTL = timedelta(hours=24)
JSON = "application/json"
MAX_KEY_LENGTH = 255


def request_hash(tool_id: uuid.UUID, value: Any, *, stream: bool = False) -> bytes:
    """SHA-256 over the tool id, the canonical JSON of the input and — when asked for — the
    stream (a streamed and a plain request are different requests)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    marker = b"stream:" if stream else b""
    return hashlib.sha256(marker + tool_id.bytes + canonical.encode("ascii")).digest()


@dataclass(frozen=True)
class StoredKey:
    """A live record of an Idempotency-Key, as the database holds it."""

    state: str  # in_flight | done
    request_hash: bytes
    response_status: int | None
    response_body: str | None  # the JSONB column as text


@dataclass(frozen=True)
class StoredResponse:
    """The first response to a key, to be sent again."""

    status: int
    body: bytes
    media_type: str = JSON


def encode_response(body: bytes, media_type: str = JSON) -> str:
    """The JSONB value stored for a response body (its exact text, and its media type when it is
    not JSON: a streamed call's events)."""
    stored: dict[str, str] = {"body": body.decode("utf-8")}
    if media_type != JSON:
        stored["media_type"] = media_type
    return json.dumps(stored)


def replayable(stored: StoredKey, expected_hash: bytes, headers: dict[str, str]) -> StoredResponse:
    """The stored response, or 409 when the key was used differently or is still running."""
    if stored.request_hash != expected_hash:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different tool or input",
            headers=headers,
        )
    if stored.state != "done" or stored.response_status is None or stored.response_body is None:
        raise IdempotencyConflict("A request with this Idempotency-Key is still in progress", headers=headers)
    doc = json.loads(stored.response_body)
    return StoredResponse(stored.response_status, doc["body"].encode("utf-8"), doc.get("media_type", JSON))

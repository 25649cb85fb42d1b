"""Idempotency keys for invocations (API.md §5, guarantee 4), kept in PostgreSQL.

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
from datetime import datetime, timedelta
from typing import Any

from fastapi.responses import Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.config import Settings
from joyhub.core.errors import IdempotencyConflict

KEY_TTL = timedelta(hours=24)
MAX_KEY_LENGTH = 255


def request_hash(tool_id: uuid.UUID, value: Any) -> bytes:
    """SHA-256 over the tool id and the canonical JSON of the input."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(tool_id.bytes + canonical.encode("ascii")).digest()


@dataclass(frozen=True)
class StoredKey:
    state: str
    request_hash: bytes
    response_status: int | None
    response_body: str | None  # the JSONB column as text


def encode_response(body: bytes) -> str:
    """The JSONB value stored for a response body (its exact text)."""
    return json.dumps({"body": body.decode("utf-8")})


def replay(stored: StoredKey, expected_hash: bytes, headers: dict[str, str]) -> Response:
    """The stored response, or 409 when the key was used differently or is still running."""
    if stored.request_hash != expected_hash:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different tool or input",
            headers=headers,
        )
    if stored.state != "done" or stored.response_status is None or stored.response_body is None:
        raise IdempotencyConflict("A request with this Idempotency-Key is still in progress", headers=headers)
    body = json.loads(stored.response_body)["body"].encode("utf-8")
    return Response(
        content=body,
        status_code=stored.response_status,
        media_type="application/json",
        headers={**headers, "Idempotent-Replayed": "true"},
    )


# $1 id, $2 user, $3 key, $4 hash, $5 tool, $6 now, $7 expires
_CLAIM = """
    INSERT INTO idempotency_keys AS k
        (id, user_id, key, request_hash, tool_id, state, created_at, expires_at)
    VALUES ($1, $2, $3, $4, $5, 'in_flight', $6, $7)
    ON CONFLICT (user_id, key) DO UPDATE SET
        request_hash = EXCLUDED.request_hash, tool_id = EXCLUDED.tool_id, usage_log_id = NULL,
        state = 'in_flight', response_status = NULL, response_body = NULL,
        created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
    WHERE k.expires_at <= EXCLUDED.created_at
    RETURNING k.id
"""

_LOOKUP = """
    SELECT state, request_hash, response_status, response_body::text AS body
    FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND expires_at > $3
"""


async def claim(
    driver: Any, *, user_id: uuid.UUID, key: str, digest: bytes, tool_id: uuid.UUID, now: datetime
) -> uuid.UUID | None:
    """Claim `key` in the caller's transaction; None when someone holds it (live, unexpired).

    `driver` is the asyncpg connection of that transaction. An expired record not yet swept is
    taken over. Concurrent claims of one key serialise on the unique index: the loser waits for
    the winner's transaction and then gets None.
    """
    found = await driver.fetchval(_CLAIM, uuid.uuid4(), user_id, key, digest, tool_id, now, now + KEY_TTL)
    return None if found is None else uuid.UUID(str(found))


async def lookup(driver: Any, *, user_id: uuid.UUID, key: str, now: datetime) -> StoredKey | None:
    row = await driver.fetchrow(_LOOKUP, user_id, key, now)
    if row is None:
        return None
    return StoredKey(row["state"], bytes(row["request_hash"]), row["response_status"], row["body"])


_DELETE_EXPIRED = text(
    """
    DELETE FROM idempotency_keys WHERE id IN (
        SELECT id FROM idempotency_keys WHERE expires_at <= :now
        ORDER BY expires_at LIMIT 10000 FOR UPDATE SKIP LOCKED)
    """
)


async def sweep_expired(session: AsyncSession, settings: Settings, now: datetime) -> int:
    """Sweep job: forget keys older than 24 h (in batches, safe on many workers at once)."""
    result: Any = await session.execute(_DELETE_EXPIRED, {"now": now})
    return int(result.rowcount or 0)

"""Which tool a model id names, and which models a caller's plan may use (API.md §12).

On this surface a tool's `name` is its model id. Resolving it costs a query; the answer is kept
for a moment per process (`RESOLVE_TTL_SECONDS`) because every request resolves a model and the
hot path must stay within a few milliseconds of the upstream. That cannot let through anything
the admission would refuse: the gateway's admission statement reads the tool by id on every
call, so a tool deactivated or deleted meanwhile is refused there (404 `model_not_found`) and
admin edits apply at once. Only a rename takes up to that moment to be seen by a worker.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from joyhub.openai_compat.schemas import Model

RESOLVE_TTL_SECONDS = 2.0
MAX_ENTRIES = 4096

# the partial unique index on lower(name) among live tools answers this
_RESOLVE = text(
    """
    SELECT id, name FROM tools
    WHERE lower(name) = lower(:name) AND deleted_at IS NULL AND is_active AND protocol = 'openai'
    """
)

# the openai tools of the caller's active subscription's plan (none without one)
_MODELS = text(
    """
    SELECT t.name, t.created_at FROM tools AS t
    JOIN subscriptions AS s ON s.user_id = :user_id AND s.status = 'active'
    JOIN plans AS p ON p.code = s.plan_code
    LEFT JOIN plans AS mp ON mp.code = t.min_plan_code
    WHERE t.deleted_at IS NULL AND t.is_active AND t.protocol = 'openai'
      AND (mp.rank IS NULL OR p.rank >= mp.rank)
    ORDER BY lower(t.name)
    """
)


@dataclass(frozen=True)
class ModelRef:
    tool_id: uuid.UUID
    name: str  # the tool's name as stored: the `model` of every answer


class ModelCatalog:
    """The process's model-id lookups (built once per app)."""

    def __init__(self, ttl_seconds: float = RESOLVE_TTL_SECONDS) -> None:
        self.ttl_seconds = ttl_seconds
        self._known: dict[str, tuple[float, ModelRef]] = {}

    async def resolve(self, engine: AsyncEngine, model: str) -> ModelRef | None:
        """The live, active `openai` tool named `model` (case-insensitively), or None."""
        key = model.lower()
        now = time.monotonic()
        found = self._known.get(key)
        if found is not None and found[0] > now:
            return found[1]
        async with engine.connect() as conn:
            row = (await conn.execute(_RESOLVE, {"name": model})).first()
        if row is None:
            self._known.pop(key, None)
            return None
        ref = ModelRef(row.id, row.name)
        if len(self._known) >= MAX_ENTRIES:
            self._known.clear()
        self._known[key] = (now + self.ttl_seconds, ref)
        return ref


async def list_models(session: AsyncSession, user_id: uuid.UUID) -> list[Model]:
    rows = (await session.execute(_MODELS, {"user_id": user_id})).all()
    return [Model(id=r.name, created=int(r.created_at.timestamp()), owned_by="joyhub") for r in rows]

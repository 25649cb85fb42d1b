"""Writing audit entries: one call, in the caller's transaction, secrets masked as "***".

Every admin write and every subscription change calls `record` before the request's single
commit, so the change and its audit row land together or not at all.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.clock import utcnow
from joyhub.core.context import current_request_id
from joyhub.models import AuditLog, User

SECRET_FIELDS = frozenset(
    {"auth_header_value", "password", "password_hash", "new_password", "key", "token", "secret"}
)


def mask(changes: dict[str, Any]) -> dict[str, Any]:
    """Replace secret values (at any depth) with "***"; keep the fact that they changed."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key in SECRET_FIELDS:
            out[key] = "***" if not isinstance(value, dict) else {k: "***" for k in value}
        elif isinstance(value, dict):
            out[key] = mask(value)
        else:
            out[key] = value
    return out


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`{field: {"before": x, "after": y}}` for the fields whose value changed."""
    return {
        k: {"before": before.get(k), "after": after.get(k)}
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    }


def record(
    session: AsyncSession,
    *,
    actor: User | None,
    action: str,
    target_type: str,
    target_id: uuid.UUID | str | None,
    changes: dict[str, Any] | None = None,
) -> AuditLog:
    """Add an audit row to the session (flushed with the change it describes)."""
    entry = AuditLog(
        id=uuid.uuid4(),
        actor_id=actor.id if actor is not None else None,
        actor_email=actor.email if actor is not None else None,
        action=action,
        target_type=target_type,
        target_id=str(target_id) if target_id is not None else None,
        changes=mask(_jsonable(changes or {})),
        request_id=current_request_id(),
        created_at=utcnow(),
    )
    session.add(entry)
    return entry


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)

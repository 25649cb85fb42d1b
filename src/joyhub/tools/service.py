"""The tool catalog: what users may see, what admins may change (API.md §5, §7).

A tool's name is unique among live (non-deleted) tools, case-insensitively — the partial unique
index `uq_tools_name_live` decides, so two admins racing on one name cannot both win. Deletion
is soft: the row stays so usage history keeps its name. Every admin write is audited in the same
transaction, with the secret header value masked.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import asdict
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core import audit, metrics
from joyhub.core.clock import utcnow
from joyhub.core.config import Settings
from joyhub.core.egress import EgressDenied, EgressPolicy
from joyhub.core.errors import Conflict, NotFound, ValidationFailed, field_error
from joyhub.core.pagination import Page
from joyhub.models import Plan, Tool, User
from joyhub.tools.breaker import Breakers, CircuitView
from joyhub.tools.schemas import AdminToolOut, CircuitOut, ToolCreate, ToolOut, ToolUpdate
from joyhub.webhooks import events

NOT_NULLABLE = (
    "name",
    "description",
    "api_endpoint",
    "timeout_seconds",
    "max_attempts",
    "streaming",
    "protocol",
    "is_active",
)


def tool_out(tool: Tool) -> ToolOut:
    return ToolOut(
        id=tool.id,
        name=tool.name,
        description=tool.description,
        category=tool.category,
        input_schema=tool.input_schema,
        min_plan=tool.min_plan_code,
        streaming=tool.streaming,
        protocol=tool.protocol,
        is_active=tool.is_active,
        created_at=tool.created_at,
        updated_at=tool.updated_at,
    )


def admin_tool_out(tool: Tool, circuit: CircuitView) -> AdminToolOut:
    return AdminToolOut(
        **tool_out(tool).model_dump(),
        api_endpoint=tool.api_endpoint,
        timeout_seconds=tool.timeout_seconds,
        max_attempts=tool.max_attempts,
        auth_header_name=tool.auth_header_name,
        has_auth_secret=tool.auth_header_value is not None,
        requests_per_minute=tool.requests_per_minute,
        upstream_model=tool.upstream_model,
        circuit=CircuitOut(**asdict(circuit)),
    )


def clean_filter(field: str, value: str | None) -> str | None:
    """A query filter as given (trimmed); empty means none. NUL cannot reach PostgreSQL: 422."""
    if value is None:
        return None
    if "\x00" in value:
        raise ValidationFailed(details=[field_error(field, "must not contain NUL bytes")])
    return value.strip() or None


def _like(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _search(query: Select[Tool], term: str | None) -> Select[Tool]:
    if term:
        pattern = _like(term)
        query = query.where(
            Tool.name.ilike(pattern, escape="\\") | Tool.description.ilike(pattern, escape="\\")
        )
    return query


async def _paged(session: AsyncSession, query: Select[Tool], page: Page) -> tuple[list[Tool], int]:
    total = (await session.execute(select(func.count()).select_from(query.subquery()))).scalar_one()
    rows = (
        await session.execute(
            query.order_by(func.lower(Tool.name), Tool.id).offset(page.offset).limit(page.limit)
        )
    ).scalars()
    return list(rows), int(total)


async def list_catalog(
    session: AsyncSession, *, search: str | None, category: str | None, page: Page
) -> tuple[list[Tool], int]:
    """Active, live tools by name; `search` matches name or description, `category` exactly."""
    query = select(Tool).where(Tool.deleted_at.is_(None), Tool.is_active.is_(True))
    query = _search(query, search)
    if category:
        query = query.where(func.lower(Tool.category) == category.lower())
    return await _paged(session, query, page)


async def get_catalog_tool(session: AsyncSession, tool_id: uuid.UUID) -> Tool:
    tool = await session.get(Tool, tool_id)
    if tool is None or tool.deleted_at is not None or not tool.is_active:
        raise NotFound("Tool not found")
    return tool


async def list_admin(
    session: AsyncSession, *, search: str | None, is_active: bool | None, page: Page
) -> tuple[list[Tool], int]:
    query = _search(select(Tool).where(Tool.deleted_at.is_(None)), search)
    if is_active is not None:
        query = query.where(Tool.is_active.is_(is_active))
    return await _paged(session, query, page)


async def get_admin_tool(session: AsyncSession, tool_id: uuid.UUID, *, lock: bool = False) -> Tool:
    query = select(Tool).where(Tool.id == tool_id, Tool.deleted_at.is_(None))
    if lock:
        query = query.with_for_update()
    tool = (await session.execute(query)).scalar_one_or_none()
    if tool is None:
        raise NotFound("Tool not found")
    return tool


def snapshot(tool: Tool) -> dict[str, Any]:
    """The audited fields. The secret appears only as a digest, which the audit masks as "***"."""
    secret = tool.auth_header_value
    return {
        "name": tool.name,
        "description": tool.description,
        "category": tool.category,
        "input_schema": tool.input_schema,
        "min_plan": tool.min_plan_code,
        "api_endpoint": tool.api_endpoint,
        "timeout_seconds": tool.timeout_seconds,
        "max_attempts": tool.max_attempts,
        "auth_header_name": tool.auth_header_name,
        "auth_header_value": hashlib.sha256(secret.encode()).hexdigest() if secret else None,
        "has_auth_secret": secret is not None,
        "streaming": tool.streaming,
        "protocol": tool.protocol,
        "upstream_model": tool.upstream_model,
        "requests_per_minute": tool.requests_per_minute,
        "is_active": tool.is_active,
        "deleted_at": tool.deleted_at,
    }


async def _check_plan(session: AsyncSession, code: str | None) -> None:
    if code is not None and await session.get(Plan, code) is None:
        raise ValidationFailed(details=[field_error("body.min_plan", f"Unknown plan {code[:32]!r}")])


async def _check_endpoint_policy(url: str | None, settings: Settings, egress: EgressPolicy) -> None:
    """https only in production, and the egress policy's verdict on where the URL leads now
    (`core/egress.py`; checked again at every connection, so a later DNS change cannot evade it)."""
    if url is None:
        return
    if settings.environment == "production" and not url.startswith("https://"):
        raise ValidationFailed(
            details=[field_error("body.api_endpoint", "must be an https:// URL in production")]
        )
    try:
        await egress.check_url(url)
    except EgressDenied as exc:
        raise ValidationFailed(details=[field_error("body.api_endpoint", f"not allowed: {exc}")]) from None


def _check_secret_pair(tool: Tool) -> None:
    if tool.auth_header_value is not None and tool.auth_header_name is None:
        raise ValidationFailed(details=[field_error("body.auth_header_value", "needs auth_header_name")])


async def _flush_unique(session: AsyncSession) -> None:
    try:
        await session.flush()
    except IntegrityError as exc:
        if "uq_tools_name_live" in str(exc.orig):
            raise Conflict("A tool with this name already exists") from None
        raise


async def create_tool(
    session: AsyncSession, actor: User, data: ToolCreate, settings: Settings, egress: EgressPolicy
) -> Tool:
    await _check_endpoint_policy(data.api_endpoint, settings, egress)
    await _check_plan(session, data.min_plan)
    now = utcnow()
    tool = Tool(
        id=uuid.uuid4(),
        name=data.name,
        description=data.description,
        category=data.category,
        input_schema=data.input_schema,
        min_plan_code=data.min_plan,
        api_endpoint=data.api_endpoint,
        timeout_seconds=data.timeout_seconds or settings.tool_default_timeout_seconds,
        max_attempts=data.max_attempts or settings.tool_default_max_attempts,
        auth_header_name=data.auth_header_name,
        auth_header_value=data.auth_header_value,
        streaming=data.streaming,
        protocol=data.protocol,
        upstream_model=data.upstream_model,
        requests_per_minute=data.requests_per_minute,
        is_active=data.is_active,
        created_at=now,
        updated_at=now,
    )
    _check_secret_pair(tool)
    session.add(tool)
    await _flush_unique(session)
    audit.record(
        session,
        actor=actor,
        action="tool.create",
        target_type="tool",
        target_id=tool.id,
        changes=audit.diff({}, snapshot(tool)),
    )
    return tool


async def update_tool(
    session: AsyncSession,
    actor: User,
    tool_id: uuid.UUID,
    data: ToolUpdate,
    settings: Settings,
    egress: EgressPolicy,
) -> Tool:
    fields = data.model_fields_set
    nulls = [f for f in NOT_NULLABLE if f in fields and getattr(data, f) is None]
    if nulls:
        raise ValidationFailed(details=[field_error(f"body.{f}", "may not be null") for f in nulls])
    if "api_endpoint" in fields:  # before the row lock: it may resolve a host name
        await _check_endpoint_policy(data.api_endpoint, settings, egress)
    tool = await get_admin_tool(session, tool_id, lock=True)
    before = snapshot(tool)
    if "min_plan" in fields:
        await _check_plan(session, data.min_plan)
        tool.min_plan_code = data.min_plan
    for name in (
        "name",
        "description",
        "api_endpoint",
        "category",
        "input_schema",
        "timeout_seconds",
        "max_attempts",
        "auth_header_name",
        "auth_header_value",
        "streaming",
        "protocol",
        "upstream_model",
        "requests_per_minute",
        "is_active",
    ):
        if name in fields:
            setattr(tool, name, getattr(data, name))
    if "auth_header_name" in fields and data.auth_header_name is None:
        tool.auth_header_value = None  # no header name, no secret to send
    _check_secret_pair(tool)
    after = snapshot(tool)
    changes = audit.diff(before, after)
    if changes:
        # a fresh updated_at is what makes every worker pick up the change (validator cache key)
        tool.updated_at = utcnow()
        await _flush_unique(session)
        audit.record(
            session,
            actor=actor,
            action="tool.update",
            target_type="tool",
            target_id=tool.id,
            changes=changes,
        )
    return tool


async def delete_tool(session: AsyncSession, actor: User, tool_id: uuid.UUID) -> None:
    tool = await get_admin_tool(session, tool_id, lock=True)
    before = snapshot(tool)
    now = utcnow()
    tool.deleted_at = now
    tool.updated_at = now
    await session.flush()
    audit.record(
        session,
        actor=actor,
        action="tool.delete",
        target_type="tool",
        target_id=tool.id,
        changes=audit.diff(before, snapshot(tool)) | {"name": tool.name},
    )


async def reset_circuit(
    session: AsyncSession, actor: User, tool_id: uuid.UUID, breakers: Breakers
) -> tuple[Tool, CircuitView]:
    tool = await get_admin_tool(session, tool_id)
    before = await breakers.view(str(tool.id))
    await breakers.reset(str(tool.id))
    metrics.CIRCUIT_STATE.labels(str(tool.id)).set(metrics.CIRCUIT_STATE_VALUES["closed"])
    after = await breakers.view(str(tool.id))
    if before.state != "closed":
        events.emit(
            session,
            events.TOOL_CIRCUIT_CLOSED,
            user_id=None,
            data=events.circuit_data(tool.id, tool.name, before.consecutive_failures),
            now=utcnow(),
        )
    audit.record(
        session,
        actor=actor,
        action="tool.circuit_reset",
        target_type="tool",
        target_id=tool.id,
        changes={"circuit": {"before": _circuit_json(before), "after": _circuit_json(after)}},
    )
    return tool, after


def _circuit_json(view: CircuitView) -> dict[str, Any]:
    return CircuitOut(**asdict(view)).model_dump(mode="json")

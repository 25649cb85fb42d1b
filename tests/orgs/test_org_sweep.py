"""What an organization call holds is given back by every path that gives back a personal call's:
the sweep closing a call whose worker died, and the undo of an admission whose reply was lost —
on the organization's subscription and on the member's row."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.auth.credentials import Credential
from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.tools.metering import Admission, MeteringStore
from tests.conftest import test_settings as hub_settings
from tests.orgs.helpers import make_org, org_ledger
from tests.tools.helpers import admit_request, make_tool, tool_version

pytestmark = pytest.mark.integration


async def _admit(engine: AsyncEngine, store: MeteringStore, cred: Credential, tool: uuid.UUID) -> Admission:
    version = await tool_version(engine, tool)
    result = (await store.admit_batch([admit_request(tool, version, cred, reserve=8, request_id="req")]))[0]
    assert result.admission is not None, result.read
    return result.admission


async def test_sweep_and_undo_release_the_member_and_the_org(engine: AsyncEngine) -> None:
    org = await make_org(engine, admins=0, members=1, token_limit=100)
    member = org.of("member")
    tool = await make_tool(engine, "http://127.0.0.1:9/unused")
    store = MeteringStore(engine)
    cred = Credential(user_id=member.user_id, session_id=member.session_id, org_id=org.id)
    first = await _admit(engine, store, cred, tool)
    second = await _admit(engine, store, cred, tool)
    assert first.org_id == org.id and first.user_id == member.user_id
    held = await org_ledger(engine, org.id)
    assert (held.tokens_reserved, held.inflight, held.member_reserved) == (16, 2, 16)

    await store.undo_admissions([second.log_id], second.started_at)
    held = await org_ledger(engine, org.id)
    assert (held.tokens_reserved, held.inflight, held.member_reserved) == (8, 1, 8)

    async with make_sessionmaker(engine)() as db, db.begin():
        closed = await MeteringStore.close_stale(db, hub_settings(), utcnow() + timedelta(hours=1))
    assert closed == 1
    after = await org_ledger(engine, org.id)
    assert (after.tokens_used, after.tokens_reserved, after.inflight, after.member_reserved) == (0, 0, 0, 0)
    async with engine.connect() as conn:
        rollup = (
            await conn.execute(
                text("SELECT sum(invocations), sum(errors) FROM usage_org_daily WHERE org_id = :o"),
                {"o": org.id},
            )
        ).one()
        personal = (
            await conn.execute(
                text("SELECT count(*) FROM usage_daily WHERE user_id = :u"), {"u": member.user_id}
            )
        ).scalar_one()
    assert tuple(rollup) == (1, 1) and personal == 0

"""`X-Org-ID` on the OpenAI surface (API.md §12 with §13): the same billing rule as the JSON
invoke — the header is part of the credential every invocation surface takes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from tests.factories import Account, make_subscription
from tests.live_hub import LiveHubFactory
from tests.openai_compat.openai_upstream import OpenAIUpstream
from tests.orgs.helpers import Org, make_org, org_ledger
from tests.tools.helpers import make_tool, sub_state
from tests.usage.factories import make_api_key

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "hi there"}]


async def _org_member_calling(
    engine: AsyncEngine, oai_upstream: OpenAIUpstream
) -> tuple[str, Org, Account, str]:
    """An OpenAI-protocol model, an organization with one member, and that member's API key."""
    model = f"llm-{uuid.uuid4().hex[:6]}"
    await make_tool(engine, oai_upstream.base("ok"), name=model, protocol="openai", upstream_model="up")
    org = await make_org(engine, admins=0, members=1)
    member = org.of("member")
    return model, org, member, await make_api_key(engine, member.user_id)


async def test_x_org_id_bills_the_organization_on_the_openai_surface(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    hub = await live_hub()
    model, org, member, key = await _org_member_calling(engine, oai_upstream)
    await make_subscription(engine, member.user_id, "pro")

    def call(org_id: uuid.UUID) -> Any:
        client = OpenAI(
            base_url=f"{hub.url}/api/v1/openai",
            api_key=key,
            max_retries=0,
            timeout=20,
            default_headers={"X-Org-ID": str(org_id)},
        )
        return client.chat.completions.create(model=model, messages=HI)

    answer = await asyncio.to_thread(call, org.id)
    assert answer.usage is not None
    ledger = await org_ledger(engine, org.id)
    assert ledger.tokens_used == answer.usage.total_tokens == ledger.member_used[member.user_id]
    assert (await sub_state(engine, member.user_id)).tokens_used == 0  # the personal one untouched
    with pytest.raises(openai.NotFoundError):  # not a member of that organization
        await asyncio.to_thread(call, uuid.uuid4())


async def test_org_summary_shows_the_reported_prompt_and_completion_tokens_per_tool(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    hub = await live_hub()
    model, org, member, key = await _org_member_calling(engine, oai_upstream)
    client = AsyncOpenAI(
        base_url=f"{hub.url}/api/v1/openai",
        api_key=key,
        max_retries=0,
        timeout=20,
        default_headers={"X-Org-ID": str(org.id)},
    )
    async with client:
        one = await client.chat.completions.create(model=model, messages=HI)
        two = await client.chat.completions.create(model=model, messages=HI, max_tokens=3)
    assert one.usage is not None and two.usage is not None

    today = utcnow().date().isoformat()
    for query in ("", f"?start_date={today}&end_date={today}"):  # the raw edges, then the rollup's days
        r = await hub.client.get(f"/api/v1/orgs/{org.id}/usage/summary{query}", headers=org.owner.headers)
        (by_tool,) = r.json()["data"]["by_tool"]
        assert by_tool["input_tokens"] == one.usage.prompt_tokens + two.usage.prompt_tokens, query
        assert by_tool["output_tokens"] == one.usage.completion_tokens + two.usage.completion_tokens
        assert by_tool["tokens"] == one.usage.total_tokens + two.usage.total_tokens
    # the member's personal summary shows none of it
    personal = (await hub.client.get("/api/v1/usage/summary", headers=member.headers)).json()["data"]
    assert personal["by_tool"] == [] and personal["total_invocations"] == 0

"""`joyhub serve --demo`: the hub serves, registers and meters its own demo tools end to end."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub import demo
from joyhub.core.db import make_sessionmaker
from joyhub.main import create_app
from joyhub.models import Tool, User
from tests import conftest
from tests.factories import make_account, make_subscription
from tests.tools.helpers import usage_logs

pytestmark = pytest.mark.integration


class _Hub:
    def __init__(self, engine: AsyncEngine, tmp_path: Path) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        app = create_app(
            conftest.test_settings(tmp_path), engine=engine, sessionmaker=make_sessionmaker(engine)
        )
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None, access_log=False))
        self.task: asyncio.Task[None] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> _Hub:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            await asyncio.sleep(0.01)
            if self.task.done():
                self.task.result()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task
        self.sock.close()


@pytest.fixture
async def demo_env(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    monkeypatch.setenv("JOYHUB_DEMO", "1")
    yield


async def test_demo_tools_end_to_end(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JOYHUB_DEMO", "1")
    hub = _Hub(engine, tmp_path)
    monkeypatch.setenv("JOYHUB_DEMO_BASE_URL", f"http://0.0.0.0:{hub.port}")
    async with hub, httpx.AsyncClient(base_url=hub.base, timeout=10) as http:
        printed = capsys.readouterr().out
        assert printed.count(demo.DEMO_ADMIN_EMAIL) == 1
        password = printed.split("password: ")[1].split()[0]
        assert len(password) >= 20

        user = await make_account(engine)
        await make_subscription(engine, user.user_id, "free")
        r = await http.get("/api/v1/tools", headers=user.headers)
        tools = {t["name"]: t for t in r.json()["data"]}
        assert {"Word Count", "Summarise", "Sentiment"} <= set(tools)
        assert tools["Word Count"]["input_schema"]["required"] == ["text"]

        text_in = "Joy is great. The hub works! Does it count? Yes."
        r = await http.post(
            f"/api/v1/tools/{tools['Word Count']['id']}/invoke",
            json={"input": {"text": text_in}},
            headers=user.headers,
        )
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["output"]["words"] == 10
        assert data["tokens_used"] == data["output"]["usage"]["total_tokens"] == -(-len(text_in) // 4)
        assert r.headers["X-Quota-Remaining"] == str(1000 - data["tokens_used"])

        r = await http.post(
            f"/api/v1/tools/{tools['Summarise']['id']}/invoke",
            json={"input": {"text": text_in, "max_sentences": 1}},
            headers=user.headers,
        )
        assert r.json()["data"]["output"]["summary"] == "Joy is great."
        r = await http.post(
            f"/api/v1/tools/{tools['Sentiment']['id']}/invoke",
            json={"input": {"text": "I love it, great and awesome"}},
            headers=user.headers,
        )
        assert r.json()["data"]["output"]["label"] == "positive"
        r = await http.post(
            f"/api/v1/tools/{tools['Sentiment']['id']}/invoke",
            json={"input": {"text": 5}},
            headers=user.headers,
        )
        assert r.json()["error"]["code"] == "TOOL_INPUT_INVALID"
        # the streaming demo: a word per event, as they come, then `done` with the usage
        assert tools["Story Stream"]["streaming"] is True
        async with http.stream(
            "POST",
            f"/api/v1/tools/{tools['Story Stream']['id']}/invoke",
            json={"input": {"text": "hello there", "words": 5}, "stream": True},
            headers=user.headers,
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in r.aiter_lines() if line.startswith(("event:", "data:"))]
        assert [line for line in lines if line.startswith("event:")] == ["event: chunk"] * 5 + ["event: done"]
        words = "".join(json.loads(line[5:])["text"] for line in lines[1:10:2])
        assert words == "hello there once upon a."
        done = json.loads(lines[-1][5:])
        assert (done["tokens_used"], done["token_source"]) == (-(-len("hello there") // 4) + 5, "reported")
        assert [log.status for log in await usage_logs(engine, user.user_id)] == ["success"] * 4

        # the demo endpoints are not a way around the quota
        r = await http.post("/demo/tools/word-count", json={"text": "free tokens?"})
        assert r.status_code == 403
        assert "/demo" not in (await http.get("/openapi.json")).text

    # a second start: no new admin, no duplicate tools, endpoints follow the new address
    hub2 = _Hub(engine, tmp_path)
    monkeypatch.setenv("JOYHUB_DEMO_BASE_URL", f"http://127.0.0.1:{hub2.port}")
    async with hub2:
        assert demo.DEMO_ADMIN_EMAIL not in capsys.readouterr().out
    async with make_sessionmaker(engine)() as db:
        names = (
            await db.execute(select(Tool.name, Tool.api_endpoint).where(Tool.deleted_at.is_(None)))
        ).all()
        admins = (await db.execute(select(func.count()).where(User.role == "admin"))).scalar_one()
    assert sorted(n for n, _ in names) == [
        "Sentiment",
        "Story Stream",
        "Summarise",
        "Word Count",
        "demo-chat",
        "demo-embed",
    ]
    assert all(url.startswith(hub2.base) for _, url in names)
    assert admins == 1
    # the password was printed and stored nowhere else (only as a bcrypt hash)
    async with engine.connect() as conn:
        dump = (await conn.execute(text("SELECT changes::text FROM audit_logs"))).scalars().all()
    assert all(password not in d for d in dump)


async def test_demo_setup_is_safe_when_workers_start_together(
    engine: AsyncEngine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    apps = [
        create_app(conftest.test_settings(tmp_path), engine=engine, sessionmaker=make_sessionmaker(engine))
        for _ in range(3)
    ]
    await asyncio.gather(*(demo.register_tools(a, "http://127.0.0.1:1") for a in apps))
    passwords = await asyncio.gather(*(demo.ensure_admin(a) for a in apps))
    assert sum(p is not None for p in passwords) == 1
    async with make_sessionmaker(engine)() as db:
        count = (await db.execute(select(func.count()).select_from(Tool))).scalar_one()
    assert count == len(demo.DEMO_TOOLS) == 6


def test_demo_tools_are_deterministic() -> None:
    body = demo.TextIn(text="good good bad")
    assert demo.sentiment(body) == demo.sentiment(body)
    assert demo.sentiment(body)["label"] == "positive"
    assert demo.word_count(demo.TextIn(text=""))["words"] == 0
    assert (
        demo.summarise(demo.SummariseIn(text="One. Two. Three.", max_sentences=2))["summary"] == "One. Two."
    )
    assert demo.base_url("http://0.0.0.0:8000/") == "http://127.0.0.1:8000"
    assert demo.base_url("http://[::]:8000") == "http://127.0.0.1:8000"
    assert demo.base_url("http://[::1]:8000") == "http://[::1]:8000"


async def test_the_readme_openai_snippet_works_against_the_demo(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's lines, as written, after `make run` (API.md §12): the demo's `demo-chat` and
    `demo-embed` through /api/v1/openai with a hub API key, metered."""
    from openai import AsyncOpenAI, OpenAI

    from tests.usage.factories import make_api_key

    monkeypatch.setenv("JOYHUB_DEMO", "1")
    hub = _Hub(engine, tmp_path)
    monkeypatch.setenv("JOYHUB_DEMO_BASE_URL", f"http://0.0.0.0:{hub.port}")
    async with hub:
        user = await make_account(engine)
        await make_subscription(engine, user.user_id, "free")
        key = await make_api_key(engine, user.user_id)

        def readme() -> Any:
            client = OpenAI(base_url=f"http://127.0.0.1:{hub.port}/api/v1/openai", api_key=key)
            return client.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": "hi"}]
            )

        answer = await asyncio.to_thread(readme)
        assert answer.model == "demo-chat"
        assert answer.choices[0].message.content.startswith("Hello! You said: hi.")
        async with AsyncOpenAI(base_url=f"{hub.base}/api/v1/openai", api_key=key, max_retries=0) as client:
            models = [m.id async for m in client.models.list()]
            assert {"demo-chat", "demo-embed"} <= set(models)
            stream = await client.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4
            )
            words = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert words == "Hello! You said: hi."
            emb = await client.embeddings.create(model="demo-embed", input="a b c")
            assert emb.usage.total_tokens == 3 and len(emb.data[0].embedding) == 8
        logs = await usage_logs(engine, user.user_id)
        assert [log.status for log in logs] == ["success"] * 3
        assert logs[2].tokens_used == 3

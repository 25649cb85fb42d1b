"""Built-in demo tools for `joyhub serve --demo` (API.md §10): nothing else has to run.

Four deterministic text tools are served by the hub itself under `/demo/tools/<name>` (POST,
JSON in and out, each reporting `usage.total_tokens`; `story` streams its answer as Server-Sent
Events, a word at a time) and registered in the catalog pointing at
JOYHUB_DEMO_BASE_URL, so a new user can register, subscribe to `free` and invoke one at once.
They go through the real gateway like any other tool — quota, usage log, breaker and all.
Two OpenAI-compatible models are served the same way under `/demo/openai/v1` (`demo_models.py`:
`demo-chat`, streaming or not, and `demo-embed`), registered with `protocol: "openai"`, so the
OpenAI SDK pointed at `<hub>/api/v1/openai` with a hub API key works at once (API.md §12).

The endpoints want a secret header derived from the hub's signing key (HMAC), registered as the
tools' `auth_header_value`: calling them directly, around the quota, does not work, and every
worker of one deployment derives the same value.

Start-up registration is idempotent (upsert by name under an advisory lock, so several workers
starting at once register each tool once), and if no active admin exists one is created —
`admin@joyhub.local` with a generated password printed once to stdout and stored nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, text

from joyhub import demo_models
from joyhub.core.clock import utcnow
from joyhub.core.config import Settings
from joyhub.core.errors import Forbidden, ValidationFailed
from joyhub.core.security import constant_time_equal, hash_password
from joyhub.models import Tool, User

DEMO_HEADER = "X-Demo-Key"
DEMO_ADMIN_EMAIL = "admin@joyhub.local"
_LOCK_ID = 4_242_005
MAX_TEXT = 100_000

_WORD = re.compile(r"[A-Za-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# word lists for the demo sentiment tool (a string split keeps them readable)
POSITIVE = frozenset(
    (  # noqa: SIM905
        "good great excellent amazing awesome love loved lovely happy joy joyful nice wonderful "
        "fantastic best like liked enjoy enjoyed pleasant perfect brilliant superb delightful glad "
        "fast easy helpful beautiful win success recommend"
    ).split()
)
NEGATIVE = frozenset(
    (  # noqa: SIM905
        "bad terrible awful horrible hate hated sad angry poor worst dislike disliked slow broken "
        "ugly annoying boring disappointing disappointed fail failed failure problem problems wrong "
        "useless difficult hard bug bugs crash"
    ).split()
)


def demo_secret(settings: Settings) -> str:
    """The header value the demo endpoints expect: HMAC of a label under the signing key."""
    return hmac.new(settings.secret_key().encode(), b"joyhub-demo-tools", hashlib.sha256).hexdigest()


def _tokens(text_in: str, extra: int = 0) -> dict[str, int]:
    total = max(1, math.ceil(len(text_in) / 4) + extra)
    return {"total_tokens": total}


class TextIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=MAX_TEXT)


class SummariseIn(TextIn):
    max_sentences: int = Field(2, ge=1, le=10)


class StoryIn(TextIn):
    words: int = Field(24, ge=1, le=200)


STORY_WORDS = (  # noqa: SIM905 (a sentence reads better than a list of words)
    "once upon a time a small hub carried every token of every tool to the people who asked "
    "and counted each one exactly so nobody paid for what they never received"
).split()
STORY_DELAY_SECONDS = 0.04


def story_events(body: StoryIn) -> list[dict[str, Any]]:
    """The events of the streaming demo: one word each (the input's words first, then a story),
    the last carrying the usage — deterministic for a given input."""
    words = [*_WORD.findall(body.text), *STORY_WORDS]
    events: list[dict[str, Any]] = [
        {"index": i, "text": words[i % len(words)] + (" " if i + 1 < body.words else ".")}
        for i in range(body.words)
    ]
    events[-1]["usage"] = _tokens(body.text, body.words)
    return events


def word_count(body: TextIn) -> dict[str, Any]:
    words = _WORD.findall(body.text)
    return {
        "words": len(words),
        "characters": len(body.text),
        "lines": body.text.count("\n") + 1 if body.text else 0,
        "unique_words": len({w.lower() for w in words}),
        "usage": _tokens(body.text),
    }


def summarise(body: SummariseIn) -> dict[str, Any]:
    sentences = [s.strip() for s in _SENTENCE_END.split(body.text.strip()) if s.strip()]
    summary = " ".join(sentences[: body.max_sentences])
    return {
        "summary": summary,
        "sentences_total": len(sentences),
        "sentences_kept": min(len(sentences), body.max_sentences),
        "usage": _tokens(body.text, math.ceil(len(summary) / 4)),
    }


def sentiment(body: TextIn) -> dict[str, Any]:
    words = [w.lower() for w in _WORD.findall(body.text)]
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    score = 0.0 if pos + neg == 0 else round((pos - neg) / (pos + neg), 3)
    label = "positive" if score > 0.2 else "negative" if score < -0.2 else "neutral"
    return {
        "label": label,
        "score": score,
        "positive_words": pos,
        "negative_words": neg,
        "usage": _tokens(body.text),
    }


router = APIRouter()


def _check_key(request: Request, key: str | None) -> None:
    if key is None or not constant_time_equal(key, demo_secret(request.app.state.settings)):
        raise Forbidden("Demo tools are called through the hub's gateway")


@router.post("/tools/word-count")
async def word_count_endpoint(
    body: TextIn, request: Request, key: Annotated[str | None, Header(alias=DEMO_HEADER)] = None
) -> dict[str, Any]:
    _check_key(request, key)
    return word_count(body)


@router.post("/tools/summarise")
async def summarise_endpoint(
    body: SummariseIn, request: Request, key: Annotated[str | None, Header(alias=DEMO_HEADER)] = None
) -> dict[str, Any]:
    _check_key(request, key)
    return summarise(body)


@router.post("/tools/sentiment")
async def sentiment_endpoint(
    body: TextIn, request: Request, key: Annotated[str | None, Header(alias=DEMO_HEADER)] = None
) -> dict[str, Any]:
    _check_key(request, key)
    return sentiment(body)


@router.post("/tools/story")
async def story_endpoint(
    body: StoryIn, request: Request, key: Annotated[str | None, Header(alias=DEMO_HEADER)] = None
) -> StreamingResponse:
    """A streaming tool (API.md §5.1): one word every few tens of milliseconds, as Server-Sent
    Events, the usage in the last event, then `[DONE]`."""
    _check_key(request, key)

    async def events() -> AsyncIterator[bytes]:
        for event in story_events(body):
            await asyncio.sleep(STORY_DELAY_SECONDS)
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# -- the OpenAI-compatible demo models (API.md §12; `demo_models.py` makes their answers) -------

OPENAI_DELAY_SECONDS = 0.02  # between streamed words: visibly a stream, still quick


@router.post("/openai/v1/chat/completions")
async def openai_chat_endpoint(
    request: Request, key: Annotated[str | None, Header(alias=DEMO_HEADER)] = None
) -> Response:
    _check_key(request, key)
    return await _openai_answer(await _openai_body(request), chat=True)


@router.post("/openai/v1/completions")
async def openai_completions_endpoint(
    request: Request, key: Annotated[str | None, Header(alias=DEMO_HEADER)] = None
) -> Response:
    _check_key(request, key)
    return await _openai_answer(await _openai_body(request), chat=False)


@router.post("/openai/v1/embeddings")
async def openai_embeddings_endpoint(
    request: Request, key: Annotated[str | None, Header(alias=DEMO_HEADER)] = None
) -> Response:
    _check_key(request, key)
    return JSONResponse(demo_models.embeddings(await _openai_body(request)))


async def _openai_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ValidationFailed("The body must be a JSON object")
    return body


async def _openai_answer(body: dict[str, Any], *, chat: bool) -> Response:
    """A whole completion, or its chunks as Server-Sent Events one word at a time, `[DONE]` last."""
    if not body.get("stream"):
        return JSONResponse(demo_models.completion(body, chat=chat))

    async def events() -> AsyncIterator[bytes]:
        for chunk in demo_models.chunks(body, chat=chat):
            await asyncio.sleep(OPENAI_DELAY_SECONDS)
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _text_schema(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {"text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}}
    props.update(extra or {})
    return {"type": "object", "properties": props, "required": ["text"], "additionalProperties": False}


DEMO_TOOLS: list[dict[str, Any]] = [
    {
        "name": "Word Count",
        "path": "word-count",
        "category": "text",
        "description": "Counts words, characters, lines and unique words in a text (demo tool).",
        "input_schema": _text_schema(),
    },
    {
        "name": "Summarise",
        "path": "summarise",
        "category": "text",
        "description": "Keeps the first sentences of a text as its summary (demo tool).",
        "input_schema": _text_schema({"max_sentences": {"type": "integer", "minimum": 1, "maximum": 10}}),
    },
    {
        "name": "Sentiment",
        "path": "sentiment",
        "category": "text",
        "description": "Scores a text positive, negative or neutral from word lists (demo tool).",
        "input_schema": _text_schema(),
    },
    {
        "name": "Story Stream",
        "path": "story",
        "category": "text",
        "description": "Tells a short story one word at a time: a streaming tool (demo tool; "
        'invoke with "stream": true).',
        "input_schema": _text_schema({"words": {"type": "integer", "minimum": 1, "maximum": 200}}),
        "streaming": True,
    },
    {  # OpenAI-compatible models (API.md §12): /api/v1/openai with `model="demo-chat"`
        "name": demo_models.CHAT_MODEL,
        "path": "openai/v1",
        "category": "llm",
        "description": "A deterministic chat model behind the OpenAI-compatible API (demo tool; "
        "use the OpenAI SDK with base_url=<hub>/api/v1/openai and model='demo-chat').",
        "input_schema": None,
        "protocol": "openai",
    },
    {
        "name": demo_models.EMBED_MODEL,
        "path": "openai/v1",
        "category": "llm",
        "description": "A deterministic embedding model behind the OpenAI-compatible API (demo tool; "
        "client.embeddings.create(model='demo-embed', input=...)).",
        "input_schema": None,
        "protocol": "openai",
    },
]


def base_url(raw: str) -> str:
    """JOYHUB_DEMO_BASE_URL made callable: a wildcard bind address means this machine."""
    parts = urlsplit(raw.rstrip("/"))
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - rewriting a bind-all address, not binding
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme or 'http'}://{host}{port}{parts.path}"


async def register_tools(app: FastAPI, base: str) -> list[uuid.UUID]:
    """Upsert the demo tools by name (case-insensitive, live tools); return their ids."""
    settings: Settings = app.state.settings
    secret = demo_secret(settings)
    ids: list[uuid.UUID] = []
    async with app.state.sessionmaker() as session, session.begin():
        await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        now = utcnow()
        for spec in DEMO_TOOLS:
            values = {
                "description": spec["description"],
                "category": spec["category"],
                "input_schema": spec["input_schema"],
                # an OpenAI-compatible model's endpoint is its server's base URL (API.md §12)
                "api_endpoint": f"{base}/demo/{spec['path']}"
                if spec.get("protocol") == "openai"
                else f"{base}/demo/tools/{spec['path']}",
                "timeout_seconds": 10,
                "max_attempts": 2,
                "auth_header_name": DEMO_HEADER,
                "auth_header_value": secret,
                "streaming": spec.get("streaming", False),
                "protocol": spec.get("protocol", "json"),
            }
            tool = (
                await session.execute(
                    select(Tool).where(
                        func.lower(Tool.name) == spec["name"].lower(), Tool.deleted_at.is_(None)
                    )
                )
            ).scalar_one_or_none()
            if tool is None:
                tool = Tool(id=uuid.uuid4(), name=spec["name"], is_active=True, created_at=now, **values)
                session.add(tool)
            elif any(getattr(tool, k) != v for k, v in values.items()):
                for key, value in values.items():
                    setattr(tool, key, value)
                tool.updated_at = now
            ids.append(tool.id)
    return ids


async def ensure_admin(app: FastAPI) -> str | None:
    """Create `admin@joyhub.local` when no active admin exists; return the password (once)."""
    settings: Settings = app.state.settings
    async with app.state.sessionmaker() as session, session.begin():
        await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        active_admin = (
            await session.execute(
                select(User.id).where(User.role == "admin", User.is_active.is_(True)).limit(1)
            )
        ).first()
        if active_admin is not None:
            return None
        password = secrets.token_urlsafe(18)
        password_hash = await hash_password(password, settings.bcrypt_rounds)
        user = (
            await session.execute(select(User).where(User.email == DEMO_ADMIN_EMAIL))
        ).scalar_one_or_none()
        if user is None:
            session.add(
                User(
                    id=uuid.uuid4(),
                    name="Demo Administrator",
                    email=DEMO_ADMIN_EMAIL,
                    password_hash=password_hash,
                    role="admin",
                    is_active=True,
                )
            )
        else:
            user.role, user.is_active, user.password_hash = "admin", True, password_hash
            user.updated_at = utcnow()
    return password


async def setup(app: FastAPI) -> None:
    """Start-up with `--demo`: register the tools, make sure someone can administer them."""
    import os

    base = base_url(os.environ.get("JOYHUB_DEMO_BASE_URL") or "http://127.0.0.1:8000")
    await register_tools(app, base)
    password = await ensure_admin(app)
    if password is not None:
        # printed once, on stdout, for the person who started the server; stored nowhere else
        print(
            "\n=== Joyfull UI Hub demo ===\n"
            f"Created admin {DEMO_ADMIN_EMAIL} with password: {password}\n"
            "(shown only this once; change it after logging in)\n",
            flush=True,
        )

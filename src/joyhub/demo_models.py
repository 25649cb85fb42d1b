"""The demo's OpenAI-compatible models (API.md §12): deterministic answers in the shapes vLLM and
OpenAI send, with real usage numbers, for `joyhub serve --demo` (`demo.py` serves them), the
tests and the benchmark.

- `demo-chat` answers chat and text completions: a fixed sentence that echoes the last user
  words, cut at `max_tokens` words; one word is one token, and a prompt costs one token per word
  of its text (at least 1). Streamed, it is one chunk per word (`chat.completion.chunk`, the
  first carrying the assistant role, the last `finish_reason`), and with
  `stream_options.include_usage` every chunk has `"usage": null` and a final usage-only chunk
  with empty `choices` follows — OpenAI's and vLLM's shape.
- `demo-embed` answers embeddings: an 8-dimensional unit vector per input, derived from its text,
  with `usage.prompt_tokens` = `usage.total_tokens`.

Nothing here depends on the time or on chance, except the `created` stamps and ids.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import uuid
from typing import Any

CHAT_MODEL = "demo-chat"
EMBED_MODEL = "demo-embed"
EMBED_DIMENSIONS = 8
DEFAULT_MAX_TOKENS = 64
_WORD = re.compile(r"\S+")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prompt_text(body: dict[str, Any]) -> str:
    """The prompt's text: every message's content, or the completion prompt."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else ""


def count_tokens(text: str) -> int:
    return max(1, len(_WORD.findall(text)))


def _last_user_words(body: dict[str, Any]) -> list[str]:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _WORD.findall(_text_of(message.get("content")))[:12]
        return []
    return _WORD.findall(prompt_text(body))[:12]


def answer_words(body: dict[str, Any]) -> list[str]:
    """The answer, a word per token, at most `max_tokens` (or `max_completion_tokens`) words."""
    heard = " ".join(_last_user_words(body)) or "nothing"
    words = (
        f"Hello! You said: {heard}. I am {CHAT_MODEL}, a deterministic model served by the hub's "
        "demo, so every answer is the same for the same question."
    ).split()
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        words = words[:limit]
    return words


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(body: dict[str, Any], words: list[str]) -> str:
    full = answer_words({**body, "max_tokens": None, "max_completion_tokens": None})
    return "length" if len(words) < len(full) else "stop"


def completion(body: dict[str, Any], *, chat: bool = True) -> dict[str, Any]:
    """A whole chat completion (or text completion, `chat=False`)."""
    words = answer_words(body)
    text = " ".join(words)
    model = str(body.get("model", CHAT_MODEL))
    finish = _finish(body, words)
    usage = _usage(count_tokens(prompt_text(body)), len(words))
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind, prefix = "text_completion", "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def chunks(body: dict[str, Any], *, chat: bool = True) -> list[dict[str, Any]]:
    """A streamed completion's chunks, in order (without the closing `[DONE]`)."""
    words = answer_words(body)
    model = str(body.get("model", CHAT_MODEL))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    out: list[dict[str, Any]] = []
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        last = i == len(words) - 1
        finish = _finish(body, words) if last else None
        if chat:
            delta: dict[str, Any] = {"content": text}
            if i == 0:
                delta = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        chunk: dict[str, Any] = {
            "id": ident,
            "object": kind,
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if include_usage:
            chunk["usage"] = None
        out.append(chunk)
    if include_usage:
        usage = _usage(count_tokens(prompt_text(body)), len(words))
        out.append(
            {"id": ident, "object": kind, "created": created, "model": model, "choices": [], "usage": usage}
        )
    return out


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8", "replace")).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:EMBED_DIMENSIONS]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """Embeddings of `input` (a text or a list of texts), billed one token per word."""
    given = body.get("input")
    texts = [given] if isinstance(given, str) else [t if isinstance(t, str) else str(t) for t in given or []]
    tokens = sum(count_tokens(t) for t in texts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _vector(t)} for i, t in enumerate(texts)],
        "model": str(body.get("model", EMBED_MODEL)),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }

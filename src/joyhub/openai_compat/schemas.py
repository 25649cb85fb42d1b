"""Request and response shapes of the OpenAI surface (API.md §12).

The request bodies are OpenAI's and are passed through to the upstream: only what the hub itself
reads is declared (`model`, `stream`, `stream_options`, and what an operation cannot do without);
every other field is kept as sent (`extra="allow"` — the upstream, not the hub, knows which
parameters its models take).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_MODEL = Field(min_length=1, max_length=200, description="The model id: an `openai` tool's name")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = Field(
        None, description="Send the final usage-only chunk (the hub always asks the upstream for it)"
    )


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = _MODEL

    def body(self) -> dict[str, Any]:
        """The request as the caller sent it (declared fields and every other one)."""
        return self.model_dump(exclude_unset=True)


class _Streamable(_OpenAIRequest):
    stream: bool | None = Field(None, description="Relay the answer as Server-Sent Events as it arrives")
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class ChatCompletionRequest(_Streamable):
    """`POST /openai/chat/completions`: OpenAI's chat completion request."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}]
        },
    )

    messages: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)


class CompletionRequest(_Streamable):
    """`POST /openai/completions`: OpenAI's (legacy) text completion request."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"model": "demo-chat", "prompt": "Once upon a time", "max_tokens": 16}]
        },
    )

    prompt: str | list[Any] = Field(description="Text, or a list of texts or token arrays")


class EmbeddingRequest(_OpenAIRequest):
    """`POST /openai/embeddings`: OpenAI's embedding request."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"examples": [{"model": "demo-embed", "input": "The hub meters every token."}]},
    )

    input: str | list[Any] = Field(description="Text, or a list of texts or token arrays")


class Model(BaseModel):
    """One model of `GET /openai/models`, in OpenAI's shape."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When the tool was created (Unix seconds)")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """Every error on this surface (API.md §12), instead of the envelope."""

    error: OpenAIErrorDetail

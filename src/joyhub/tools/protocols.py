"""How a tool's upstream is spoken to (its `protocol`, API.md §5 and §12), for the one gateway.

A `json` tool gets the caller's input as the body of `POST <api_endpoint>`. An `openai` tool's
`api_endpoint` is the base URL of an OpenAI-compatible server (with its version path, as the
OpenAI SDK takes it); the call goes to `<base>/<operation>` (`chat/completions`, `completions`,
`embeddings`; a JSON API caller's invoke means `chat/completions`), with `model` replaced by the
tool's `upstream_model` (default: its name). A stream always asks the upstream for its usage
(`stream_options.include_usage`), so the hub can bill what it reports whatever the caller asked;
whether the usage chunk reaches the caller is the presenter's business (`openai/presenter.py`).

Everything else — admission, limits, idempotency, breaker, retries, relay, settle — is the same
for both: a protocol changes where and what is sent, never how it is metered.
"""

from __future__ import annotations

from typing import Any, Literal

from joyhub.tools.metering import ToolRead

OPENAI = "openai"
Operation = Literal["chat/completions", "completions", "embeddings"]
DEFAULT_OPERATION: Operation = "chat/completions"


def upstream_url(tool: ToolRead, operation: Operation | None) -> str:
    """Where the call goes."""
    if tool.protocol != OPENAI:
        return tool.api_endpoint
    return f"{tool.api_endpoint.rstrip('/')}/{operation or DEFAULT_OPERATION}"


def upstream_model(tool: ToolRead) -> str:
    """The model id the upstream knows the tool by."""
    return tool.upstream_model or tool.name


def openai_body(tool: ToolRead, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The OpenAI request as the upstream gets it: the caller's, with the upstream's model id and,
    for a stream, usage asked for; a call not streamed is not asked to stream."""
    out = {**body, "model": upstream_model(tool)}
    if stream:
        options = out.get("stream_options")
        out["stream"] = True
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    else:
        out.pop("stream", None)
        out.pop("stream_options", None)
    return out

"""The OpenAPI document: readable operation ids, and its export for the TypeScript client.

The dashboard's SDK (`clients/typescript`) is generated from this document, and every operation
id becomes a function name there (`tools-invoke` → `toolsInvoke`). FastAPI's default ids
(`invoke_tool_api_v1_tools__tool_id__invoke_post`) are unreadable and change with every path
edit, so the app builds them with `operation_id` below instead: `{tag}-{name}`, where

- `tag` is the route's one tag, its domain (`auth`, `users`, `subscriptions`, `tools`, `usage`,
  `admin`, `operations`), given where the router is mounted;
- `name` is the route's name — the decorator's `name=`, else the endpoint function's name — in
  kebab case, without the domain's own noun, which the tag already says: `invoke_tool` under
  `tools` is `tools-invoke`, `usage_summary` under `usage` is `usage-summary`, `logout_all` under
  `auth` is `auth-logout-all`.

One rule rather than a table to keep in sync: a new route gets a readable id by itself. An id
changes only when its route's name or domain does, and then `tests/contract/test_openapi.py`
fails until the committed document and the client are regenerated (`make client`), so the
SDK never changes silently. To rename an endpoint function but keep its id, give the route the
old name with `name=`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.routing import APIRoute
from fastapi.utils import generate_unique_id


def operation_id(route: APIRoute) -> str:
    """`{tag}-{name}` for a route (see the module docstring); the app's `generate_unique_id_function`.

    Routes outside the schema (`/metrics`, the demo tools) keep FastAPI's default: no client
    ever calls them by id. A documented route without a tag keeps it too, and the contract test
    names it (every documented route must have exactly one tag).
    """
    if not route.include_in_schema or not route.tags:
        return generate_unique_id(route)
    tag = str(route.tags[0])
    words = route.name.lower().split("_")
    own_noun = {tag, tag.removesuffix("s")}
    kept = [w for w in words if w and w not in own_noun] or words
    return f"{tag}-{'-'.join(kept)}"


def render(schema: dict[str, Any]) -> str:
    """The committed form of the document: stable key order, two-space indent, final newline.

    `clients/typescript/openapi.json` is written with this, and compared against it.
    """
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"

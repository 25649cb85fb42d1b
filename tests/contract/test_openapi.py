"""The OpenAPI document the TypeScript client is generated from (issue 20).

Its operation ids are the client's function names, so they must be unique, readable and
`{tag}-{name}`; every request body carries a valid example; every JSON answer is documented as
the envelope. And the document committed beside the client (`clients/typescript/openapi.json`)
must be the app's current one: an id or a schema changed without regenerating the client fails
here, saying "run make client".
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from jsonschema import Draft202012Validator

from joyhub.core.openapi import operation_id, render
from joyhub.main import create_app
from tests.conftest import test_settings as hub_settings

pytestmark = pytest.mark.contract

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "typescript"
COMMITTED = CLIENT_DIR / "openapi.json"
METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
# the two documented exceptions to the envelope (API.md §1), besides 204s
NOT_ENVELOPED = {("auth-token", "200"), ("usage-export", "200"), ("orgs-usage-export", "200")}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return create_app(hub_settings()).openapi()


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def duplicate_ids(schema: dict[str, Any]) -> dict[str, list[str]]:
    """Operation ids used more than once, with the operations that share each."""
    counts = Counter(op["operationId"] for _, _, op in operations(schema))
    return {
        oid: [f"{m} {p}" for m, p, op in operations(schema) if op["operationId"] == oid]
        for oid, n in counts.items()
        if n > 1
    }


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_operation_ids_are_tag_dash_name_and_unique(schema: dict[str, Any]) -> None:
    problems = []
    for method, path, op in operations(schema):
        tags = op.get("tags", [])
        if len(tags) != 1:
            problems.append(f"{method} {path}: needs exactly one tag (its domain), has {tags}")
            continue
        if not re.fullmatch(rf"{re.escape(tags[0])}-[a-z0-9]+(-[a-z0-9]+)*", op["operationId"]):
            problems.append(f"{method} {path}: operationId {op['operationId']!r} is not {tags[0]}-<name>")
    assert problems == []
    assert duplicate_ids(schema) == {}


def test_a_shared_operation_id_is_caught() -> None:
    """Two routes whose names reduce to the same id: the check above names both."""
    app = FastAPI(generate_unique_id_function=operation_id)

    @app.get("/tools", tags=["tools"])
    async def list_tools() -> None: ...

    @app.get("/tools/all", tags=["tools"], name="tools_list")
    async def everything() -> None: ...

    with pytest.warns(UserWarning, match="Duplicate Operation ID tools-list"):
        document = app.openapi()
    assert duplicate_ids(document) == {"tools-list": ["GET /tools", "GET /tools/all"]}


@pytest.mark.parametrize(
    ("tag", "name", "expected"),
    [
        ("tools", "invoke_tool", "tools-invoke"),
        ("tools", "list_tools", "tools-list"),
        ("usage", "usage_summary", "usage-summary"),
        ("subscriptions", "current_subscription", "subscriptions-current"),
        ("auth", "password_reset_confirm", "auth-password-reset-confirm"),
        ("admin", "list_audit_logs", "admin-list-audit-logs"),
        ("usage", "usage", "usage-usage"),  # never an empty name
    ],
)
def test_operation_id_rule(tag: str, name: str, expected: str) -> None:
    app = FastAPI(generate_unique_id_function=operation_id)

    async def endpoint() -> None: ...

    app.add_api_route("/x", endpoint, tags=[tag], name=name)
    assert app.openapi()["paths"]["/x"]["get"]["operationId"] == expected


def test_every_request_body_has_an_example_that_fits_its_schema(schema: dict[str, Any]) -> None:
    bodies = 0
    for method, path, op in operations(schema):
        for media_type, media in op.get("requestBody", {}).get("content", {}).items():
            bodies += 1
            where = f"{method} {path} ({media_type})"
            examples = (
                [media["example"]]
                if "example" in media
                else [e["value"] for e in media.get("examples", {}).values()]
                or resolve(schema, media["schema"]).get("examples", [])
            )
            assert examples, f"{where}: no request example"
            validator = Draft202012Validator({**media["schema"], "components": schema["components"]})
            for example in examples:
                errors = [e.message for e in validator.iter_errors(example)]
                assert errors == [], f"{where}: example {example} does not fit: {errors}"
    assert bodies >= 17


def test_every_json_answer_is_documented_as_the_envelope(schema: dict[str, Any]) -> None:
    problems = []
    for _method, path, op in operations(schema):
        if not path.startswith("/api/v1/") or path.startswith(OPENAI_PATHS):
            continue
        for status, response in op["responses"].items():
            where = f"{op['operationId']} {status}"
            if status == "204" or (op["operationId"], status) in NOT_ENVELOPED:
                continue
            body = response.get("content", {}).get("application/json", {}).get("schema")
            if body is None:
                problems.append(f"{where}: no JSON schema")
                continue
            envelope = resolve(schema, body)
            if set(envelope.get("properties", {})) != {"data", "error", "meta"}:
                problems.append(f"{where}: not the envelope")
            elif set(envelope.get("required", [])) != {"data", "error", "meta"}:
                problems.append(f"{where}: the envelope's three keys are always sent, so required")
            elif int(status) >= 400 and envelope["properties"]["data"].get("type") != "null":
                problems.append(f"{where}: an error's data is null")
    assert problems == []


OPENAI_PATHS = "/api/v1/openai/"  # OpenAI's own shapes, not the envelope (API.md §12)


def test_the_openai_surface_documents_openais_error_shape(schema: dict[str, Any]) -> None:
    seen = 0
    for _method, path, op in operations(schema):
        if not path.startswith(OPENAI_PATHS):
            continue
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            seen += 1
            body = resolve(schema, response["content"]["application/json"]["schema"])
            assert set(body["properties"]) == {"error"}, f"{op['operationId']} {status}"
            detail = resolve(schema, body["properties"]["error"])
            assert set(detail["properties"]) == {"message", "type", "param", "code"}
    assert seen >= 4


def test_committed_document_is_the_apps(schema: dict[str, Any]) -> None:
    """The client was generated from this app's OpenAPI, not an older one."""
    committed = COMMITTED.read_text(encoding="utf-8")
    current = render(schema)
    if committed == current:
        return
    old = json.loads(committed)
    ids = {op["operationId"] for _, _, op in operations(schema)}
    old_ids = {op["operationId"] for _, _, op in operations(old)}
    diff = "".join(
        list(difflib.unified_diff(committed.splitlines(True), current.splitlines(True), "committed", "app"))[
            :40
        ]
    )
    pytest.fail(
        "clients/typescript/openapi.json is not the app's OpenAPI any more: run make client, and "
        f"commit the regenerated client.\noperation ids added: {sorted(ids - old_ids)}, "
        f"removed: {sorted(old_ids - ids)}\n{diff}",
        pytrace=False,
    )


def test_typescript_client_is_generated_from_the_committed_document() -> None:
    generator = CLIENT_DIR / "node_modules" / ".bin" / "openapi-ts"
    node = shutil.which("node")
    if node is None or not generator.exists():
        pytest.skip("TypeScript client check skipped (no Node or no node_modules); make test-client runs it")
    done = subprocess.run(
        [node, "scripts/check-generated.mjs"], cwd=CLIENT_DIR, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr + done.stdout

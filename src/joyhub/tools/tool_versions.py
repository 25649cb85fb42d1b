"""What this process knows of each tool's current version, so the gateway can check the input
and the circuit *before* its admission statement and admit in one round trip.

The admission statement (`MeteringConnection.admit`) admits only against the tool version the
caller's input was validated for: it is given that version's `updated_at` and admits only when
the tool's row still carries it. A tool seen for the first time, or edited since (every edit moves
`updated_at`), is therefore not admitted on that first try; the statement returns the new
version's schema instead, it is learnt here, and the statement is run again. So an edit applies
to the very next call on every worker, and no cache can be stale in a way that admits a call the
current schema refuses.

Only tools the database returned are learnt (never an id a caller made up), and the cache is a
bounded LRU.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator

from joyhub.tools.input_validation import input_errors

CACHE_SIZE = 1024


@dataclass(frozen=True)
class ToolVersion:
    updated_at: datetime
    timeout_seconds: int
    validator: Draft202012Validator | None  # None: the tool takes any JSON object
    streaming: bool = False

    def input_errors(self, value: dict[str, Any]) -> list[dict[str, Any]]:
        return input_errors(self.validator, value) if self.validator is not None else []


def _compile(schema_text: str | None) -> Draft202012Validator | None:
    schema = json.loads(schema_text) if schema_text is not None else None
    # JSON null is stored for "no schema"; a schema was checked as one when it was written
    return Draft202012Validator(schema) if isinstance(schema, dict) else None


class ToolVersions:
    """A small LRU of `ToolVersion`s keyed by tool id (one per process)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[uuid.UUID, ToolVersion] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tool_id: uuid.UUID) -> ToolVersion | None:
        with self._lock:
            found = self._items.get(tool_id)
            if found is not None:
                self._items.move_to_end(tool_id)
            return found

    def learn(
        self,
        tool_id: uuid.UUID,
        updated_at: datetime,
        timeout_seconds: int,
        schema_text: str | None,
        streaming: bool = False,
    ) -> ToolVersion:
        """Remember the version the database just returned (its schema compiled once) — unless a
        newer one is known already: a slow request must not bring back the version it read."""
        known = self.get(tool_id)
        if known is not None and known.updated_at > updated_at:
            return known
        version = ToolVersion(updated_at, timeout_seconds, _compile(schema_text), streaming)
        with self._lock:
            self._items[tool_id] = version
            self._items.move_to_end(tool_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return version

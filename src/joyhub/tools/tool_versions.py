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

Schemas are compiled with the bounded validator (`safe_validator.py`). The gateway validates
with `ToolVersion.input_errors_async`: on the event loop only while the work stays small (an input
up to `THREAD_VALIDATION_BYTES` that validates within `LOOP_WORK_UNITS`), otherwise on a worker
thread, so even a schema's bounded worst case is not paid on the event loop.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio.to_thread
from jsonschema.protocols import Validator

from joyhub.core.errors import field_error
from joyhub.tools.input_validation import (
    LOOP_WORK_UNITS,
    TOO_COMPLEX,
    compile_schema,
    errors_within,
    input_errors,
    work_budget,
)
from joyhub.tools.safe_validator import BudgetExceeded

CACHE_SIZE = 1024
# inputs bigger than this are validated on a worker thread; smaller ones cost less than the hop
THREAD_VALIDATION_BYTES = 64 * 1024


@dataclass(frozen=True)
class ToolVersion:
    updated_at: datetime
    timeout_seconds: int
    validator: Validator | None  # None: the tool takes any JSON object
    streaming: bool = False

    def input_errors(self, value: dict[str, Any], nbytes: int | None = None) -> list[dict[str, Any]]:
        """The input's errors (at most 20), on this thread; `nbytes` sizes the work budget."""
        return input_errors(self.validator, value, nbytes) if self.validator is not None else []

    async def input_errors_async(self, value: dict[str, Any], nbytes: int) -> list[dict[str, Any]]:
        """`input_errors` for a request body of `nbytes`, keeping big work off the event loop.

        A body up to 64 KiB is validated here with at most LOOP_WORK_UNITS of work (tens of ms);
        a bigger one, or one that needs more, is validated (again, from the start) on a worker
        thread within its full budget. A request cancelled meanwhile leaves the thread to finish
        within that budget.
        """
        validator = self.validator
        if validator is None:
            return []
        budget = work_budget(nbytes)
        if nbytes <= THREAD_VALIDATION_BYTES:
            try:
                return errors_within(validator, value, min(budget, LOOP_WORK_UNITS))
            except BudgetExceeded:
                if budget <= LOOP_WORK_UNITS:
                    return [field_error("body.input", TOO_COMPLEX)]
        return await anyio.to_thread.run_sync(input_errors, validator, value, nbytes)


def _compile(schema_text: str | None) -> Validator | None:
    schema = json.loads(schema_text) if schema_text is not None else None
    # JSON null is stored for "no schema"; a schema was checked as one when it was written
    return compile_schema(schema) if isinstance(schema, dict) else None


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

"""JSON log lines on stdout (API.md §8), uvicorn's own lines included.

Every line carries the request id of the request it belongs to (from a contextvar). Secrets are
kept out by construction: nothing logs request bodies or headers, and `redact` masks any value
under a key that looks secret before it is written.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from joyhub.core.context import request_id_var

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "color_message",  # uvicorn's ANSI-coloured duplicate of the message
}
SECRET_MARKERS = ("password", "secret", "token", "authorization", "api_key", "apikey", "auth_header_value")


def redact(value: Any) -> Any:
    """Mask values under secret-looking keys, recursively ("***")."""
    if isinstance(value, dict):
        return {
            k: ("***" if any(m in str(k).lower() for m in SECRET_MARKERS) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


_base_factory = logging.getLogRecordFactory()


def _record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Stamp every record with the request id current when it was *created*."""
    record = _base_factory(*args, **kwargs)
    if getattr(record, "request_id", None) is None:
        record.request_id = request_id_var.get()
    return record


def install_record_factory() -> None:
    """Idempotent: make every log record carry the request id (called by the app factory)."""
    if logging.getLogRecordFactory() is not _record_factory:
        logging.setLogRecordFactory(_record_factory)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, val in record.__dict__.items():
            if key not in _STD_ATTRS and key not in line and not key.startswith("_"):
                line[key] = val
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(redact(line), default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or "-"
        extra = {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS and not k.startswith("_")}
        base = f"{datetime.now(UTC):%H:%M:%S} {record.levelname:<7} [{rid}] {record.getMessage()}"
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in redact(extra).items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger (ours, uvicorn's, SQLAlchemy's) through one stdout handler."""
    install_record_factory()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # our own access line replaces uvicorn's (it has the request id and user id)
    logging.getLogger("uvicorn.access").disabled = True

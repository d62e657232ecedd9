"""Logging set-up for the entry points: human-readable lines by default, JSON with one setting.

Libraries only call ``logging.getLogger(__name__)``; handlers and filters are configured
here, once, by ``streamherd-orchestrator`` and ``streamherd-worker``. Structured fields
travel as ``extra={...}`` and are printed after the event name; secrets never are (fields
named like one, and ``?token=`` in the paths uvicorn logs).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came in through ``extra=`` and is a field.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)
# Loggers that print request paths, query strings (and so ``?token=``) included.
SERVER_LOGGERS = ("uvicorn.error", "uvicorn.access")
_TOKEN_IN_QUERY = re.compile(r"([?&](?:token|access_token)=)[^&\s\"']*", re.IGNORECASE)
# Never printed, whatever a caller passes in ``extra``.
_SECRET_FIELDS = frozenset({"token", "session_token", "authorization", "password", "secret"})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: ("<redacted>" if key.lower() in _SECRET_FIELDS else value)
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
    }


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{at} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line = f"{line} {fields}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TokenRedaction(logging.Filter):
    """uvicorn logs each WebSocket's path with its query string, token included."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's problem
            return True
        if "token=" in text.lower():
            record.msg = _TOKEN_IN_QUERY.sub(r"\1<redacted>", text)
            record.args = ()
        return True


def redact_tokens() -> None:
    """Keep ``?token=`` values out of the server loggers' lines (idempotent)."""
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedaction) for f in logger.filters):
            logger.addFilter(TokenRedaction())


def configure_logging(*, level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else HumanFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs at INFO would drown the heartbeat path; uvicorn's errors still come through.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    redact_tokens()

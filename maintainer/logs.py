"""Logging for the daemon: one JSON object per line (or plain text), never a secret.

Each finished run becomes one line with `job`, `target`, `item`, `status`, `duration` and
`sqlstate`, so a log pipeline can count and alert on runs without parsing prose. Messages pass
through the DSN redactor on the way out; run errors are already primary messages only (the
runner strips PostgreSQL's DETAIL, which can quote row values).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, Literal

from maintainer.db import redact_dsn
from maintainer.project import item_label
from maintainer.results import RunResult

LOGGER_NAME = "maintainer"
# Structured fields a record may carry (passed with `extra=`); everything else stays out of the line.
FIELDS = (
    "job", "unit", "target", "item", "status", "duration", "sqlstate", "trigger", "run_id", "reason", "error",
    "findings", "actions", "port", "problems", "jobs", "schedules",
)

log = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "msg": redact_dsn(record.getMessage()),
        }
        if record.name != LOGGER_NAME:
            data["logger"] = record.name
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                data[name] = redact_dsn(value) if isinstance(value, str) else value
        if record.exc_info:
            data["exception"] = redact_dsn(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        fields = " ".join(
            f"{name}={record.__dict__[name]}" for name in FIELDS if record.__dict__.get(name) is not None
        )
        line = f"{ts} {record.levelname.lower():7} {record.getMessage()}" + (f" [{fields}]" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact_dsn(line)


def setup(log_format: Literal["json", "text"], level: int = logging.INFO) -> None:
    """Route the daemon's and APScheduler's records to stderr in the configured format.

    Calling it again (SIGHUP with a new `log_format`) swaps the formatter in place.
    """
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_maintainer", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._maintainer = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(formatter)
    root.setLevel(logging.WARNING)
    log.setLevel(level)
    # APScheduler says "Running job …" twice a tick at INFO; its warnings (missed runs, maximum
    # instances reached) are what an operator needs.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def log_run(result: RunResult) -> None:
    """One line per finished run."""
    level = logging.ERROR if result.status == "failed" else logging.INFO
    item = item_label(result.item)
    message = f"{result.job} on {result.target}{f' [{item}]' if item else ''}: {result.status}"
    if result.error:
        message += f": {result.error}"
    elif result.reason:
        message += f": {result.reason}"
    log.log(level, message, extra={
        "job": result.job, "unit": result.unit, "target": result.target, "item": item,
        "status": result.status, "duration": round(result.seconds, 3), "sqlstate": result.sqlstate,
        "trigger": result.trigger, "run_id": result.run_id, "reason": result.reason, "error": result.error,
        "findings": len(result.findings), "actions": len(result.actions),
    })

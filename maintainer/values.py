"""Parsing of the human-friendly values used in configuration and params.

Durations (`500ms`, `2s`, `5min`, `1h`, `7 days`, ISO-8601 `PT5M`), sizes (`100MB`, `1GB`),
PostgreSQL intervals (`1 month`, `3 months`) and SQL identifiers (`schema.table`). Every parser
raises `ValueError` with a message a user can act on; callers add the file and key.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import TypeAdapter

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "msec": 0.001,
    "millisecond": 0.001,
    "milliseconds": 0.001,
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
_TIMEDELTA = TypeAdapter(timedelta)


def parse_duration(value: Any) -> timedelta:
    """A duration from `2s`, `5min`, `7 days`, ISO-8601 (`PT5M`) or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 2s, 5min, 1h, 7 days)")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match and match.group(2).lower() in _DURATION_UNITS:
            return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()])
        if value.strip().upper().startswith("P"):
            with contextlib.suppress(ValueError):
                return _TIMEDELTA.validate_python(value.strip())
    raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 2s, 5min, 1h, 7 days or ISO-8601 PT5M)")


_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from `100MB`, `1GB`, `512kB` (PostgreSQL's 1024-based units) or a plain integer."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use e.g. 100MB, 1GB)")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and (match.group(2).lower() or "b") in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower() or "b"])
    raise ValueError(f"{value!r} is not a size (use e.g. 100MB, 1GB)")


def format_duration(delta: timedelta) -> str:
    """The PostgreSQL GUC form of a duration (`lock_timeout = '2000ms'`)."""
    return f"{round(delta.total_seconds() * 1000)}ms"


_INTERVAL_RE = re.compile(
    r"^\s*(\d+)\s*(day|days|week|weeks|month|months|year|years|hour|hours|minute|minutes)\s*$",
    re.IGNORECASE,
)


def parse_interval(value: Any) -> str:
    """A calendar interval (`1 day`, `1 week`, `1 month`, `3 months`, `1 year`), normalised."""
    if isinstance(value, str):
        match = _INTERVAL_RE.match(value)
        if match and int(match.group(1)) > 0:
            unit = match.group(2).lower().rstrip("s")
            count = int(match.group(1))
            return f"{count} {unit}{'s' if count != 1 else ''}"
    raise ValueError(f"{value!r} is not an interval (use e.g. 1 day, 1 week, 1 month, 3 months, 1 year)")


# Plain SQL identifiers only: configuration that needs quotes or semicolons in a name is far more
# likely to be an injection attempt or a typo than a real table, so it is refused outright.
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


def check_identifier(value: Any) -> str:
    if not isinstance(value, str) or not _IDENT_RE.match(value):
        raise ValueError(
            f"{value!r} is not a plain identifier (letters, digits, _ and $; at most 63 bytes; "
            "no quotes, spaces or semicolons)"
        )
    return value


@dataclass(frozen=True)
class QualifiedName:
    """A schema-qualified relation name such as `public.orders`; unqualified names mean `public`."""

    schema: str
    name: str

    @classmethod
    def parse(cls, value: Any) -> QualifiedName:
        if isinstance(value, QualifiedName):
            return value
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a table name (use schema.table)")
        parts = value.split(".")
        if len(parts) > 2:
            raise ValueError(f"{value!r} is not a table name (use schema.table)")
        try:
            checked = [check_identifier(part) for part in parts]
        except ValueError:
            raise ValueError(
                f"{value!r} is not a valid table name: use schema.table with plain identifiers "
                "(no quotes, spaces or semicolons)"
            ) from None
        return cls("public", checked[0]) if len(checked) == 1 else cls(checked[0], checked[1])

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

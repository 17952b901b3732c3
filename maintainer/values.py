"""Parsing of the human-friendly values used in configuration and params.

Durations (`500ms`, `2s`, `5min`, `1h`, `7 days`, ISO-8601 `PT5M`), sizes (`100MB`, `1GB`),
PostgreSQL intervals (`1 month`, `3 months`) and SQL identifiers (`schema.table`). Every parser
raises `ValueError` with a message a user can act on; callers add the file and key.
"""

from __future__ import annotations

import contextlib
import math
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
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", re.IGNORECASE)
_TIMEDELTA = TypeAdapter(timedelta)
# What timedelta can hold: beyond it (`99999999999 days`, `1e+300`, `.inf`) Python raises
# OverflowError, which is not a ValueError, so it is refused here with a message instead.
MAX_DURATION = timedelta(days=999_999_999)
# What configuration and unit params accept: longer than anything maintenance waits for, and safe
# to sleep (threading's TIMEOUT_MAX is 292 years) or to subtract from now.
PRACTICAL_MAX_DURATION = timedelta(days=36_500)
# Sizes and integers end up in bigint columns and parameters.
MAX_BIGINT = 2**63 - 1


def parse_duration(value: Any) -> timedelta:
    """A duration from `2s`, `5min`, `7 days`, ISO-8601 (`PT5M`) or a number of seconds.

    Negative, infinite, NaN and absurdly long values are refused (at most `MAX_DURATION`).
    """
    if isinstance(value, timedelta):
        return _bounded_duration(value, value)
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 2s, 5min, 1h, 7 days)")
    if isinstance(value, int | float):
        return _bounded_duration(value, _seconds(value, value))
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match and match.group(2).lower() in _DURATION_UNITS:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
            return _bounded_duration(value, _seconds(value, seconds))
        if value.strip().upper().startswith("P"):
            parsed: timedelta | None = None
            with contextlib.suppress(ValueError, OverflowError):
                parsed = _TIMEDELTA.validate_python(value.strip())
            if parsed is not None:
                return _bounded_duration(value, parsed)
    raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 2s, 5min, 1h, 7 days or ISO-8601 PT5M)")


def _seconds(original: Any, seconds: float) -> timedelta:
    """`timedelta(seconds=…)` without its OverflowError (not a ValueError) for huge or infinite input."""
    if not math.isfinite(seconds) or abs(seconds) > MAX_DURATION.total_seconds():
        raise ValueError(f"{original!r} is too long for a duration (at most {MAX_DURATION.days} days)")
    return timedelta(seconds=seconds)


def practical_duration(delta: timedelta) -> timedelta:
    """At most `PRACTICAL_MAX_DURATION` (100 years): a longer wait is a typo."""
    if delta > PRACTICAL_MAX_DURATION:
        raise ValueError(
            f"{delta.days} days is too long (at most {PRACTICAL_MAX_DURATION.days} days, about 100 years)"
        )
    return delta


def _bounded_duration(original: Any, delta: timedelta) -> timedelta:
    if delta < timedelta(0):
        raise ValueError(f"{original!r} is negative: a duration is 0 or more")
    if delta > MAX_DURATION:
        raise ValueError(f"{original!r} is too long for a duration (at most {MAX_DURATION.days} days)")
    return delta


_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from `100MB`, `1GB`, `512kB` (PostgreSQL's 1024-based units) or a plain integer.

    Between 0 and 2^63-1 bytes: sizes are compared with bigint values in the database.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use e.g. 100MB, 1GB)")
    size: float | int | None = None
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if match and (match.group(2).lower() or "b") in _SIZE_UNITS:
            size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower() or "b"]
    if size is None:
        raise ValueError(f"{value!r} is not a size (use e.g. 100MB, 1GB)")
    if size < 0:
        raise ValueError(f"{value!r} is negative: a size is 0 or more")
    if not math.isfinite(size) or size > MAX_BIGINT:
        raise ValueError(f"{value!r} is too large for a size (at most 8191 PB, 2^63-1 bytes)")
    return int(size)


def format_duration(delta: timedelta) -> str:
    """The PostgreSQL GUC form of a duration (`lock_timeout = '2000ms'`)."""
    return f"{round(delta.total_seconds() * 1000)}ms"


_INTERVAL_RE = re.compile(
    r"\s*(\d+)\s*(day|days|week|weeks|month|months|year|years|hour|hours|minute|minutes)\s*",
    re.IGNORECASE,
)
# Ten thousand of any unit: 10000 years still lands inside PostgreSQL's timestamps (year 294276).
MAX_INTERVAL_COUNT = 10_000


def parse_interval(value: Any) -> str:
    """A calendar interval (`1 day`, `1 week`, `1 month`, `3 months`, `1 year`), normalised."""
    if isinstance(value, str):
        match = _INTERVAL_RE.fullmatch(value)
        if match and int(match.group(1)) > MAX_INTERVAL_COUNT:
            raise ValueError(f"{value!r} is too long for an interval (at most {MAX_INTERVAL_COUNT} of a unit)")
        if match and int(match.group(1)) > 0:
            unit = match.group(2).lower().rstrip("s")
            count = int(match.group(1))
            return f"{count} {unit}{'s' if count != 1 else ''}"
    raise ValueError(f"{value!r} is not an interval (use e.g. 1 day, 1 week, 1 month, 3 months, 1 year)")


# Plain SQL identifiers only: configuration that needs quotes or semicolons in a name is far more
# likely to be an injection attempt or a typo than a real table, so it is refused outright.
# fullmatch, not `$`: `$` also matches before a trailing newline, and `a\n` is not a plain name.
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


def check_identifier(value: Any) -> str:
    if not isinstance(value, str) or not _IDENT_RE.fullmatch(value):
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


def human_size(size: float) -> str:
    """Bytes for people, 1024-based like PostgreSQL's pg_size_pretty: `16.5 MB`, `512 bytes`."""
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """A wait or a lag for people: `850 ms`, `42.0 s`, `12.5 min`."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"

"""Cron expressions, parsed in one place: the daemon's triggers (APScheduler), the schedule
periods of alert rules and the Sentry monitors' crontabs all read schedules through here.

Expressions are 5-field UTC crontabs or an @alias. Day-of-week is counted the cron way (0 and 7
are Sunday), whatever APScheduler's own convention.
"""

from __future__ import annotations

import re

from apscheduler.triggers.cron import CronTrigger

_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def expand_alias(expression: str) -> str:
    """The 5-field form of an expression: an @alias spelt out, whitespace normalised."""
    return " ".join(_CRON_ALIASES.get(expression.strip(), expression).split())


def cron_trigger(expression: str, jitter: int | None = None) -> CronTrigger:
    """An APScheduler trigger for a 5-field UTC cron expression or an @alias."""
    crontab = expand_alias(expression).split()
    if len(crontab) != 5:
        raise ValueError("expected 5 fields: minute hour day-of-month month day-of-week")
    minute, hour, day, month, day_of_week = crontab
    return CronTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=cron_weekdays(day_of_week), timezone="UTC",
        jitter=jitter,
    )


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def cron_weekdays(field: str) -> str:
    """A cron day-of-week field as APScheduler 3 day names.

    Cron counts from Sunday (0, and 7 again); APScheduler 3 counts from Monday, so a literal `0`
    would fire on Mondays and `1-5` on Tuesday to Saturday. Expanding to names removes the doubt.
    """
    if field == "*":
        return field
    numeric = re.sub(r"[a-z]+", lambda name: str(_weekday(name.group())), field.lower())
    days = {day % 7 for day in expand_field(numeric, 0, 7)}
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


def _weekday(name: str) -> int:
    if name in _WEEKDAYS:
        return _WEEKDAYS.index(name)
    raise ValueError(f"day-of-week {name!r} must be 0-7 or sun..sat")


def expand_field(field: str, low: int, high: int) -> set[int]:
    """The numbers a numeric cron field matches (`*`, `a-b`, `*/n`, `a-b/n`, lists)."""
    values: set[int] = set()
    for part in field.split(","):
        body, slash, step_text = part.partition("/")
        step = int(step_text) if slash else 1
        if body == "*":
            first, last = low, high
        elif "-" in body:
            first, last = (int(x) for x in body.split("-", 1))
        else:
            first = int(body)
            last = high if slash else first
        if step < 1 or not low <= first <= last <= high:
            raise ValueError(f"cannot expand cron field {field!r}")
        values.update(range(first, last + 1, step))
    return values

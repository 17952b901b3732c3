"""What a run returns to every front door (CLI, scheduler, HTTP): plain data, JSON-ready."""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "failed", "skipped", "planned"]

# How much a finding's level needs a human, for ordering (higher first) and colour in every view;
# `unknown` (could not be measured) outranks `ok`.
LEVEL_RANK: dict[str, int] = {"critical": 3, "error": 3, "warn": 2, "warning": 2, "unknown": 1, "ok": 0}
LEVEL_STYLE: dict[str, str] = {
    "critical": "red", "error": "red", "warn": "yellow", "warning": "yellow", "unknown": "magenta", "ok": "green",
}


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def json_safe(value: Any) -> Any:
    """Database values as JSON values: Decimal → number, timestamps → ISO-8601, etc."""
    # Most values are JSON already: answer those before the chain of isinstance tests (a steady
    # pass converts every finding of hundreds of items).
    kind = type(value)
    if kind in _JSON_SCALARS:
        return value
    if kind is dict:
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() and abs(value) < 2**63 else float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes | memoryview):
        return f"<{len(value)} bytes>"
    return value


def merge_findings(
    findings: Sequence[Mapping[str, Any]], changes: Sequence[Mapping[str, Any]], key: Sequence[str],
    omit: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """A unit's findings with its `report` rows merged in (front matter `report: {merge_on: key}`).

    A report row whose `key` fields match a finding updates that finding's columns; a row that
    matches none is a finding of its own, after the others. Every finding carries every column
    but those in `omit`: one the report adds is null where the report said nothing. Discover's
    values keep their types, so a report never reads them back from JSON."""
    merged = [dict(finding) for finding in findings]
    by_key = {tuple(finding.get(k) for k in key): finding for finding in merged}
    columns = dict.fromkeys(c for finding in merged for c in finding)
    for change in changes:
        columns.update(dict.fromkeys(change))
        found = by_key.get(tuple(change.get(k) for k in key))
        if found is None:
            merged.append(dict(change))
        else:
            found.update(change)
    for column in omit:
        columns.pop(column, None)
    return [{column: finding.get(column) for column in columns} for finding in merged]


@dataclass
class Action:
    sql: str
    status: Literal["ok", "failed", "planned", "skipped"]
    rows: int | None = None
    seconds: float | None = None
    attempts: int = 1
    sqlstate: str | None = None
    iterations: int | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sql": self.sql,
            "status": self.status,
            "rows": self.rows,
            "seconds": None if self.seconds is None else round(self.seconds, 6),
        }
        if self.attempts > 1:
            data["attempts"] = self.attempts
        if self.iterations is not None:
            data["iterations"] = self.iterations
        if self.sqlstate:
            data["sqlstate"] = self.sqlstate
        return data


@dataclass
class RunResult:
    job: str
    unit: str
    target: str
    item: dict[str, Any] | None
    status: Status = "ok"
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    finished_at: dt.datetime | None = None
    actions: list[Action] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    sqlstate: str | None = None
    reason: str | None = None  # why a run was skipped
    attempts: int = 0
    run_id: int | None = None
    trigger: str = "manual"
    display: list[str] | None = None  # finding fields for human output (unit front matter)
    throttled_seconds: dict[str, float] = field(default_factory=dict)  # pacing's waits, by reason
    # Refused for its configuration before anything ran (a target behind a pooler): exit code 2.
    refused: bool = False

    @property
    def seconds(self) -> float:
        end = self.finished_at or dt.datetime.now(dt.UTC)
        return (end - self.started_at).total_seconds()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "job": self.job,
            "unit": self.unit,
            "target": self.target,
            "item": json_safe(self.item),
            "status": self.status,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "actions": [a.to_json() for a in self.actions],
            "findings": [json_safe(f) for f in self.findings],
            "error": self.error,
        }
        if self.sqlstate:
            data["sqlstate"] = self.sqlstate
        if self.reason:
            data["reason"] = self.reason
        if self.run_id is not None:
            data["run_id"] = self.run_id
        if self.throttled_seconds:
            data["throttled_seconds"] = self.throttled_seconds
        return data


def exit_code(results: Iterable[RunResult], *, usage_error: bool = False) -> int:
    """SPEC §5: 2 usage/config (a run refused for its target's configuration too), then 1 failed,
    then 3 skipped, then 0."""
    results = list(results)
    if usage_error or any(r.refused for r in results):
        return 2
    statuses = {r.status for r in results}
    if "failed" in statuses:
        return 1
    if "skipped" in statuses:
        return 3
    return 0

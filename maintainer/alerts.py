"""Sentry: failed runs, Crons check-ins, finding alerts, and the scrubbing that keeps secrets home.

* A failed run is one event tagged `job`, `unit`, `target`, `item`, `sqlstate`, grouped by the
  fingerprint (job, target, item, SQLSTATE): one broken table is one issue, not one per tick.
* Each scheduled (job, target) checks in to Sentry Crons (in progress once the advisory lock is
  held, then ok or error) with a monitor config derived from its cron schedule, so a job that
  silently stops running raises an alert. Skipped replicas send nothing.
* Findings at warn/critical level, as named by the unit's front matter `alerts`, become events,
  de-duplicated per object (unit, target, key fields): sent again only when the level rises or a
  day has passed. The state is in memory: a restarted daemon alerts once more, which is the
  safe direction.
* Nothing secret or personal leaves: local variables are off, default PII is off, and
  `before_send` strips DSN passwords, PostgreSQL DETAIL/CONTEXT text (it quotes row values), and
  everything but tags and SQLSTATE from events of sensitive units (anonymization).
"""

from __future__ import annotations

import logging
import math
import re
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sentry_sdk
from sentry_sdk.crons import capture_checkin
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.utils import BadDsn, Dsn

from maintainer.config import ConfigError, Job, Settings, Window
from maintainer.cron import expand_alias, expand_field
from maintainer.db import redact_dsn
from maintainer.project import item_label
from maintainer.results import LEVEL_RANK, RunResult
from maintainer.units import Unit

if TYPE_CHECKING:
    from sentry_sdk._types import MonitorConfig

log = logging.getLogger("maintainer")

SENSITIVE_TAG = "sensitive"
REPEAT_AFTER = timedelta(days=1)
# Findings at `warn` and above alert (the one ranking of levels is in results.py); `ok`,
# `unknown` and null never do.
SENTRY_LEVEL = {LEVEL_RANK["warn"]: "warning", LEVEL_RANK["critical"]: "error"}

# psycopg renders an error as the primary message followed by DETAIL/HINT/CONTEXT lines; DETAIL
# quotes row values (`Key (email)=(…) already exists`), CONTEXT and LINE can quote statements.
_DIAGNOSTIC_TAIL = re.compile(r"\n\s*(?:DETAIL|CONTEXT|HINT|QUERY|STATEMENT|LINE \d+):.*", re.DOTALL)


# -- scrubbing ----------------------------------------------------------------------------------


# Frame contents beyond file, function and line: local variables, and source lines (a line of SQL
# or a test fixture can hold values). Sentry still shows where it happened.
_FRAME_DATA = frozenset({"vars", "pre_context", "context_line", "post_context"})


def scrub_text(text: str) -> str:
    return redact_dsn(_DIAGNOSTIC_TAIL.sub("", text))


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in _FRAME_DATA}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def scrub_event(event: dict[str, Any], hint: Mapping[str, Any]) -> dict[str, Any] | None:
    """`before_send`: the last stop before anything leaves the process."""
    if event.get("type") == "check_in":
        return event  # slug, status, duration and schedule only
    event.pop("user", None)
    event.pop("request", None)
    tags = event.get("tags") or {}
    if tags.get(SENSITIVE_TAG) == "true":
        # Runs of sensitive units touch personal data: keep what identifies the failure, nothing else.
        what = f"{tags.get('job', '?')} on {tags.get('target', '?')}"
        state = tags.get("sqlstate")
        summary = "finding" if tags.get("kind") == "finding" else "run failed"
        kept = {k: event[k] for k in ("event_id", "timestamp", "level", "platform", "fingerprint", "environment",
                                       "release", "server_name", "sdk", "type") if k in event}
        kept["tags"] = dict(tags)
        kept["message"] = f"{what}: {summary}" + (f" (SQLSTATE {state})" if state else "")
        return kept
    return dict(_scrub(event))


def init(settings: Settings, *, release: str | None = None) -> bool:
    """Start the SDK when a DSN is configured; returns whether Sentry is on."""
    if settings.sentry.dsn is None:
        return False
    try:
        Dsn(settings.sentry.dsn.get_secret_value())
    except BadDsn:
        raise ConfigError(["sentry.dsn: not a valid Sentry DSN (https://<key>@<host>/<project>)"]) from None
    sentry_sdk.init(
        dsn=settings.sentry.dsn.get_secret_value(),
        environment=settings.sentry.environment,
        release=release,
        include_local_variables=False,  # frames would carry DSNs, row values and --arg values
        send_default_pii=False,
        before_send=scrub_event,  # type: ignore[arg-type]
        # The daemon sends its own events; log records must not turn into events or breadcrumbs.
        disabled_integrations=[LoggingIntegration()],
        max_breadcrumbs=0,
        traces_sample_rate=None,
    )
    return True


# -- crons ----------------------------------------------------------------------------------------


def monitor_slug(job: str, target: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", f"{job}-{target}".lower()).strip("-")
    return slug[:50]


def monitor_config(job: Job, settings: Settings) -> MonitorConfig | None:
    """Sentry's view of the schedule; None when it cannot be expressed as one crontab."""
    if job.schedule is None:
        return None
    crontab = expand_alias(job.schedule)
    window = job.parsed_window
    if window is not None:
        restricted = _within_window(crontab, window)
        if restricted is None:
            return None
        crontab = restricted
    margin = settings.scheduler.misfire_grace_time + settings.scheduler.jitter
    statement = job.timeouts.statement or settings.defaults.statement_timeout
    runtime = statement * max(1, len(job.items or []))
    config: MonitorConfig = {
        "schedule": {"type": "crontab", "value": crontab},
        "timezone": "UTC",
        # Minutes, as Sentry counts them: a late start inside the misfire grace is not "missed".
        "checkin_margin": max(1, math.ceil(margin.total_seconds() / 60)),
        "max_runtime": min(max(30, math.ceil(runtime.total_seconds() / 60)), 24 * 60),
    }
    return config


def _within_window(crontab: str, window: Window) -> str | None:
    """Restrict the hour field to the window, so skipped ticks are not reported as missed.

    Only windows on whole hours can be written as a crontab; others get no monitor.
    """
    if window.start.minute or window.end.minute:
        return None
    start, end = window.start.hour, window.end.hour
    hours_in_window = set(range(start, end)) if start < end else set(range(start, 24)) | set(range(0, end))
    fields = crontab.split()
    try:
        scheduled = expand_field(fields[1], 0, 23)
    except ValueError:
        return None
    hours = sorted(scheduled & hours_in_window)
    if not hours:
        return None
    fields[1] = ",".join(map(str, hours))
    return " ".join(fields)


class CheckIn:
    """One scheduled (job, target) run as Sentry Crons sees it."""

    def __init__(self, slug: str, config: MonitorConfig) -> None:
        self.slug = slug
        self.config = config
        self.check_in_id: str | None = None
        self._started = 0.0
        self._starting = threading.Lock()  # the lanes of a job start it at once

    def start(self) -> None:
        """In progress: called by the lock holder only, once per run of the (job, target)."""
        with self._starting:
            if self.check_in_id is None:
                self._started = time.monotonic()
                self.check_in_id = capture_checkin(monitor_slug=self.slug, status="in_progress",
                                                   monitor_config=self.config)

    def finish(self, ok: bool) -> None:
        if self.check_in_id is not None:
            capture_checkin(monitor_slug=self.slug, check_in_id=self.check_in_id, status="ok" if ok else "error",
                            duration=time.monotonic() - self._started, monitor_config=self.config)


# -- findings and failures ----------------------------------------------------------------------


@dataclass(frozen=True)
class FindingAlert:
    unit: str
    job: str
    target: str
    key: tuple[str, ...]
    rank: int
    message: str
    fields: dict[str, Any]


class _FieldsOnly(string.Formatter):
    """`str.format` for unit messages: plain field names only, no attribute or index access."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if not field_name.isidentifier():
            raise KeyError(field_name)
        return kwargs[field_name], field_name

    def format_field(self, value: Any, format_spec: str) -> Any:
        # A NULL field in a free-text position (`{cause}`) reads as nothing, not "None"; a NULL
        # under a number format still fails, and the caller falls back to its plain message.
        if value is None and not format_spec:
            return ""
        return super().format_field(value, format_spec)


_FORMATTER = _FieldsOnly()


def format_message(template: str | None, finding: Mapping[str, Any], fallback: str) -> str:
    if not template:
        return fallback
    try:
        return _FORMATTER.vformat(template, (), dict(finding)).strip()
    except (KeyError, ValueError, TypeError, IndexError):
        return fallback  # e.g. a ratio that is NULL for an unreadable sequence


def finding_message(unit: Unit, finding: Mapping[str, Any]) -> str:
    """The unit's `alerts.message` for one finding (or a plain fallback naming the object)."""
    spec = unit.meta.alerts
    key_fields = spec.key if spec is not None else []
    level = finding.get(spec.level if spec is not None else "level")
    name = ", ".join(str(finding.get(k)) for k in key_fields) or unit.name
    return format_message(spec.message if spec is not None else None, finding, f"{unit.name}: {name} is {level}")


class FindingAlerts:
    """De-duplication per object: alert on a rise, or when the last alert is a day old."""

    def __init__(self, repeat_after: timedelta = REPEAT_AFTER, clock: Callable[[], float] = time.time) -> None:
        self.repeat_after = repeat_after.total_seconds()
        self.clock = clock
        self._sent: dict[tuple[str, str, tuple[str, ...]], tuple[int, float]] = {}
        self._lock = threading.Lock()

    def due(self, unit: Unit, job: str, target: str, findings: Sequence[Mapping[str, Any]]) -> list[FindingAlert]:
        spec = unit.meta.alerts
        if spec is None:
            return []
        level_field, key_fields = spec.level, spec.key
        shown = [level_field, *key_fields, *(m.value for m in unit.meta.metrics.values())]
        alerts = []
        now = self.clock()
        with self._lock:
            for finding in findings:
                if finding.get("verify_failed"):
                    continue
                key = tuple(str(finding.get(k)) for k in key_fields)
                state_key = (unit.name, target, key)
                rank = LEVEL_RANK.get(str(finding.get(level_field)).lower(), 0)
                if rank < LEVEL_RANK["warn"]:
                    self._sent.pop(state_key, None)  # back to normal: the next rise alerts again
                    continue
                previous = self._sent.get(state_key)
                if previous is not None and rank <= previous[0] and now - previous[1] < self.repeat_after:
                    continue
                self._sent[state_key] = (rank, now)
                fields = {k: finding.get(k) for k in shown if k in finding}
                alerts.append(FindingAlert(unit.name, job, target, key, rank, finding_message(unit, finding), fields))
        return alerts


class Alerts:
    """The Sentry side of a finished run; a no-op without a DSN."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.findings = FindingAlerts()

    def observe(self, unit: Unit, result: RunResult, *, cancelled: bool = False) -> None:
        if not self.enabled:
            return
        if result.status == "failed" and not cancelled:
            self.run_failed(unit, result)
        if result.status in ("ok", "failed") and result.findings:
            for alert in self.findings.due(unit, result.job, result.target, result.findings):
                self.send_finding(unit, alert)

    def run_failed(self, unit: Unit, result: RunResult) -> None:
        item = item_label(result.item)
        with sentry_sdk.new_scope() as scope:
            self._tag(scope, unit, result.job, result.target)
            scope.set_tag("item", (item or "-")[:200])
            scope.set_tag("trigger", result.trigger)
            if result.sqlstate:
                scope.set_tag("sqlstate", result.sqlstate)
            scope.fingerprint = [result.job, result.target, item or "-", result.sqlstate or "-"]
            scope.set_level("error")
            where = f"{result.job} on {result.target}" + (f" [{item}]" if item else "")
            sentry_sdk.capture_message(f"{where} failed: {result.error or 'unknown error'}")

    def send_finding(self, unit: Unit, alert: FindingAlert) -> None:
        with sentry_sdk.new_scope() as scope:
            self._tag(scope, unit, alert.job, alert.target)
            scope.set_tag("kind", "finding")
            scope.set_tag("level", SENTRY_LEVEL[alert.rank])
            scope.fingerprint = ["finding", alert.unit, alert.target, *alert.key]
            scope.set_level(SENTRY_LEVEL[alert.rank])  # type: ignore[arg-type]
            if not unit.meta.sensitive:
                scope.set_context("finding", alert.fields)
            sentry_sdk.capture_message(f"{alert.target}: {alert.message}")

    @staticmethod
    def _tag(scope: Any, unit: Unit, job: str, target: str) -> None:
        scope.set_tag("job", job)
        scope.set_tag("unit", unit.name)
        scope.set_tag("target", target)
        if unit.meta.sensitive:
            scope.set_tag(SENSITIVE_TAG, "true")

    @staticmethod
    def flush(timeout: float = 2.0) -> None:
        if sentry_sdk.get_client().is_active():
            sentry_sdk.flush(timeout=timeout)

"""Where a finished run goes: one log line, Prometheus series, Sentry events.

The scheduler, the HTTP trigger and `maintainer trigger` all hand their `RunResult`s here, so a
run is reported the same way whoever started it. A failing consumer is logged and never turns a
finished maintenance run into an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from maintainer import alerts as sentry
from maintainer import logs
from maintainer.alerts import Alerts
from maintainer.config import ConfigError
from maintainer.metrics import Metrics
from maintainer.project import Project
from maintainer.results import RunResult
from maintainer.units import Unit

log = logging.getLogger("maintainer")


class Outcomes:
    def __init__(self, *, metrics: Metrics | None = None, alerts: Alerts | None = None, log_runs: bool = True) -> None:
        self.metrics = metrics
        self.alerts = alerts
        self.log_runs = log_runs

    def record(self, unit: Unit, result: RunResult, *, cancelled: bool = False) -> None:
        """`cancelled`: the run was stopped by a shutdown; logged and counted, but no Sentry error."""
        if result.status == "planned":
            return  # dry runs change nothing and are nobody's concern but the caller's
        if self.log_runs:
            self._safely("log", lambda: logs.log_run(result))
        if self.metrics is not None:
            metrics = self.metrics
            self._safely("metrics", lambda: metrics.observe(unit, result))
        if self.alerts is not None:
            alerts = self.alerts
            self._safely("sentry", lambda: alerts.observe(unit, result, cancelled=cancelled))

    def skipped(self, job: str, target: str, reason: str) -> None:
        """A scheduled run that did not start (outside its window): counted and logged, no ledger row."""
        if self.log_runs:
            log.info(f"{job} on {target}: skipped: {reason}",
                     extra={"job": job, "target": target, "status": "skipped", "reason": reason, "trigger": "schedule"})
        if self.metrics is not None:
            self.metrics.skipped(job, target)

    @staticmethod
    def _safely(what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception:
            log.exception(f"reporting a run to {what} failed")


def report_manual_runs(project: Project, results: list[RunResult]) -> None:
    """`maintainer trigger`: Sentry errors and finding alerts when a DSN is set (the CLI prints the
    runs itself, and a one-shot process has no metrics endpoint)."""
    try:
        if not sentry.init(project.settings):
            return
    except ConfigError as exc:
        log.warning("; ".join(exc.problems))  # the runs are done; only their alerts are lost
        return
    outcomes = Outcomes(alerts=Alerts(enabled=True), log_runs=False)
    for result in results:
        unit = project.units.get(result.unit)
        if unit is not None:
            outcomes.record(unit, result)
    Alerts.flush()

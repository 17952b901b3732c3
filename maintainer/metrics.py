"""Prometheus metrics: fixed job series plus gauges declared by units in their front matter.

A unit says what its findings mean for monitoring, e.g. in `sequences.sql.j2`:

    metrics:
      maintainer_sequence_used_ratio: {value: used_ratio, labels: [sequence, column]}

and every finding with a numeric `used_ratio` becomes one sample, labelled with the finding's
`sequence` and `column` plus `target`. No unit-specific Python: a new unit gets gauges by
declaring them. The gauges of a (job, target, item) are replaced as a whole by its next run, so an
object that disappears (a dropped sequence) stops being exported instead of going stale.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from maintainer.pacing import THROTTLE_REASONS
from maintainer.project import item_label
from maintainer.results import RunResult
from maintainer.units import Unit

log = logging.getLogger("maintainer")

# Maintenance runs take from milliseconds (a catalog query) to hours (a sweep, a big REINDEX).
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, float("inf"))
FINDINGS_METRIC = "maintainer_findings"
RUN_STATUSES = ("ok", "failed", "skipped")


@dataclass(frozen=True)
class Sample:
    name: str
    labelnames: tuple[str, ...]
    labels: tuple[str, ...]
    value: float


def finding_samples(unit: Unit, job: str, target: str, findings: Sequence[Mapping[str, Any]]) -> list[Sample]:
    """The samples a unit's front matter derives from findings (invalid declarations are skipped)."""
    samples: list[Sample] = []
    findings = [f for f in findings if not f.get("verify_failed")]
    for name, spec in unit.meta.metrics.items():
        value_field, labels = spec.value, spec.labels  # names checked when the unit loaded
        labelnames = ("target", *labels)
        for finding in findings:
            value = _number(finding.get(value_field))
            if value is None:
                continue  # unknown is not zero: no sample beats a misleading one
            samples.append(Sample(name, labelnames, (target, *(_label(finding.get(label)) for label in labels)), value))
    level_field = unit.level_field
    if level_field is not None:
        counts: dict[str, int] = {}
        for finding in findings:
            level = finding.get(level_field)
            if level is not None:
                counts[str(level)] = counts.get(str(level), 0) + 1
        for level, count in sorted(counts.items()):
            samples.append(Sample(FINDINGS_METRIC, ("job", "target", "level"), (job, target, level), float(count)))
    return samples


class FindingGauges(Collector):
    """Gauges from the newest findings of every (job, target, item)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[tuple[str, str, str], list[Sample]] = {}
        self._help: dict[str, str] = {FINDINGS_METRIC: "Findings of the newest run of a job, by level"}
        # A metric's label names are fixed by the first samples seen, so a conflicting declaration
        # in another unit cannot take a name over later.
        self._labelnames: dict[str, tuple[str, ...]] = {}

    def update(
        self, unit: Unit, job: str, target: str, item: str | None, findings: Sequence[Mapping[str, Any]]
    ) -> None:
        self._store(unit, job, target, item, findings, replace=True)

    def seed(
        self, unit: Unit, job: str, target: str, item: str | None, findings: Sequence[Mapping[str, Any]]
    ) -> None:
        """Findings read from the ledger at start; never overwrites a run that finished meanwhile."""
        self._store(unit, job, target, item, findings, replace=False)

    def _store(
        self, unit: Unit, job: str, target: str, item: str | None, findings: Sequence[Mapping[str, Any]],
        *, replace: bool,
    ) -> None:
        samples = finding_samples(unit, job, target, findings)
        with self._lock:
            key = (job, target, item or "")
            if not replace and key in self._snapshots:
                return
            self._snapshots[key] = samples
            for name, spec in unit.meta.metrics.items():
                self._help.setdefault(name, spec.help or f"{spec.value} from unit {unit.name}")

    def retain(self, keep: Iterable[tuple[str, str]]) -> None:
        """Forget (job, target) pairs that are no longer configured (after a reload)."""
        wanted = set(keep)
        with self._lock:
            for key in [k for k in self._snapshots if (k[0], k[1]) not in wanted]:
                del self._snapshots[key]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshots = [list(s) for s in self._snapshots.values()]
            helps = dict(self._help)
            for samples in snapshots:
                for sample in samples:
                    self._labelnames.setdefault(sample.name, sample.labelnames)
            fixed = dict(self._labelnames)
        families: dict[str, tuple[tuple[str, ...], dict[tuple[str, ...], float]]] = {}
        for samples in snapshots:
            for sample in samples:
                labelnames, series = families.setdefault(sample.name, (fixed[sample.name], {}))
                if labelnames != sample.labelnames:
                    _warn_once(f"metric {sample.name}: units declare different labels; keeping {list(labelnames)}")
                    continue
                series[sample.labels] = sample.value  # the same object from two runs: one series
        for name in sorted(families):
            labelnames, series = families[name]
            if not series:
                continue
            family = GaugeMetricFamily(name, helps.get(name, name), labels=list(labelnames))
            for labels, value in series.items():
                family.add_metric(list(labels), value)
            yield family


class Metrics:
    """The daemon's registry: job runs, durations, last success, config state and finding gauges."""

    def __init__(self) -> None:
        # `*_created` series double the exposition and no dashboard uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.runs = Counter("maintainer_job_runs", "Runs by result (one per item)", ["job", "target", "status"],
                            registry=self.registry)
        self.duration = Histogram("maintainer_job_duration_seconds", "Run duration (one observation per item)",
                                  ["job", "target"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.last_success = Gauge("maintainer_job_last_success_timestamp_seconds",
                                  "When a run of the job last finished ok (Unix time)", ["job", "target"],
                                  registry=self.registry)
        self.last_run = Gauge("maintainer_job_last_run_timestamp_seconds", "When a run of the job last finished",
                              ["job", "target"], registry=self.registry)
        self.config_valid = Gauge("maintainer_config_valid",
                                  "0 after a configuration reload was refused (the previous one stays in force)",
                                  registry=self.registry)
        self.config_valid.set(1)
        self.throttled = Counter("maintainer_throttled_seconds",
                                 "Seconds runs waited for standbys to catch up (pacing), by what they waited for",
                                 ["job", "target", "reason"], registry=self.registry)
        self.findings = FindingGauges()
        self.registry.register(self.findings)
        # What the run-time gauges hold, so that values read from the ledger at start never
        # overwrite a run that finished meanwhile (the restore runs next to the first runs).
        self._finished: dict[tuple[Literal["run", "success"], str, str], float] = {}
        self._finished_lock = threading.Lock()

    def observe(self, unit: Unit, result: RunResult) -> None:
        self._initialise(result.job, result.target)
        self.runs.labels(result.job, result.target, result.status).inc()
        for reason, seconds in result.throttled_seconds.items():
            self.throttled.labels(result.job, result.target, reason).inc(seconds)
        if result.status in ("ok", "failed"):
            self.duration.labels(result.job, result.target).observe(result.seconds)
            finished = (result.finished_at or result.started_at).timestamp()
            self._set_finished("run", result.job, result.target, finished)
            if result.status == "ok":
                self._set_finished("success", result.job, result.target, finished)
        # A failed run keeps the previous gauges unless it still produced findings.
        if result.status == "ok" or result.findings:
            self.findings.update(unit, result.job, result.target, item_label(result.item), result.findings)

    def seed_finish_times(self, job: str, target: str, last_run: float | None, last_success: float | None) -> None:
        """Run times read from the ledger at start: after a restart the gauges go on where they
        were, so the time since the last success (and `MaintainerJobNotSucceeding`) does not start
        again from nothing. A newer value set by a run of this process wins."""
        if last_run is not None:
            self._set_finished("run", job, target, last_run)
        if last_success is not None:
            self._set_finished("success", job, target, last_success)

    def _set_finished(self, which: Literal["run", "success"], job: str, target: str, at: float) -> None:
        gauge = self.last_success if which == "success" else self.last_run
        with self._finished_lock:
            if at >= self._finished.get((which, job, target), float("-inf")):
                self._finished[(which, job, target)] = at
                gauge.labels(job, target).set(at)

    def skipped(self, job: str, target: str) -> None:
        self._initialise(job, target)
        self.runs.labels(job, target, "skipped").inc()

    def _initialise(self, job: str, target: str) -> None:
        """Export the counters of a (job, target) at 0 from its first run on: `increase()` cannot see
        the first failure or wait of a series that is born at 1 (the alert rules rely on it)."""
        for status in RUN_STATUSES:
            self.runs.labels(job, target, status)
        for reason in THROTTLE_REASONS:
            self.throttled.labels(job, target, reason)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


def _label(value: Any) -> str:
    return "" if value is None else str(value)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)

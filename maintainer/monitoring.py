"""What `maintainer rules` and `maintainer dashboard` are derived from: the units (built-in and the
configured `templates_dir`), the jobs and their schedules when a configuration is found, and the
metrics every unit declares in its front matter.

Without a configuration file (no `--config`, no `$MAINTAINER_CONFIG`, no `./maintainer.yaml`) only
the built-in units are read, so the output is the same on every machine: that is what the Helm
chart ships.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maintainer.config import Job, Settings, Throttle
from maintainer.cron import cron_trigger
from maintainer.project import load_project
from maintainer.units import Unit, load_units

# The longest gap is looked for over a year of fire times (month ends, weekdays only, a window that
# lets a few ticks a day through), capped for dense schedules: a week of every-minute ticks.
_PERIOD_HORIZON = dt.timedelta(days=400)
_PERIOD_FIRES = 10_080


@dataclass(frozen=True)
class DeclaredMetric:
    """A gauge a unit's front matter declares: `name{target, <labels>}` from the finding field `value`."""

    name: str
    labels: tuple[str, ...]  # `target` first, then the declared labels
    value: str
    help: str | None
    units: tuple[str, ...]  # the units that declare it
    builtin: bool  # declared by a built-in unit (and by no user unit)


@dataclass
class Source:
    """The units, and — when a configuration was found — the jobs and settings."""

    units: dict[str, Unit]
    jobs: list[Job] = field(default_factory=list)
    settings: Settings | None = None

    @property
    def configured(self) -> bool:
        return self.settings is not None

    @property
    def throttle(self) -> Throttle:
        return self.settings.defaults.throttle if self.settings is not None else Throttle()

    def jobs_of(self, unit: str) -> list[Job]:
        return [job for job in self.jobs if job.unit == unit]

    def declared_metrics(self) -> list[DeclaredMetric]:
        """Every metric in the units' front matter, by name (the first declaration fixes the labels,
        as it does in the exporter)."""
        found: dict[str, DeclaredMetric] = {}
        for unit in sorted(self.units.values(), key=lambda u: (not u.builtin, u.name)):
            for name, spec in unit.meta.metrics.items():
                value, labels, help_text = metric_parts(spec)
                known = found.get(name)
                if known is None:
                    labelnames = ("target", *labels)
                    found[name] = DeclaredMetric(name, labelnames, value, help_text, (unit.name,), unit.builtin)
                else:
                    found[name] = DeclaredMetric(
                        name, known.labels, known.value, known.help or help_text, (*known.units, unit.name),
                        known.builtin and unit.builtin,
                    )
        return sorted(found.values(), key=lambda m: m.name)

    def param_values(self, unit_names: tuple[str, ...], param: str) -> list[Any]:
        """The values a param takes: each job's (and item's) when configured, else the unit's default."""
        values: list[Any] = []
        for name in unit_names:
            unit = self.units.get(name)
            if unit is None or param not in unit.meta.params:
                continue
            default = unit.meta.params[param].default
            jobs = self.jobs_of(name)
            if not jobs:
                values.append(default)
            for job in jobs:
                variants = [{**job.params, **item} for item in job.items] if job.items else [job.params]
                values.extend(variant.get(param, default) for variant in variants)
        return [value for value in values if value is not None]


def metric_parts(spec: Any) -> tuple[str, tuple[str, ...], str | None]:
    """(value field, label names, help) of one `metrics:` entry, a mapping or a typed model."""
    if isinstance(spec, Mapping):
        help_text = spec.get("help")
        return str(spec.get("value")), tuple(str(label) for label in spec.get("labels") or ()), (
            str(help_text) if help_text else None
        )
    return str(spec.value), tuple(spec.labels), spec.help


def load_source(config: str | None) -> Source:
    """Units, jobs and settings of the configuration, or the built-in units alone when there is none.

    Raises `ConfigError` for a configuration that does not load (as every other command does)."""
    explicit = config or os.environ.get("MAINTAINER_CONFIG")
    if explicit is None and not Path("maintainer.yaml").exists():
        return Source(load_units(None))
    project = load_project(explicit or "maintainer.yaml")
    return Source(project.units, sorted(project.jobs.values(), key=lambda j: j.name), project.settings)


def schedule_period(job: Job) -> dt.timedelta | None:
    """The longest gap between two runs the job's schedule (and window) allows; None when manual.

    Cron fire times are generated over a year; with a window, only the fire times inside it count,
    since the others are skipped."""
    if job.schedule is None:
        return None
    trigger = cron_trigger(job.schedule)
    window = job.parsed_window
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)  # fixed, so that the output does not depend on today
    fires: list[dt.datetime] = []
    moment = trigger.get_next_fire_time(None, start)
    while moment is not None and moment - start < _PERIOD_HORIZON and len(fires) < _PERIOD_FIRES:
        if window is None or window.contains(moment.time()):
            fires.append(moment)
        moment = trigger.get_next_fire_time(None, moment + dt.timedelta(seconds=1))
    if len(fires) < 2:
        return _PERIOD_HORIZON  # a yearly schedule, or a window no tick falls into
    gaps = (later - earlier for earlier, later in itertools.pairwise(fires))
    return max(gaps)

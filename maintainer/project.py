"""The loaded, cross-validated whole: settings + units + jobs, and the runs a job fans out to."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, cast

from maintainer.config import ConfigError, Job, Settings, Target, Throttle, config_path, load_jobs, load_settings
from maintainer.db import advisory_key
from maintainer.render import ArgValue
from maintainer.results import json_safe
from maintainer.units import Unit, UnitError, load_units
from maintainer.values import QualifiedName


@dataclass
class RunSpec:
    """One (job, target, item) to run: everything the runner needs, already validated."""

    job: Job
    unit: Unit
    target_name: str
    target: Target
    item: dict[str, Any] | None
    params: dict[str, Any]
    settings: Settings

    # A spec's item and params never change once validated: what is derived from them is computed
    # once (a steady pass over hundreds of items asks for each several times).
    @cached_property
    def item_label(self) -> str | None:
        return item_label(self.item)

    @cached_property
    def logged_params(self) -> dict[str, Any]:
        """The params as the ledger keeps them: secrets masked, JSON values."""
        return cast(dict[str, Any], json_safe(loggable_params(self.params)))

    @cached_property
    def lock_key(self) -> int:
        """The session advisory lock of this (job, target, item), the same in every replica."""
        return advisory_key(self.job.name, self.target_name, self.item_label or "")

    @property
    def throttle(self) -> Throttle | None:
        """The pacing limits of this job (`defaults.throttle` with the job's overrides), or None
        when the job turned pacing off."""
        own = self.job.throttle
        if own is False:
            return None
        base = self.settings.defaults.throttle
        return base if own is None else base.model_copy(update=own.model_dump(exclude_none=True))


def item_label(item: dict[str, Any] | None) -> str | None:
    """A short stable name for an item: its table when it has one, else its JSON."""
    if item is None:
        return None
    if "table" in item:
        return str(QualifiedName.parse(item["table"])) if isinstance(item["table"], str) else str(item["table"])
    return json.dumps(item, sort_keys=True, default=str)


@dataclass
class Project:
    settings: Settings
    units: dict[str, Unit]
    jobs: dict[str, Job]
    path: Path
    # Params validated per (job, item index); index -1 = the job without items.
    _params: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def job(self, name: str) -> Job:
        if name not in self.jobs:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise ConfigError([f"unknown job {name!r} (jobs: {known})"])
        return self.jobs[name]

    def targets_of(self, job: Job, only: str | None = None) -> list[str]:
        names = job.targets if job.targets is not None else sorted(self.settings.targets)
        if only is not None:
            if only not in self.settings.targets:
                raise ConfigError([f"unknown target {only!r} (targets: {', '.join(sorted(self.settings.targets))})"])
            if only not in names:
                raise ConfigError([f"job {job.name!r} does not run on target {only!r}"])
            return [only]
        return names

    def run_specs(self, job: Job, target: str | None = None) -> list[RunSpec]:
        specs = []
        for target_name in self.targets_of(job, target):
            items: list[dict[str, Any] | None] = list(job.items) if job.items else [None]
            for index, item in enumerate(items):
                params = self._params[(job.name, index if job.items else -1)]
                specs.append(
                    RunSpec(
                        job,
                        self.units[job.unit],
                        target_name,
                        self.settings.targets[target_name],
                        item,
                        params,
                        self.settings,
                    )
                )
        return specs


# PostgreSQL's text cannot hold a NUL byte; refused up front instead of failing at bind time.
NUL_IN_ARG = "the value contains a NUL byte, which PostgreSQL text cannot hold"


def parse_args(pairs: list[str]) -> dict[str, ArgValue]:
    """`--arg key=value` pairs; values stay untrusted (`ArgValue`) and can only be bound."""
    args: dict[str, ArgValue] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError([f"--arg {pair.split('=')[0]!r}: use --arg name=value with a plain name"])
        if "\x00" in value:
            raise ConfigError([f"--arg {key.strip()}: {NUL_IN_ARG}"])
        args[key.strip()] = ArgValue(value)
    return args


def load_project(explicit_path: str | None = None) -> Project:
    """Load and cross-check everything; raises ConfigError listing every problem found."""
    path = config_path(explicit_path)
    if explicit_path is not None and not path.exists():
        raise ConfigError([f"{path}: config file not found"])
    settings = load_settings(path)
    problems: list[str] = []
    try:
        units = load_units(settings.templates_dir)
    except UnitError as exc:
        raise ConfigError(str(exc).splitlines()) from None
    jobs = load_jobs(settings.jobs_dir)
    project = Project(settings, units, {j.name: j for j in jobs}, path)
    for job in jobs:
        where = str(job.source or job.name)
        if job.unit not in units:
            problems.append(f"{where}: unit: unknown unit {job.unit!r} (units: {', '.join(sorted(units))})")
            continue
        unit = units[job.unit]
        for target in job.targets or []:
            if target not in settings.targets:
                problems.append(f"{where}: targets: unknown target {target!r}")
            elif unit.meta.ddl and settings.targets[target].pooled:
                problems.append(
                    f"{where}: targets: {target!r} is declared pooled (transaction-mode pooler); unit "
                    f"{unit.name!r} runs DDL and needs a direct connection"
                )
        variants = (
            [(i, {**job.params, **item}) for i, item in enumerate(job.items)] if job.items else [(-1, job.params)]
        )
        for index, values in variants:
            label = where if index < 0 else f"{where}: items[{index}]"
            try:
                project._params[(job.name, index)] = unit.validate_params(values, label)
            except UnitError as exc:
                problems.extend(str(exc).splitlines())
    if problems:
        raise ConfigError(problems)
    return project


def loggable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params as recorded in the ledger: job-file configuration only (never `--arg` values)."""
    return {k: (str(v) if isinstance(v, QualifiedName | dt.timedelta) else v) for k, v in params.items()}

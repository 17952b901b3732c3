"""Configuration: `maintainer.yaml` (+ `MAINTAINER_*` environment overrides) and the job files.

Everything is validated once, up front. A mistake becomes a `ConfigError` whose lines each name
the file and the key, so `maintainer check` (and every other command) can print them and exit 2
before anything touches a database.
"""

from __future__ import annotations

import os
import re
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from maintainer.values import parse_duration, parse_size

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
TARGET_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class ConfigError(Exception):
    """Invalid configuration; `problems` are one-line messages naming file and key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(Strict):
    dsn: SecretStr | None = None
    dsn_file: Path | None = None
    # A transaction-mode pooler cannot hold session advisory locks or run CONCURRENTLY; a target
    # declared pooled refuses DDL units instead of failing half-way.
    pooled: bool = False

    def conninfo(self) -> str:
        """The DSN, read from `dsn_file` at use so rotated secrets are picked up."""
        if self.dsn is not None:
            return self.dsn.get_secret_value()
        if self.dsn_file is not None:
            return self.dsn_file.read_text().strip()
        raise ValueError("target has neither dsn nor dsn_file")


class Defaults(Strict):
    lock_timeout: Duration = timedelta(seconds=2)
    statement_timeout: Duration = timedelta(hours=1)
    max_attempts: int = Field(default=3, ge=1, le=20)
    # First retry waits about this long; each further retry doubles it (with jitter), capped.
    retry_backoff: Duration = timedelta(milliseconds=500)
    retry_backoff_max: Duration = timedelta(seconds=30)
    # A server that answered earlier in a run and then went away (restart, failover) is waited for at
    # least this long, retries with backoff, before the run gives up on it.
    reconnect_window: Duration = timedelta(seconds=15)
    # Ledger records older than this are purged at the end of runs.
    history_retention: Duration = timedelta(days=90)


class Http(Strict):
    listen: str = "0.0.0.0:9188"
    trigger_token_file: Path | None = None


class Sentry(Strict):
    dsn: SecretStr | None = None
    environment: str = "production"


class Scheduler(Strict):
    """The daemon's scheduling knobs (`maintainer run`)."""

    # APScheduler's default is 1 s: a GC pause or a busy worker pool would silently drop runs.
    misfire_grace_time: Duration = timedelta(minutes=5)
    # Random delay added to every scheduled run, to spread many targets firing on the same tick.
    jitter: Duration = timedelta(0)
    # (job, target) schedules that may run at the same time; the items of one job run in sequence.
    max_workers: int = Field(default=8, ge=1, le=64)
    # SIGTERM: runs stop at their next safe point; a statement still running this long after the
    # signal is cancelled, so the process exits before Kubernetes' default 30 s kill.
    shutdown_grace: Duration = timedelta(seconds=25)
    # On start, run once a (job, target) whose last tick was missed while no daemon was up.
    catch_up: bool = True


class Settings(BaseSettings):
    """`maintainer.yaml`. Environment variables (`MAINTAINER_…`, `__` for nesting) win over the file."""

    model_config = SettingsConfigDict(env_prefix="MAINTAINER_", env_nested_delimiter="__", extra="forbid", frozen=True)

    targets: dict[str, Target] = Field(default_factory=dict)
    jobs_dir: Path = Path("jobs")
    templates_dir: Path | None = None
    defaults: Defaults = Defaults()
    state_schema: str = "maintainer"
    http: Http = Http()
    sentry: Sentry = Sentry()
    scheduler: Scheduler = Scheduler()
    log_format: Literal["json", "text"] = "json"

    @field_validator("targets")
    @classmethod
    def _target_names(cls, targets: dict[str, Target]) -> dict[str, Target]:
        for name, target in targets.items():
            if not TARGET_NAME_RE.match(name):
                raise ValueError(f"target name {name!r} must match [a-z0-9][a-z0-9_-]*")
            if (target.dsn is None) == (target.dsn_file is None):
                raise ValueError(f"target {name!r} needs exactly one of dsn or dsn_file")
        return targets

    @field_validator("state_schema")
    @classmethod
    def _plain_schema(cls, value: str) -> str:
        from maintainer.values import check_identifier

        return check_identifier(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment must override it, not the reverse.
        return env_settings, init_settings


_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def cron_trigger(expression: str, jitter: int | None = None) -> CronTrigger:
    """An APScheduler trigger for a 5-field UTC cron expression or an @alias."""
    crontab = _CRON_ALIASES.get(expression.strip(), expression).split()
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
    days: set[int] = set()
    for part in field.lower().split(","):
        body, slash, step_text = part.partition("/")
        step = int(step_text) if slash else 1
        if body == "*":
            low, high = 0, 6
        elif "-" in body:
            first, last = body.split("-", 1)
            low, high = _weekday(first), _weekday(last)
        else:
            low = _weekday(body)
            high = 7 if slash else low
        if step < 1 or low > high:
            raise ValueError(f"day-of-week {part!r} is not a valid range")
        days.update(day % 7 for day in range(low, high + 1, step))
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


def _weekday(text: str) -> int:
    if text in _WEEKDAYS:
        return _WEEKDAYS.index(text)
    if text.isdigit() and int(text) <= 7:
        return int(text)
    raise ValueError(f"day-of-week {text!r} must be 0-7 or sun..sat")


class Window(Strict):
    """A daily UTC window such as 01:00-05:00; it may wrap past midnight (22:00-02:00)."""

    start: time
    end: time

    @classmethod
    def parse(cls, value: str) -> Window:
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", value)
        if not match:
            raise ValueError(f"window {value!r} must look like 01:00-05:00 (UTC)")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59:
            raise ValueError(f"window {value!r} has an impossible time")
        end = time(0, 0) if h2 == 24 else time(h2, m2)
        return cls(start=time(h1, m1), end=end)

    def contains(self, moment: time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


class Timeouts(Strict):
    lock: Duration | None = None
    statement: Duration | None = None


class Job(Strict):
    """One job file: a unit bound to a schedule, targets and params (SPEC §3)."""

    name: str
    unit: str
    schedule: str | None = None
    targets: list[str] | None = None
    window: str | None = None
    timeouts: Timeouts = Timeouts()
    params: dict[str, Any] = Field(default_factory=dict)
    items: list[dict[str, Any]] | None = None
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"job name {value!r} must match [a-z0-9][a-z0-9-]*")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                cron_trigger(value)
            except ValueError as exc:
                raise ValueError(f"schedule {value!r} is not a valid 5-field cron expression: {exc}") from None
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            Window.parse(value)
        return value

    @property
    def parsed_window(self) -> Window | None:
        return Window.parse(self.window) if self.window else None


def describe_validation_error(source: str, error: ValidationError) -> list[str]:
    """One line per problem: `file: key.path: what is wrong`."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] == "missing":
            message = "required key is missing"
        else:
            message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {message}")
    return lines


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        raise ConfigError([f"{path}: invalid YAML at {where}: {getattr(exc, 'problem', exc)}"]) from None


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """`--config`, else `$MAINTAINER_CONFIG`, else `./maintainer.yaml`."""
    return Path(explicit or os.environ.get("MAINTAINER_CONFIG") or "maintainer.yaml")


def load_settings(path: Path) -> Settings:
    data = _read_yaml(path) if path.exists() else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(str(path), exc)) from None
    base = path.parent
    # Relative directories are relative to the config file, not to the working directory.
    updates: dict[str, Any] = {}
    if not settings.jobs_dir.is_absolute():
        updates["jobs_dir"] = base / settings.jobs_dir
    if settings.templates_dir is not None and not settings.templates_dir.is_absolute():
        updates["templates_dir"] = base / settings.templates_dir
    targets = {
        name: target.model_copy(update={"dsn_file": base / target.dsn_file})
        for name, target in settings.targets.items()
        if target.dsn_file is not None and not target.dsn_file.is_absolute()
    }
    if targets:
        updates["targets"] = {**settings.targets, **targets}
    token = settings.http.trigger_token_file
    if token is not None and not token.is_absolute():
        updates["http"] = settings.http.model_copy(update={"trigger_token_file": base / token})
    return settings.model_copy(update=updates) if updates else settings


def load_jobs(jobs_dir: Path) -> list[Job]:
    """Every `*.yaml` job file; structural validation only (params are checked against units later)."""
    if not jobs_dir.is_dir():
        return []
    problems: list[str] = []
    jobs: list[Job] = []
    seen: dict[str, Path] = {}
    for path in sorted([*jobs_dir.glob("*.yaml"), *jobs_dir.glob("*.yml")]):
        try:
            data = _read_yaml(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if not isinstance(data, dict):
            problems.append(f"{path}: a job file must be a mapping (name, unit, schedule, ...)")
            continue
        try:
            job = Job(**data, source=path)
        except ValidationError as exc:
            problems.extend(describe_validation_error(str(path), exc))
            continue
        if job.name in seen:
            problems.append(f"{path}: name: job {job.name!r} is already defined in {seen[job.name]}")
            continue
        seen[job.name] = path
        jobs.append(job)
    if problems:
        raise ConfigError(problems)
    return jobs

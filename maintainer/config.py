"""Configuration: `maintainer.yaml` (+ `MAINTAINER_*` environment overrides) and the job files.

Everything is validated once, up front. A mistake becomes a `ConfigError` whose lines each name
the file and the key, so `maintainer check` (and every other command) can print them and exit 2
before anything touches a database.
"""

from __future__ import annotations

import json
import os
import re
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from maintainer.cron import cron_trigger
from maintainer.db import TargetUnavailable, dsn_problem
from maintainer.errors import MaintainerError
from maintainer.values import format_duration, parse_duration, parse_size, practical_duration

Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(practical_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]

# Used with fullmatch: `$` would also accept a trailing newline.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
TARGET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
# lock_timeout and statement_timeout are int4 milliseconds in PostgreSQL.
MAX_GUC_TIMEOUT = timedelta(milliseconds=2**31 - 1)


def _guc_timeout(value: timedelta | None) -> timedelta | None:
    """A duration PostgreSQL accepts as lock_timeout / statement_timeout (0 disables it)."""
    if value is None:
        return None
    if value > MAX_GUC_TIMEOUT:
        raise ValueError(
            f"{format_duration(value)} is longer than PostgreSQL allows for a timeout "
            "(2147483647ms, about 24 days; 0 disables it)"
        )
    if timedelta(0) < value < timedelta(milliseconds=1):
        raise ValueError("is shorter than 1ms, which PostgreSQL would round to 0 (no timeout at all)")
    return value


GucTimeout = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_guc_timeout)]


class ConfigError(MaintainerError):
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

    @field_validator("dsn")
    @classmethod
    def _usable_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        problem = dsn_problem(value.get_secret_value()) if value is not None else None
        if problem is not None:
            raise ValueError(problem)
        return value

    def conninfo(self) -> str:
        """The DSN, read from `dsn_file` at use so rotated secrets are picked up.

        A DSN libpq cannot use raises `TargetUnavailable` with a message that never quotes it
        (libpq's own would quote a piece of the password); every caller already handles that.
        """
        if self.dsn is not None:
            text, source = self.dsn.get_secret_value(), "dsn"
        elif self.dsn_file is not None:
            text, source = self.dsn_file.read_text().strip(), f"dsn_file {self.dsn_file}"
        else:
            raise ValueError("target has neither dsn nor dsn_file")
        problem = dsn_problem(text)
        if problem is not None:
            raise TargetUnavailable(f"{source}: {problem}")
        return text


class Throttle(Strict):
    """Pacing (SPEC §12): before each batch of a repeated step and each step of a DDL unit, wait
    while a standby replays too far behind or a replication slot retains too much WAL."""

    max_replica_lag: Duration = timedelta(seconds=30)
    max_replica_lag_bytes: Size = 1024**3
    # Waiting longer than this over one run stops it at a safe point (a warn finding; the next run resumes).
    max_wait: Duration = timedelta(minutes=10)
    # How often the primary is asked again while waiting.
    check_every: Duration = timedelta(seconds=1)


class ThrottleOverride(Strict):
    """A job's `throttle:`: the keys it sets override `defaults.throttle`."""

    max_replica_lag: Duration | None = None
    max_replica_lag_bytes: Size | None = None
    max_wait: Duration | None = None
    check_every: Duration | None = None


def _throttle_off(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as false; both spellings turn pacing off for the job.
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return False
    return value


class Defaults(Strict):
    lock_timeout: GucTimeout = timedelta(seconds=2)
    statement_timeout: GucTimeout = timedelta(hours=1)
    max_attempts: int = Field(default=3, ge=1, le=20)
    # First retry waits about this long; each further retry doubles it (with jitter), capped.
    retry_backoff: Duration = timedelta(milliseconds=500)
    retry_backoff_max: Duration = timedelta(seconds=30)
    # A server that answered earlier in a run and then went away (restart, failover) is waited for at
    # least this long, retries with backoff, before the run gives up on it.
    reconnect_window: Duration = timedelta(seconds=15)
    # Ledger records older than this are purged at the end of runs.
    history_retention: Duration = timedelta(days=90)
    throttle: Throttle = Throttle()


class Http(Strict):
    listen: str = "0.0.0.0:9188"
    trigger_token_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        from maintainer.httpserver import parse_listen

        parse_listen(value)
        return value


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
            if not TARGET_NAME_RE.fullmatch(name):
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
    lock: GucTimeout | None = None
    statement: GucTimeout | None = None


class Job(Strict):
    """One job file: a unit bound to a schedule, targets and params (SPEC §3)."""

    name: str
    unit: str
    schedule: str | None = None
    targets: list[str] | None = None
    window: str | None = None
    timeouts: Timeouts = Timeouts()
    # `off` (or false): this job never waits for standbys; a map overrides keys of defaults.throttle.
    throttle: Annotated[Literal[False] | ThrottleOverride | None, BeforeValidator(_throttle_off)] = None
    params: dict[str, Any] = Field(default_factory=dict)
    items: list[dict[str, Any]] | None = None
    # Items run in this many lanes per target, each with its own connections; their steps take turns.
    lanes: int = Field(default=1, ge=1, le=8)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
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


def describe_validation_error(source: str, error: ValidationError, *, environment: bool = False) -> list[str]:
    """One line per problem: `file: key.path: what is wrong`.

    With `environment`, a problem whose value came from a `MAINTAINER_…` variable names that
    variable instead of the file.
    """
    lines = []
    for problem in error.errors():
        where = key_path(problem["loc"])
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] == "missing":
            message = "required key is missing"
        else:
            message = problem["msg"].removeprefix("Value error, ")
        origin = (_environment_source(problem["loc"]) if environment else None) or source
        lines.append(one_line(f"{origin}: {where}: {message}"))
    return lines


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def key_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """`defaults.lock_timeout`, `items[1].table`; a key that is not plain text is shown quoted, so
    a key holding a newline or markup cannot split or restyle the message."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = str(part) if _PLAIN_KEY.fullmatch(str(part)) else repr(part)
            text += f".{name}" if text else name
    return text or "(top level)"


def one_line(message: str) -> str:
    """A problem is printed as one line whatever text it quotes."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _environment_source(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """The `MAINTAINER_…` variable a validated value came from, if one did (the longest match)."""
    names = {name.upper(): name for name in os.environ}
    for end in range(len(loc), 0, -1):
        candidate = "MAINTAINER_" + "__".join(str(part).upper() for part in loc[:end])
        if candidate in names:
            return f"environment {names[candidate]}"
    return None


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        raise ConfigError([one_line(f"{path}: invalid YAML at {where}: {getattr(exc, 'problem', exc)}")]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from None
    except (ValueError, TypeError, OverflowError) as exc:
        # A tagged value PyYAML cannot build, e.g. `!!timestamp 2024-13-45`.
        raise ConfigError([one_line(f"{path}: invalid YAML value: {exc}")]) from None
    problems = structure_problems(data)
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    return data


# Deeper than any real configuration; keeps the walk below far from Python's recursion limit.
_MAX_DEPTH = 50


def structure_problems(data: Any) -> list[str]:
    """What YAML allows but a configuration cannot hold: keys that are not strings (`1: 2`,
    `yes: …`), NUL characters, aliases that contain themselves, absurd nesting. One line each."""
    problems: list[str] = []
    _walk(data, [], set(), problems)
    return problems[:20]


def _walk(value: Any, loc: list[Any], open_ids: set[int], problems: list[str]) -> None:
    where = key_path(loc)
    if isinstance(value, str):
        if "\x00" in value:
            problems.append(f"{where}: contains a NUL character")
        return
    if not isinstance(value, dict | list):
        return
    if id(value) in open_ids:
        problems.append(f"{where}: a YAML alias refers to a value that contains it")
        return
    if len(loc) > _MAX_DEPTH:
        problems.append(f"{where}: nested more than {_MAX_DEPTH} levels deep")
        return
    open_ids.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(
                    f"{where}: key {key!r} is not a string: quote it (YAML reads numbers, yes/no, on/off, "
                    "null and dates as other types)"
                )
                continue
            if "\x00" in key:
                problems.append(f"{where}: key {key!r} contains a NUL character")
                continue
            _walk(item, [*loc, key], open_ids, problems)
    else:
        for index, item in enumerate(value):
            _walk(item, [*loc, index], open_ids, problems)
    open_ids.discard(id(value))


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
        raise ConfigError(describe_validation_error(str(path), exc, environment=True)) from None
    except SettingsError as exc:
        raise ConfigError([_environment_problem(exc)]) from None
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
    problems = [
        f"{path}: targets.{name}.dsn_file: {problem}"
        for name, target in {**settings.targets, **targets}.items()
        if (problem := _dsn_file_problem(target)) is not None
    ]
    if problems:
        raise ConfigError(problems)
    token = settings.http.trigger_token_file
    if token is not None and not token.is_absolute():
        updates["http"] = settings.http.model_copy(update={"trigger_token_file": base / token})
    return settings.model_copy(update=updates) if updates else settings


def _environment_problem(exc: SettingsError) -> str:
    """pydantic-settings could not decode a `MAINTAINER_…` variable (JSON for a nested key)."""
    match = re.search(r'field "([^"]+)"', str(exc))
    variable = f"MAINTAINER_{match.group(1).upper()}" if match else "a MAINTAINER_ variable"
    cause = exc.__cause__
    # json's messages give a position, never the text: the value may be a DSN with a password.
    why = f"{cause.msg} at line {cause.lineno} column {cause.colno}" if isinstance(cause, json.JSONDecodeError) else ""
    return one_line(
        f"environment {variable}: not valid JSON{f' ({why})' if why else ''}: a nested key takes a JSON "
        f"object, e.g. {variable}='{{\"app\": {{\"dsn\": \"postgresql://…\"}}}}', or set one key with "
        f"{variable}__<KEY>=value"
    )


def _dsn_file_problem(target: Target) -> str | None:
    """A readable dsn_file whose content libpq cannot use (checked again at every connection)."""
    if target.dsn_file is None:
        return None
    try:
        text = target.dsn_file.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None  # may appear later (a secret mounted after start); each run reports it
    problem = dsn_problem(text)
    return f"{target.dsn_file}: {problem}" if problem else None


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
        if "source" in data:
            problems.append(f"{path}: source: unknown key")  # the field that records the file itself
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

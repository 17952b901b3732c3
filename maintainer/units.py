"""Units: `<name>.sql.j2` files with YAML front matter and discover / apply / verify / report blocks.

Built-in units ship in the package; a file of the same name in `templates_dir` overrides one.
This module parses a unit, validates the params a job gives it, renders its blocks through the
sandbox in `render.py`, and splits the result into statements with PostgreSQL's own parser.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pglast
import yaml
from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PrefixLoader,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    nodes,
)
from pglast import parser as pg_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maintainer.config import describe_validation_error, structure_problems
from maintainer.errors import MaintainerError, RunFailed
from maintainer.render import RenderError, TrustedSql, make_environment, render_with_binds
from maintainer.results import json_safe
from maintainer.values import (
    PRACTICAL_MAX_DURATION,
    QualifiedName,
    check_identifier,
    format_duration,
    parse_duration,
    parse_interval,
    parse_size,
)

BLOCKS = ("survey", "prepare", "discover", "apply", "recheck", "after", "verify", "report", "check")
ParamType = Literal[
    "table",
    "identifier",
    "string",
    "integer",
    "number",
    "boolean",
    "duration",
    "size",
    "interval",
    "list",
    "map",
    "sql",
    "any",
]


class UnitError(MaintainerError):
    """A unit file that cannot be used; the message names the file (and line when known)."""


# Types whose values have an order, so that `min` and `max` apply to them.
BOUNDED_TYPES = ("integer", "number", "duration", "size")
# Integer params are bound as bigint unless the unit declares a narrower range (int4 settings and
# columns need `max: 2147483647`); a value outside would fail only at run time, in the database.
INT8_MIN, INT8_MAX = -(2**63), 2**63 - 1


class ParamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A list is a union, e.g. `[interval, integer]`: the first type that accepts the value wins.
    type: ParamType | list[ParamType]
    required: bool = False
    default: Any = None
    description: str | None = None
    choices: list[Any] | None = None
    # Inclusive bounds for integer, number, duration and size values, written like a value of the
    # type (`max: 1000`, `max: 1 day`, `max: 1GB`); in a union they bound those types only.
    min: Any = None
    max: Any = None

    @model_validator(mode="after")
    def _bounds_and_default(self) -> ParamSpec:
        kinds = self.type if isinstance(self.type, list) else [self.type]
        bounded = [kind for kind in kinds if kind in BOUNDED_TYPES]
        for name in ("min", "max"):
            bound = getattr(self, name)
            if bound is None:
                continue
            if not bounded:
                raise ValueError(f"{name} applies to {', '.join(BOUNDED_TYPES)} params only")
            for kind in bounded:
                _coerce_bound(kind, bound, name)
        if self.default is not None:
            try:
                coerce_param(self, self.default)
            except ValueError as exc:
                raise ValueError(f"default: {exc}") from None
        return self


METRIC_NAME = re.compile(r"\A[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME = re.compile(r"\A[a-zA-Z_][a-zA-Z0-9_]*\Z")


class MetricSpec(BaseModel):
    """`metrics: {<name>: {value: <field>, labels: [<field>…], help: …}}`: one gauge per finding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str
    labels: list[str] = Field(default_factory=list)
    help: str | None = None

    @model_validator(mode="after")
    def _label_names(self) -> MetricSpec:
        bad = [label for label in self.labels if not LABEL_NAME.match(label)]
        if bad:
            raise ValueError(f"labels: {bad[0]!r} is not a Prometheus label name")
        return self


class AlertSpec(BaseModel):
    """`alerts: {level: <field>, key: [<field>…], message: "…{field}…"}`: which finding field carries
    the level, which fields name the object (one alert per object), and the message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: str = "level"
    key: list[str] = Field(default_factory=list)
    message: str | None = None


class ForecastSpec(BaseModel):
    """`forecast: {value: <field>, key: <field>}`: the counter a forecast follows. At the end of each
    run the runner keeps each finding's `value` under its `key` (the largest, when several findings
    share a key; one counter per run without a `key`) in the run's ledger record, so a later run
    reads a few numbers per earlier run instead of its findings (`observed` in lib/forecast.sql.j2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str
    key: str | None = None


class CooldownSpec(BaseModel):
    """`cooldown: {key: <field>, decision: <value>, within: <param>}`: a unit that must not act on
    the same object again too soon (`reindex`: rebuild an index). Before its blocks render, the
    runner reads from this target's ledger when each object (a finding's `key` field) last got a
    finding whose `decision` field says `decision`, over the runs of the last `within` (the name of
    a duration param), and hands it over as `cooldowns`: `{object: when}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    decision: str
    within: str = "cooldown"


class ReportSpec(BaseModel):
    """`report: {merge_on: [fields], omit: [fields]}`: the `report` block returns only the findings
    and columns it changes, and the runner merges its rows into discover's findings on the
    `merge_on` fields (see results.merge_findings). `omit`: discover columns only the steps need
    (which rows are steps, the names apply quotes), left out of the findings. Without this
    section the report's rows replace the findings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_on: list[str] = Field(min_length=1)
    omit: list[str] = Field(default_factory=list)


class FrontMatter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    # none: every statement autocommits (required for CONCURRENTLY);
    # per_step: each rendering of apply (one step) runs in its own transaction.
    transaction: Literal["none", "per_step"] = "per_step"
    repeat: Literal["until_zero_rows"] | None = None
    # Units whose runs touch personal data: errors are recorded by SQLSTATE only.
    sensitive: bool = False
    # What PostgreSQL's error messages in this unit's runs may contain. `untrusted` (the default):
    # they may quote row values (`invalid input syntax for type integer: "…"`), so a message is
    # recorded only for SQLSTATE classes that name objects, never values, and the condition name
    # otherwise. `trusted`: the unit's SQL never makes PostgreSQL quote personal data (it reads
    # the catalog; its own RAISE messages name tables), so every primary message is kept.
    messages: Literal["trusted", "untrusted"] = "untrusted"
    # Units that change schema (DDL); refused on targets declared `pooled: true`.
    ddl: bool = False
    # Ceiling for `repeat` loops, so a unit that never converges cannot spin forever.
    max_iterations: int = 100_000
    # stop: a failed step ends the run (later steps may depend on it); continue: the others still run.
    on_step_error: Literal["stop", "continue"] = "stop"
    # The finding fields shown in human output (all of them are in JSON and the ledger).
    display: list[str] | None = None
    metrics: dict[str, MetricSpec] = Field(default_factory=dict)
    alerts: AlertSpec | None = None
    forecast: ForecastSpec | None = None
    cooldown: CooldownSpec | None = None
    report: ReportSpec | None = None

    @model_validator(mode="after")
    def _metric_names(self) -> FrontMatter:
        bad = [name for name in self.metrics if not METRIC_NAME.match(name)]
        if bad:
            raise ValueError(f"metrics: {bad[0]!r} is not a Prometheus metric name")
        return self

    @model_validator(mode="after")
    def _cooldown_param(self) -> FrontMatter:
        if self.cooldown is not None:
            within = self.params.get(self.cooldown.within)
            if within is None or within.type != "duration":
                raise ValueError(f"cooldown.within: {self.cooldown.within!r} must name a param of type duration")
        return self

    @model_validator(mode="after")
    def _messages_of_sensitive_units(self) -> FrontMatter:
        if self.sensitive and self.messages == "trusted":
            raise ValueError("sensitive: true records errors by SQLSTATE only; remove messages: trusted")
        return self

    @property
    def trusted_messages(self) -> bool:
        """Whether the runner may record PostgreSQL's primary messages of any SQLSTATE class."""
        return self.messages == "trusted" and not self.sensitive


@dataclass
class Unit:
    name: str
    path: Path
    meta: FrontMatter
    template: Template
    builtin: bool
    source: str = field(repr=False)
    # Names defined by the unit's top level (imports of library files, its own macros): blocks are
    # rendered on their own, without the template's top level, so these go into every context.
    imports: dict[str, Any] = field(default_factory=dict, repr=False)

    def has_block(self, name: str) -> bool:
        return name in self.template.blocks

    @property
    def level_field(self) -> str | None:
        """The finding field that carries a level (`alerts.level`), if the unit declares alerts."""
        return self.meta.alerts.level if self.meta.alerts is not None else None

    def finding_fields(self) -> dict[str, list[str]]:
        """Finding fields the front matter relies on, by where: `check` compares them with what
        discover returns, so a misspelt field is reported instead of silently never alerting."""
        named: dict[str, list[str]] = {}
        for name, metric in self.meta.metrics.items():
            named[f"metrics.{name}"] = [metric.value, *metric.labels]
        if self.meta.alerts is not None:
            template = self.meta.alerts.message or ""
            in_message = [field for _, field, _, _ in string.Formatter().parse(template) if field]
            named["alerts"] = [self.meta.alerts.level, *self.meta.alerts.key, *in_message]
        if self.meta.display:
            named["display"] = list(self.meta.display)
        if self.meta.forecast is not None:
            named["forecast"] = [self.meta.forecast.value, *filter(None, [self.meta.forecast.key])]
        if self.meta.cooldown is not None:
            named["cooldown"] = [self.meta.cooldown.key, "decision"]
        if self.meta.report is not None:
            # (`omit` names discover columns that the findings leave out on purpose)
            named["report.merge_on"] = list(self.meta.report.merge_on)
        return named

    def observations(self, findings: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        """What a run observed for later forecasts (see `ForecastSpec`): `{key: value}`, or None when
        the unit forecasts nothing or no finding carries a value."""
        spec = self.meta.forecast
        if spec is None:
            return None
        observed: dict[str, Any] = {}
        for finding in findings:
            value = _observable(finding.get(spec.value))
            if value is None:
                continue
            if spec.key is None:
                key = ""
            elif (named := finding.get(spec.key)) is None:
                continue
            else:
                key = str(named)
            # several findings of one key (a sequence feeding several columns): the largest
            if (earlier := observed.get(key)) is None or value > earlier:
                observed[key] = value
        return observed or None

    def validate_params(self, values: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Typed params with defaults applied; raises `UnitError` naming `where` and the key."""
        problems = []
        result: dict[str, Any] = {}
        for key in values:
            if key not in self.meta.params:
                known = ", ".join(sorted(self.meta.params)) or "none"
                problems.append(f"{where}: {key}: unknown param of unit {self.name!r} (known: {known})")
        for key, spec in self.meta.params.items():
            if key in values and values[key] is not None:
                try:
                    result[key] = coerce_param(spec, values[key])
                except ValueError as exc:
                    problems.append(f"{where}: {key}: {exc}")
            elif spec.required:
                problems.append(f"{where}: {key}: required param of unit {self.name!r} is missing")
            else:
                # Checked when the unit was parsed (ParamSpec), so this cannot fail.
                result[key] = coerce_param(spec, spec.default) if spec.default is not None else None
        if problems:
            raise UnitError("\n".join(problems))
        return result

    def render_block(self, block: str, context: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """Render one block to SQL text and its bound values."""
        func = self.template.blocks[block]
        ctx = self.template.new_context({**self.imports, **context}, shared=False)
        try:
            return render_with_binds(lambda _c: "".join(func(ctx)), context=context)
        except RenderError as exc:
            raise RenderError(f"{self.path.name} ({block}): {exc}") from None


def coerce_param(spec: ParamSpec, value: Any) -> Any:
    """Turn a YAML value into the param's type, or raise ValueError saying what was expected."""
    if isinstance(spec.type, list):
        problems = []
        for option in spec.type:
            try:
                return coerce_param(spec.model_copy(update={"type": option}), value)
            except ValueError as exc:
                problems.append(str(exc))
        raise ValueError("; or ".join(problems))
    kind = spec.type
    result: Any
    if kind == "table":
        result = QualifiedName.parse(value)
    elif kind == "identifier":
        result = check_identifier(value)
    elif kind == "string":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        result = value
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_shown(value)}")
        result = value
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {_shown(value)}")
        try:
            result = float(value)
        except OverflowError:
            raise ValueError(f"{_shown(value)} is too large for a number") from None
        if not math.isfinite(result):
            raise ValueError(f"expected a finite number, got {value!r}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        result = value
    elif kind == "duration":
        result = parse_duration(value)
    elif kind == "size":
        result = parse_size(value)
    elif kind == "interval":
        result = parse_interval(value)
    elif kind == "list":
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        result = value
    elif kind == "map":
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        result = {key: _trusted_expr(key, item) for key, item in value.items()}
    elif kind == "sql":
        if not isinstance(value, str):
            raise ValueError(f"expected SQL text, got {value!r}")
        result = TrustedSql(value)
    else:
        result = value
    if spec.choices is not None and result not in spec.choices:
        raise ValueError(f"{value!r} is not one of {spec.choices}")
    if kind in BOUNDED_TYPES:
        _check_bounds(spec, kind, value, result)
    return result


def _shown(value: Any) -> str:
    """A value for a message: huge integers shortened (`int.__repr__` refuses over 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    return repr(value)


def _coerce_bound(kind: str, bound: Any, name: str) -> Any:
    """A `min`/`max` written in the front matter, as a value of `kind` (`1 day` for a duration)."""
    try:
        return coerce_param(ParamSpec.model_construct(type=kind), bound)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _check_bounds(spec: ParamSpec, kind: str, value: Any, result: Any) -> None:
    """The declared `min`/`max`, within what the engine can carry: bigint for integers, a century
    for durations. The message shows the bound as the unit wrote it when that is the one in force."""
    low = _coerce_bound(kind, spec.min, "min") if spec.min is not None else None
    high = _coerce_bound(kind, spec.max, "max") if spec.max is not None else None
    low_text, high_text = spec.min, spec.max
    ceiling = {"integer": INT8_MAX, "duration": PRACTICAL_MAX_DURATION}.get(kind)
    if kind == "integer" and (low is None or low < INT8_MIN):
        low, low_text = INT8_MIN, INT8_MIN
    if ceiling is not None and (high is None or high > ceiling):
        high, high_text = ceiling, _bound(ceiling)
    if low is not None and result < low:
        raise ValueError(f"{_shown(value)} is out of range: at least {low_text}")
    if high is not None and result > high:
        raise ValueError(f"{_shown(value)} is out of range: at most {high_text}")


def _bound(value: Any) -> str:
    if isinstance(value, timedelta):
        return f"{value.days} days" if value == timedelta(days=value.days) else format_duration(value)
    return str(value)


def _trusted_expr(key: Any, value: Any) -> Any:
    """In a `map` param, `{expr: <SQL>}` is SQL the operator wrote in the job file: trusted like a
    `sql` param (emitted with `| sql`), while every other value stays a plain value for `literal`/`bind`."""
    if isinstance(value, dict) and set(value) == {"expr"}:
        if not isinstance(value["expr"], str) or not value["expr"].strip():
            raise ValueError(f"{key}: expr: expected SQL text, got {value['expr']!r}")
        return {"expr": TrustedSql(value["expr"])}
    return value


_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*\n", re.DOTALL)


def parse_unit(path: Path, name: str | None = None, builtin: bool = False, library: Library | None = None) -> Unit:
    try:
        source = path.read_text()
    except UnicodeDecodeError as exc:
        raise UnitError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    match = _FRONT_MATTER.match(source)
    if not match:
        raise UnitError(f"{path}: a unit starts with YAML front matter between two '---' lines")
    meta = _front_matter(path, match.group(1))
    # Keep the line numbers of the file in Jinja's errors by replacing front matter with blank lines.
    body = "\n" * match.group(0).count("\n") + source[match.end() :]
    env = (library or Library(None)).environment
    try:
        tree = env.parse(body)
        _refuse_unguarded_output(tree, path)
        template = env.from_string(body)
    except TemplateSyntaxError as exc:
        raise UnitError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
    unknown = set(template.blocks) - set(BLOCKS)
    if unknown:
        raise UnitError(f"{path}: unknown block(s) {sorted(unknown)}; blocks are {', '.join(BLOCKS)}")
    if "apply" not in template.blocks and "discover" not in template.blocks:
        raise UnitError(f"{path}: a unit needs a discover or an apply block")
    imports = _top_level_names(tree, env, path)
    return Unit(name or path.name.removesuffix(".sql.j2"), path, meta, template, builtin, source, imports)


LIBRARY_DIR = "lib"


class Library:
    """The unit library: `lib/<file>.sql.j2` macros that units import. Built-in files ship in
    `templates/lib/`; a user's `<templates_dir>/lib/` comes first, so a user file of the same name wins.
    Library files are not units: no front matter, never listed, only imported."""

    def __init__(self, user_dir: Path | None) -> None:
        directories = [builtin_templates_dir() / LIBRARY_DIR]
        if user_dir is not None:
            directories.insert(0, user_dir / LIBRARY_DIR)
        search = ChoiceLoader([_LibraryFileLoader(directory) for directory in directories])
        self.environment = make_environment(PrefixLoader({LIBRARY_DIR: search}, delimiter="/"))


class _LibraryFileLoader(FileSystemLoader):
    """A library file, refused at load when it has front matter or a block that bypasses the guard."""

    def __init__(self, directory: Path) -> None:
        super().__init__(str(directory))
        self.directory = directory

    def get_source(self, environment: Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        try:
            source, filename, uptodate = super().get_source(environment, template)
        except UnicodeDecodeError as exc:
            raise UnitError(f"{self.directory / template}: not UTF-8 text (byte {exc.start})") from None
        where = Path(filename)
        if _FRONT_MATTER.match(source):
            raise UnitError(f"{where}: library files have no front matter (they hold macros, not a unit)")
        try:
            _refuse_unguarded_output(environment.parse(source), where)
        except TemplateSyntaxError as exc:
            raise UnitError(f"{where}:{exc.lineno}: template syntax error: {exc.message}") from None
        return source, filename, uptodate


def _top_level_names(tree: nodes.Template, env: Environment, path: Path) -> dict[str, Any]:
    """What the unit's top level defines for its blocks: `{% import %}` / `{% from … import %}` of
    library files and its own `{% macro %}`s. Blocks are rendered on their own, without the top
    level, so these are evaluated here, once (library files take no context), into names the
    runner puts in every block's context."""
    names: dict[str, Any] = {}
    definitions: list[nodes.Node] = []
    for node in tree.body:
        if isinstance(node, nodes.Import | nodes.FromImport):
            names.update(_imported(node, env, path))
            definitions.append(node)  # the unit's macros may use them too
        elif isinstance(node, nodes.Macro):
            definitions.append(node)
    if any(isinstance(node, nodes.Macro) for node in definitions):
        code = env.compile(nodes.Template(definitions, lineno=1))
        module = env.template_class.from_code(env, code, {}, None).make_module()
        names.update({name: getattr(module, name) for name in module.__dict__ if not name.startswith("_")})
    return names


def _imported(node: nodes.Import | nodes.FromImport, env: Environment, path: Path) -> dict[str, Any]:
    """What a top-level import binds: a library module (`import … as m`) or its macros (`from …
    import a, b as c`), checked: an existing library file, no context, macros it has."""
    if not isinstance(node.template, nodes.Const) or not isinstance(node.template.value, str):
        raise UnitError(f"{path}:{node.lineno}: import a library file by its name, e.g. \"lib/catalog.sql.j2\"")
    if node.with_context:
        raise UnitError(f"{path}:{node.lineno}: library imports take no context: pass values to the macros")
    try:
        module = env.get_template(node.template.value).make_module()
    except TemplateNotFound:
        raise UnitError(
            f"{path}:{node.lineno}: no library file {node.template.value!r} "
            f"(library files are {LIBRARY_DIR}/<name>.sql.j2)"
        ) from None
    except TemplateSyntaxError as exc:
        where = exc.filename or node.template.value
        raise UnitError(f"{where}:{exc.lineno}: template syntax error: {exc.message}") from None
    if isinstance(node, nodes.Import):
        return {node.target: module}
    names = {}
    for imported in node.names:
        macro, alias = imported if isinstance(imported, tuple) else (imported, imported)
        if not hasattr(module, macro) or macro.startswith("_"):
            raise UnitError(f"{path}:{node.lineno}: {node.template.value} has no macro {macro!r}")
        names[alias] = getattr(module, macro)
    return names


def _front_matter(path: Path, text: str) -> FrontMatter:
    """The validated front matter; each problem one line naming the file and the key."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""  # + the opening '---' line
        problem = getattr(exc, "problem", None) or exc
        raise UnitError(f"{path}: front matter is not valid YAML{where}: {problem}") from None
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        raise UnitError(f"{path}: front matter is not valid YAML: {exc}") from None
    problems = structure_problems(raw)
    if not isinstance(raw, dict):
        problems.append("(top level): must be a mapping (description, params, transaction, ...)")
    if problems:
        raise UnitError("\n".join(f"{path}: front matter: {problem}" for problem in problems))
    try:
        return FrontMatter(**raw)
    except ValidationError as exc:
        raise UnitError("\n".join(describe_validation_error(f"{path}: front matter", exc))) from None


def _refuse_unguarded_output(tree: nodes.Template, path: Path) -> None:
    """`{% call %}` and `{% filter %}` write their result without passing the output guard, so a
    value could reach the SQL raw (or a quoted literal be un-quoted by a string filter)."""
    for node in tree.find_all((nodes.CallBlock, nodes.FilterBlock)):
        tag = "call" if isinstance(node, nodes.CallBlock) else "filter"
        raise UnitError(
            f"{path}:{node.lineno}: {{% {tag} %}} blocks are not allowed in units: their output bypasses the "
            "ident/literal/bind guard"
        )


def builtin_templates_dir() -> Path:
    """Where the built-in units live: inside the wheel, or `templates/` of a source checkout."""
    packaged = Path(str(resources.files("maintainer"))) / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


def load_units(user_dir: Path | None) -> dict[str, Unit]:
    """Built-in units, then user units from `templates_dir` (which override by name); all of them
    import from one library (the user's `lib/` first)."""
    units: dict[str, Unit] = {}
    problems: list[str] = []
    sources = [(builtin_templates_dir(), True)]
    if user_dir is not None:
        if not user_dir.is_dir():
            raise UnitError(f"templates_dir {user_dir} does not exist")
        sources.append((user_dir, False))
    library = Library(user_dir)
    for directory, builtin in sources:
        for path in sorted(directory.glob("*.sql.j2")):
            try:
                unit = parse_unit(path, builtin=builtin, library=library)
            except UnitError as exc:
                problems.append(str(exc))
                continue
            units[unit.name] = unit
    if problems:
        raise UnitError("\n".join(problems))
    return units


# What a statement does to the transaction: "begin" (BEGIN / START TRANSACTION), "commit" (COMMIT /
# END), "other" (ROLLBACK, SAVEPOINT, PREPARE TRANSACTION, COMMIT AND CHAIN: not allowed in a unit),
# or None for every ordinary statement.
Control = Literal["begin", "commit", "other"] | None


@dataclass(frozen=True)
class Statement:
    sql: str
    params: list[Any]
    control: Control = None


def split_statements(text: str, values: list[Any], where: str = "") -> list[Statement]:
    """Split with PostgreSQL's parser (so `DO $$ …; … $$` stays whole) and renumber `$n` per statement."""
    try:
        plan = _split_plan(text)
    except pg_parser.ParseError as exc:
        raise UnitError(f"{where}SQL syntax error: {exc}") from None
    statements = []
    for sql_text, numbers, control in plan:
        for number in numbers:
            if number < 1 or number > len(values):
                raise UnitError(f"{where}parameter ${number} has no bound value (write {{{{ x | bind }}}})")
        statements.append(Statement(sql_text, [values[n - 1] for n in numbers], control))
    return statements


def transaction_blocks(statements: list[Statement], transaction: str, where: str = "") -> list[list[Statement]]:
    """Group a rendering's statements by transaction: each group runs as one transaction.

    `per_step`: the whole rendering is one group (the runner wraps it). `none`: every statement is a
    group of its own (autocommit), except statements between an explicit `BEGIN` and `COMMIT`, which
    form one group, BEGIN and COMMIT included. Anything else that controls the transaction (ROLLBACK,
    SAVEPOINT, nesting, an unclosed BEGIN) is a unit error, raised before anything runs.
    """
    if transaction != "none":
        control = next((s for s in statements if s.control is not None), None)
        if control is not None:
            raise UnitError(
                f"{where}{control.sql.splitlines()[-1]!r}: this unit runs each step in one transaction"
                " (transaction: per_step); BEGIN/COMMIT blocks need transaction: none"
            )
        return [statements] if statements else []
    groups: list[list[Statement]] = []
    block: list[Statement] | None = None
    for statement in statements:
        if statement.control == "other":
            raise UnitError(
                f"{where}{statement.sql.splitlines()[-1]!r}: only BEGIN … COMMIT blocks may control transactions"
            )
        if statement.control == "begin":
            if block is not None:
                raise UnitError(f"{where}BEGIN inside a BEGIN … COMMIT block")
            block = [statement]
        elif statement.control == "commit":
            if block is None:
                raise UnitError(f"{where}COMMIT without BEGIN")
            block.append(statement)
            groups.append(block)
            block = None
        elif block is not None:
            block.append(statement)
        else:
            groups.append([statement])
    if block is not None:
        raise UnitError(f"{where}BEGIN without COMMIT")
    return groups


# Cheap test before parsing: only a statement starting with one of these words can be transaction control.
_MAYBE_CONTROL = re.compile(
    r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*(?:BEGIN|START|COMMIT|END|ROLLBACK|ABORT|SAVEPOINT|RELEASE|PREPARE)\b",
    re.IGNORECASE | re.DOTALL,
)


@functools.lru_cache(maxsize=64)
def _control_of(statement: str) -> Control:
    if not _MAYBE_CONTROL.match(statement):
        return None
    node = pglast.parse_sql(statement)[0].stmt
    if not isinstance(node, pglast.ast.TransactionStmt):
        return None  # e.g. PREPARE of a query, or a statement merely starting with END-like words
    kind = pglast.enums.TransactionStmtKind
    if node.kind in (kind.TRANS_STMT_BEGIN, kind.TRANS_STMT_START):
        return "begin"
    if node.kind == kind.TRANS_STMT_COMMIT and not node.chain:
        return "commit"
    return "other"


@functools.lru_cache(maxsize=512)
def _split_plan(text: str) -> tuple[tuple[str, tuple[int, ...], Control], ...]:
    """Each statement's text with its `$n` renumbered from 1, the block-wide numbers it uses, and
    whether it is transaction control (BEGIN / COMMIT).

    Cached by text: the batches of a repeated step render the same text with new bound values, so
    only the first batch pays for parsing.
    """
    plan = []
    for piece in pglast.split(text, with_parser=True, only_slices=True):
        chunk = text[piece]
        # Scanning builds a Python object per token (tens of ms for a big catalog query), and a
        # statement without a `$` cannot hold a `$n` parameter.
        tokens = [t for t in pg_parser.scan(chunk) if t.name == "PARAM"] if "$" in chunk else []
        mapping: dict[int, int] = {}
        out, last = [], 0
        for token in tokens:
            number = int(chunk[token.start + 1 : token.end + 1])
            mapping.setdefault(number, len(mapping) + 1)
            out.append(chunk[last : token.start] + f"${mapping[number]}")
            last = token.end + 1
        out.append(chunk[last:])
        statement = "".join(out).strip()
        plan.append((statement, tuple(sorted(mapping, key=mapping.__getitem__)), _control_of(statement)))
    return tuple(plan)


def _observable(value: Any) -> int | float | None:
    """A finding's value as a number JSON can carry (no NaN or infinity, a Decimal from a survey's
    row as an int or a float, as SQL reads it back), or None: nothing to observe."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        number: int | float = json_safe(value) if value.is_finite() else math.nan
        value = number
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def render_statements(unit: Unit, block: str, context: Mapping[str, Any]) -> list[Statement]:
    """A block rendered and split into statements; only `apply` and `after` may render none."""
    text, values = unit.render_block(block, context)
    statements = split_statements(text, values, where=f"{unit.path.name} ({block}): ")
    if not statements and block not in ("apply", "after"):
        raise RunFailed(f"{unit.path.name}: {block} rendered no statement")
    return statements


def render_select(unit: Unit, block: str, context: Mapping[str, Any]) -> Statement:
    """A block that must be exactly one SELECT (survey, prepare, discover, verify, report)."""
    statements = render_statements(unit, block, context)
    if len(statements) != 1:
        raise RunFailed(f"{unit.path.name}: {block} must be exactly one SELECT")
    return statements[0]

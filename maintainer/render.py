"""The template sandbox: the only way a value can reach SQL text.

Every `{{ … }}` in a unit must end in one of three filters:

* `ident`   — an identifier, quoted by psycopg (`"a""b"`), schema-qualified for table names;
* `literal` — a SQL literal, quoted by psycopg (`'o''r'`);
* `bind`    — a server-side parameter (`$1`), the value never enters the text at all.

They return `SqlText`, and the environment's `finalize` refuses anything else, so a raw string, a
number or a value assembled with `~` is a render error, not a query. Values passed with `--arg`
are `ArgValue`s which only `bind` accepts, so a manual argument can never become SQL text or be
stored in the ledger's rendered SQL.

Macros (a unit's own, or the unit library's) return `SqlText` too: the guard runs on every `{{ … }}`
inside a macro as it renders, so what comes out is the macro's own text plus guarded pieces. A macro
that interpolates a raw value fails where it is called, with the macro's file and line.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from jinja2 import BaseLoader, StrictUndefined, TemplateError, Undefined
from jinja2.runtime import Context, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from psycopg import sql

from maintainer.errors import MaintainerError
from maintainer.values import QualifiedName


class RenderError(MaintainerError):
    """A unit could not be rendered into safe SQL."""


class SqlText(str):
    """SQL produced by a safe filter (or trusted SQL from the operator's job file)."""

    __slots__ = ()


class TrustedSql(str):
    """A `sql`-typed param: SQL text written by the operator in a job file, emitted with `| sql`."""

    __slots__ = ()


class ArgValue(str):
    """A value from `--arg` (or the HTTP trigger): untrusted, can only be bound as a parameter."""

    __slots__ = ()


class Binds:
    """Collects the values bound while one block renders; `$n` numbers are block-global."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any) -> SqlText:
        self.values.append(value)
        return SqlText(f"${len(self.values)}")


_current_binds: contextvars.ContextVar[Binds] = contextvars.ContextVar("binds")


def _defined(value: Any, filter_name: str) -> Any:
    # StrictUndefined does not fire when an undefined value is merely passed to a filter.
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, SqlText):
        raise RenderError(f"`{filter_name}` was applied to text that is already SQL")
    return value


def _plain(value: Any) -> Any:
    """Unwrap the str subclasses so psycopg adapts them as ordinary values."""
    if isinstance(value, TrustedSql | ArgValue):
        return str(value)
    if isinstance(value, QualifiedName):
        return str(value)
    if isinstance(value, Mapping):
        return json.dumps({k: _plain(v) for k, v in value.items()}, default=str)
    return value


def ident_filter(value: Any, *more: Any) -> SqlText:
    """`x | ident` quotes an identifier; `schema | ident(name)` and table names get qualified."""
    value = _defined(value, "ident")
    parts: list[str]
    if isinstance(value, QualifiedName):
        parts = [value.schema, value.name]
    elif isinstance(value, str) and not isinstance(value, ArgValue):
        parts = [value]
    elif isinstance(value, list | tuple) and all(isinstance(p, str) for p in value):
        parts = list(value)
    else:
        raise RenderError(f"`ident` needs a name, got {type(value).__name__}")
    for extra in more:
        extra = _defined(extra, "ident")
        if not isinstance(extra, str) or isinstance(extra, ArgValue):
            raise RenderError("`ident` arguments must be names")
        parts.append(extra)
    if not parts or any(part == "" for part in parts):
        raise RenderError("`ident` got an empty name")
    return SqlText(_quote_identifier(tuple(str(p) for p in parts)))


@functools.lru_cache(maxsize=4096)
def _quote_identifier(parts: tuple[str, ...]) -> str:
    # The same names come back in every step of a pass (a parent, its partitions, their columns).
    return sql.Identifier(*parts).as_string(None)


def literal_filter(value: Any) -> SqlText:
    """A quoted SQL literal; durations become intervals, table names strings."""
    value = _defined(value, "literal")
    if isinstance(value, ArgValue):
        raise RenderError("values passed with --arg can only be bound: use `| bind`, not `| literal`")
    if isinstance(value, timedelta):
        return SqlText(f"{sql.Literal(f'{value.total_seconds()} seconds').as_string(None).strip()}::interval")
    return SqlText(sql.Literal(_plain(value)).as_string(None).strip())


def bind_filter(value: Any) -> SqlText:
    """A server-side parameter: the value travels separately from the SQL text."""
    value = _defined(value, "bind")
    binds = _current_binds.get(None)
    if binds is None:
        raise RenderError("`bind` used outside of a statement block")
    if isinstance(value, timedelta):
        value = f"{value.total_seconds()} seconds"
    elif isinstance(value, list | tuple):
        value = [_plain(v) for v in value]
    else:
        value = _plain(value)
    return binds.add(value)


def sql_filter(value: Any) -> SqlText:
    """Operator-written SQL from a `sql`-typed param; nothing else is accepted."""
    value = _defined(value, "sql")
    if not isinstance(value, TrustedSql):
        raise RenderError("`sql` only accepts params declared `type: sql` in the unit")
    return SqlText(value)


_ARG_PLACEHOLDER = re.compile(r"%\(([A-Za-z_][A-Za-z0-9_]*)\)s")


def sql_with_args_filter(value: Any, args: Any) -> SqlText:
    """Operator SQL (a `sql` param) whose `%(name)s` placeholders become binds of `args[name]`.

    `{{ params.where | sql_with_args(args) }}`: the text is trusted (it comes from a job file), the
    `--arg` values are not, so each one travels as a server-side parameter, never as text. Only
    `%(name)s` is special; every other `%` is left as written.
    """
    value = _defined(value, "sql_with_args")
    if not isinstance(value, TrustedSql):
        raise RenderError("`sql_with_args` only accepts params declared `type: sql` in the unit")
    args = _defined(args, "sql_with_args")
    if not isinstance(args, Mapping):
        raise RenderError("`sql_with_args` needs the `args` mapping: write `| sql_with_args(args)`")
    missing = sorted({name for name in _ARG_PLACEHOLDER.findall(value) if name not in args})
    if missing:
        needed = " ".join(f"--arg {name}=…" for name in missing)
        raise RenderError(f"this job's SQL has placeholders without a value: run it with {needed}")
    return SqlText(_ARG_PLACEHOLDER.sub(lambda match: bind_filter(args[match.group(1)]), value))


_SEPARATORS = {", ", ",", ",\n", " AND ", " OR ", "\n", " "}


def join_sql_filter(values: Iterable[Any], separator: str = ", ") -> SqlText:
    """Join already-safe SQL pieces, e.g. `cols | map('ident') | join_sql(', ')`."""
    items = list(values)
    if separator not in _SEPARATORS:
        raise RenderError(f"`join_sql` separator must be one of {sorted(_SEPARATORS)}")
    if not all(isinstance(item, SqlText) for item in items):
        raise RenderError("`join_sql` only joins values that went through ident/literal/bind")
    return SqlText(separator.join(items))


def _finalize(value: Any) -> Any:
    if isinstance(value, SqlText):
        return value
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    shown = type(value).__name__
    raise RenderError(
        f"a {shown} value reached the SQL without a filter: write {{{{ … | ident }}}}, "
        "{{ … | literal }} or {{ … | bind }}"
    )


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox (every call in a template passes through `call`), where a macro's output counts
    as SQL: everything it interpolated already passed `_finalize`."""

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(__obj, Macro) and isinstance(result, str):
            return SqlText(result)
        return result


def make_environment(loader: BaseLoader | None = None) -> ImmutableSandboxedEnvironment:
    env = GuardedEnvironment(
        loader=loader,
        undefined=StrictUndefined,
        finalize=_finalize,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ident=ident_filter, literal=literal_filter, bind=bind_filter, sql=sql_filter, join_sql=join_sql_filter,
        sql_with_args=sql_with_args_filter,
    )
    return env


def render_with_binds(render: Any, *, context: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """Run a block render function with a fresh bind collector; returns (sql, bound values)."""
    binds = Binds()
    token = _current_binds.set(binds)
    try:
        text = render(context)
    except RenderError as exc:
        raise RenderError(f"{_where(exc)}{exc}") from None
    except TemplateError as exc:
        raise RenderError(f"{_where(exc)}{exc}") from None
    finally:
        _current_binds.reset(token)
    return text, binds.values


def _where(exc: BaseException) -> str:
    """`<file>:<line>: ` of the innermost template frame: the library file of a macro when the error
    arose inside one (the message points at the macro, not at its call), else the unit's line."""
    place = ""
    tb = exc.__traceback__
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if template is not None:
            line = template.get_corresponding_lineno(tb.tb_lineno)
            place = f"{template.filename}:{line}: " if template.filename else f"line {line}: "
        tb = tb.tb_next
    return place

"""Property tests: hostile configuration, job files, `--arg` values and environment JSON (issue 16).

Hypothesis writes maintainer.yaml files, job files, `--arg` pairs and `MAINTAINER_*` JSON full of
Rich markup, quotes, semicolons, newlines, huge numbers, NaN and infinities, keys that are not
strings and unicode, and runs the real CLI against a real PostgreSQL. Whatever it writes:

* the exit code is 0, 1, 2 or 3, and no command ends in a traceback;
* a planted password (`Pl4nted` … `S3cret`, in DSNs of every syntax: a URL with the `@` percent-
  encoded or not, key=value with a quoted and escaped password or an unquoted space; inline, in a
  `dsn_file` or in the environment) never appears in stdout, stderr, the log or the ledger;
* a planted personal value (`zq-person-77@example.test`), which a user unit not marked sensitive
  makes PostgreSQL quote in an error (it casts the column to integer), never appears either.

Knobs (environment):
  MAINTAINER_FAULT_SCALE   integer, default 1: the number of examples of each property is multiplied
                           by it (the default keeps the file well under a minute on one server).

The properties run against the first available test server only: they test the input handling,
which does not depend on the server version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maintainer.cli import main
from maintainer.logs import JsonFormatter, TextFormatter
from tests.conftest import SERVER_IDS, Database

SCALE = max(1, int(os.environ.get("MAINTAINER_FAULT_SCALE", "1") or 1))
PASSWORD_PIECES = ("Pl4nted", "S3cret")
PERSON = "zq-person-77@example.test"
PLANTED = (*PASSWORD_PIECES, PERSON, "zq-person")

# Input handling does not depend on the server: one server keeps the file fast.
pytestmark = pytest.mark.parametrize("server", SERVER_IDS[:1], indirect=True)


def examples(count: int) -> settings:
    return settings(
        max_examples=count * SCALE,
        deadline=None,
        database=None,  # no .hypothesis directory in the working tree
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


CAST_UNIT = """---
description: reads a number that turns out to be an email address
---
{% block discover %}
SELECT email::integer AS n FROM people
{% endblock %}
"""

ARG_UNIT = """---
description: echoes an argument
params:
  limit: {type: integer, default: 5, min: 1, max: 100}
  pause: {type: duration, default: 1ms}
  ratio: {type: number, default: 0.5}
  table: {type: table}
---
{% block discover %}
SELECT {{ args.x | bind }}::text AS x, {{ params.ratio | bind }}::float8 AS ratio LIMIT {{ params.limit | bind }}
{% endblock %}
"""

# -- hostile values -------------------------------------------------------------------------------

NASTY_TEXT = [
    "[/red]", "[bold]x[/bold]", "x[/]", ":smile:", "'", '"', "\\", ";", "; DROP TABLE people; --",
    "\n", "a\nb", "\r\n", "\t", "\x1b[31mred", "é", "😀", "\u202e", "%s", "%(x)s", "{{ x }}", "{% raw %}",
    "$1", "public.a\n", "public.people", "people", "1 month", "2s", "99999999999 days", "1e+300", ".inf",
    "PT5M", "P99999999999D", "-5s", "0", "", " ", "@daily", "61 * * * *", "01:00-05:00", "25:00-26:00",
    "127.0.0.1:99999", "0.0.0.0:9188", "json", "text", "drop",
]
NASTY_NUMBERS = [0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 10**400,
                 float("nan"), float("inf"), float("-inf"), 1e300, -0.0, 0.5]

hostile_text = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=12))
hostile_scalar = st.one_of(
    hostile_text,
    st.sampled_from(NASTY_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
hostile_key = st.one_of(hostile_text, st.integers(min_value=-5, max_value=5), st.booleans(), st.none(),
                        st.sampled_from([1.5, float("nan")]))
hostile_value = st.recursive(
    hostile_scalar,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(hostile_key, children, max_size=3)),
    max_leaves=6,
)


def _yaml(data: Any) -> str:
    # sort_keys=False: keys of mixed types cannot be sorted; allow_unicode keeps the text as written.
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# -- the planted secrets --------------------------------------------------------------------------


def planted_dsns(db: Database) -> list[str]:
    """DSNs of every syntax whose password holds the planted pieces; the valid ones connect (the
    test servers trust local connections, so the password is never checked)."""
    info = psycopg.conninfo.conninfo_to_dict(db.dsn)
    host, port, dbname, user = info.get("host", "127.0.0.1"), info.get("port", "5432"), info["dbname"], info["user"]
    return [
        f"postgresql://{user}:Pl4nted%40S3cret@{host}:{port}/{dbname}",  # valid: '@' percent-encoded
        f"host={host} port={port} dbname={dbname} user={user} password='Pl4nted\\'S3cret c'",  # valid, escaped quote
        f"postgresql://{user}:Pl4nted@S3cret@{host}:{port}/{dbname}",  # '@' not encoded
        f"host={host} port={port} dbname={dbname} user={user} password=Pl4nted S3cret",  # unquoted space
        f"host={host} port={port} dbname={dbname} user={user} password='Pl4nted\\'S3cret",  # unclosed quote
        f"postgresql://{user}:Pl4nted S3cret@{host}:{port}/{dbname}",  # a space in a URL
    ]


@dataclass
class Sandbox:
    """A config directory for one example, the database it points at, and what the log said."""

    root: Path
    db: Database
    log: list[str]

    @property
    def config(self) -> Path:
        return self.root / "maintainer.yaml"

    def write_config(self, data: Any, dsn: str, placement: str) -> dict[str, str]:
        """maintainer.yaml with `dsn` placed inline, in a dsn_file or in the environment (returned)."""
        env: dict[str, str] = {}
        if isinstance(data, dict):
            targets = data.setdefault("targets", {}) if isinstance(data.get("targets", {}), dict) else {}
            if placement == "inline":
                targets["app"] = {"dsn": dsn}
            elif placement == "file":
                (self.root / "dsn").write_text(dsn)
                targets["app"] = {"dsn_file": "dsn"}
            else:
                targets["app"] = {"dsn": "postgresql://placeholder@127.0.0.1:1/none"}
                env["MAINTAINER_TARGETS__APP__DSN"] = dsn
        self.config.write_text(_yaml(data))
        return env

    def cli(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(main, [*args, "--config", str(self.config)], env=env or {}, catch_exceptions=True)


def base_config() -> dict[str, Any]:
    return {"jobs_dir": "jobs", "templates_dir": "templates", "log_format": "text",
            "defaults": {"lock_timeout": "1s", "max_attempts": 1}}


@pytest.fixture
def sandbox_root(db: Database) -> Iterator[tuple[Database, list[str]]]:
    db.run_script(f"CREATE TABLE people (email text UNIQUE); INSERT INTO people VALUES ('{PERSON}')")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend((JsonFormatter().format(record), TextFormatter().format(record)))

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("maintainer")
    logger.addHandler(handler)
    try:
        yield db, lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def make_sandbox(sandbox_root: tuple[Database, list[str]]) -> Iterator[Any]:
    db, lines = sandbox_root
    made: list[Path] = []

    def make() -> Sandbox:
        root = Path(tempfile.mkdtemp(prefix="fuzz-"))
        made.append(root)
        (root / "jobs").mkdir()
        (root / "templates").mkdir()
        (root / "templates" / "cast.sql.j2").write_text(CAST_UNIT)
        (root / "templates" / "echo.sql.j2").write_text(ARG_UNIT)
        (root / "jobs" / "cast.yaml").write_text(_yaml({"name": "cast", "unit": "cast"}))
        return Sandbox(root, db, lines)

    yield make
    for root in made:
        shutil.rmtree(root, ignore_errors=True)


# -- the invariants -------------------------------------------------------------------------------


def check_result(result: Result, what: str) -> None:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{what}: ended in an exception instead of a message:\n{trace}")
    assert result.exit_code in (0, 1, 2, 3), f"{what}: exit code {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output, f"{what}:\n{result.output}"
    leaked = [piece for piece in PLANTED if piece in result.output]
    assert not leaked, f"{what}: {leaked} in the output:\n{result.output}"
    if result.exit_code == 2 and result.stderr:
        assert all(line.startswith(("error: ", "Usage:", "Try ", "Error: ", "")) for line in result.stderr.splitlines())


def check_ledger_and_log(sandbox: Sandbox, what: str) -> None:
    text = "\n".join(sandbox.log)
    if sandbox.db.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'maintainer'") != [(0,)]:
        rows = sandbox.db.execute(
            "SELECT (SELECT coalesce(string_agg(r::text, E'\\n'), '') FROM maintainer.run r)"
            " || (SELECT coalesce(string_agg(a::text, E'\\n'), '') FROM maintainer.action a)"
            " || (SELECT coalesce(string_agg(f::text, E'\\n'), '') FROM maintainer.finding f)"
        )
        text += "\n" + str(rows[0][0])
    leaked = [piece for piece in PLANTED if piece in text]
    assert not leaked, f"{what}: {leaked} in the ledger or the log"


COMMANDS = [
    ("jobs",), ("jobs", "--json"), ("check",), ("history",), ("history", "--json"), ("report",),
    ("report", "--json"), ("plan", "cast"), ("plan", "cast", "--json"), ("trigger", "cast"),
    ("trigger", "cast", "--json"), ("trigger", "cast", "--dry-run"),
]
commands = st.sampled_from(COMMANDS)
placements = st.sampled_from(["inline", "file", "environment"])

CONFIG_PATHS = [
    ("defaults", "lock_timeout"), ("defaults", "statement_timeout"), ("defaults", "max_attempts"),
    ("defaults", "retry_backoff"), ("defaults", "history_retention"), ("scheduler", "jitter"),
    ("scheduler", "max_workers"), ("scheduler", "misfire_grace_time"), ("http", "listen"), ("state_schema",),
    ("log_format",), ("jobs_dir",), ("sentry", "environment"), ("targets", "app", "pooled"), ("defaults",),
]


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


# -- the properties -------------------------------------------------------------------------------


@examples(12)
@given(
    mutations=st.lists(st.tuples(st.one_of(st.sampled_from(CONFIG_PATHS), st.tuples(hostile_key)), hostile_value),
                       max_size=3),
    dsn_index=st.integers(min_value=0, max_value=5),
    placement=placements,
    command=commands,
)
def test_hostile_maintainer_yaml(make_sandbox: Any, mutations: list[tuple[tuple[Any, ...], Any]],
                                 dsn_index: int, placement: str, command: tuple[str, ...]) -> None:
    sandbox: Sandbox = make_sandbox()
    data = base_config()
    for path, value in mutations:
        if path[0] != "targets":  # the target is where the planted DSN goes
            _set(data, path, value)
    dsn = planted_dsns(sandbox.db)[dsn_index]
    env = sandbox.write_config(data, dsn, placement)
    what = f"{' '.join(command)} with {data!r} ({placement} dsn #{dsn_index})"
    check_result(sandbox.cli(*command, env=env), what)
    check_ledger_and_log(sandbox, what)


JOB_FIELDS = ["name", "unit", "schedule", "targets", "window", "timeouts", "params", "items"]
UNITS = ["echo", "cast", "sequences", "partitions", "reindex", "autovacuum", "anonymize"]
PARAM_NAMES = ["limit", "pause", "ratio", "table", "premake", "interval", "retention", "max_indexes", "min_bloat",
               "batch_size", "warn", "critical", "schemas", "where", "set", "key", "overrides", "min_wasted"]


@examples(15)
@given(
    unit=st.sampled_from(UNITS),
    params=st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES), hostile_key), hostile_value, max_size=3),
    fields=st.dictionaries(st.sampled_from(JOB_FIELDS[2:]), hostile_value, max_size=2),
    extra=st.dictionaries(hostile_key, hostile_value, max_size=1),
    name=st.one_of(st.just("fuzzed"), hostile_text),
    command=st.sampled_from([("plan", "fuzzed"), ("trigger", "fuzzed", "--json"), ("trigger", "fuzzed"), ("check",),
                             ("jobs",)]),
    dsn_index=st.sampled_from([0, 1]),
)
def test_hostile_job_files(make_sandbox: Any, unit: str, params: dict[Any, Any], fields: dict[str, Any],
                           extra: dict[Any, Any], name: str, command: tuple[str, ...], dsn_index: int) -> None:
    sandbox: Sandbox = make_sandbox()
    env = sandbox.write_config(base_config(), planted_dsns(sandbox.db)[dsn_index], "inline")
    job: dict[Any, Any] = {"name": name, "unit": unit, **fields, "params": params, **extra}
    (sandbox.root / "jobs" / "fuzzed.yaml").write_text(_yaml(job))
    what = f"{' '.join(command)} with job {job!r}"
    check_result(sandbox.cli(*command, env=env), what)
    check_ledger_and_log(sandbox, what)


argument_text = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=12)).filter(lambda t: "\x00" not in t)


@examples(10)
@given(
    pairs=st.lists(st.tuples(st.one_of(st.just("x"), argument_text), argument_text), min_size=1, max_size=3),
    raw=st.lists(argument_text, max_size=1),
    command=st.sampled_from(["plan", "trigger"]),
    job=st.sampled_from(["echo", "cast"]),
)
def test_hostile_arguments(make_sandbox: Any, pairs: list[tuple[str, str]], raw: list[str], command: str,
                           job: str) -> None:
    sandbox: Sandbox = make_sandbox()
    env = sandbox.write_config(base_config(), planted_dsns(sandbox.db)[1], "inline")
    (sandbox.root / "jobs" / "echo.yaml").write_text(_yaml({"name": "echo", "unit": "echo"}))
    args = [item for key, value in pairs for item in ("--arg", f"{key}={value}")]
    args += [item for text in raw for item in ("--arg", text)]
    what = f"{command} {job} {args!r}"
    check_result(sandbox.cli(command, job, *args, "--json", env=env), what)
    check_ledger_and_log(sandbox, what)


ENV_VARIABLES = ["MAINTAINER_TARGETS", "MAINTAINER_DEFAULTS", "MAINTAINER_SCHEDULER", "MAINTAINER_HTTP",
                 "MAINTAINER_DEFAULTS__LOCK_TIMEOUT", "MAINTAINER_DEFAULTS__MAX_ATTEMPTS", "MAINTAINER_STATE_SCHEMA"]


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value)  # NaN and Infinity come out as JSON's non-standard tokens
    except (TypeError, ValueError):
        return repr(value)


env_value = st.one_of(
    hostile_text.filter(lambda t: "\x00" not in t),
    hostile_value.map(_json_text).filter(lambda t: "\x00" not in t),
    hostile_value.map(_json_text).map(lambda t: t[: max(1, len(t) // 2)]),  # truncated JSON
)


@examples(10)
@given(
    variables=st.dictionaries(st.sampled_from(ENV_VARIABLES), env_value, min_size=1, max_size=2),
    command=st.sampled_from([("jobs",), ("check",), ("trigger", "cast", "--json")]),
)
def test_hostile_environment(make_sandbox: Any, variables: dict[str, str], command: tuple[str, ...]) -> None:
    sandbox: Sandbox = make_sandbox()
    env = sandbox.write_config(base_config(), planted_dsns(sandbox.db)[0], "inline")
    env.update({name: value.replace("\x00", "") for name, value in variables.items()})
    what = f"{' '.join(command)} with {variables!r}"
    check_result(sandbox.cli(*command, env=env), what)
    check_ledger_and_log(sandbox, what)


@examples(5)
@given(dsn_index=st.integers(min_value=0, max_value=5), placement=placements)
def test_every_command_with_every_planted_dsn(make_sandbox: Any, dsn_index: int, placement: str) -> None:
    """The planted DSNs, unchanged configuration otherwise: every read and run command, JSON and
    text, and the personal value the cast unit makes PostgreSQL quote."""
    sandbox: Sandbox = make_sandbox()
    env = sandbox.write_config(base_config(), planted_dsns(sandbox.db)[dsn_index], placement)
    for command in COMMANDS:
        what = f"{' '.join(command)} ({placement} dsn #{dsn_index})"
        result = sandbox.cli(*command, env=env)
        check_result(result, what)
        if dsn_index <= 1 and command[0] == "trigger" and "--dry-run" not in command:
            assert result.exit_code == 1, f"{what}: the cast unit fails\n{result.output}"
    check_ledger_and_log(sandbox, f"every command ({placement} dsn #{dsn_index})")

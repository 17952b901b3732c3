"""Bad input is a one-line error with exit code 2, and nothing secret or personal leaks (issue 16).

Each class of hostile input found by fault injection gets a test: values that overflow, YAML keys
that are not strings, malformed JSON in the environment, Rich markup in user text, a table name
with a trailing newline, values that used to fail only in the database, DSNs whose password holds
an unescaped `@`, a space or escaped quotes, and PostgreSQL messages that quote row values. A
usage error must name the file and key, show the user's text verbatim, and change nothing in the
database (no ledger schema, no table).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner, Result

from maintainer import db as dbmod
from maintainer import output, report
from maintainer.checks import run_checks
from maintainer.cli import main
from maintainer.logs import JsonFormatter, TextFormatter
from maintainer.project import load_project
from maintainer.runner import RunOptions, run_all
from maintainer.scheduler import Daemon
from tests.conftest import Database, Workspace

PASSWORD_PIECES = ("Pl4nted", "S3cret")
PERSON = "zq-person-77@example.test"

ECHO_UNIT = """---
description: counts the rows of a table
params:
  table: {type: table, required: true}
  pause: {type: duration, default: 10ms}
  limit: {type: integer, default: 10, min: 1, max: 1000}
---
{% block discover %}
SELECT count(*) AS n FROM {{ params.table | ident }} LIMIT {{ params.limit | bind }}
{% endblock %}
"""

# Not marked sensitive: a user unit like any other, whose discover makes PostgreSQL quote a row value.
CAST_UNIT = """---
description: reads a number that turns out to be an email address
---
{% block discover %}
SELECT email::integer AS n FROM people
{% endblock %}
"""


def cli(ws: Workspace, *args: str, env: Mapping[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(ws.config)], env=dict(env or {}), catch_exceptions=True)


def database_state(db: Database) -> list[tuple[Any, ...]]:
    """Every schema and relation outside the catalogs: what a usage error must leave as it was."""
    return db.execute(
        "SELECT n.nspname, c.relname FROM pg_namespace n LEFT JOIN pg_class c ON c.relnamespace = n.oid"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND n.nspname NOT LIKE 'pg_temp%'"
        " AND n.nspname NOT LIKE 'pg_toast_temp%' ORDER BY 1, 2"
    )


def assert_usage_error(result: Result, *verbatim: str) -> list[str]:
    """Exit 2, no traceback, every stderr line one `error:` line, the user's text as typed."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    for text in verbatim:
        assert text in result.stderr, result.stderr
    return lines


@contextmanager
def unchanged(db: Database) -> Iterator[None]:
    before = database_state(db)
    yield
    assert database_state(db) == before
    assert db.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'maintainer'") == [(0,)]


def write_yaml(path: Path, text: str) -> None:
    path.write_text(text)


# -- values that overflow ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "job", "verbatim"),
    [
        ({"defaults": {"lock_timeout": "99999999999 days"}}, None, "defaults.lock_timeout: '99999999999 days'"),
        ({"defaults": {"retry_backoff": 1e300}}, None, "defaults.retry_backoff: 1e+300"),
        ({"defaults": {"history_retention": float("inf")}}, None, "defaults.history_retention: inf"),
        ({"scheduler": {"jitter": 2**63}}, None, "scheduler.jitter: 9223372036854775808"),
        ({}, {"params": {"table": "t", "pause": 2**63}}, "pause: 9223372036854775808"),
        ({}, {"params": {"table": "t", "pause": "99999999999 days"}}, "pause: '99999999999 days'"),
        ({}, {"params": {"table": "t"}, "timeouts": {"statement": 2**63}}, "timeouts.statement: 9223372036854775808"),
        ({}, {"params": {"table": "t"}, "timeouts": {"lock": "30 days"}}, "timeouts.lock: 2592000000ms is longer"),
    ],
)
def test_a_duration_that_overflows_is_a_usage_error(
    workspace: Workspace, db: Database, config: dict[str, Any], job: dict[str, Any] | None, verbatim: str
) -> None:
    workspace.write_config(**config)
    workspace.unit("echo", ECHO_UNIT)
    workspace.job("echo", unit="echo", **(job or {"params": {"table": "t"}}))
    with unchanged(db):
        assert_usage_error(cli(workspace, "trigger", "echo"), verbatim)


def test_an_overflowing_default_in_a_unit_is_a_usage_error(workspace: Workspace, db: Database) -> None:
    workspace.unit("echo", ECHO_UNIT.replace("default: 10ms", "default: 9223372036854775808"))
    workspace.job("echo", unit="echo", params={"table": "t"})
    with unchanged(db):
        assert_usage_error(
            cli(workspace, "check"), "echo.sql.j2: front matter: params.pause: default: 9223372036854775808"
        )


# -- keys that are not strings ----------------------------------------------------------------------


def test_a_yaml_key_that_is_not_a_string_is_a_usage_error(workspace: Workspace, db: Database) -> None:
    workspace.unit("echo", ECHO_UNIT)
    workspace.job("echo", unit="echo", params={"table": "t"})
    with unchanged(db):
        write_yaml(workspace.config, workspace.config.read_text() + "1: 2\n")
        assert_usage_error(cli(workspace, "check"), "maintainer.yaml: (top level): key 1 is not a string")
        workspace.write_config()
        write_yaml(workspace.root / "jobs" / "echo.yaml", "name: echo\nunit: echo\nparams: {table: t}\n1: 2\n")
        assert_usage_error(cli(workspace, "trigger", "echo"), "echo.yaml: (top level): key 1 is not a string")
        write_yaml(workspace.root / "jobs" / "echo.yaml", "name: echo\nunit: echo\nparams: {table: t, yes: 2}\n")
        assert_usage_error(cli(workspace, "trigger", "echo"), "echo.yaml: params: key True is not a string")


# -- malformed JSON in the environment --------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MAINTAINER_TARGETS", '{"app": '), ("MAINTAINER_DEFAULTS", "[/red]{"), ("MAINTAINER_SCHEDULER", "nan")],
)
def test_malformed_json_in_the_environment_is_a_usage_error(
    workspace: Workspace, db: Database, variable: str, value: str
) -> None:
    workspace.unit("echo", ECHO_UNIT)
    workspace.job("echo", unit="echo", params={"table": "t"})
    with unchanged(db):
        lines = assert_usage_error(cli(workspace, "trigger", "echo", env={variable: value}), f"environment {variable}")
        assert len(lines) == 1


def test_a_bad_value_from_the_environment_names_the_variable(workspace: Workspace, db: Database) -> None:
    with unchanged(db):
        assert_usage_error(
            cli(workspace, "check", env={"MAINTAINER_DEFAULTS__LOCK_TIMEOUT": "[/red] 1e+300"}),
            "environment MAINTAINER_DEFAULTS__LOCK_TIMEOUT: defaults.lock_timeout: '[/red] 1e+300'",
        )


# -- Rich markup in user text -----------------------------------------------------------------------


def test_markup_in_user_text_is_shown_verbatim(workspace: Workspace, db: Database) -> None:
    workspace.unit("echo", ECHO_UNIT)
    with unchanged(db):
        workspace.job("echo", unit="echo", params={"table": "[/red]"})
        assert_usage_error(cli(workspace, "trigger", "echo"), "table: '[/red]' is not a valid table name")
        workspace.job("echo", unit="echo", params={"table": "t"})
        assert_usage_error(cli(workspace, "trigger", "x[/red]"), "unknown job 'x[/red]' (jobs: echo)")
        assert_usage_error(cli(workspace, "trigger", "echo", "--arg", "[/red]=1"), "--arg '[/red]'")
        assert_usage_error(cli(workspace, "plan", "echo", "--arg", "[bold]x:smile:=1"), "--arg '[bold]x:smile:'")
        assert_usage_error(cli(workspace, "trigger", "echo", "--arg", "x=a\x00b"), "--arg x: the value contains a NUL")
        # The pattern in the message is markup-like text too: it must survive.
        write_yaml(workspace.root / "jobs" / "echo.yaml", "name: Echo[/red]\nunit: echo\nparams: {table: t}\n")
        assert_usage_error(cli(workspace, "jobs"), "job name 'Echo[/red]' must match [a-z0-9][a-z0-9-]*")


def test_markup_in_data_is_shown_verbatim(workspace: Workspace, db: Database) -> None:
    """Findings, ledger history and the report print data through Rich: as text, never markup."""
    db.run_script('CREATE TABLE t (x int); INSERT INTO t VALUES (1)')
    workspace.unit("echo", ECHO_UNIT.replace("count(*) AS n", "'[/red] :smile: [bold]' AS \"[/x]\""))
    workspace.job("echo", unit="echo", items=[{"table": "t", "limit": 5}])
    run = cli(workspace, "trigger", "echo")
    assert run.exit_code == 0, run.output
    assert "[/red] :smile: [bold]" in run.stdout and "[/x]" in run.stdout
    history = cli(workspace, "history")
    assert history.exit_code == 0 and "Traceback" not in history.output, history.output
    rendered = cli(workspace, "report")
    assert rendered.exception is None or isinstance(rendered.exception, SystemExit), rendered.output


# -- table names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["public.a\n", "a\n", "public.a\r", "public.\na"])
def test_a_table_name_with_a_newline_is_refused(workspace: Workspace, db: Database, name: str) -> None:
    db.run_script("CREATE TABLE a (x int)")
    workspace.unit("echo", ECHO_UNIT)
    workspace.job("echo", unit="echo", params={"table": name})
    with unchanged(db):
        lines = assert_usage_error(cli(workspace, "trigger", "echo"), f"table: {name!r} is not a valid table name")
        assert len(lines) == 1


# -- values that failed only in the database --------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "params", "verbatim"),
    [
        (
            "partitions",
            {"table": "public.t", "interval": "1 month", "premake": 2**31},
            "premake: 2147483648 is out of range: at most 1000",
        ),
        ("partitions", {"table": "public.t", "interval": 0}, "interval: "),
        ("reindex", {"max_indexes": 2**31}, "max_indexes: 2147483648 is out of range: at most 1000"),
        ("reindex", {"min_bloat": float("nan")}, "min_bloat: expected a finite number, got nan"),
        ("reindex", {"min_bloat": float("inf")}, "min_bloat: expected a finite number, got inf"),
        ("sequences", {"warn": 1e400}, "warn: expected a finite number, got inf"),
        ("autovacuum", {"vacuum_rows": 0}, "vacuum_rows: 0 is out of range: at least 1"),
        (
            "anonymize",
            {"table": "public.t", "where": "true", "set": {"x": None}, "batch_size": 0},
            "batch_size: 0 is out of range: at least 1",
        ),
        (
            "anonymize",
            {"table": "public.t", "where": "true", "set": {"x": None}, "batch_size": 2**31},
            "batch_size: 2147483648 is out of range: at most 2147483647",
        ),
    ],
)
def test_a_value_the_database_would_refuse_is_refused_at_load(
    workspace: Workspace, db: Database, unit: str, params: dict[str, Any], verbatim: str
) -> None:
    workspace.job("j", unit=unit, params=params)
    with unchanged(db):
        assert_usage_error(cli(workspace, "trigger", "j"), verbatim)


def test_unit_authors_get_their_bounds_checked(workspace: Workspace, db: Database) -> None:
    with unchanged(db):
        workspace.unit("echo", ECHO_UNIT.replace("max: 1000", "max: banana"))
        assert_usage_error(cli(workspace, "check"), "params.limit: max: expected an integer, got 'banana'")
        workspace.unit("echo", ECHO_UNIT.replace("{type: table, required: true}", "{type: table, min: 1}"))
        assert_usage_error(cli(workspace, "check"), "params.table: min applies to integer, number, duration, size")
        workspace.unit("echo", ECHO_UNIT.replace("---\n{%", "sensitive: true\nmessages: trusted\n---\n{%"))
        assert_usage_error(cli(workspace, "check"), "records errors by SQLSTATE only; remove messages: trusted")
        workspace.unit("echo", ECHO_UNIT)
        workspace.job("echo", unit="echo", params={"table": "t", "limit": 1001})
        assert_usage_error(cli(workspace, "trigger", "echo"), "limit: 1001 is out of range: at most 1000")


# -- DSNs whose password needed quoting -------------------------------------------------------------

MALFORMED_DSNS = [
    "postgresql://maintainer:Pl4nted@S3cret@127.0.0.1:1/app",  # '@' in the password, not %40
    "postgresql://maintainer:Pl4nted/S3cret@127.0.0.1:1/app",  # '/' in the password, not %2F
    "host=127.0.0.1 port=1 password=Pl4nted S3cret",  # a space without quotes
    "host=127.0.0.1 port=1 password='Pl4nted\\'S3cret c",  # an escaped quote, the closing one missing
    "postgresql://maintainer:Pl4nted S3cret@127.0.0.1:1/app",  # a space in a URL
]


@pytest.mark.parametrize("dsn", MALFORMED_DSNS)
def test_a_malformed_dsn_is_a_usage_error_that_never_shows_the_password(
    workspace: Workspace, db: Database, tmp_path: Path, dsn: str
) -> None:
    workspace.unit("echo", ECHO_UNIT)
    workspace.job("echo", unit="echo", params={"table": "t"})
    (tmp_path / "dsn").write_text(dsn)
    sources: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"targets": {"app": {"dsn": dsn}}}, {}),
        ({"targets": {"app": {"dsn_file": str(tmp_path / "dsn")}}}, {}),
        ({}, {"MAINTAINER_TARGETS__APP__DSN": dsn}),
    ]
    with unchanged(db):
        for config, env in sources:
            workspace.write_config(**config)
            for command in (["trigger", "echo"], ["check"], ["jobs"], ["history"], ["report"], ["plan", "echo"]):
                result = cli(workspace, *command, env=env)
                assert_usage_error(result, "dsn")
                assert not any(piece in result.output for piece in PASSWORD_PIECES), result.output


def test_a_dsn_file_that_breaks_after_start_never_leaks(workspace: Workspace, db: Database, tmp_path: Path) -> None:
    """The daemon re-reads dsn_file at every connection: every read-only view, the runs, the
    daemon's log and the unauthenticated /readyz say it is unusable without quoting it."""
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(db.dsn)
    workspace.write_config(targets={"app": {"dsn_file": str(dsn_file)}}, http={"listen": "127.0.0.1:0"},
                           scheduler={"catch_up": False})
    workspace.job("headroom", unit="sequences")
    project = load_project(str(workspace.config))
    records = capture_logs()
    daemon = Daemon(project, str(workspace.config))
    daemon.start()
    seen: list[str] = []
    try:
        for dsn in MALFORMED_DSNS:
            dsn_file.write_text(dsn)
            daemon._ready = None  # the probe result is cached briefly
            status, body = http(daemon.http.port, "/readyz")
            assert status == 503 and "unreachable" in body, body
            seen.append(body)
    finally:
        daemon.shutdown()
    for dsn in MALFORMED_DSNS:
        dsn_file.write_text(dsn)
        seen += [
            json.dumps(output.job_rows(project), default=str),
            json.dumps(output.collect_history(project, None, 5), default=str),
            json.dumps(report.build(project), default=str),
            repr(run_checks(project)),
            json.dumps([r.to_json() for r in run_all(project.run_specs(project.jobs["headroom"]),
                                                    RunOptions(trigger="manual"))], default=str),
        ]
    seen += records.lines()
    text = "\n".join(seen)
    assert "not a valid connection string" in text or "percent-encode" in text
    assert not any(piece in text for piece in PASSWORD_PIECES), text


def test_a_quoted_password_with_escaped_quotes_works_and_never_shows(workspace: Workspace, db: Database) -> None:
    """`password='Pl4nted\\'S3cret c'` is a valid key=value DSN: it connects (the test servers trust
    local connections) and appears nowhere, neither in output nor in the ledger."""
    info = psycopg.conninfo.conninfo_to_dict(db.dsn)
    plain = " ".join(f"{key}={value}" for key, value in info.items() if key != "password")
    dsn = plain + " password='Pl4nted\\'S3cret c'"
    assert psycopg.conninfo.conninfo_to_dict(dsn)["password"] == "Pl4nted'S3cret c"
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.write_config(targets={"app": {"dsn": dsn}})
    workspace.job("headroom", unit="sequences")
    outputs = [cli(workspace, "trigger", "headroom", "--json"), cli(workspace, "trigger", "headroom")]
    for command in (["check"], ["jobs"], ["history"], ["report"], ["plan", "headroom"]):
        outputs += [cli(workspace, *command), cli(workspace, *command, "--json")] if command[0] != "check" else [
            cli(workspace, *command)]
    for result in outputs:
        assert result.exit_code in (0, 1), result.output
        assert "Traceback" not in result.output
        assert not any(piece in result.output for piece in PASSWORD_PIECES), result.output
    assert outputs[0].exit_code == 0
    assert not any(piece in ledger_text(db) for piece in PASSWORD_PIECES)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://u:Pl4nted@S3cret@db/app",
        "could not connect: postgresql://u:Pl4nted@S3cret@db:5432/app failed",
        "password=Pl4nted S3cret host=db",
        "host=db password='Pl4nted\\'S3cret c' dbname=app",
        "host=db password='Pl4nted\\'S3cret",
        "host=db password=Pl4nted'S3cret",
        "postgresql://u:Pl4nted S3cret@db/app",
        "postgresql://db/app?sslmode=require&password=Pl4nted%20S3cret",
        "failed to resolve host 'S3cret@db': Name or service not known",
        'connection to server at "S3cret@db" (10.0.0.1), port 5432 failed',
        "PGPASSWORD=Pl4nted-S3cret",
        "failed: postgresql://u:Pl4nted@db/a [error=could not connect to postgresql://u:S3cret@db/a findings=0]",
        "postgresql://u:Pl4nted postgresql://v:S3cret@db",
    ],
)
def test_redact_dsn_removes_the_whole_password_of_any_dsn(text: str) -> None:
    redacted = dbmod.redact_dsn(text)
    assert not any(piece in redacted for piece in PASSWORD_PIECES), redacted


# -- PostgreSQL messages that quote row values ------------------------------------------------------


def test_a_postgres_message_quoting_a_row_value_is_withheld(workspace: Workspace, db: Database, tmp_path: Path) -> None:
    db.run_script(f"CREATE TABLE people (email text UNIQUE); INSERT INTO people VALUES ('{PERSON}')")
    workspace.unit("cast", CAST_UNIT)
    workspace.job("cast", unit="cast")
    (tmp_path / "token").write_text("tok")
    workspace.write_config(http={"listen": "127.0.0.1:0", "trigger_token_file": str(tmp_path / "token")},
                           scheduler={"catch_up": False})
    records = capture_logs()
    outputs = [cli(workspace, "trigger", "cast", "--json"), cli(workspace, "trigger", "cast"),
               cli(workspace, "plan", "cast"), cli(workspace, "check")]
    assert outputs[0].exit_code == 1
    run = json.loads(outputs[0].stdout)["runs"][0]
    assert run["error"] == "invalid_text_representation (SQLSTATE 22P02)" and run["sqlstate"] == "22P02"
    outputs += [cli(workspace, "history"), cli(workspace, "history", "--json"), cli(workspace, "report", "--json")]
    daemon = Daemon(load_project(str(workspace.config)), str(workspace.config))
    daemon.start()
    try:
        status, http_body = http(daemon.http.port, "/jobs/cast/trigger?wait=true", token="tok")
    finally:
        daemon.shutdown()
    assert status == 200, http_body
    assert "invalid_text_representation (SQLSTATE 22P02)" in http_body
    seen = "\n".join([*(r.output for r in outputs), http_body, ledger_text(db), *records.lines()])
    assert "Traceback" not in seen
    assert PERSON not in seen and "zq-person" not in seen


def test_messages_that_name_objects_only_are_kept(db: Database) -> None:
    """Integrity, syntax and lock errors name constraints and tables, never values: kept whole; a
    unit declaring `messages: trusted` keeps data exceptions too, `sensitive` keeps the SQLSTATE."""
    db.run_script(f"CREATE TABLE people (email text UNIQUE); INSERT INTO people VALUES ('{PERSON}')")
    with db.connect() as conn:
        with pytest.raises(psycopg.Error) as duplicate:
            conn.execute("INSERT INTO people SELECT email FROM people")
        with pytest.raises(psycopg.Error) as cast:
            conn.execute("SELECT email::integer FROM people")
        with pytest.raises(psycopg.Error) as missing:
            conn.execute("SELECT * FROM nowhere")
    assert dbmod.error_summary(duplicate.value) == 'duplicate key value violates unique constraint "people_email_key"'
    assert dbmod.error_summary(missing.value) == 'relation "nowhere" does not exist'
    assert dbmod.error_summary(cast.value) == "invalid_text_representation (SQLSTATE 22P02)"
    assert PERSON in dbmod.error_summary(cast.value, trusted=True)
    assert dbmod.error_summary(cast.value, sensitive=True) == "InvalidTextRepresentation (SQLSTATE 22P02)"
    assert dbmod.condition_name("P0001") == "raise_exception" and dbmod.condition_name("ZZ999") == "error"


def test_the_built_in_units_declare_what_their_messages_hold() -> None:
    from maintainer.units import load_units

    units = load_units(None)
    assert {name for name, unit in units.items() if unit.meta.trusted_messages} == {
        "advisor", "autovacuum", "partitions", "reindex", "sequences"}
    assert units["anonymize"].meta.sensitive and not units["anonymize"].meta.trusted_messages


# -- helpers ----------------------------------------------------------------------------------------


def http(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    """GET (or, with a token, POST) on the daemon; the status and body whatever the status."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if token else "GET",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def ledger_text(db: Database) -> str:
    if db.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'maintainer'") == [(0,)]:
        return ""
    rows = db.execute(
        "SELECT (SELECT coalesce(string_agg(r::text, E'\\n'), '') FROM maintainer.run r)"
        " || (SELECT coalesce(string_agg(a::text, E'\\n'), '') FROM maintainer.action a)"
        " || (SELECT coalesce(string_agg(f::text, E'\\n'), '') FROM maintainer.finding f)"
    )
    return str(rows[0][0])


class _Lines(logging.Handler):
    """Every record, formatted as the daemon writes it (JSON and text), kept for inspection."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.formatted: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.formatted += [JsonFormatter().format(record), TextFormatter().format(record)]

    def lines(self) -> list[str]:
        return list(self.formatted)


def capture_logs() -> _Lines:
    handler = _Lines()
    logger = logging.getLogger("maintainer")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return handler


@pytest.fixture(autouse=True)
def _detach_log_capture() -> Iterator[None]:
    yield
    logger = logging.getLogger("maintainer")
    for handler in [h for h in logger.handlers if isinstance(h, _Lines)]:
        logger.removeHandler(handler)


def test_yaml_dump_of_an_int_key_is_what_the_tests_above_write() -> None:
    assert yaml.safe_dump({1: 2}) == "1: 2\n"

"""The unit library: macros shared by units, under the same guard as the units themselves.

A macro's output counts as SQL only because every `{{ … }}` inside it passed `ident`, `literal`,
`bind` or `sql`; these tests put hostile values through macros (the unit's own, the built-in
library's, a user library's) and check that nothing reaches the text unquoted, that a raw value
fails naming the macro's file and line, and that front matter is typed down to its last key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pglast
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import ast

from maintainer import context as render_context
from maintainer.render import ArgValue, RenderError
from maintainer.units import Library, Unit, UnitError, load_units, parse_unit
from tests.conftest import Database, Workspace

ROOT = Path(__file__).resolve().parent.parent
hostile = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1)

USER_LIBRARY = """\
{% macro count_of(table) %}SELECT count(*) AS n FROM {{ table | ident }}{% endmacro %}
{% macro raw(value) %}SELECT {{ value }}{% endmacro %}
{% macro quoted(value) %}SELECT {{ value | literal }} AS v{% endmacro %}
"""


def library_unit(root: Path, body: str, library: str = USER_LIBRARY) -> Unit:
    (root / "lib").mkdir(exist_ok=True)
    (root / "lib" / "mine.sql.j2").write_text(library)
    path = root / "u.sql.j2"
    path.write_text(
        "---\ndescription: test\n---\n"
        '{% from "lib/mine.sql.j2" import count_of, raw, quoted %}\n'
        '{% import "lib/catalog.sql.j2" as catalog %}\n'
        "{% block apply %}" + body + "{% endblock %}\n"
    )
    return parse_unit(path, library=Library(root))


def render(unit: Unit, **context: Any) -> tuple[str, list[Any]]:
    return unit.render_block("apply", {"params": {}, "row": {}, "args": {}, **context})


@settings(max_examples=200, deadline=None)
@given(value=hostile)
def test_a_name_through_a_library_macro_is_exactly_that_identifier(
    tmp_path_factory: pytest.TempPathFactory, value: str
) -> None:
    unit = library_unit(tmp_path_factory.mktemp("u"), "{{ count_of(v) }}")
    text, _ = render(unit, v=value)
    [statement] = pglast.parse_sql(text)
    range_var = statement.stmt.fromClause[0]
    assert isinstance(range_var, ast.RangeVar)
    assert range_var.relname == value or len(value.encode()) > 63


@settings(max_examples=200, deadline=None)
@given(value=hostile)
def test_a_value_through_a_library_macro_is_exactly_that_literal(
    tmp_path_factory: pytest.TempPathFactory, value: str
) -> None:
    unit = library_unit(tmp_path_factory.mktemp("u"), "{{ quoted(v) }}")
    text, _ = render(unit, v=value)
    [statement] = pglast.parse_sql(text)
    assert statement.stmt.targetList[0].val.val.sval == value


@settings(max_examples=100, deadline=None)
@given(value=hostile)
def test_a_macro_that_interpolates_a_raw_value_fails_naming_its_file_and_line(
    tmp_path_factory: pytest.TempPathFactory, value: str
) -> None:
    root = tmp_path_factory.mktemp("u")
    unit = library_unit(root, "{{ raw(v) }}")
    with pytest.raises(RenderError) as failure:
        render(unit, v=value)
    assert f"{root / 'lib' / 'mine.sql.j2'}:2:" in str(failure.value)
    # the message says what went wrong, never the value itself
    assert str(failure.value).endswith("mine.sql.j2:2: a str value reached the SQL without a filter: "
                                       "write {{ … | ident }}, {{ … | literal }} or {{ … | bind }}")


@pytest.mark.parametrize("expr", [
    "{{ quoted(args.id) }}",                 # an --arg value through `literal` inside a macro
    "{{ count_of(args.id) }}",               # … through `ident`
    "{{ count_of('t') ~ args.id }}",         # macro output is SQL, what it is joined with is not
    "{{ count_of('t') | replace('t', args.id) }}",
    "{{ (count_of('t') ~ '') }}",
    "{{ catalog.user_schema(args.id) }}",
])
def test_macro_output_stays_behind_the_guard(tmp_path: Path, expr: str) -> None:
    unit = library_unit(tmp_path, f"SELECT 1; {expr}")
    with pytest.raises(RenderError):
        render(unit, args={"id": ArgValue("1; DROP TABLE t")})


def test_a_units_own_macro_is_sql_too(tmp_path: Path) -> None:
    path = tmp_path / "u.sql.j2"
    path.write_text(
        "---\ndescription: test\n---\n"
        "{% macro pick(t) %}SELECT * FROM {{ t | ident }}{% endmacro %}\n"
        "{% block apply %}{{ pick(v) }};{% endblock %}\n"
    )
    assert parse_unit(path).render_block("apply", {"v": 'a"b'}) == ('SELECT * FROM "a""b";', [])


@pytest.mark.parametrize("library, problem", [
    ("{% macro m(v) %}{% filter upper %}{{ v | literal }}{% endfilter %}{% endmacro %}",
     "bypasses the ident/literal/bind guard"),
    ("{% macro m(v) %}{% call caller() %}x{% endcall %}{% endmacro %}", "bypasses the ident/literal/bind guard"),
    ("---\ndescription: x\n---\n{% macro m() %}SELECT 1{% endmacro %}", "library files have no front matter"),
    ("{% macro m( %}", "template syntax error"),
])
def test_a_bad_library_file_is_a_load_error_naming_it(tmp_path: Path, library: str, problem: str) -> None:
    with pytest.raises(UnitError, match=problem) as failure:
        library_unit(tmp_path, "SELECT 1", library=library)
    assert "mine.sql.j2" in str(failure.value)


def test_missing_library_files_and_macros_are_load_errors(tmp_path: Path) -> None:
    (tmp_path / "u.sql.j2").write_text(
        '---\ndescription: x\n---\n{% from "lib/nothere.sql.j2" import m %}\n{% block apply %}SELECT 1{% endblock %}'
    )
    with pytest.raises(UnitError, match=r"u.sql.j2:4: no library file 'lib/nothere.sql.j2'"):
        parse_unit(tmp_path / "u.sql.j2")
    (tmp_path / "u.sql.j2").write_text(
        '---\ndescription: x\n---\n{% from "lib/catalog.sql.j2" import nope %}\n{% block apply %}SELECT 1{% endblock %}'
    )
    with pytest.raises(UnitError, match="has no macro 'nope'"):
        parse_unit(tmp_path / "u.sql.j2")


def test_a_user_library_file_of_the_same_name_wins_and_is_not_a_unit(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    builtin = (ROOT / "templates" / "lib" / "catalog.sql.j2").read_text()
    (tmp_path / "lib" / "catalog.sql.j2").write_text(
        builtin + "{% macro user_schema(namespace, state_schema=none) %}{{ namespace | ident }}.nspname = 'app'"
        "{% endmacro %}"
    )
    (tmp_path / "u.sql.j2").write_text(
        '---\ndescription: x\n---\n{% from "lib/catalog.sql.j2" import user_schema %}\n'
        "{% block discover %}SELECT 1 FROM pg_namespace n WHERE {{ user_schema('n') }}{% endblock %}"
    )
    units = load_units(tmp_path)
    assert "catalog" not in units and "lib/catalog" not in units
    text, _ = units["u"].render_block("discover", {})
    assert text == "SELECT 1 FROM pg_namespace n WHERE \"n\".nspname = 'app'"
    # the built-ins that import the same file now get the user's macro too, also where another of
    # its macros calls it (reindex's check counts the tables of user schemas): the user's library wins
    assert "\"n\".nspname = 'app'" in units["reindex"].imports["table_rights"]("facts")


@pytest.mark.parametrize("front_matter, key", [
    ("alerts: {levle: level}", "alerts.levle"),
    ("metrics: {maintainer_x: {value: x, label: [a]}}", "metrics.maintainer_x.label"),
    ("metrics: {maintainer_x: {valeu: x}}", "metrics.maintainer_x.valeu"),
    ("params: {n: {type: integer, defualt: 1}}", "params.n.defualt"),
    ("display: {x: 1}", "display"),
    ("metrics: {'bad name': {value: x}}", "metrics"),
    ("forecast: {vaule: x}", "forecast.vaule"),
    ("report: {merge: [x]}", "report.merge"),
    ("report: {merge_on: []}", "report.merge_on"),
    ("cooldown: {key: x, decison: rebuilt}", "cooldown.decison"),
    ("params: {wait: {type: integer}}\ncooldown: {key: x, decision: done, within: wait}", "cooldown.within"),
])
def test_a_misspelt_front_matter_key_makes_check_exit_2_naming_file_and_key(
    offline_workspace: Workspace, front_matter: str, key: str
) -> None:
    body = "{% block discover %}SELECT 1 AS x{% endblock %}\n"
    offline_workspace.unit("mine", f"---\ndescription: x\n{front_matter}\n---\n{body}")
    result = offline_workspace.cli("check")
    assert result.exit_code == 2, result.output
    assert "mine.sql.j2" in result.output and key in result.output


def test_the_readme_context_table_is_the_one_the_engine_builds() -> None:
    readme = (ROOT / "README.md").read_text()
    table = render_context.markdown_table()
    assert table in readme, f"README's context table is out of date; it should read:\n{table}"


CONTEXT_UNIT = """\
---
description: sees its context
repeat: until_zero_rows
---
{% from "lib/mine.sql.j2" import count_of %}
{% from "lib/catalog.sql.j2" import user_schema %}
{% block survey %}SELECT NULL::int AS item WHERE false{% endblock %}
{% block prepare %}SELECT 1 AS ready{% endblock %}
{% block discover %}
SELECT ({{ count_of('things') }}) AS things,
       (SELECT count(*) FROM pg_namespace n
         WHERE {{ user_schema('n', state_schema) }} AND n.nspname = 'public') AS public
{% endblock %}
{% block apply %}
UPDATE things SET done = true WHERE id = (SELECT min(id) FROM things WHERE NOT done) RETURNING id
{% endblock %}
{% block after %}{% endblock %}
{% block verify %}SELECT 1 WHERE false{% endblock %}
{% block report %}
SELECT {{ discovered[0].things | bind }}::int AS things, {{ steps | length | bind }}::int AS steps
{% endblock %}
{% block check %}SELECT 'ok' AS level, 'fine' AS message{% endblock %}
"""


def test_a_user_unit_imports_built_in_and_own_macros_and_every_block_sees_its_documented_context(
    workspace: Workspace, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.execute("CREATE TABLE things (id int PRIMARY KEY, done bool NOT NULL DEFAULT false)")
    db.execute("INSERT INTO things (id) SELECT g FROM generate_series(1, 3) g")
    (workspace.root / "templates" / "lib").mkdir()
    (workspace.root / "templates" / "lib" / "mine.sql.j2").write_text(USER_LIBRARY)
    workspace.unit("seer", CONTEXT_UNIT)
    workspace.job("seer", unit="seer", items=[{}, {}])
    seen: dict[str, set[str]] = {}
    original = Unit.render_block

    def recording(self: Unit, block: str, context: Any) -> tuple[str, list[Any]]:
        seen.setdefault(block, set()).update(context)
        return original(self, block, context)

    monkeypatch.setattr(Unit, "render_block", recording)
    result = workspace.cli("trigger", "seer", "--json")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)["runs"]
    assert [r["findings"] for r in runs] == [[{"things": 3, "steps": 1}], [{"things": 3, "steps": 1}]]
    assert db.execute("SELECT count(*) FROM things WHERE done") == [(3,)]
    result = workspace.cli("check")
    assert "fine" in result.output, result.output
    assert set(seen) == {"survey", "prepare", "discover", "apply", "after", "verify", "report", "check"}
    for block in seen:
        assert seen[block] == set(render_context.names_of(block)), block


def test_check_names_front_matter_fields_that_findings_never_carry(workspace: Workspace, db: Database) -> None:
    workspace.unit("typo", """\
---
description: a unit whose front matter names a field it never returns
metrics:
  maintainer_typo_rows: {value: rwos, labels: [relname]}
alerts: {level: level, key: [relname], message: "{relname}: {nope} rows"}
display: [relname, level, colour]
---
{% block discover %}SELECT 'pg_class' AS relname, 'ok' AS level{% endblock %}
""")
    workspace.job("typo", unit="typo")
    result = workspace.cli("check")
    line = next(line for line in result.output.splitlines() if "unit typo" in line)
    assert "metrics.maintainer_typo_rows names 'rwos'" in line
    assert "alerts names 'nope'" in line and "display names 'colour'" in line
    assert "'relname'" not in line.split(":")[0]


def test_check_names_a_cooldown_key_that_findings_never_carry(workspace: Workspace, db: Database) -> None:
    workspace.unit("cooling", """\
---
description: a unit whose cooldown names a field it never returns
params:
  cooldown: {type: duration, default: 1 day}
cooldown: {key: indx, decision: rebuilt}
---
{% block discover %}SELECT 'i' AS index, 'rebuilt' AS decision, {{ cooldowns | bind }}::jsonb AS seen{% endblock %}
""")
    workspace.job("cooling", unit="cooling")
    result = workspace.cli("check")
    line = next(line for line in result.output.splitlines() if "unit cooling" in line)
    assert "cooldown names 'indx'" in line and "'decision'" not in line


def test_the_built_in_units_declare_only_fields_their_findings_carry(workspace: Workspace, db: Database) -> None:
    db.run_script("""
        CREATE TABLE metrics (id bigint, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at);
        CREATE TABLE metrics_old PARTITION OF metrics FOR VALUES FROM ('2000-01-01') TO ('2000-02-01');
        CREATE TABLE things (id serial PRIMARY KEY, email text);
        INSERT INTO things (email) SELECT 'x' || g FROM generate_series(1, 100) g;
        ANALYZE things;
    """)
    workspace.job("sequences", unit="sequences")
    workspace.job("autovacuum", unit="autovacuum")
    workspace.job("reindex", unit="reindex", params={"min_wasted": 0, "min_bloat": 0})
    workspace.job("partitions", unit="partitions",
                  items=[{"table": "public.metrics", "interval": "1 month", "retention": "12 months"}])
    workspace.job("anonymize", unit="anonymize",
                  items=[{"table": "public.things", "where": "id < 10", "set": {"email": None}}])
    result = workspace.cli("check")
    assert "not a field of its findings" not in result.output, result.output
    assert result.output.count("finding(s)") == 5, result.output

"""The template guard: no value, however hostile, reaches SQL text unquoted."""

from __future__ import annotations

from pathlib import Path

import pglast
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import ast

from maintainer.render import ArgValue, RenderError, TrustedSql
from maintainer.units import UnitError, parse_unit, split_statements
from maintainer.values import QualifiedName


def make_unit(tmp_path: Path, body: str, params: str = "") -> object:
    path = tmp_path / "u.sql.j2"
    path.write_text(f"---\ndescription: test\nparams:\n{params or '  {}'}\n---\n{body}")
    return parse_unit(path)


def render(tmp_path: Path, body: str, **context: object) -> tuple[str, list[object]]:
    unit = make_unit(tmp_path, "{% block apply %}" + body + "{% endblock %}")
    return unit.render_block("apply", {"params": {}, "row": {}, "args": {}, **context})  # type: ignore[attr-defined]


# Text without NUL (PostgreSQL cannot store it in identifiers or text literals at all).
hostile = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1)


@settings(max_examples=300, deadline=None)
@given(value=hostile)
def test_ident_always_parses_to_exactly_that_identifier(tmp_path_factory: pytest.TempPathFactory, value: str) -> None:
    tmp = tmp_path_factory.mktemp("u")
    text, _ = render(tmp, "SELECT 1 FROM {{ v | ident }}", v=value)
    statements = pglast.parse_sql(text)
    assert len(statements) == 1
    range_var = statements[0].stmt.fromClause[0]
    assert isinstance(range_var, ast.RangeVar)
    # PostgreSQL truncates identifiers to 63 bytes; the quoted text still holds exactly the value.
    assert range_var.relname == value or len(value.encode()) > 63


@settings(max_examples=300, deadline=None)
@given(value=hostile)
def test_literal_always_parses_to_exactly_that_string(tmp_path_factory: pytest.TempPathFactory, value: str) -> None:
    tmp = tmp_path_factory.mktemp("u")
    text, _ = render(tmp, "SELECT {{ v | literal }} AS x", v=value)
    statements = pglast.parse_sql(text)
    assert len(statements) == 1
    target = statements[0].stmt.targetList[0].val
    assert isinstance(target, ast.A_Const)
    assert target.val.sval == value


@settings(max_examples=200, deadline=None)
@given(value=hostile)
def test_bind_keeps_the_value_out_of_the_text(tmp_path_factory: pytest.TempPathFactory, value: str) -> None:
    tmp = tmp_path_factory.mktemp("u")
    text, values = render(tmp, "SELECT * FROM t WHERE a = {{ v | bind }}", v=ArgValue(value))
    assert text == "SELECT * FROM t WHERE a = $1"
    assert values == [value]


@settings(max_examples=200, deadline=None)
@given(value=hostile)
def test_a_raw_value_is_a_render_error(tmp_path_factory: pytest.TempPathFactory, value: str) -> None:
    tmp = tmp_path_factory.mktemp("u")
    with pytest.raises(RenderError):
        render(tmp, "SELECT {{ v }}", v=value)
    with pytest.raises(RenderError):
        render(tmp, "SELECT {{ v ~ '' }}", v=value)


@pytest.mark.parametrize(
    "expr",
    [
        "{{ args.id | literal }}",  # --arg values may only be bound
        "{{ args.id | ident }}",
        "{{ args.id | sql }}",
        "{{ 'x' | sql }}",  # only `type: sql` params are trusted SQL
        "{{ missing | bind }}",  # undefined passed to a filter still fails
        "{{ (1 | literal) | literal }}",  # no double-processing of SQL text
        "{{ [1 | literal, 'raw'] | join_sql }}",
    ],
)
def test_unsafe_expressions_are_refused(tmp_path: Path, expr: str) -> None:
    with pytest.raises(RenderError):
        render(tmp_path, f"SELECT {expr}", args={"id": ArgValue("1; DROP TABLE t")})


def test_trusted_sql_param_and_qualified_names(tmp_path: Path) -> None:
    text, values = render(
        tmp_path,
        "DELETE FROM {{ t | ident }} WHERE {{ w | sql }} AND id > {{ n | bind }}",
        t=QualifiedName("app", "Orders"),
        w=TrustedSql("created_at < now()"),
        n=5,
    )
    assert text == 'DELETE FROM "app"."Orders" WHERE created_at < now() AND id > $1'
    assert values == [5]


def test_sandbox_blocks_python_internals(tmp_path: Path) -> None:
    with pytest.raises(RenderError):
        render(tmp_path, "{{ ''.__class__.__mro__ | literal }}")


def test_split_keeps_do_blocks_whole_and_renumbers_params() -> None:
    text = "UPDATE t SET a = $2; DO $$ BEGIN PERFORM 1; PERFORM 2; END $$; SELECT $1, $3, $1"
    statements = split_statements(text, ["one", "two", "three"])
    assert [s.sql for s in statements] == [
        "UPDATE t SET a = $1",
        "DO $$ BEGIN PERFORM 1; PERFORM 2; END $$",
        "SELECT $1, $2, $1",
    ]
    assert [s.params for s in statements] == [["two"], [], ["one", "three"]]


def test_split_reports_syntax_errors() -> None:
    with pytest.raises(UnitError, match="syntax error"):
        split_statements("SELEC 1", [])


def test_unit_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.sql.j2"
    path.write_text("---\ndescription: x\n---\n{% block apply %}\nSELECT {{ 1 | ident \n{% endblock %}\n")
    with pytest.raises(UnitError, match=r"bad.sql.j2:6: template syntax error"):
        parse_unit(path)


@pytest.mark.parametrize("body", [
    "{% call v.format() %}{% endcall %}",
    "{% filter replace(\"'\", '') %}{{ v | literal }}{% endfilter %}",
])
def test_blocks_whose_output_bypasses_the_guard_are_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "u.sql.j2"
    path.write_text("---\ndescription: x\n---\n{% block apply %}\nSELECT " + body + "\n{% endblock %}\n")
    with pytest.raises(UnitError, match="bypasses the ident/literal/bind guard"):
        parse_unit(path)

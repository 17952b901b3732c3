"""Configuration mistakes: one actionable line naming file and key, exit code 2, nothing executed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maintainer.config import Window, load_settings
from maintainer.values import parse_duration, parse_size
from tests.conftest import Workspace

ECHO_UNIT = """---
description: echo a table name
params:
  table: {type: table, required: true}
  limit: {type: integer, default: 10}
  pause: {type: duration, default: 50ms}
---
{% block discover %}
SELECT {{ params.table | literal }} AS t LIMIT {{ params.limit | bind }}
{% endblock %}
"""


def assert_config_error(ws: Workspace, *fragments: str) -> str:
    result = ws.cli("jobs")
    assert result.exit_code == 2, result.output
    text = result.output
    for fragment in fragments:
        assert fragment in text, text
    assert "Traceback" not in text
    return text


def test_unknown_top_level_key(offline_workspace: Workspace) -> None:
    offline_workspace.write_config(jobs_dri="jobs")
    assert_config_error(offline_workspace, "maintainer.yaml: jobs_dri: unknown key")


def test_unknown_nested_key_and_bad_duration(offline_workspace: Workspace) -> None:
    offline_workspace.write_config(defaults={"lock_timeout": "2 fortnights", "max_attempt": 3})
    text = assert_config_error(offline_workspace, "defaults.max_attempt: unknown key", "defaults.lock_timeout")
    assert "is not a duration" in text


def test_bad_cron(offline_workspace: Workspace) -> None:
    offline_workspace.unit("echo", ECHO_UNIT)
    offline_workspace.job("nightly", unit="echo", schedule="61 * * * *", params={"table": "public.t"})
    assert_config_error(offline_workspace, "nightly.yaml: schedule:", "not a valid 5-field cron")


def test_unknown_unit_and_target(offline_workspace: Workspace) -> None:
    offline_workspace.unit("echo", ECHO_UNIT)
    offline_workspace.job("a", unit="nope")
    offline_workspace.job("b", unit="echo", targets=["elsewhere"], params={"table": "t"})
    assert_config_error(
        offline_workspace, "a.yaml: unit: unknown unit 'nope'", "b.yaml: targets: unknown target 'elsewhere'"
    )


def test_param_of_the_wrong_type_and_unknown_param(offline_workspace: Workspace) -> None:
    offline_workspace.unit("echo", ECHO_UNIT)
    offline_workspace.job("a", unit="echo", params={"table": "t", "limit": "ten", "colour": "red"})
    assert_config_error(offline_workspace, "a.yaml: limit: expected an integer", "a.yaml: colour: unknown param")


def test_required_param_missing_in_an_item(offline_workspace: Workspace) -> None:
    offline_workspace.unit("echo", ECHO_UNIT)
    offline_workspace.job("a", unit="echo", items=[{"table": "t1"}, {"limit": 3}])
    assert_config_error(offline_workspace, "a.yaml: items[1]: table: required param")


@pytest.mark.parametrize("name", ['public."x; DROP TABLE y"', "x; DROP TABLE y", "a'b", "a.b.c", "t--", " t"])
def test_hostile_table_names_are_refused(offline_workspace: Workspace, name: str) -> None:
    offline_workspace.unit("echo", ECHO_UNIT)
    offline_workspace.job("a", unit="echo", params={"table": name})
    assert_config_error(offline_workspace, "a.yaml: table:", "table name")


def test_environment_overrides_the_file(offline_workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAINTAINER_TARGETS__APP__DSN", "postgresql://other@127.0.0.1:5/db")
    monkeypatch.setenv("MAINTAINER_DEFAULTS__LOCK_TIMEOUT", "750ms")
    settings = load_settings(offline_workspace.config)
    assert settings.targets["app"].conninfo() == "postgresql://other@127.0.0.1:5/db"
    assert settings.defaults.lock_timeout == timedelta(milliseconds=750)
    assert settings.jobs_dir == offline_workspace.root / "jobs"


def test_dsn_is_never_printed(offline_workspace: Workspace) -> None:
    offline_workspace.write_config(targets={"app": {"dsn": "postgresql://u:hunter2@127.0.0.1:1/x"}}, colour=1)
    text = assert_config_error(offline_workspace, "colour: unknown key")
    assert "hunter2" not in text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2),
        ("5min", 300),
        ("1h", 3600),
        ("7 days", 604800),
        ("PT5M", 300),
        (3, 3),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("100MB", 100 * 1024**2), ("1GB", 1024**3), ("512kB", 512 * 1024), (42, 42)]
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "min", "h", " days"]))
def test_duration_round_trip(amount: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, " days": 86400}[unit]
    assert parse_duration(f"{amount}{unit}") == timedelta(seconds=amount * factor)


def test_windows_wrap_midnight() -> None:
    from datetime import time

    night = Window.parse("22:00-02:00")
    assert night.contains(time(23, 30)) and night.contains(time(1, 59))
    assert not night.contains(time(2, 0)) and not night.contains(time(12, 0))
    with pytest.raises(ValueError):
        Window.parse("25:00-01:00")


def test_secret_files_are_relative_to_the_config_file(offline_workspace: Workspace) -> None:
    (offline_workspace.root / "secrets").mkdir()
    (offline_workspace.root / "secrets" / "dsn").write_text("postgresql://u@127.0.0.1:1/x\n")
    offline_workspace.write_config(
        targets={"app": {"dsn_file": "secrets/dsn"}}, http={"trigger_token_file": "secrets/token"}
    )
    settings = load_settings(offline_workspace.config)
    assert settings.targets["app"].conninfo() == "postgresql://u@127.0.0.1:1/x"
    assert settings.http.trigger_token_file == offline_workspace.root / "secrets" / "token"

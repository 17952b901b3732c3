"""`maintainer report`: the newest findings from the ledger, grouped by unit, worst first."""

from __future__ import annotations

import json

from tests.conftest import Database, Workspace

FLAGS_UNIT = """---
description: a toy health check with its own levels
params:
  table: {type: table, required: true}
metrics:
  maintainer_toy_score: {value: score, labels: [name]}
alerts:
  level: level
  key: [name]
  message: "{name} scores {score}"
---
{% block discover %}
SELECT name, score, CASE WHEN score > 5 THEN 'critical' ELSE 'ok' END AS level, false AS action
  FROM {{ params.table | ident }} ORDER BY name
{% endblock %}
"""


def test_report_shows_the_worst_first_from_the_ledger(workspace: Workspace, db: Database) -> None:
    db.run_script(
        "CREATE TABLE accounts (id serial PRIMARY KEY); CREATE TABLE events (id serial PRIMARY KEY);"
        "CREATE TABLE scores (name text, score int); INSERT INTO scores VALUES ('a', 1), ('b', 9);"
        "SELECT setval('events_id_seq', 1500000000);"  # 70%: warn
    )
    workspace.unit("toy", FLAGS_UNIT)
    workspace.job("headroom", unit="sequences")
    workspace.job("toy", unit="toy", params={"table": "scores"})
    empty = workspace.cli("report")
    assert empty.exit_code == 0 and "no findings recorded yet" in empty.output
    for job in ("headroom", "toy"):
        assert workspace.cli("trigger", job).exit_code == 0
    # A newer run replaces the older one's findings.
    db.execute("SELECT setval('events_id_seq', 1600000000)")
    assert workspace.cli("trigger", "headroom").exit_code == 0

    result = workspace.cli("report", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["targets"] == {"app": "ok"}
    assert [s["unit"] for s in report["sections"]] == ["toy", "sequences"]  # a critical outranks a warn
    toy, sequences = report["sections"]
    assert [(f["level"], f["message"]) for f in toy["findings"]] == [("critical", "b scores 9"), ("ok", "a scores 1")]
    assert toy["counts"] == {"critical": 1, "ok": 1}
    first = sequences["findings"][0]
    assert first["level"] == "warn" and first["finding"]["column"] == "public.events.id"
    assert first["values"]["used_ratio"] > 0.74
    assert first["message"].startswith("public.events.id uses 75% of its range")
    assert [f["level"] for f in sequences["findings"]] == ["warn", "ok"]

    text = workspace.cli("report")
    assert text.exit_code == 0
    lines = text.output.splitlines()
    assert any("toy" in line and "1 critical" in line for line in lines)
    assert lines.index(next(line for line in lines if line.startswith("toy"))) < \
        lines.index(next(line for line in lines if line.startswith("sequences")))
    assert "74.5%" in text.output or "74.4%" in text.output or "74.6%" in text.output
    assert "b scores 9" in text.output


def test_report_limits_rows_and_names_unreachable_targets(workspace: Workspace, db: Database) -> None:
    db.run_script("".join(f"CREATE TABLE t{i} (id serial PRIMARY KEY);" for i in range(5)))
    workspace.job("headroom", unit="sequences", targets=["app"])
    workspace.write_config(targets={"app": {"dsn": db.dsn}, "gone": {"dsn": "postgresql://u:pw@127.0.0.1:1/x"}})
    assert workspace.cli("trigger", "headroom").exit_code == 0
    result = workspace.cli("report", "-n", "2")
    assert result.exit_code == 1  # a target could not be read
    assert "target gone: unreachable" in result.output and ":pw@" not in result.output
    assert "… 3 more" in result.output

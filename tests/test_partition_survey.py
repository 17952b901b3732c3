"""The `partitions` survey against the full discovery it stands in for, over the same real catalog.

The survey may vouch for a table only when a full run would find no step and report level `ok`;
then the finding it records must be the one the full run would have recorded.
"""

from __future__ import annotations

import json
from typing import Any

from maintainer.db import advisory_key
from maintainer.project import load_project
from maintainer.runner import RunOptions, run, run_all
from maintainer.session import Session
from maintainer.survey import survey_items
from tests.conftest import Database, Workspace
from tests.test_partitions import month, monthly_table, suffix

# name -> (item params beyond the table, whether the survey may vouch for it)
STATES: dict[str, tuple[dict[str, Any], bool]] = {
    "steady": ({"interval": "1 month"}, True),
    "steady_default": ({"interval": "1 month"}, True),
    "steady_retention": ({"interval": "1 month", "retention": "12 months"}, True),
    "steady_weekly": ({"interval": "1 week", "premake": 3}, True),
    "steady_daily_date": ({"interval": "1 day", "premake": 2}, True),
    "beyond_premake": ({"interval": "1 month", "premake": 2}, True),
    "open_ended": ({"interval": "1 month", "retention": "1 month"}, True),  # MINVALUE and MAXVALUE bounds
    "short": ({"interval": "1 month"}, False),  # one month missing at the end
    "gap": ({"interval": "1 month"}, False),  # a hole next month
    "expired": ({"interval": "1 month", "retention": "12 months"}, False),
    "default_rows": ({"interval": "1 month"}, False),
    "leftover": ({"interval": "1 month"}, False),  # a helper CHECK of an interrupted creation
    "orphaned": ({"interval": "1 month"}, False),  # a marked table whose DROP never ran
    "few_ahead": ({"interval": "1 month", "premake": 1}, False),  # level warn: fewer than 2 ahead
    "by_id": ({"interval": 1000}, False),  # integer key: its largest key must be read
    "plain": ({"interval": "1 month"}, False),  # not partitioned: the full run fails it
    "bad_interval": ({"interval": "2 hours"}, False),
}


def build_states(db: Database) -> None:
    for name in ("steady", "steady_retention", "default_rows", "leftover", "orphaned"):
        monthly_table(db, name, range(-3, 5), default=name == "default_rows")
    monthly_table(db, "short", range(-3, 4))
    monthly_table(db, "few_ahead", range(-3, 2))
    monthly_table(db, "steady_default", range(-3, 5), default=True)
    monthly_table(db, "beyond_premake", range(0, 8))
    monthly_table(db, "open_ended", range(-1, 3), extra=f"""
        CREATE TABLE open_ended_low PARTITION OF open_ended FOR VALUES FROM (MINVALUE) TO ('{month(-1):%Y-%m-%d}');
        CREATE TABLE open_ended_high PARTITION OF open_ended FOR VALUES FROM ('{month(3):%Y-%m-%d}') TO (MAXVALUE);
    """)
    monthly_table(db, "gap", [*range(-3, 1), *range(2, 5)])  # type: ignore[arg-type]
    monthly_table(db, "expired", range(-15, 5))
    db.run_script(f"""
        CREATE TABLE steady_weekly (k timestamptz NOT NULL) PARTITION BY RANGE (k);
        CREATE TABLE steady_daily_date (k date NOT NULL) PARTITION BY RANGE (k);
        CREATE TABLE by_id (id bigint NOT NULL) PARTITION BY RANGE (id);
        CREATE TABLE by_id_p0 PARTITION OF by_id FOR VALUES FROM (0) TO (100000);
        CREATE TABLE plain (id int, created_at timestamptz);
        CREATE TABLE bad_interval (k timestamptz NOT NULL) PARTITION BY RANGE (k);
        INSERT INTO default_rows (workspace_id, created_at) VALUES (1, '2001-01-01 00:00+00');
        ALTER TABLE leftover{suffix(month(2))} ADD CONSTRAINT maintainer_bounds_0123456789 CHECK (true);
        CREATE TABLE orphaned_p20000101 (LIKE orphaned);
        COMMENT ON TABLE orphaned_p20000101 IS
            'pg-maintainer: retiring partition of public.orphaned FROM (x) TO (y); dropped once detached';
    """)


def test_the_survey_vouches_exactly_for_the_tables_a_full_run_leaves_alone(workspace: Workspace, db: Database) -> None:
    build_states(db)
    items = [{"table": f"public.{name}", **params} for name, (params, _) in STATES.items()]
    workspace.job("partitions", unit="partitions", items=items)
    # the steady tables get their partitions the normal way first (weekly and daily start empty)
    workspace.job("setup", unit="partitions",
                  items=[item for item in items if str(item["table"]).startswith("public.steady")])
    assert all(r["status"] == "ok" for r in json.loads(workspace.cli("trigger", "setup", "--json").output)["runs"])

    project = load_project(str(workspace.config))
    specs = project.run_specs(project.job("partitions"))
    with Session() as session:
        vouched = survey_items(specs, RunOptions(), session)
    expected = {i for i, (_, idle) in enumerate(STATES.values()) if idle}
    assert set(vouched) == expected, sorted(list(STATES)[i] for i in set(vouched) ^ expected)

    for index, spec in enumerate(specs):
        full = run(spec, RunOptions(dry_run=True))  # no survey: prepare, discover, report
        if index in vouched:
            assert full.actions == [] and full.status == "planned", spec.item_label
            assert [vouched[index]] == full.findings, spec.item_label
        else:
            assert full.actions or full.status == "failed" or full.findings[0]["level"] != "ok", spec.item_label


def test_surveyed_items_are_recorded_and_still_yield_to_a_running_item(workspace: Workspace, db: Database) -> None:
    monthly_table(db, "calm", range(-1, 5))
    monthly_table(db, "busy", range(-1, 5))
    workspace.job("partitions", unit="partitions",
                  items=[{"table": f"public.{name}", "interval": "1 month"} for name in ("calm", "busy")])
    project = load_project(str(workspace.config))
    specs = project.run_specs(project.job("partitions"))
    # a run of `busy` in progress elsewhere holds its lock; an earlier run of `calm` died mid-way
    holder = db.connect()
    holder.execute("SELECT pg_advisory_lock(%s)", (advisory_key("partitions", "app", "public.busy"),))
    first = run_all(specs, RunOptions())
    assert [r.status for r in first] == ["ok", "skipped"]
    db.execute("UPDATE maintainer.run SET status = 'running', finished_at = NULL WHERE id = %s", (first[0].run_id,))
    holder.close()

    results = run_all(specs, RunOptions(trigger="schedule"))
    assert [r.status for r in results] == ["ok", "ok"] and all(r.actions == [] for r in results)
    rows = db.execute(
        "SELECT r.item, r.status, r.trigger, f.level, f.data->>'partitions_ahead' FROM maintainer.run r"
        " LEFT JOIN maintainer.finding f ON f.run_id = r.id WHERE r.id >= %s ORDER BY r.id",
        (first[0].run_id,),
    )
    assert rows == [
        ("public.calm", "interrupted", "manual", "ok", "4"),
        ("public.busy", "skipped", "manual", None, None),
        ("public.calm", "ok", "schedule", "ok", "4"),
        ("public.busy", "ok", "schedule", "ok", "4"),
    ]

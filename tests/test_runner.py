"""The engine against a real PostgreSQL: runs, ledger, locks, retries, dry runs, hostile input."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

from tests.conftest import Database, Workspace, release_after_the_first_timeout

COUNTER_UNIT = """---
description: bump a counter per pending row
params:
  table: {type: table, required: true}
---
{% block discover %}
SELECT id, note FROM {{ params.table | ident }} WHERE NOT done ORDER BY id
{% endblock %}
{% block apply %}
UPDATE {{ params.table | ident }} SET done = true WHERE id = {{ row.id | bind }};
{% endblock %}
{% block verify %}
SELECT id FROM {{ params.table | ident }} WHERE NOT done
{% endblock %}
"""


BATCHED_UNIT = """---
description: keyset batches, each carrying the last key to the next in `prev`
repeat: until_zero_rows
params:
  batch: {type: integer, default: 1000}
---
{% block discover %}
SELECT count(*) AS estimate FROM items WHERE NOT done
{% endblock %}
{% block apply %}
WITH batch AS (
  SELECT id FROM items
  WHERE NOT done AND id > {{ (prev.last_id if prev else 0) | bind }}
  ORDER BY id LIMIT {{ params.batch | bind }}
), done AS (
  UPDATE items SET done = true FROM batch WHERE items.id = batch.id RETURNING items.id
)
SELECT count(*)::int AS rows, max(id) AS last_id FROM done;
{% endblock %}
"""


def make_items(db: Database, rows: int = 3) -> None:
    db.run_script(
        "CREATE TABLE items (id int PRIMARY KEY, note text, done bool NOT NULL DEFAULT false);"
        f"INSERT INTO items (id, note) SELECT g, 'n' || g FROM generate_series(1, {rows}) g;"
    )


def catalog_snapshot(db: Database) -> str:
    """Everything a maintenance run could change: relations, columns, constraints, options, data, sequences."""
    rows = db.execute(
        """
        SELECT json_build_object(
          'namespaces', (SELECT json_agg(nspname ORDER BY nspname) FROM pg_namespace),
          'classes', (SELECT json_agg(json_build_array(n.nspname, c.relname, c.relkind, c.relfilenode,
                                                       c.reloptions, c.relpersistence, c.relispartition)
                                      ORDER BY n.nspname, c.relname)
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace),
          'attributes', (SELECT json_agg(json_build_array(attrelid::regclass::text, attname, atttypid, attnotnull)
                                         ORDER BY attrelid, attnum) FROM pg_attribute WHERE attrelid >= 16384),
          'constraints', (SELECT json_agg(json_build_array(conname, pg_get_constraintdef(oid)) ORDER BY conname)
                          FROM pg_constraint WHERE connamespace NOT IN (11, 99)),
          'indexes', (SELECT json_agg(json_build_array(indexrelid::regclass::text, indisvalid) ORDER BY 1)
                      FROM pg_index WHERE indexrelid >= 16384),
          'sequences', (SELECT json_agg(json_build_array(schemaname, sequencename, last_value) ORDER BY 1, 2)
                        FROM pg_sequences),
          'data', (SELECT json_agg(json_build_array(id, note, done) ORDER BY id) FROM items)
        )::text
        """
    )
    return str(rows[0][0])


def test_trigger_runs_steps_verifies_and_records_the_ledger(workspace: Workspace, db: Database) -> None:
    make_items(db)
    workspace.unit("counter", COUNTER_UNIT)
    workspace.job("count", unit="counter", params={"table": "items"})
    result = workspace.cli("trigger", "count", "--json")
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)["runs"][0]
    assert run["status"] == "ok" and run["error"] is None
    assert [f["id"] for f in run["findings"]] == [1, 2, 3]
    assert [a["rows"] for a in run["actions"]] == [1, 1, 1]
    assert all(a["sql"] == 'UPDATE "public"."items" SET done = true WHERE id = $1' for a in run["actions"])
    assert db.execute("SELECT count(*) FROM items WHERE NOT done") == [(0,)]
    ledger = db.execute("SELECT job, unit, target, item, status, trigger FROM maintainer.run")
    assert ledger == [("count", "counter", "app", None, "ok", "manual")]
    assert db.execute("SELECT count(*) FROM maintainer.action") == [(3,)]
    assert db.execute("SELECT count(*) FROM maintainer.finding") == [(3,)]

    again = json.loads(workspace.cli("trigger", "count", "--json").output)["runs"][0]
    assert again["status"] == "ok" and again["actions"] == [] and again["findings"] == []

    history = json.loads(workspace.cli("history", "count", "--json").output)["runs"]
    assert [h["status"] for h in history] == ["ok", "ok"]
    assert history[0]["triggered_by"]


MERGING_UNIT = """---
description: mark items done; the report says which, merged into the findings
params:
  table: {type: table, required: true}
report: {merge_on: [id], omit: [action]}
---
{% block discover %}
SELECT id, label, id < 3 AS action FROM {{ params.table | ident }} ORDER BY id
{% endblock %}
{% block apply %}
UPDATE {{ params.table | ident }} SET done = true WHERE id = {{ row.id | bind }}
{% endblock %}
{% block report %}
SELECT s.id, s.status AS outcome
  FROM unnest({{ steps | map(attribute='row.id') | list | bind }}::int[],
              {{ steps | map(attribute='status') | list | bind }}::text[]) AS s (id, status)
UNION ALL
SELECT 99, 'noticed'
{% endblock %}
"""


def test_a_report_merged_on_a_key_changes_only_what_it_returns(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE TABLE items (id int PRIMARY KEY, label text, done boolean NOT NULL DEFAULT false);"
                  "INSERT INTO items (id, label) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    workspace.unit("merging", MERGING_UNIT)
    workspace.job("merge", unit="merging", params={"table": "items"})
    result = workspace.cli("trigger", "merge", "--json")
    assert result.exit_code == 0, result.output
    findings = json.loads(result.output)["runs"][0]["findings"]
    # discover's values and types stay; the step rows get their outcome; a row matching no
    # finding is one of its own; `action` is left out; every finding has every column
    assert findings == [
        {"id": 1, "label": "a", "outcome": "ok"},
        {"id": 2, "label": "b", "outcome": "ok"},
        {"id": 3, "label": "c", "outcome": None},
        {"id": 99, "label": None, "outcome": "noticed"},
    ]
    assert db.execute("SELECT id FROM items WHERE done ORDER BY id") == [(1,), (2,)]
    planned = json.loads(workspace.cli("trigger", "merge", "--dry-run", "--json").output)["runs"][0]["findings"]
    assert [f["outcome"] for f in planned] == ["planned", "planned", None, "noticed"]


def test_plan_and_dry_run_leave_the_catalog_unchanged(workspace: Workspace, db: Database) -> None:
    make_items(db)
    db.run_script("CREATE SEQUENCE s; SELECT nextval('s');")
    workspace.unit("counter", COUNTER_UNIT)
    workspace.unit(
        "ddl",
        """---
description: DDL that must not run in a dry run
transaction: none
---
{% block apply %}
CREATE INDEX CONCURRENTLY items_note ON items (note);
SELECT nextval('s');
DROP TABLE items;
{% endblock %}
""",
    )
    workspace.job("count", unit="counter", params={"table": "items"})
    workspace.job("ddl", unit="ddl")
    before = catalog_snapshot(db)
    plan = workspace.cli("plan", "count")
    assert plan.exit_code == 0, plan.output
    assert 'UPDATE "public"."items" SET done = true WHERE id = $1;' in plan.output
    for job in ("count", "ddl"):
        result = json.loads(workspace.cli("trigger", job, "--dry-run", "--json").output)["runs"][0]
        assert result["status"] == "planned"
        assert all(a["status"] == "planned" for a in result["actions"])
    assert catalog_snapshot(db) == before
    assert db.execute("SELECT to_regnamespace('maintainer')") == [(None,)]


def test_a_missing_table_fails_clearly_and_changes_nothing(workspace: Workspace, db: Database) -> None:
    make_items(db)
    workspace.unit("counter", COUNTER_UNIT)
    workspace.job("count", unit="counter", items=[{"table": "nope"}, {"table": "items"}])
    result = workspace.cli("trigger", "count", "--json")
    assert result.exit_code == 1
    runs = json.loads(result.output)["runs"]
    assert runs[0]["status"] == "failed"
    assert runs[0]["error"] == "table: table public.nope does not exist on target 'app'"
    assert runs[1]["status"] == "ok"  # one bad item never stops the others


def test_hostile_arg_is_bound_never_interpolated(workspace: Workspace, db: Database) -> None:
    db.run_script(
        "CREATE TABLE people (id bigint PRIMARY KEY, email text);"
        "INSERT INTO people VALUES (1, 'a@example.com'), (2, 'b@example.com');"
    )
    workspace.unit(
        "forget",
        """---
description: erase one person
---
{% block apply %}
UPDATE people SET email = NULL WHERE email = {{ args.email | bind }};
{% endblock %}
""",
    )
    workspace.unit(
        "forget_id",
        """---
description: erase one person by id
---
{% block apply %}
UPDATE people SET email = NULL WHERE id = {{ args.id | bind }};
{% endblock %}
""",
    )
    workspace.job("forget", unit="forget")
    workspace.job("forget-id", unit="forget_id")
    hostile = "x' OR '1'='1"
    result = json.loads(workspace.cli("trigger", "forget", "--arg", f"email={hostile}", "--json").output)["runs"][0]
    assert result["status"] == "ok" and result["actions"][0]["rows"] == 0
    typed = workspace.cli("trigger", "forget-id", "--arg", f"id={hostile}", "--json")
    assert typed.exit_code == 1
    failed = json.loads(typed.output)["runs"][0]
    assert failed["sqlstate"] == "22P02" and hostile not in failed["error"]
    assert db.execute("SELECT count(*) FROM people WHERE email IS NOT NULL") == [(2,)]
    stored = db.execute("SELECT string_agg(coalesce(error, '') || params::text, ' ') FROM maintainer.run")[0][0]
    stored += db.execute("SELECT string_agg(sql, ' ') FROM maintainer.action")[0][0]
    assert hostile not in stored and "OR '1'" not in stored
    missing = workspace.cli("trigger", "forget", "--json")
    assert json.loads(missing.output)["runs"][0]["error"].endswith("'dict object' has no attribute 'email'")


def test_transient_lock_timeouts_are_retried_logic_errors_are_not(workspace: Workspace, db: Database) -> None:
    make_items(db)
    workspace.write_config(defaults={"lock_timeout": "200ms", "retry_backoff": "400ms", "max_attempts": 5})
    workspace.unit(
        "locker",
        """---
description: needs a strong lock briefly
---
{% block apply %}
LOCK TABLE items IN ACCESS EXCLUSIVE MODE;
UPDATE items SET done = true;
{% endblock %}
""",
    )
    workspace.unit(
        "broken",
        """---
description: a logic error
---
{% block apply %}
SELECT 1 / 0;
{% endblock %}
""",
    )
    workspace.job("locker", unit="locker")
    workspace.job("broken", unit="broken")
    holder = db.connect()
    holder.autocommit = False
    holder.execute("LOCK TABLE items IN ACCESS SHARE MODE")

    releaser = release_after_the_first_timeout(db, holder, "items")
    run = json.loads(workspace.cli("trigger", "locker", "--json").output)["runs"][0]
    releaser.join()
    holder.close()
    assert run["status"] == "ok", run
    assert run["actions"][0].get("attempts", 1) >= 2
    assert db.execute("SELECT bool_and(done) FROM items") == [(True,)]
    assert db.execute("SELECT attempts FROM maintainer.run WHERE job = 'locker'")[0][0] >= 2

    broken = json.loads(workspace.cli("trigger", "broken", "--json").output)["runs"][0]
    assert broken["status"] == "failed" and broken["sqlstate"] == "22012"
    assert db.execute("SELECT attempts FROM maintainer.run WHERE job = 'broken'") == [(1,)]


def test_two_concurrent_triggers_one_runs_one_is_skipped(workspace: Workspace, db: Database) -> None:
    workspace.unit(
        "slow",
        """---
description: holds its lock for a while
---
{% block apply %}
SELECT pg_sleep(3);
{% endblock %}
""",
    )
    workspace.job("slow", unit="slow")
    command = [sys.executable, "-m", "maintainer.cli", "trigger", "slow", "--json", "--config", str(workspace.config)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    while not db.execute("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"):
        assert time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.05)
    second = subprocess.run(command, stdout=subprocess.PIPE, env=env, timeout=60)
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert second.returncode == 3
    skipped = json.loads(second.stdout)["runs"][0]
    assert skipped["status"] == "skipped" and "another runner holds the lock" in skipped["reason"]
    assert sorted(r[0] for r in db.execute("SELECT status FROM maintainer.run")) == ["ok", "skipped"]


def test_repeat_until_zero_rows_paginates_with_prev(workspace: Workspace, db: Database) -> None:
    make_items(db, rows=2500)
    workspace.unit("batched", BATCHED_UNIT + """{% block report %}
SELECT {{ steps | map(attribute='batches') | list | bind }}::int[] AS batches,
       {{ steps | map(attribute='rows') | list | bind }}::int[] AS rows
{% endblock %}
""")
    workspace.job("batched", unit="batched")
    run = json.loads(workspace.cli("trigger", "batched", "--json").output)["runs"][0]
    assert run["status"] == "ok"
    assert run["actions"][0]["iterations"] == 4  # 1000 + 1000 + 500 + the empty batch that stops it
    assert run["actions"][0]["rows"] == 2500
    assert run["findings"] == [{"batches": [3], "rows": [2500]}]  # the empty last batch is not counted
    assert db.execute("SELECT count(*) FROM items WHERE NOT done") == [(0,)]


def test_concurrently_needs_autocommit_and_gets_it(workspace: Workspace, db: Database) -> None:
    make_items(db)
    workspace.unit(
        "idx",
        """---
description: build an index without blocking writers
transaction: none
---
{% block apply %}
CREATE INDEX CONCURRENTLY IF NOT EXISTS items_note ON items (note);
{% endblock %}
""",
    )
    workspace.job("idx", unit="idx")
    run = json.loads(workspace.cli("trigger", "idx", "--json").output)["runs"][0]
    assert run["status"] == "ok", run
    assert db.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_note'::regclass") == [(True,)]


def test_interrupted_runs_are_marked_by_the_next_holder(workspace: Workspace, db: Database) -> None:
    workspace.unit("slow", "---\ndescription: x\n---\n{% block apply %}\nSELECT pg_sleep(30);\n{% endblock %}\n")
    workspace.unit("fast", "---\ndescription: x\n---\n{% block apply %}\nSELECT 1;\n{% endblock %}\n")
    workspace.job("slow", unit="slow")
    command = [sys.executable, "-m", "maintainer.cli", "trigger", "slow", "--config", str(workspace.config)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while not db.execute("SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%'"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.kill()
    victim.wait()
    db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%'")
    assert db.execute("SELECT status FROM maintainer.run") == [("running",)]
    workspace.job("slow", unit="fast")  # same job name → same lock; the next run cleans up
    assert workspace.cli("trigger", "slow").exit_code == 0
    assert sorted(r[0] for r in db.execute("SELECT status FROM maintainer.run")) == ["interrupted", "ok"]


def test_ledger_purges_old_runs(workspace: Workspace, db: Database) -> None:
    workspace.unit("fast", "---\ndescription: x\n---\n{% block apply %}\nSELECT 1;\n{% endblock %}\n")
    workspace.job("fast", unit="fast")
    assert workspace.cli("trigger", "fast").exit_code == 0
    db.execute("UPDATE maintainer.run SET started_at = now() - interval '200 days'")
    assert workspace.cli("trigger", "fast").exit_code == 0
    assert db.execute("SELECT count(*) FROM maintainer.run") == [(1,)]


def test_check_renders_every_job_and_reports_problems(workspace: Workspace, db: Database) -> None:
    make_items(db)
    workspace.unit("counter", COUNTER_UNIT)
    workspace.job("count", unit="counter", params={"table": "items"})
    workspace.job("missing", unit="counter", params={"table": "ghost"})
    result = workspace.cli("check")
    assert result.exit_code == 2, result.output
    assert "table public.ghost does not exist" in result.output
    assert "connected: PostgreSQL" in result.output
    workspace.job("missing", unit="counter", params={"table": "items"})
    assert workspace.cli("check").exit_code == 0


def test_unreachable_target_is_a_failed_run_without_secrets(workspace: Workspace) -> None:
    workspace.write_config(targets={"app": {"dsn": "postgresql://u:hunter2@127.0.0.1:1/x"}})
    workspace.unit("fast", "---\ndescription: x\n---\n{% block apply %}\nSELECT 1;\n{% endblock %}\n")
    workspace.job("fast", unit="fast")
    result = workspace.cli("trigger", "fast", "--json")
    assert result.exit_code == 1
    assert "hunter2" not in result.output
    assert "unreachable" in json.loads(result.output)["runs"][0]["error"]


def test_direct_connection_is_named(db: Database) -> None:
    from maintainer import db as dbmod

    with dbmod.connect(db.dsn, application_name="pg-maintainer test") as conn:
        row = conn.execute("SELECT current_setting('application_name') AS name").fetchone()
        assert row is not None and row["name"] == "pg-maintainer test"
    assert isinstance(conn, psycopg.Connection)


def test_nothing_runs_on_a_replica_in_recovery(tmp_path: Path) -> None:
    from maintainer.pgserver import LocalCluster, available_kinds
    from tests.conftest import Workspace

    kind = available_kinds()[0]
    with LocalCluster(kind) as cluster:
        cluster.restart_as_standby()
        ws = Workspace(tmp_path, cluster.dsn())
        (tmp_path / "jobs").mkdir()
        (tmp_path / "templates").mkdir()
        ws.write_config()
        ws.unit("fast", "---\ndescription: x\n---\n{% block apply %}\nSELECT 1;\n{% endblock %}\n")
        ws.job("fast", unit="fast")
        result = ws.cli("trigger", "fast", "--json")
        assert result.exit_code == 3, result.output
        run = json.loads(result.output)["runs"][0]
        assert run["status"] == "skipped" and "replica in recovery" in run["reason"]


def test_a_user_unit_overrides_the_builtin_of_the_same_name(workspace: Workspace, db: Database) -> None:
    mine = "---\ndescription: mine\n---\n{% block discover %}\nSELECT 'mine' AS who\n{% endblock %}\n"
    workspace.unit("sequences", mine)
    workspace.job("sequences", unit="sequences")
    run = json.loads(workspace.cli("trigger", "sequences", "--json").output)["runs"][0]
    assert run["findings"] == [{"who": "mine"}]


def test_a_failed_step_rolls_back_as_a_whole(workspace: Workspace, db: Database) -> None:
    make_items(db)
    workspace.unit(
        "half",
        """---
description: second statement fails
---
{% block apply %}
UPDATE items SET done = true;
SELECT 1 / 0;
{% endblock %}
""",
    )
    workspace.job("half", unit="half")
    run = json.loads(workspace.cli("trigger", "half", "--json").output)["runs"][0]
    assert run["status"] == "failed"
    assert [a["status"] for a in run["actions"]] == ["skipped", "failed"]
    assert db.execute("SELECT count(*) FROM items WHERE done") == [(0,)]


def test_jobs_lists_schedule_next_run_and_last_result(workspace: Workspace, db: Database) -> None:
    workspace.unit("fast", "---\ndescription: x\n---\n{% block apply %}\nSELECT 1;\n{% endblock %}\n")
    workspace.job("nightly", unit="fast", schedule="@daily", window="01:00-05:00")
    workspace.job("manual", unit="fast")
    assert workspace.cli("trigger", "nightly").exit_code == 0
    rows = {r["job"]: r for r in json.loads(workspace.cli("jobs", "--json").output)["jobs"]}
    assert rows["nightly"]["schedule"] == "@daily" and rows["nightly"]["next_run"].endswith("T00:00:00+00:00")
    assert rows["nightly"]["last_status"] == "ok"
    assert rows["manual"]["next_run"] is None and rows["manual"]["last_status"] is None
    human = workspace.cli("jobs")
    assert "nightly" in human.output and "never run" in human.output


def test_progress_is_reported_per_batch(workspace: Workspace, db: Database) -> None:
    from maintainer.project import load_project
    from maintainer.runner import Progress, RunOptions, run

    make_items(db, rows=50)
    workspace.unit("batched", BATCHED_UNIT)
    workspace.job("batched", unit="batched", params={"batch": 20})
    project = load_project(str(workspace.config))
    seen: list[Progress] = []
    result = run(project.run_specs(project.job("batched"))[0], RunOptions(progress=seen.append))
    assert result.status == "ok"
    assert [(p.iterations, p.rows, p.estimate) for p in seen] == [(1, 20, 50), (2, 40, 50), (3, 50, 50), (4, 50, 50)]


def test_check_dry_runs_manual_jobs_with_null_arguments(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE TABLE people (id bigint PRIMARY KEY, email text)")
    workspace.unit("forget", """---
description: erase one person
---
{% block discover %}
SELECT count(*) AS matching FROM people WHERE id = {{ args.user_id | bind }}
{% endblock %}
{% block apply %}
UPDATE people SET email = NULL WHERE id = {{ args.user_id | bind }};
{% endblock %}
""")
    workspace.job("forget", unit="forget")
    result = workspace.cli("check")
    assert result.exit_code == 0, result.output
    assert "job forget on app" in result.output


def test_items_share_a_session_but_not_its_settings_or_locks(workspace: Workspace, db: Database) -> None:
    workspace.unit("probe", """---
description: report the backend, then change a session setting
params:
  n: {type: integer, required: true}
---
{% block discover %}
SELECT pg_backend_pid() AS pid, current_setting('work_mem') AS work_mem,
       current_setting('lock_timeout') AS lock_timeout,
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory_locks,
       1 / ({{ params.n | bind }}::int - 2) AS boom
{% endblock %}
{% block apply %}
SET work_mem = '77MB';
{% endblock %}
""")
    workspace.job("probe", unit="probe", timeouts={"lock": "1500ms"}, items=[{"n": 1}, {"n": 2}, {"n": 3}])
    runs = json.loads(workspace.cli("trigger", "probe", "--json").output)["runs"]
    assert [r["status"] for r in runs] == ["ok", "failed", "ok"]  # the middle item divides by zero, alone
    first, third = runs[0]["findings"][0], runs[2]["findings"][0]
    assert first["pid"] == third["pid"]  # one backend for the items of a (job, target)
    assert first["work_mem"] == third["work_mem"] != "77MB"  # the first item's SET did not leak
    assert third["lock_timeout"] == "1500ms"
    assert first["advisory_locks"] == third["advisory_locks"] == 1  # each item holds only its own lock
    assert db.execute("SELECT count(*) FROM maintainer.run") == [(3,)]


def test_a_session_whose_backend_ended_between_items_is_replaced(workspace: Workspace, db: Database) -> None:
    # A run releases its lock and resets the session's settings in one round trip, so the next item
    # does not ask again; but a backend that ended in between (a restart, a failover, a terminated
    # session) must still be noticed before the next item runs on it.
    from maintainer.project import load_project
    from maintainer.runner import RunOptions, run, run_all

    workspace.unit("whoami", """---
description: report the backend
params:
  n: {type: integer, required: true}
---
{% block discover %}
SELECT pg_backend_pid() AS pid, {{ params.n | bind }}::int AS n
{% endblock %}
""")
    workspace.job("whoami", unit="whoami", items=[{"n": 1}, {"n": 2}, {"n": 3}])
    project = load_project(str(workspace.config))

    def terminate_after_the_first(spec, options, *, session=None, surveyed=None):  # type: ignore[no-untyped-def]
        result = run(spec, options, session=session, surveyed=surveyed)
        if spec.params["n"] == 1:
            pid = result.findings[0]["pid"]
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + 10
            while db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) != [(0,)]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        return result

    results = run_all(project.run_specs(project.job("whoami")), RunOptions(), runner=terminate_after_the_first)
    assert [r.status for r in results] == ["ok", "ok", "ok"], [r.error for r in results]
    pids = [r.findings[0]["pid"] for r in results]
    assert pids[0] != pids[1] == pids[2]  # a new backend for the second item, kept for the third


def test_a_backend_that_ends_right_after_the_ledger_record_is_replaced(workspace: Workspace, db: Database) -> None:
    # A restart or failover can land between any two queries of a run: also between its ledger
    # record and its first look at the catalog (extensions, the ledger, the tables it names). The
    # run takes a new connection and its lock again, as it does for its blocks' own queries.
    from maintainer.project import load_project
    from maintainer.runner import RunOptions, run

    workspace.unit("whoami", """---
description: report the backend
---
{% block discover %}
SELECT pg_backend_pid() AS pid
{% endblock %}
""")
    workspace.job("whoami", unit="whoami")
    project = load_project(str(workspace.config))
    backends: list[int] = []  # the work connection's, as each is made

    def terminate_the_work_backend(ledger: object) -> None:
        pid = backends[-1]
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) != [(0,)]:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    spec = project.run_specs(project.job("whoami"))[0]
    result = run(spec, RunOptions(on_connect=lambda conn: backends.append(conn.info.backend_pid),
                                  on_locked=terminate_the_work_backend))
    assert result.status == "ok", result.error
    assert len(backends) == 2 and result.findings[0]["pid"] == backends[1]
    assert db.execute("SELECT status FROM maintainer.run") == [("ok",)]


def numbered_unit(workspace: Workspace, name: str, apply: str) -> None:
    """A unit whose items are numbered (`n`), finding one row each and running `apply` as its step."""
    workspace.unit(name, f"""---
description: a numbered item and its step
params:
  n: {{type: integer, required: true}}
---
{{% block discover %}}
SELECT {{{{ params.n | bind }}}}::int AS n
{{% endblock %}}
{{% block apply %}}
{apply.strip()}
{{% endblock %}}
""")


def test_lanes_overlap_items_but_their_steps_take_turns(workspace: Workspace, db: Database) -> None:
    # `lanes: 2`: two sessions work through the items, in order; a step of one never runs while a
    # step of the other does (each step notes when it ran, on which backend).
    from maintainer.project import load_project
    from maintainer.runner import RunOptions, run_all

    db.execute("CREATE TABLE turns (item int, pid int, started timestamptz, ended timestamptz)")
    numbered_unit(workspace, "turns", """
INSERT INTO turns VALUES ({{ params.n | bind }}, pg_backend_pid(), clock_timestamp(), NULL);
SELECT pg_sleep(0.1);
UPDATE turns SET ended = clock_timestamp() WHERE item = {{ params.n | bind }};
""")
    workspace.job("turns", unit="turns", lanes=2, items=[{"n": n} for n in range(1, 7)])
    project = load_project(str(workspace.config))

    results = run_all(project.run_specs(project.job("turns")), RunOptions())

    assert [(r.status, r.item) for r in results] == [("ok", {"n": n}) for n in range(1, 7)]
    turns = db.execute("SELECT item, pid, started, ended FROM turns ORDER BY started")
    assert sorted(item for item, *_ in turns) == list(range(1, 7))
    assert len({pid for _, pid, *_ in turns}) == 2  # both lanes ran steps
    for (_, _, _, ended), (_, _, started, _) in itertools.pairwise(turns):
        assert started >= ended  # one step at a time
    assert db.execute("SELECT count(*) FROM maintainer.run WHERE job = 'turns' AND status = 'ok'") == [(6,)]
    assert db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg-maintainer%'") == [(0,)]


def test_lanes_stop_taking_items_once_cancelled(workspace: Workspace, db: Database) -> None:
    # A shutdown (the cancel event) stops every lane after its current item; what ran is returned
    # in item order and recorded.
    from maintainer.project import load_project
    from maintainer.runner import RunOptions, run, run_all

    numbered_unit(workspace, "slow", "SELECT pg_sleep(0.05);")
    workspace.job("slow", unit="slow", lanes=3, items=[{"n": n} for n in range(1, 31)])
    project = load_project(str(workspace.config))
    cancel = threading.Event()

    def cancel_after_the_first(spec, options, *, session=None, surveyed=None):  # type: ignore[no-untyped-def]
        result = run(spec, options, session=session, surveyed=surveyed)
        cancel.set()
        return result

    results = run_all(project.run_specs(project.job("slow")), RunOptions(cancel=cancel), runner=cancel_after_the_first)

    # the items the lanes had taken before the first one ended: a prefix of the 30, in order
    ran = [r.item["n"] for r in results if r.item is not None]
    assert 1 <= len(ran) < 10 and ran == list(range(1, len(ran) + 1)), ran
    assert all(r.status == "ok" for r in results)
    assert db.execute("SELECT count(*) FROM maintainer.run WHERE job = 'slow'") == [(len(ran),)]


def test_prepared_catalog_queries_survive_ddl_and_a_changed_result_type_is_replanned(
    workspace: Workspace, db: Database
) -> None:
    # The discover text is the same for every item, so the session prepares it after a few items;
    # each apply runs an ALTER between two of its executions. The first ALTERs change nothing it
    # reads; the later ones add a column to the table it selects * from.
    db.run_script("CREATE TABLE widened (id int); INSERT INTO widened VALUES (1)")
    workspace.unit("widen", """---
description: read a table whole, then widen it
params:
  n: {type: integer, required: true}
---
{% block discover %}
SELECT w.*, {{ params.n | bind }}::int AS n, (SELECT count(*) FROM pg_prepared_statements) AS prepared
  FROM widened w
{% endblock %}
{% block apply %}
{% if params.n > 6 %}
ALTER TABLE widened ADD COLUMN {{ ('c' ~ params.n) | ident }} int;
{% else %}
ALTER TABLE widened ALTER COLUMN id SET DEFAULT {{ params.n | literal }};
{% endif %}
{% endblock %}
""")
    workspace.job("widen", unit="widen", items=[{"n": n} for n in range(1, 11)])
    runs = json.loads(workspace.cli("trigger", "widen", "--json").output)["runs"]
    assert [r["status"] for r in runs] == ["ok"] * 10, [r["error"] for r in runs]
    # the session's prepared statements are kept across the ALTERs (they only accumulate) until a
    # changed result type forced them out and the discover was re-run
    prepared = [r["findings"][0]["prepared"] for r in runs]
    assert prepared[:7] == sorted(prepared[:7]) and prepared[6] > 0
    assert prepared[7] < prepared[6]
    assert set(runs[-1]["findings"][0]) == {"id", "c7", "c8", "c9", "n", "prepared"}

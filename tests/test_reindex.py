"""The `reindex` unit against real PostgreSQL: estimate, confirmation, rebuild, leftovers, skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from maintainer.pgserver import LocalCluster, ServerKind, available_kinds
from tests.conftest import Database, Server, Workspace

ROWS = 60_000  # the primary key is ~1.3 MB, above the 1 MB "tiny" limit; the md5 index ~3.3 MB


def make_table(db: Database, name: str, *, churn: bool, extra: str = "") -> None:
    """`name` (id int PK, code md5 text indexed); with churn, two thirds of the rows are deleted."""
    db.run_script(
        f"CREATE TABLE {name} (id int PRIMARY KEY, code text NOT NULL{extra}) WITH (autovacuum_enabled = false);"
        f"INSERT INTO {name} (id, code) SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;"
        f"CREATE INDEX {name}_code ON {name} (code);"
    )
    settle(db, name, f"DELETE FROM {name} WHERE id % 3 <> 0" if churn else None)


def settle(db: Database, table: str, change: str | None = None) -> None:
    """Apply `change`, flush its statistics, then VACUUM and ANALYZE like autovacuum eventually would."""
    with db.connect() as conn:
        if change:
            conn.execute(change)  # type: ignore[arg-type]
        # the change's counters must reach the statistics before ANALYZE resets them
        conn.execute("SELECT pg_stat_force_next_flush()")
        time.sleep(0.1)
        conn.execute(f"VACUUM (ANALYZE) {table}")  # type: ignore[arg-type]


def run(workspace: Workspace, job: str, *extra: str) -> dict[str, Any]:
    result = workspace.cli("trigger", job, "--json", *extra)
    assert result.exit_code in (0, 1), result.output
    run: dict[str, Any] = json.loads(result.output)["runs"][0]
    return run


def by_index(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["index"]: f for f in run["findings"]}


def filenode(db: Database, index: str) -> int:
    return int(db.execute("SELECT pg_relation_filenode(%s::regclass)", (index,))[0][0])


def test_bloated_index_is_rebuilt_confirmed_and_its_fresh_twin_untouched(workspace: Workspace, db: Database) -> None:
    db.execute("CREATE EXTENSION pgstattuple")
    make_table(db, "churned", churn=True)
    make_table(db, "twin", churn=False)
    twin_nodes = {i: filenode(db, i) for i in ("twin_pkey", "twin_code")}
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB"})

    first = run(workspace, "reindex")
    assert first["status"] == "ok", first["error"]
    assert [a["sql"] for a in first["actions"]] == [
        'REINDEX INDEX CONCURRENTLY "public"."churned_code"',  # the most bytes to win first
        'REINDEX INDEX CONCURRENTLY "public"."churned_pkey"',
    ]
    found = by_index(first)
    for name in ("public.churned_pkey", "public.churned_code"):
        index = found[name]
        assert index["decision"] == "rebuilt" and index["reason"] == "confirmed by pgstatindex"
        assert 0.55 < index["estimated_bloat"] < 0.75 and 0.55 < index["confirmed_bloat"] < 0.75
        assert index["size_after"] < 0.45 * index["size"]  # two thirds deleted: it shrinks
        assert index["bloat"] < 0.05  # measured against the same expected size after the rebuild
    for name in ("public.twin_pkey", "public.twin_code"):
        assert found[name]["decision"] == "keep" and found[name]["estimated_bloat"] < 0.05
    assert {i: filenode(db, i) for i in twin_nodes} == twin_nodes
    assert db.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == [(0,)]

    # the ledger remembers the rebuilds: within the cooldown they are not touched again
    db.execute("DELETE FROM churned WHERE id % 2 = 0")
    settle(db, "churned")
    second = run(workspace, "reindex")
    assert second["status"] == "ok" and second["actions"] == []
    again = by_index(second)["public.churned_pkey"]
    assert again["decision"] == "skip" and "within cooldown" in again["reason"]


def test_estimate_alone_decides_without_pgstattuple_and_max_indexes_defers(workspace: Workspace, db: Database) -> None:
    make_table(db, "churned", churn=True)
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB", "max_indexes": 1})
    result = run(workspace, "reindex")
    assert result["status"] == "ok", result["error"]
    found = by_index(result)
    assert found["public.churned_code"]["decision"] == "rebuilt"
    assert found["public.churned_code"]["reason"] == "estimate only: pgstattuple is not installed"
    assert found["public.churned_code"]["confirmed_bloat"] is None
    deferred = found["public.churned_pkey"]
    assert deferred["decision"] == "defer" and "max_indexes reached" in deferred["reason"]


def test_expression_index_is_measured_then_rebuilt_and_its_table_analyzed(workspace: Workspace, db: Database) -> None:
    db.execute("CREATE EXTENSION pgstattuple")
    db.run_script(
        "CREATE TABLE emails (address text NOT NULL) WITH (autovacuum_enabled = false);"
        f"INSERT INTO emails SELECT md5(g::text) || '@EXAMPLE.com' FROM generate_series(1, {ROWS}) g;"
        "CREATE INDEX emails_lower ON emails (lower(address));"
    )
    settle(db, "emails", "DELETE FROM emails WHERE random() < 0.66")
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB"})
    result = run(workspace, "reindex")
    assert result["status"] == "ok", result["error"]
    index = by_index(result)["public.emails_lower"]
    assert index["estimated_bloat"] is None and index["estimate_note"].startswith("expression index")
    assert 0.55 < index["confirmed_bloat"] < 0.75 and index["decision"] == "rebuilt"
    # the expression's statistics belong to the index: they are gathered again right away
    assert [a["sql"] for a in result["actions"]] == [
        'REINDEX INDEX CONCURRENTLY "public"."emails_lower"',
        'ANALYZE "public"."emails"',
    ]


def test_exclusion_constraint_and_non_btree_indexes_are_skipped_without_error(
    workspace: Workspace, db: Database
) -> None:
    make_table(db, "slots", churn=False, extra=", CONSTRAINT slots_one_code EXCLUDE USING btree (code WITH =)")
    db.execute("CREATE INDEX slots_hash ON slots USING hash (id)")
    settle(db, "slots", "DELETE FROM slots WHERE id % 3 <> 0")
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB"})
    result = run(workspace, "reindex")
    assert result["status"] == "ok", result["error"]
    found = by_index(result)
    excluded = found["public.slots_one_code"]
    assert excluded["estimated_bloat"] > 0.5  # bloated, and still left alone
    assert excluded["decision"] == "skip" and "exclusion-constraint" in excluded["reason"]
    assert found["public.slots_hash"]["decision"] == "skip"
    assert found["public.slots_hash"]["estimate_note"] == "hash index: only B-tree bloat is estimated"
    assert [a["sql"] for a in result["actions"]] == [
        'REINDEX INDEX CONCURRENTLY "public"."slots_code"',
        'REINDEX INDEX CONCURRENTLY "public"."slots_pkey"',
    ]


def test_estimate_is_unavailable_rather_than_wrong(workspace: Workspace, db: Database) -> None:
    make_table(db, "shapes", churn=False)
    db.run_script(
        "CREATE INDEX shapes_partial ON shapes (code) WHERE id > 10;"
        "CREATE INDEX shapes_expr ON shapes (lower(code));"
        "CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small SELECT generate_series(1, 100); ANALYZE small;"
        "CREATE TABLE unanalyzed (id int PRIMARY KEY) WITH (autovacuum_enabled = false);"
        "INSERT INTO unanalyzed SELECT generate_series(1, 100000);"
        "CREATE TABLE stale (id int PRIMARY KEY) WITH (autovacuum_enabled = false);"
        "INSERT INTO stale SELECT generate_series(1, 100000);"
    )
    settle(db, "stale")
    with db.connect() as conn:
        conn.execute("INSERT INTO stale SELECT generate_series(100001, 200000)")
        conn.execute("SELECT pg_stat_force_next_flush()")
    deadline = time.monotonic() + 10
    while db.execute("SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = 'stale'") != [(100000,)]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB"})
    found = by_index(run(workspace, "reindex"))
    notes = {name: found[name]["estimate_note"] for name in (
        "public.shapes_partial", "public.shapes_expr", "public.small_pkey", "public.unanalyzed_pkey",
        "public.stale_pkey")}
    assert notes["public.shapes_partial"].startswith("partial index")
    assert notes["public.shapes_expr"].startswith("expression index")
    assert notes["public.small_pkey"] == "tiny index (< 1 MB)"
    assert notes["public.unanalyzed_pkey"] in ("table never analyzed", "no statistics: ANALYZE the table")
    assert notes["public.stale_pkey"].startswith("statistics stale: 100000 rows changed")
    assert all(found[name]["estimated_bloat"] is None for name in notes)
    assert all(found[name]["decision"] == "keep" for name in notes)


def test_leftovers_are_cleaned_first_foreign_invalid_indexes_only_reported(workspace: Workspace, db: Database) -> None:
    long_name = "churned_" + "x" * 52  # 60 bytes: its leftover's base name is shortened to fit 63
    make_table(db, "churned", churn=False)
    db.execute(f"CREATE INDEX {long_name} ON churned (code)")
    settle(db, "churned", "DELETE FROM churned WHERE id % 3 <> 0")
    db.run_script("CREATE TABLE dup (v int); INSERT INTO dup VALUES (1), (1);")
    with db.connect() as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY dup_v ON dup (v)")  # fails, leaves an invalid index
    # interrupted rebuilds: a transaction holding a snapshot makes REINDEX CONCURRENTLY time out half-way
    with db.connect() as holder, db.connect() as rebuilder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM churned")
        rebuilder.execute("SET lock_timeout = '200ms'")
        for index in ("churned_pkey", long_name):
            with pytest.raises(psycopg.errors.LockNotAvailable):
                rebuilder.execute(f"REINDEX INDEX CONCURRENTLY {index}")  # type: ignore[arg-type]
        holder.execute("ROLLBACK")
    leftovers = [r[0] for r in db.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE NOT i.indisvalid"
        " AND c.relname LIKE '%ccnew%' ORDER BY 1")]
    assert leftovers == ["churned_pkey_ccnew", long_name[:57] + "_ccnew"]
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB", "max_indexes": 5})

    plan = workspace.cli("plan", "reindex")
    assert plan.exit_code == 0, plan.output
    assert db.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == [(3,)]  # a plan changes nothing

    result = run(workspace, "reindex")
    assert result["status"] == "ok", result["error"]
    statements = [a["sql"] for a in result["actions"]]
    # cleanup first; each rebuild re-checks its own leftover (a no-op once it is gone)
    assert statements[:2] == [
        'DROP INDEX CONCURRENTLY IF EXISTS "public"."churned_pkey_ccnew"',
        f'DROP INDEX CONCURRENTLY IF EXISTS "public"."{long_name[:57]}_ccnew"',
    ]
    assert 'REINDEX INDEX CONCURRENTLY "public"."churned_pkey"' in statements
    assert f'REINDEX INDEX CONCURRENTLY "public"."{long_name}"' in statements
    found = by_index(result)
    assert found["public.churned_pkey_ccnew"]["decision"] == "dropped"
    assert found["public.churned_pkey"]["decision"] == "rebuilt"
    foreign = found["public.dup_v"]
    assert foreign["kind"] == "invalid" and foreign["decision"] == "report" and foreign["level"] == "warn"
    assert db.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE NOT i.indisvalid"
    ) == [("dup_v",)]


def test_a_rebuild_in_progress_elsewhere_is_left_alone(workspace: Workspace, db: Database) -> None:
    make_table(db, "churned", churn=True)
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB"})
    errors: list[BaseException] = []

    def rebuild() -> None:
        try:
            with db.connect() as conn:
                conn.execute("SET lock_timeout = '30s'")
                conn.execute("REINDEX INDEX CONCURRENTLY churned_code")
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    with db.connect() as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM churned")  # the other rebuild waits for this snapshot
        other = threading.Thread(target=rebuild)
        other.start()
        try:
            deadline = time.monotonic() + 30
            while not db.execute("SELECT 1 FROM pg_class WHERE relname = 'churned_code_ccnew'"):
                assert time.monotonic() < deadline, "the other rebuild never started"
                time.sleep(0.05)
            result = run(workspace, "reindex")
        finally:
            holder.execute("ROLLBACK")
            other.join(timeout=60)
    assert not errors
    assert result["status"] == "ok", result["error"]
    assert result["actions"] == []
    found = by_index(result)
    assert found["public.churned_code_ccnew"]["decision"] == "report"
    assert "another session holds a lock on it" in found["public.churned_code_ccnew"]["reason"]
    assert found["public.churned_pkey"]["decision"] == "skip"
    assert found["public.churned_pkey"]["reason"] == "another index build is running on the table"


@pytest.mark.parametrize("kind", available_kinds(), ids=lambda kind: kind.name)
def test_a_table_under_an_anti_wraparound_autovacuum_is_skipped(tmp_path: Path, kind: ServerKind) -> None:
    # A real anti-wraparound autovacuum: a cluster of its own whose launcher looks every second, a table
    # whose freeze age limit is the smallest allowed (100,000 transactions, burnt in well under a second)
    # and whose vacuum is throttled to a crawl (a minute or more for its 500 pages), so it is still
    # running when the unit looks. Autovacuum disabled on the table does not stop a vacuum against
    # wraparound; freeze_table_age 0 makes it scan every page (before 16 it would otherwise skip the
    # all-visible ones and be over within a second).
    with LocalCluster(kind, settings={"autovacuum_naptime": "1s"}) as cluster:
        db = Database(Server(kind.name, cluster.dsn(), kind.version_num), "postgres", cluster.dsn())
        db.run_script(
            "CREATE TABLE frozen (id int PRIMARY KEY, code text NOT NULL) WITH (autovacuum_enabled = false,"
            " autovacuum_freeze_max_age = 100000, autovacuum_freeze_table_age = 0, autovacuum_vacuum_cost_delay = 100,"
            " autovacuum_vacuum_cost_limit = 1);"
            f"INSERT INTO frozen SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;"
            "CREATE INDEX frozen_code ON frozen (code);"
            "DELETE FROM frozen WHERE id % 3 <> 0;"
            "CREATE PROCEDURE burn(n int) LANGUAGE plpgsql AS"
            " $$BEGIN FOR i IN 1..n LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END$$;"
        )
        settle(db, "frozen")  # bloated, analyzed, and still older than the next 100,000 transactions
        make_table(db, "churned", churn=True)  # equally bloated, no vacuum: rebuilt
        db.execute("CALL burn(110000)")
        vacuuming = ("SELECT a.query FROM pg_stat_progress_vacuum v JOIN pg_stat_activity a ON a.pid = v.pid"
                     " WHERE v.relid = 'frozen'::regclass")
        deadline = time.monotonic() + 30
        while not (activity := db.execute(vacuuming)):
            assert time.monotonic() < deadline, "no anti-wraparound autovacuum started"
            time.sleep(0.1)
        assert "(to prevent wraparound)" in activity[0][0]
        (tmp_path / "jobs").mkdir()
        (tmp_path / "templates").mkdir()
        workspace = Workspace(tmp_path, db.dsn)
        workspace.write_config()
        workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB", "max_indexes": 5})

        result = run(workspace, "reindex")
        assert db.execute(vacuuming), "the vacuum ended during the run: the test proves nothing"
    assert result["status"] == "ok", result["error"]
    found = by_index(result)
    for name in ("public.frozen_pkey", "public.frozen_code"):
        assert found[name]["estimated_bloat"] > 0.5  # a candidate, were it not for the vacuum
        assert found[name]["decision"] == "skip"
        assert found[name]["reason"] == "an anti-wraparound autovacuum is running on the table"
    assert sorted(a["sql"] for a in result["actions"]) == [
        'REINDEX INDEX CONCURRENTLY "public"."churned_code"',
        'REINDEX INDEX CONCURRENTLY "public"."churned_pkey"',
    ]


def test_a_run_killed_mid_rebuild_is_completed_by_the_next(workspace: Workspace, db: Database) -> None:
    make_table(db, "churned", churn=True)
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB", "max_indexes": 1},
                  timeouts={"lock": "60s"})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "maintainer.cli", "trigger", "reindex", "--config", str(workspace.config)]
    waiting = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-maintainer reindex'"
               " AND query LIKE 'REINDEX INDEX CONCURRENTLY%'")
    with db.connect() as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM churned")  # the rebuild waits for this snapshot
        victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + 30
            while not db.execute(waiting + " AND wait_event_type = 'Lock'"):
                assert time.monotonic() < deadline, "the rebuild never started waiting"
                time.sleep(0.05)
        finally:
            victim.kill()
            victim.wait()
        db.execute("SELECT pg_terminate_backend(pid) FROM (" + waiting + ") w")
        holder.execute("ROLLBACK")
    assert db.execute("SELECT status FROM maintainer.run") == [("running",)]
    assert db.execute("SELECT count(*) FROM pg_class WHERE relname = 'churned_code_ccnew'") == [(1,)]

    result = run(workspace, "reindex")
    assert result["status"] == "ok", result["error"]
    assert [a["sql"] for a in result["actions"]] == [
        'DROP INDEX CONCURRENTLY IF EXISTS "public"."churned_code_ccnew"',
        'DROP INDEX CONCURRENTLY IF EXISTS "public"."churned_code_ccnew"',
        'REINDEX INDEX CONCURRENTLY "public"."churned_code"',
    ]
    assert by_index(result)["public.churned_code"]["decision"] == "rebuilt"
    assert db.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == [(0,)]
    assert sorted(r[0] for r in db.execute("SELECT status FROM maintainer.run")) == ["interrupted", "ok"]


def test_check_reports_missing_pgstattuple(workspace: Workspace, db: Database) -> None:
    make_table(db, "churned", churn=False)
    workspace.job("reindex", unit="reindex")
    result = workspace.cli("check")
    assert result.exit_code == 0, result.output
    assert "pgstattuple is not installed" in result.output
    db.execute("CREATE EXTENSION pgstattuple")
    assert "candidates are confirmed with pgstatindex()" in workspace.cli("check").output


def test_units_see_installed_extensions_and_whether_the_ledger_exists(workspace: Workspace, db: Database) -> None:
    db.execute("CREATE EXTENSION pgstattuple")
    workspace.unit("facts", """---
description: what the template context tells about the catalog
---
{% block discover %}
SELECT {{ extensions.pgstattuple.schema | literal }} AS schema, {{ ledger_exists | literal }} AS ledger
{% endblock %}
""")
    workspace.job("facts", unit="facts")
    planned = json.loads(workspace.cli("trigger", "facts", "--dry-run", "--json").output)["runs"][0]
    assert planned["findings"] == [{"schema": "public", "ledger": False}]  # a dry run creates no ledger
    ran = json.loads(workspace.cli("trigger", "facts", "--json").output)["runs"][0]
    assert ran["findings"] == [{"schema": "public", "ledger": True}]

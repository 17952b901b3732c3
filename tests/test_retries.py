"""Retries that look before they repeat, and runs that survive their server going away.

* A run that spans a server restart (fast or immediate) reconnects its work *and* its ledger
  connection: what the CLI prints is what the ledger keeps.
* A step of a unit with a `recheck` block is retried from what the catalog says now: a timed-out
  DETACH … CONCURRENTLY is finalized (a second DETACH would fail), a timed-out REINDEX CONCURRENTLY
  drops its own half-built copy before building another.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from maintainer.pgserver import LocalCluster, ServerKind, available_kinds
from tests.conftest import Database, Workspace, release_after_the_first_timeout
from tests.test_partitions import month, monthly_table, only, runs, suffix
from tests.test_reindex import by_index, make_table
from tests.test_reindex import run as run_reindex


def maintainer_command() -> str:
    executable = shutil.which("maintainer", path=str(Path(sys.executable).parent))
    assert executable is not None
    return executable


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


# -- a server restart in the middle of a run ----------------------------------------------------

SLOW_UNIT = """---
description: two slow steps, long enough to restart the server under the first
transaction: none
---
{% block discover %}
SELECT n FROM generate_series(1, 2) AS n
{% endblock %}
{% block apply %}
SELECT pg_sleep(1.5);
{% endblock %}
"""


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("kind", available_kinds(), ids=lambda kind: kind.name)
def test_a_run_across_a_server_restart_is_recorded_as_the_cli_reports_it(
    tmp_path: Path, kind: ServerKind, mode: str
) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "slow.sql.j2").write_text(SLOW_UNIT)
    (tmp_path / "jobs" / "slow.yaml").write_text(yaml.safe_dump({"name": "slow", "unit": "slow"}))
    # Test clusters run with synchronous_commit off: a crash would lose commits that were acknowledged,
    # which is no production server's behaviour and would lose ledger records for the wrong reason.
    with LocalCluster(kind, settings={"synchronous_commit": "on"}) as cluster:
        config = tmp_path / "maintainer.yaml"
        config.write_text(yaml.safe_dump({
            "targets": {"app": {"dsn": cluster.dsn()}},
            "jobs_dir": "jobs",
            "templates_dir": "templates",
            "defaults": {"retry_backoff": "200ms", "max_attempts": 3},
            "log_format": "text",
        }))
        process = subprocess.Popen([maintainer_command(), "trigger", "slow", "--json", "--config", str(config)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def sleeping() -> bool:
                with cluster.connect() as conn:
                    return bool(conn.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-maintainer slow'"
                        " AND query LIKE 'SELECT pg_sleep%'").fetchall())
            wait_for(sleeping, "the first step runs")
            cluster.restart(mode)
            out, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert "Traceback" not in err, err
        [printed] = json.loads(out)["runs"]
        assert printed["status"] == "ok", printed
        assert process.returncode == 0
        # The first step was cut by the restart and ran again over a new connection.
        assert [a["status"] for a in printed["actions"]] == ["ok", "ok"]
        assert printed["actions"][0]["attempts"] == 2

        with cluster.connect() as conn:
            [(status, finished, attempts)] = conn.execute(
                "SELECT status, finished_at IS NOT NULL, attempts FROM maintainer.run WHERE id = %s",
                (printed["run_id"],)).fetchall()
            findings = [row[0] for row in conn.execute(
                "SELECT data FROM maintainer.finding WHERE run_id = %s ORDER BY seq", (printed["run_id"],))]
            actions = conn.execute(
                "SELECT status, attempts FROM maintainer.action WHERE run_id = %s ORDER BY seq",
                (printed["run_id"],)).fetchall()
        assert (status, finished) == ("ok", True)
        assert attempts == printed.get("attempts", attempts) >= 2
        assert findings == printed["findings"] == [{"n": 1}, {"n": 2}]
        assert actions == [("ok", 2), ("ok", 1)]

        history = subprocess.run([maintainer_command(), "history", "--json", "--config", str(config)],
                                 capture_output=True, text=True, check=True)
        assert "Traceback" not in history.stderr
        assert [r["status"] for r in json.loads(history.stdout)["runs"]] == ["ok"]


# -- DETACH … CONCURRENTLY cut by lock_timeout --------------------------------------------------

def test_a_detach_cut_by_lock_timeout_is_finalized_not_detached_again(workspace: Workspace, db: Database) -> None:
    monthly_table(db, "readings", range(-7, 3))
    workspace.write_config(defaults={"lock_timeout": "1s", "retry_backoff": "50ms", "max_attempts": 4})
    workspace.job("partitions", unit="partitions", params={"premake": 2},
                  items=[{"table": "public.readings", "interval": "1 month", "retention": "6 months"}])
    expired = f"readings{suffix(month(-7))}"
    reader = db.connect()
    reader.autocommit = False
    reader.execute("SELECT count(*) FROM readings")  # a report query on the parent, still open
    finalizing = ("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-maintainer partitions'"
                  " AND query LIKE '%FINALIZE%'")
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.update(runs=runs(workspace, "partitions")))
    worker.start()
    try:
        # The first DETACH gives up after lock_timeout and leaves a pending detach; the retry must be
        # FINALIZE (a second DETACH fails with "already pending detach").
        wait_for(lambda: bool(db.execute(finalizing)), "the retry finalizes the pending detach")
    finally:
        reader.rollback()
        reader.close()
        worker.join(timeout=60)
    run, finding = only(outcome["runs"])
    assert run["status"] == "ok", run["error"]
    detach = [a for a in run["actions"] if "DETACH PARTITION" in a["sql"]]
    assert detach[0]["sql"].endswith(f'"public"."{expired}" CONCURRENTLY')
    assert detach[0]["status"] == "failed" and detach[0]["sqlstate"] == "55P03"
    assert detach[-1]["sql"].endswith(f'"public"."{expired}" FINALIZE') and detach[-1]["status"] == "ok"
    assert finding["retired"] == 1 and finding["pending_detach"] == 0
    assert db.execute("SELECT to_regclass(%s)", (expired,)) == [(None,)]
    assert db.execute("SELECT count(*) FROM pg_inherits WHERE inhdetachpending") == [(0,)]
    assert db.execute("SELECT status FROM maintainer.run") == [("ok",)]


# -- a batch of creations whose ATTACHes are cut by lock_timeout ---------------------------------

@pytest.mark.parametrize("default", [False, True], ids=["no-default", "empty-default"])
def test_a_batch_cut_at_attach_is_resumed_whole_without_creating_twice(
    workspace: Workspace, db: Database, default: bool
) -> None:
    monthly_table(db, "batched", range(0, 1), default=default)
    workspace.write_config(defaults={"lock_timeout": "200ms", "retry_backoff": "50ms", "max_attempts": 4})
    workspace.job("partitions", unit="partitions", params={"premake": 3},
                  items=[{"table": "public.batched", "interval": "1 month"}])
    holder = db.connect()
    holder.autocommit = False
    holder.execute("LOCK TABLE batched IN SHARE UPDATE EXCLUSIVE MODE")  # the ATTACHes must wait
    releaser = release_after_the_first_timeout(db, holder, "batched")
    try:
        run, finding = only(runs(workspace, "partitions"))
    finally:
        releaser.join(timeout=60)
        holder.close()
    assert run["status"] == "ok", run["error"]
    statements = [a["sql"] for a in run["actions"]]
    # the three tables were created once, in one transaction; the failed ATTACH transaction was
    # tried again whole after recheck found the tables (resumed: no second CREATE)
    assert sum(s.startswith("CREATE TABLE") for s in statements) == 3
    attaches = [a for a in run["actions"] if "ATTACH PARTITION" in a["sql"]]
    assert [a["status"] for a in attaches[-3:]] == ["ok"] * 3
    assert any(a["status"] == "failed" and a["sqlstate"] == "55P03" for a in run["actions"])
    assert finding["created"] == 3 and finding["partitions_ahead"] == 3 and finding["level"] == "ok"
    attached = db.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'batched'::regclass")
    assert attached == [(5 if default else 4,)]
    assert db.execute("SELECT count(*) FROM pg_constraint WHERE conname LIKE 'maintainer%%'") == [(0,)]


# -- REINDEX CONCURRENTLY cut by lock_timeout ---------------------------------------------------

def invalid_copies(db: Database) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE NOT i.indisvalid AND c.relname ~ '_cc(new|old)[0-9]*$' ORDER BY 1")]


def test_a_timed_out_rebuild_drops_its_own_copy_before_trying_again(workspace: Workspace, db: Database) -> None:
    make_table(db, "churned", churn=True)
    db.run_script("CREATE TABLE elsewhere (id int)")
    workspace.write_config(defaults={"lock_timeout": "300ms", "retry_backoff": "50ms", "max_attempts": 3})
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB", "max_indexes": 1})
    with db.connect() as holder:
        # A long REPEATABLE READ transaction on an unrelated table: every rebuild waits for its snapshot.
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM elsewhere")
        result = run_reindex(workspace, "reindex")
        left_behind = invalid_copies(db)
        holder.execute("ROLLBACK")
    rebuilds = [a for a in result["actions"] if a["sql"].startswith("REINDEX")]
    assert len(rebuilds) == 3, result["actions"]  # one per attempt: each one timed out
    assert all(a["status"] == "failed" and a["sqlstate"] == "55P03" for a in rebuilds)
    # Before each new attempt, the copy of the previous one is dropped: at most one stays.
    drops = [a["sql"] for a in result["actions"] if a["sql"].startswith("DROP INDEX")]
    assert len(drops) == 2 and all("_ccnew" in sql for sql in drops), result["actions"]
    assert len(left_behind) == 1, left_behind
    # ... and the run names it.
    found = by_index(result)
    assert f"public.{left_behind[0]}" in found, found.keys()
    assert found[f"public.{left_behind[0]}"]["level"] == "warn"

    again = run_reindex(workspace, "reindex")
    assert again["status"] == "ok", again["error"]
    assert invalid_copies(db) == []


def test_a_copy_that_cannot_be_dropped_stops_the_retries(workspace: Workspace, db: Database) -> None:
    # A transaction that read the table itself: the rebuild times out, and so does the DROP of its copy
    # (DROP INDEX CONCURRENTLY waits for the table's lockers). The retries keep trying the DROP and never
    # start another rebuild: one copy stays, reported, for the next run.
    make_table(db, "churned", churn=True)
    workspace.write_config(defaults={"lock_timeout": "300ms", "retry_backoff": "50ms", "max_attempts": 3})
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB", "max_indexes": 1})
    with db.connect() as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM churned")
        result = run_reindex(workspace, "reindex")
        left_behind = invalid_copies(db)
        holder.execute("ROLLBACK")
    assert len([a for a in result["actions"] if a["sql"].startswith("REINDEX")]) == 1, result["actions"]
    assert len(left_behind) == 1, left_behind
    assert f"public.{left_behind[0]}" in by_index(result)
    again = run_reindex(workspace, "reindex")
    assert again["status"] == "ok", again["error"]
    assert invalid_copies(db) == []


def test_a_run_whose_start_record_vanished_is_recorded_anew(workspace: Workspace, db: Database) -> None:
    # What a failover that lost the last asynchronously replicated commits looks like to a run: the
    # new primary has no record of its start. The run's outcome must not vanish with it.
    workspace.unit("slow", SLOW_UNIT)
    workspace.job("slow", unit="slow")
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.update(result=workspace.cli("trigger", "slow", "--json")))
    worker.start()
    try:
        wait_for(lambda: bool(db.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-maintainer slow'"
                                         " AND query LIKE 'SELECT pg_sleep%'")), "the first step runs")
        db.execute("DELETE FROM maintainer.run")
    finally:
        worker.join(timeout=60)
    [printed] = json.loads(outcome["result"].output)["runs"]
    assert printed["status"] == "ok", printed
    [(run_id, status, findings)] = db.execute(
        "SELECT r.id, r.status, (SELECT count(*) FROM maintainer.finding f WHERE f.run_id = r.id)"
        " FROM maintainer.run r")
    assert (run_id, status, findings) == (printed["run_id"], "ok", 2)

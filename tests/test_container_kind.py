"""A representative run of each built-in job, marked `container` so it also runs on the
testcontainers PostgreSQL (tests/conftest.py): check, sequences, partitions, reindex and autovacuum
through the CLI on a fresh database, the ledger and the history read back. The whole suite covers
the details on the local servers; these show the same engine works on a server in a container,
reached over TCP with password authentication."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import Database, Workspace

pytestmark = pytest.mark.container


def trigger(workspace: Workspace, job: str) -> dict[str, Any]:
    result = workspace.cli("trigger", job, "--json")
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.output)["runs"]
    assert run["status"] == "ok" and run["error"] is None, run
    return dict(run)


def test_check_connects_and_passes(workspace: Workspace, db: Database) -> None:
    workspace.job("sequences", unit="sequences")
    result = workspace.cli("check")
    assert result.exit_code == 0, result.output


def test_each_built_in_job_runs_and_is_recorded(workspace: Workspace, db: Database) -> None:
    db.run_script(
        "CREATE TABLE counters (id serial PRIMARY KEY, n int);"
        "SELECT setval('counters_id_seq', 1717986918);"  # 80% of int4
        "CREATE TABLE events (at timestamptz NOT NULL, body text) PARTITION BY RANGE (at);"
        "CREATE TABLE churned (id int PRIMARY KEY, code text NOT NULL) WITH (autovacuum_enabled = false);"
        "INSERT INTO churned SELECT g, md5(g::text) FROM generate_series(1, 60000) g;"
        "CREATE INDEX churned_code ON churned (code);"
        "DELETE FROM churned WHERE id % 3 <> 0;"
    )
    db.execute("VACUUM (ANALYZE) churned")
    workspace.job("sequences", unit="sequences")
    workspace.job("partitions", unit="partitions", params={"premake": 2},
                  items=[{"table": "public.events", "interval": "1 month"}])
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB"})
    workspace.job("autovacuum", unit="autovacuum")

    sequences = trigger(workspace, "sequences")
    counter = next(f for f in sequences["findings"] if f["sequence"] == "public.counters_id_seq")
    assert counter["level"] == "warn" and counter["used_ratio"] == pytest.approx(0.8, abs=0.001)

    partitions = trigger(workspace, "partitions")
    assert partitions["findings"][0]["created"] == 3
    assert db.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass") == [(3,)]

    reindex = trigger(workspace, "reindex")
    assert 'REINDEX INDEX CONCURRENTLY "public"."churned_code"' in [a["sql"] for a in reindex["actions"]]
    assert db.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == [(0,)]

    trigger(workspace, "autovacuum")

    history = workspace.cli("history", "--json")
    assert history.exit_code == 0, history.output
    runs = json.loads(history.output)["runs"]
    assert {(r["job"], r["status"]) for r in runs} >= {
        ("sequences", "ok"), ("partitions", "ok"), ("reindex", "ok"), ("autovacuum", "ok")}

"""The `autovacuum` unit against real PostgreSQL: rules, floors, overrides, idempotence, wraparound."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tests.conftest import Database, Workspace

# Bounds small enough that 50,000-row tables count as "large" (the defaults are 100k / 1M / 500k).
SMALL_BOUNDS = {"min_rows": 10_000, "vacuum_rows": 2_000, "insert_rows": 500, "analyze_rows": 2_000}


def load(db: Database, name: str, rows: int, *, updated: bool = False, options: str = "") -> None:
    """A table with `rows` rows, vacuumed and analyzed (so autovacuum has nothing to do meanwhile);
    `updated`: 5% of the rows were updated once, so it is not insert-mostly."""
    with db.connect() as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v int, note text){options}")  # type: ignore[arg-type]
        conn.execute(f"INSERT INTO {name} SELECT g, g, 'n' || g FROM generate_series(1, {rows}) g")  # type: ignore[arg-type]
        if updated:
            conn.execute(f"UPDATE {name} SET v = v + 1 WHERE id % 20 = 0")  # type: ignore[arg-type]
        conn.execute("SELECT pg_stat_force_next_flush()")
        time.sleep(0.1)
        conn.execute(f"VACUUM (ANALYZE) {name}")  # type: ignore[arg-type]


def run(workspace: Workspace, job: str) -> dict[str, Any]:
    result = workspace.cli("trigger", job, "--json")
    assert result.exit_code in (0, 1), result.output
    run: dict[str, Any] = json.loads(result.output)["runs"][0]
    return run


def by_table(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["table"]: f for f in run["findings"] if f["kind"] == "table"}


def reloptions(db: Database, table: str) -> list[str]:
    return list(db.execute("SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = %s::regclass",
                           (table,))[0][0])


def test_large_tables_get_bounded_thresholds_once(workspace: Workspace, db: Database) -> None:
    load(db, "orders", 50_000, updated=True)
    load(db, "events", 50_000)
    load(db, "tiny", 500, updated=True)
    workspace.job("autovacuum", unit="autovacuum", params=SMALL_BOUNDS)

    first = run(workspace, "autovacuum")
    assert first["status"] == "ok", first["error"]
    found = by_table(first)
    # R1 + R3: 10,050 dead rows / 5,050 changes at the defaults; 2,000 / 50,000 = 0.04 -> ladder step 0.02
    assert found["public.orders"]["changes"] == {"autovacuum_vacuum_scale_factor": "0.02",
                                                 "autovacuum_analyze_scale_factor": "0.02"}
    assert found["public.orders"]["decision"] == "changed" and not found["public.orders"]["insert_mostly"]
    # R2: insert-only: the insert scale factor, not the dead-row one
    assert found["public.events"]["insert_mostly"]
    assert found["public.events"]["changes"] == {"autovacuum_analyze_scale_factor": "0.02",
                                                 "autovacuum_vacuum_insert_scale_factor": "0.01"}
    assert found["public.tiny"]["decision"] == "keep" and "below min_rows" in found["public.tiny"]["reason"]
    assert sorted(reloptions(db, "orders")) == ["autovacuum_analyze_scale_factor=0.02",
                                                "autovacuum_vacuum_scale_factor=0.02"]
    assert reloptions(db, "tiny") == []
    assert [a["sql"] for a in first["actions"]] == [
        'ALTER TABLE "public"."events" SET ("autovacuum_analyze_scale_factor" = \'0.02\','
        ' "autovacuum_vacuum_insert_scale_factor" = \'0.01\')',
        'ALTER TABLE "public"."orders" SET ("autovacuum_vacuum_scale_factor" = \'0.02\','
        ' "autovacuum_analyze_scale_factor" = \'0.02\')',
    ]

    second = run(workspace, "autovacuum")
    assert second["status"] == "ok" and second["actions"] == []
    assert {f["decision"] for f in by_table(second).values()} == {"keep"}

    # the ledger keeps what was there before each change, so it can be reverted
    before = db.execute(
        "SELECT f.data -> 'current_options', f.data -> 'changes' FROM maintainer.finding f"
        " JOIN maintainer.run r ON r.id = f.run_id"
        " WHERE f.data ->> 'table' = 'public.orders' ORDER BY r.id LIMIT 1")
    assert before == [({}, {"autovacuum_vacuum_scale_factor": "0.02", "autovacuum_analyze_scale_factor": "0.02"})]


def test_floors_hold_and_stricter_values_are_kept(workspace: Workspace, db: Database) -> None:
    load(db, "big", 50_000, updated=True)
    load(db, "tight", 50_000, updated=True, options=" WITH (autovacuum_vacuum_scale_factor = 0.005)")
    workspace.job("autovacuum", unit="autovacuum", params={**SMALL_BOUNDS, "vacuum_rows": 10, "analyze_rows": 10})
    found = by_table(run(workspace, "autovacuum"))
    big = found["public.big"]
    assert big["changes"] == {"autovacuum_vacuum_scale_factor": "0.01", "autovacuum_analyze_scale_factor": "0.005"}
    assert "floor 0.01" in big["reason"]
    tight = found["public.tight"]
    assert "autovacuum_vacuum_scale_factor" not in tight["changes"]  # never loosened behind an operator's back
    assert "below the 0.01 floor" in tight["reason"]
    assert "autovacuum_vacuum_scale_factor=0.005" in reloptions(db, "tight")


def test_overrides_win_reach_partitions_and_refuse_strong_locks(workspace: Workspace, db: Database) -> None:
    db.run_script(
        "CREATE TABLE metrics (id int, v float8) PARTITION BY RANGE (id);"
        "CREATE TABLE metrics_a PARTITION OF metrics FOR VALUES FROM (0) TO (1000);"
        "CREATE TABLE metrics_b PARTITION OF metrics FOR VALUES FROM (1000) TO (2000);"
        "INSERT INTO metrics SELECT g, g FROM generate_series(0, 1999) g;"
    )
    db.execute("VACUUM (ANALYZE) metrics")  # so that autovacuum has nothing to do with it meanwhile
    load(db, "small", 100)
    overrides = {
        "public.metrics": {"autovacuum_vacuum_scale_factor": 0.01, "autovacuum_analyze_scale_factor": 0.005},
        "small": {"fillfactor": 90, "user_catalog_table": True},
        "public.typo": {"autovacuum_vacuum_scale_factor": 0.01},
    }
    workspace.job("autovacuum", unit="autovacuum", params={"overrides": overrides})
    first = run(workspace, "autovacuum")
    assert first["status"] == "ok", first["error"]
    found = by_table(first)
    for partition in ("metrics_a", "metrics_b"):
        assert sorted(reloptions(db, partition)) == ["autovacuum_analyze_scale_factor=0.005",
                                                     "autovacuum_vacuum_scale_factor=0.01"]
        assert found[f"public.{partition}"]["decision"] == "changed"
    assert reloptions(db, "small") == ["fillfactor=90"]
    assert "override ignored: user_catalog_table" in found["public.small"]["reason"]
    assert "public.metrics" not in found  # the parent has no storage and no options of its own
    typo = next(f for f in first["findings"] if f["kind"] == "override")
    assert typo["object"] == "public.typo" and typo["level"] == "warn"
    assert typo["reason"] == "override for public.typo: no such table"
    assert run(workspace, "autovacuum")["actions"] == []


def test_apply_false_only_recommends(workspace: Workspace, db: Database) -> None:
    load(db, "orders", 50_000, updated=True)
    workspace.job("autovacuum", unit="autovacuum", params={**SMALL_BOUNDS, "apply": False})
    plan = workspace.cli("plan", "autovacuum")
    assert plan.exit_code == 0 and "ALTER TABLE" not in plan.output
    result = run(workspace, "autovacuum")
    assert result["status"] == "ok" and result["actions"] == []
    orders = by_table(result)["public.orders"]
    assert orders["decision"] == "recommend" and orders["changes"]
    assert "apply: false" in orders["reason"]
    assert reloptions(db, "orders") == []


def test_wraparound_levels_name_the_transaction_holding_freezing_back(workspace: Workspace, db: Database) -> None:
    db.execute("CREATE TABLE old (id int)")
    gid = f"held-{uuid.uuid4().hex[:8]}"
    with db.connect() as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO old VALUES (1)")
        conn.execute(f"PREPARE TRANSACTION '{gid}'")  # type: ignore[arg-type]
    try:
        with db.connect() as conn:
            for _ in range(60):
                conn.execute("SELECT txid_current()")  # each autocommit statement burns a transaction id
        # thresholds this low turn a few dozen transactions into a warning
        workspace.job("autovacuum", unit="autovacuum", params={"warn": 1e-7, "critical": 0.9})
        result = run(workspace, "autovacuum")
        assert result["status"] == "ok", result["error"]
        old = by_table(result)["public.old"]
        assert old["level"] == "warn" and old["xid_age"] >= 60
        assert old["xid_age_ratio"] == round(old["xid_age"] / 200_000_000, 4)
        assert f"prepared transaction '{gid}'" in old["cause"]
        databases = {f["database"]: f for f in result["findings"] if f["kind"] == "database"}
        assert db.name in databases and databases[db.name]["level"] == "warn"
        assert databases[db.name]["cause"]
    finally:
        db.execute(f"ROLLBACK PREPARED '{gid}'")  # type: ignore[arg-type]

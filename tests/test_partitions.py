"""The `partitions` unit against real PostgreSQL: premake, retention, DEFAULT, locks, interruptions."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from maintainer.units import ParamSpec, coerce_param
from tests.conftest import Database, Workspace

UTC = dt.UTC
ROOT = Path(__file__).resolve().parent.parent


# -- helpers -----------------------------------------------------------------------------------

def month(offset: int) -> dt.datetime:
    """First instant (UTC) of the month `offset` months from now."""
    now = dt.datetime.now(UTC)
    index = now.year * 12 + now.month - 1 + offset
    return dt.datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def suffix(moment: dt.datetime) -> str:
    return f"_p{moment:%Y%m%d}"


def monthly_table(db: Database, name: str, months: range, *, default: bool = False, extra: str = "") -> None:
    """A parent like the sample's metrics table with one partition per month in `months`."""
    script = [
        f"CREATE TABLE {name} (id bigserial, workspace_id bigint NOT NULL, created_at timestamptz NOT NULL,"
        f" PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);",
        f"CREATE INDEX {name}_ws ON {name} (workspace_id, created_at);",
    ]
    for offset in months:
        lo, hi = month(offset), month(offset + 1)
        script.append(
            f"CREATE TABLE {name}{suffix(lo)} PARTITION OF {name} FOR VALUES FROM ('{lo:%Y-%m-%d} 00:00+00') "
            f"TO ('{hi:%Y-%m-%d} 00:00+00');"
        )
    if default:
        script.append(f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT;")
    db.run_script("\n".join(script) + extra)


def runs(ws: Workspace, job: str, *extra: str) -> list[dict[str, Any]]:
    result = ws.cli("trigger", job, "--json", *extra)
    assert result.exit_code in (0, 1), result.output
    return list(json.loads(result.output)["runs"])


def only(runs_: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    [run] = runs_
    assert len(run["findings"]) == 1, run
    [finding] = run["findings"]
    return run, finding


def partitions(db: Database, parent: str) -> dict[str, str]:
    """name -> bound, read the way the unit reads them."""
    rows = db.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass ORDER BY 1",
        (parent,),
    )
    return {name: bound for name, bound in rows}


def bound(lo: dt.datetime, hi: dt.datetime) -> str:
    return f"FOR VALUES FROM ('{lo:%Y-%m-%d} 00:00:00+00') TO ('{hi:%Y-%m-%d} 00:00:00+00')"


def snapshot(db: Database) -> str:
    """Relations, constraints, comments, grants and owners: everything a run could change."""
    rows = db.execute(
        """
        SELECT json_build_object(
          'classes', (SELECT json_agg(json_build_array(n.nspname, c.relname, c.relkind, c.relfilenode, c.reloptions,
                                                       c.relacl, c.relowner, c.relispartition,
                                                       pg_get_expr(c.relpartbound, c.oid)) ORDER BY 1, 2)
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')),
          'inherits', (SELECT json_agg(json_build_array(inhrelid::regclass::text, inhparent::regclass::text,
                                                        inhdetachpending) ORDER BY 1, 2) FROM pg_inherits),
          'constraints', (SELECT json_agg(json_build_array(conrelid::regclass::text, conname, convalidated)
                                          ORDER BY 1, 2)
                          FROM pg_constraint WHERE connamespace = 'public'::regnamespace),
          'comments', (SELECT json_agg(json_build_array(objoid, description) ORDER BY 1) FROM pg_description
                       WHERE classoid = 'pg_class'::regclass)
        )::text
        """
    )
    return str(rows[0][0])


def helper_constraints(db: Database) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE conname LIKE 'maintainer\\_%' ORDER BY 1, 2"
    )


# -- premake and retention ---------------------------------------------------------------------

def test_premake_and_retention_then_a_second_run_executes_no_ddl(workspace: Workspace, db: Database) -> None:
    monthly_table(db, "metrics", range(-14, 1), extra="""
        CREATE ROLE part_owner; CREATE ROLE part_reader;
        ALTER TABLE metrics OWNER TO part_owner;
        GRANT SELECT ON metrics TO part_reader;
        GRANT SELECT ON metrics TO PUBLIC;
        INSERT INTO metrics (workspace_id, created_at)
            SELECT g % 7, now() - make_interval(mins => g) FROM generate_series(1, 300) g;
    """)
    newest = f"metrics{suffix(month(0))}"
    db.execute(f"ALTER TABLE {newest} SET (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.01)")
    try:
        workspace.job("partitions", unit="partitions",
                      items=[{"table": "public.metrics", "interval": "1 month", "retention": "12 months"}])
        run, finding = only(runs(workspace, "partitions"))
        assert run["status"] == "ok", run["error"]
        assert finding | {"hint": None} == finding | {
            "table": "public.metrics", "interval": "1 month", "retention": "12 months", "partitions": 17,
            "partitions_ahead": 4, "default_rows": 0, "default_partition": None, "to_create": 4, "created": 4,
            "to_retire": 2, "retired": 2, "pending_detach": 0, "level": "ok", "hint": None,
        }
        names = partitions(db, "metrics")
        for offset in range(1, 5):
            lo = month(offset)
            assert names[f"metrics{suffix(lo)}"] == bound(lo, month(offset + 1))
        # retention by real upper bound: the two months ending at or before now - 12 months are gone
        for offset in (-14, -13):
            assert f"metrics{suffix(month(offset))}" not in names
            assert db.execute("SELECT to_regclass(%s)", (f"metrics{suffix(month(offset))}",)) == [(None,)]
        assert f"metrics{suffix(month(-12))}" in names
        # lock-safe shape: no CREATE ... PARTITION OF, a CHECK before ATTACH, CONCURRENTLY without DEFAULT
        statements = [a["sql"] for a in run["actions"]]
        assert not any("PARTITION OF" in s for s in statements)
        assert sum("DETACH PARTITION" in s and s.endswith("CONCURRENTLY") for s in statements) == 2
        first = f'"public"."metrics{suffix(month(1))}"'
        steps = [s for s in statements if first in s]
        assert steps[0].startswith(f'CREATE TABLE {first} (\n    LIKE "public"."metrics" INCLUDING ALL')
        assert "CHECK (" in steps[0] and "ATTACH PARTITION" in steps[-2]
        assert steps[-1].startswith(f"ALTER TABLE {first} DROP CONSTRAINT")
        # the 4 new tables in one transaction, each with its grants and owner; then their ATTACHes in
        # one, each with the drop of its helper CHECK
        create_at = statements.index(steps[0])
        creates = [s for s in statements if s.startswith("CREATE TABLE")]
        assert statements[create_at - 1] == "BEGIN" and len(creates) == 4
        assert statements.index("COMMIT", create_at) == statements.index(creates[-1]) + 4
        attach_at = statements.index(steps[-2])
        attaches = statements[attach_at - 1 : statements.index("COMMIT", attach_at) + 1]
        assert attaches[:3] == ["BEGIN", steps[-2], steps[-1]] and len(attaches) == 2 + 2 * 4
        assert all("ATTACH PARTITION" in s for s in attaches[1:-1:2])
        analyze = "ANALYZE ONLY" if db.server.version_num >= 180000 else "ANALYZE"
        assert statements[-1] == f'{analyze} "public"."metrics"'
        # the new partitions look like the old ones: owner, grants, storage parameters, indexes
        new = f"metrics{suffix(month(4))}"
        owner, acl, options = db.execute(
            "SELECT pg_get_userbyid(relowner), relacl::text[], reloptions FROM pg_class WHERE relname = %s", (new,)
        )[0]
        assert owner == "part_owner"
        assert any(entry.startswith("part_reader=r/") for entry in acl)
        assert any(entry.startswith("=r/") for entry in acl)  # PUBLIC
        assert sorted(options) == ["autovacuum_vacuum_scale_factor=0.01", "fillfactor=90"]
        attached = db.execute(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE c.relkind = 'i' AND i.inhrelid IN (SELECT indexrelid FROM pg_index WHERE indrelid = %s::regclass)",
            (new,),
        )
        assert attached == [(2,)]  # primary key and the workspace index, both attached to the parent's
        assert helper_constraints(db) == []
        assert db.execute("SELECT count(*) > 0 FROM pg_statistic WHERE starelid = 'metrics'::regclass") == [(True,)]

        before = snapshot(db)
        again, finding2 = only(runs(workspace, "partitions"))
        assert again["status"] == "ok" and again["actions"] == []
        assert finding2["created"] == 0 and finding2["retired"] == 0 and finding2["partitions_ahead"] == 4
        assert finding2["level"] == "ok"
        assert snapshot(db) == before
    finally:
        db.run_script("DROP TABLE metrics CASCADE; DROP OWNED BY part_owner, part_reader;"
                      " DROP ROLE part_owner, part_reader;")


def test_plan_shows_the_ddl_and_changes_nothing(workspace: Workspace, db: Database) -> None:
    monthly_table(db, "plan_me", range(-5, 1))
    workspace.job("partitions", unit="partitions",
                  items=[{"table": "public.plan_me", "interval": "1 month", "retention": "3 months"}])
    before = snapshot(db)
    plan = workspace.cli("plan", "partitions")
    assert plan.exit_code == 0, plan.output
    assert f'CREATE TABLE "public"."plan_me{suffix(month(1))}" (' in plan.output
    assert 'LIKE "public"."plan_me" INCLUDING ALL EXCLUDING IDENTITY' in plan.output
    assert "ATTACH PARTITION" in plan.output and "DETACH PARTITION" in plan.output and "CONCURRENTLY" in plan.output
    [run] = json.loads(workspace.cli("trigger", "partitions", "--dry-run", "--json").output)["runs"]
    assert run["status"] == "planned" and {a["status"] for a in run["actions"]} == {"planned"}
    assert run["findings"][0]["to_create"] == 4 and run["findings"][0]["created"] == 0
    assert snapshot(db) == before
    assert db.execute("SELECT to_regnamespace('maintainer')") == [(None,)]


@pytest.mark.parametrize(
    ("key", "interval", "expected_names"),
    [
        # ISO weeks start on Monday; quarters on January, April, July, October
        ("date", "1 week", "monday"),
        ("timestamp", "3 months", "quarter"),
        ("timestamptz", "1 day", "day"),
        ("timestamptz", "1 year", "year"),
    ],
)
def test_time_keys_and_intervals(
    workspace: Workspace, db: Database, key: str, interval: str, expected_names: str
) -> None:
    db.run_script(f"CREATE TABLE t (k {key} NOT NULL) PARTITION BY RANGE (k)")
    workspace.job("partitions", unit="partitions", params={"premake": 2},
                  items=[{"table": "public.t", "interval": interval}])
    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "ok", run["error"]
    assert finding["created"] == 3 and finding["partitions_ahead"] == 2 and finding["level"] == "ok"
    # new partitions are empty: the parent's statistics stay valid, no ANALYZE re-samples it
    assert not any(a["sql"].startswith("ANALYZE") for a in run["actions"])
    today = dt.datetime.now(UTC).date()
    starts = sorted(dt.date(int(n[3:7]), int(n[7:9]), int(n[9:11])) for n in partitions(db, "t"))
    assert starts[0] <= today
    if expected_names == "monday":
        assert all(s.isoweekday() == 1 for s in starts) and starts[1] - starts[0] == dt.timedelta(days=7)
    elif expected_names == "quarter":
        assert all(s.day == 1 and s.month in (1, 4, 7, 10) for s in starts)
    elif expected_names == "day":
        assert starts == [today + dt.timedelta(days=n) for n in range(3)]
    else:
        assert all(s.month == 1 and s.day == 1 for s in starts)
    db.execute("INSERT INTO t VALUES (now())")  # the current period really takes today's rows


def test_integer_keys_premake_from_the_largest_key_and_retire_by_key(workspace: Workspace, db: Database) -> None:
    db.run_script("""
        CREATE TABLE events (id bigint NOT NULL, v text) PARTITION BY RANGE (id);
        CREATE INDEX ON events (id);
        CREATE TABLE events_p0 PARTITION OF events FOR VALUES FROM (0) TO (1000);
        CREATE TABLE events_p1000 PARTITION OF events FOR VALUES FROM (1000) TO (2000);
        CREATE TABLE events_p2000 PARTITION OF events FOR VALUES FROM (2000) TO (3000);
        CREATE TABLE events_p3000 PARTITION OF events FOR VALUES FROM (3000) TO (4000);
        INSERT INTO events SELECT g, 'x' FROM generate_series(1, 2500) g;
    """)
    workspace.job("partitions", unit="partitions", params={"premake": 3},
                  items=[{"table": "public.events", "interval": 1000, "retention": 1500}])
    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "ok", run["error"]
    # max key 2500: current period [2000, 3000), three more ahead; retire ranges ending <= 2500 - 1500
    assert sorted(partitions(db, "events")) == ["events_p1000", "events_p2000", "events_p3000", "events_p4000",
                                                "events_p5000"]
    assert partitions(db, "events")["events_p5000"] == "FOR VALUES FROM ('5000') TO ('6000')"
    assert finding["created"] == 2 and finding["retired"] == 1 and finding["partitions_ahead"] == 3
    assert only(runs(workspace, "partitions"))[0]["actions"] == []


def test_integer_keys_with_a_default_that_holds_a_future_key(workspace: Workspace, db: Database) -> None:
    db.run_script("""
        CREATE TABLE ids (id int NOT NULL) PARTITION BY RANGE (id);
        CREATE TABLE ids_p0 PARTITION OF ids FOR VALUES FROM (0) TO (100);
        CREATE TABLE ids_default PARTITION OF ids DEFAULT;
        INSERT INTO ids SELECT generate_series(1, 50);
        INSERT INTO ids VALUES (250);  -- lands in DEFAULT: the largest key, inside a range to create
    """)
    workspace.job("partitions", unit="partitions", params={"premake": 2},
                  items=[{"table": "public.ids", "interval": 100}])
    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "ok", run["error"]
    # the largest key (250, in DEFAULT) sets the current period; the range holding it stays refused
    assert sorted(partitions(db, "ids")) == ["ids_default", "ids_p0", "ids_p300", "ids_p400"]
    assert finding["default_rows"] == 1 and finding["level"] == "critical"
    assert "200 .. 300" in finding["hint"] and "No partition holds the largest key" in finding["hint"]


# -- DEFAULT partition --------------------------------------------------------------------------

def test_default_with_rows_is_proven_empty_for_new_ranges_and_blocks_only_ranges_it_holds(
    workspace: Workspace, db: Database
) -> None:
    monthly_table(db, "hooks", range(-5, 1), default=True)
    db.execute(
        "INSERT INTO hooks (workspace_id, created_at) VALUES (1, '1970-01-01 00:00:05+00'), (1, %s), (1, %s)",
        (month(-9), month(3) + dt.timedelta(days=2)),  # before every partition, and inside a future month
    )
    workspace.job("partitions", unit="partitions",
                  items=[{"table": "public.hooks", "interval": "1 month", "retention": "3 months"}])
    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "ok", run["error"]
    names = partitions(db, "hooks")
    assert f"hooks{suffix(month(3))}" not in names  # DEFAULT holds a row of that month: refused, not scanned
    for offset in (1, 2, 4):
        assert f"hooks{suffix(month(offset))}" in names
    assert finding["default_rows"] == 3 and finding["default_partition"] == "public.hooks_default"
    assert finding["created"] == 3 and finding["partitions_ahead"] == 2 and finding["level"] == "warn"
    assert f"{month(3):%Y-%m-%d}" in finding["hint"] and "hooks_default holds 3 row(s)" in finding["hint"]
    statements = [a["sql"] for a in run["actions"]]
    assert sum("VALIDATE CONSTRAINT" in s for s in statements) == 3
    # with a DEFAULT, DETACH CONCURRENTLY is impossible: plain DETACH under lock_timeout
    detaches = [s for s in statements if "DETACH PARTITION" in s]
    assert len(detaches) == 2 and not any("CONCURRENTLY" in s for s in detaches)
    assert helper_constraints(db) == []  # the excluding CHECKs are gone again
    assert db.execute("SELECT count(*) FROM hooks_default") == [(3,)]
    db.execute("INSERT INTO hooks (workspace_id, created_at) VALUES (1, %s)", (month(4) + dt.timedelta(days=1),))
    assert db.execute(f"SELECT count(*) FROM hooks{suffix(month(4))}") == [(1,)]


# -- isolation of misconfigured items ----------------------------------------------------------

def test_a_misconfigured_item_fails_alone(workspace: Workspace, db: Database) -> None:
    monthly_table(db, "good", range(0, 1))
    db.run_script("""
        CREATE TABLE plain (id int, created_at timestamptz);
        CREATE TABLE listed (id int) PARTITION BY LIST (id);
        CREATE TABLE texty (k text) PARTITION BY RANGE (k);
        CREATE TABLE pair (a int, b int) PARTITION BY RANGE (a, b);
    """)
    workspace.job("partitions", unit="partitions", items=[
        {"table": "public.missing", "interval": "1 month"},
        {"table": "public.plain", "interval": "1 month"},
        {"table": "public.listed", "interval": "1 month"},
        {"table": "public.texty", "interval": "1 month"},
        {"table": "public.pair", "interval": 100},
        {"table": "public.good", "interval": 1000},
        {"table": "public.good", "interval": "2 hours"},
        {"table": "public.good", "interval": "1 month", "retention": 5},
        {"table": "public.good", "interval": "1 month"},
    ])
    result = workspace.cli("trigger", "partitions", "--json")
    assert result.exit_code == 1
    outcome = [(r["status"], r.get("sqlstate"), r["error"]) for r in json.loads(result.output)["runs"]]
    assert [status for status, _, _ in outcome] == ["failed"] * 8 + ["ok"]
    assert "public.missing does not exist" in outcome[0][2]
    assert outcome[1][1:] == ("42809", "public.plain is not a partitioned table: the partitions unit manages "
                                        "tables declared PARTITION BY RANGE (column)")
    assert outcome[2][1] == "0A000" and "LIST or HASH" in outcome[2][2]
    assert outcome[3][1] == "0A000" and "on k of type text" in outcome[3][2]
    assert outcome[4][1] == "0A000" and "several columns" in outcome[4][2]
    assert outcome[5][1] == "22023" and "time key" in outcome[5][2]
    assert outcome[6][1] == "22023" and "interval 2 hours is not supported" in outcome[6][2]
    assert outcome[7][1] == "22023" and "retention 5 does not fit" in outcome[7][2]
    assert len(partitions(db, "good")) == 5
    findings = [r["findings"][0] for r in json.loads(result.output)["runs"][1:]]
    assert [f["level"] for f in findings] == ["critical"] * 7 + ["ok"]


def test_params_are_checked_when_the_config_loads(offline_workspace: Workspace) -> None:
    offline_workspace.job("partitions", unit="partitions", items=[
        {"table": "public.t", "interval": "monthly"},
        {"table": "public.t", "interval": "1 month", "retention_mode": "archive"},
    ])
    result = offline_workspace.cli("check")
    assert result.exit_code == 2
    assert "items[0]: interval: 'monthly' is not an interval" in result.output
    assert "expected an integer" in result.output
    assert "items[1]: retention_mode: 'archive' is not one of ['drop', 'detach']" in result.output


def test_union_param_types_take_the_first_type_that_fits() -> None:
    spec = ParamSpec(type=["interval", "integer"])
    assert coerce_param(spec, "3 Months") == "3 months"
    assert coerce_param(spec, 1000) == 1000
    with pytest.raises(ValueError, match=r"not an interval .*; or expected an integer, got True"):
        coerce_param(spec, True)


# -- locks, interruptions, references ------------------------------------------------------------

@pytest.mark.parametrize("with_default", [False, True], ids=["no-default", "default"])
def test_writers_never_wait_longer_than_lock_timeout(workspace: Workspace, db: Database, with_default: bool) -> None:
    """A long transaction on the parent, writers inserting all the time, a full run: writers may
    queue behind a DDL only until its lock_timeout fires, never until the long transaction ends."""
    monthly_table(db, "busy", range(-14, 1), default=with_default)
    lock_timeout = 0.3
    # statement_timeout: a DDL that ignored lock_timeout would hold the writers this long, then fail
    workspace.write_config(defaults={"lock_timeout": "300ms", "statement_timeout": "10s", "retry_backoff": "50ms",
                                     "max_attempts": 3})
    workspace.job("partitions", unit="partitions",
                  items=[{"table": "public.busy", "interval": "1 month", "retention": "12 months"}])
    latencies: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(past: bool) -> None:
        try:
            with db.connect() as conn:
                while not stop.is_set():
                    started = time.monotonic()
                    # current rows; with a DEFAULT also rows that land in it
                    conn.execute("INSERT INTO busy (workspace_id, created_at) VALUES (1, %s)",
                                 ("1999-01-01 00:00+00" if past else dt.datetime.now(UTC),))
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.005)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    blocker = db.connect()
    blocker.autocommit = False
    blocker.execute("SELECT count(*) FROM busy")  # ACCESS SHARE on the parent and every partition, held
    writers = [threading.Thread(target=write, args=(past,)) for past in (False, with_default)]
    for thread in writers:
        thread.start()
    try:
        time.sleep(0.3)
        run, finding = only(runs(workspace, "partitions"))
        # a DDL waiting for ACCESS EXCLUSIVE would hold the writers until the blocker ends: keep it open
        time.sleep(3)
    finally:
        stop.set()
        for thread in writers:
            thread.join()
        blocker.rollback()
        blocker.close()
    assert not errors, errors
    assert len(latencies) > 20
    # lock_timeout plus scheduling noise on a busy machine; a writer stuck behind the blocker waits 3 s or more
    assert max(latencies) < lock_timeout + 1.2, sorted(latencies)[-5:]
    if with_default:
        # ATTACH needs ACCESS EXCLUSIVE on DEFAULT, DETACH on the parent: both gave up, nothing changed
        assert run["status"] == "failed" and run["sqlstate"] == "55P03"
        assert finding["created"] == 0 and finding["retired"] == 0 and finding["level"] == "critical"
    else:
        # creations need no lock the blocker holds; DETACH CONCURRENTLY waits for it, gives up, stays pending
        assert finding["created"] == 4 and finding["partitions_ahead"] == 4
        assert finding["pending_detach"] == 1 and finding["level"] == "warn" and "FINALIZE" in finding["hint"]
    # once the long transaction is gone the next run finishes the job
    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "ok", run["error"]
    assert finding["pending_detach"] == 0 and finding["partitions_ahead"] == 4
    assert f"busy{suffix(month(-13))}" not in partitions(db, "busy")
    assert helper_constraints(db) == []


def test_a_run_killed_during_detach_leaves_a_pending_detach_the_next_run_finalizes(
    workspace: Workspace, db: Database
) -> None:
    monthly_table(db, "killme", range(-8, 3))
    # The backend notices its client is gone even while it waits for a lock (PostgreSQL 14+).
    dsn = db.dsn + " options='-c client_connection_check_interval=100ms'"
    workspace.write_config(targets={"app": {"dsn": dsn}},
                           defaults={"lock_timeout": "60s", "retry_backoff": "50ms", "max_attempts": 3})
    workspace.job("partitions", unit="partitions", params={"premake": 2},
                  items=[{"table": "public.killme", "interval": "1 month", "retention": "6 months"}])
    executable = shutil.which("maintainer", path=str(Path(sys.executable).parent))
    assert executable is not None
    blocker = db.connect()
    blocker.autocommit = False
    blocker.execute("SELECT count(*) FROM killme")  # DETACH ... CONCURRENTLY will wait for this transaction
    process = subprocess.Popen([executable, "trigger", "partitions", "--config", str(workspace.config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while db.execute("SELECT count(*) FROM pg_inherits WHERE inhdetachpending") != [(1,)]:
            assert time.monotonic() < deadline and process.poll() is None, "the detach never started"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        while db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-maintainer partitions'") \
                != [(0,)]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        blocker.rollback()
        blocker.close()
    [(pending,)] = db.execute("SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhdetachpending")
    assert pending == f"killme{suffix(month(-8))}"

    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "ok", run["error"]
    assert run["actions"][0]["sql"] == f'ALTER TABLE "public"."killme" DETACH PARTITION "public"."{pending}" FINALIZE'
    assert run["actions"][1]["sql"] == f'DROP TABLE "public"."{pending}"'
    assert finding["pending_detach"] == 0 and finding["retired"] == 2
    assert db.execute("SELECT to_regclass(%s)", (pending,)) == [(None,)]
    assert db.execute("SELECT count(*) FROM pg_inherits WHERE inhdetachpending") == [(0,)]
    history = db.execute("SELECT status FROM maintainer.run ORDER BY id")
    assert history == [("interrupted",), ("ok",)]


def test_a_foreign_key_blocking_retirement_is_reported_never_cascaded(workspace: Workspace, db: Database) -> None:
    monthly_table(db, "orders", range(-6, 2))
    old = month(-6) + dt.timedelta(days=3)
    db.run_script(f"""
        INSERT INTO orders (id, workspace_id, created_at) VALUES (1, 1, '{old.isoformat()}');
        CREATE TABLE refunds (order_id bigint, order_at timestamptz,
                              FOREIGN KEY (order_id, order_at) REFERENCES orders);
        INSERT INTO refunds VALUES (1, '{old.isoformat()}');
    """)
    workspace.job("partitions", unit="partitions", params={"premake": 1},
                  items=[{"table": "public.orders", "interval": "1 month", "retention": "3 months"}])
    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "failed" and run["sqlstate"] == "23503"
    assert "foreign key" in run["error"]
    assert f"orders{suffix(month(-6))}" in partitions(db, "orders")
    assert finding["retired"] == 2 and finding["level"] == "warn"  # the two months without references went
    assert "refunds" in finding["hint"] and "cascaded" in finding["hint"]
    assert db.execute("SELECT count(*) FROM refunds") == [(1,)]
    assert db.execute("SELECT count(*) FROM pg_inherits WHERE inhdetachpending") == [(0,)]


# -- interrupted work, conflicts, detach mode ---------------------------------------------------------

def test_an_interrupted_creation_is_resumed_and_foreign_names_are_left_alone(
    workspace: Workspace, db: Database
) -> None:
    monthly_table(db, "resume", range(0, 1))
    taken = f"resume{suffix(month(4))}"
    db.execute(f"CREATE TABLE {taken} (note text)")  # somebody else's table with a planned name
    workspace.job("partitions", unit="partitions",
                  items=[{"table": "public.resume", "interval": "1 month"}])
    blocker = db.connect()
    blocker.autocommit = False
    blocker.execute("LOCK TABLE resume IN SHARE UPDATE EXCLUSIVE MODE")  # ATTACH cannot get its lock
    try:
        run, finding = only(runs(workspace, "partitions"))
    finally:
        blocker.rollback()
        blocker.close()
    assert run["status"] == "failed" and run["sqlstate"] == "55P03"
    assert finding["created"] == 0 and finding["level"] == "critical"
    assert "creation(s) failed" in finding["hint"] and taken in finding["hint"]
    leftovers = [name for (name,) in db.execute("SELECT relname FROM pg_class WHERE relname LIKE 'resume\\_p%%'"
                                               " AND relkind = 'r' AND NOT relispartition ORDER BY 1")]
    assert leftovers == sorted([f"resume{suffix(month(n))}" for n in (1, 2, 3)] + [taken])
    db.execute("GRANT SELECT ON resume TO PUBLIC")  # the parent's grants changed meanwhile

    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "ok", run["error"]
    resumed_acl = db.execute("SELECT relacl::text[] FROM pg_class WHERE relname = %s", (leftovers[0],))[0][0]
    assert any(entry.startswith("=r/") for entry in resumed_acl)  # the resumed table got them too
    assert finding["created"] == 3 and finding["partitions_ahead"] == 3 and finding["level"] == "warn"
    assert not any(a["sql"].startswith("CREATE TABLE") for a in run["actions"])  # resumed: ATTACH only
    assert db.execute(f"SELECT relispartition FROM pg_class WHERE relname = '{taken}'") == [(False,)]
    assert helper_constraints(db) == []


def test_detach_mode_keeps_the_tables_and_drop_mode_finishes_interrupted_drops(
    workspace: Workspace, db: Database
) -> None:
    monthly_table(db, "keep", range(-5, 1))
    monthly_table(db, "tidy", range(-5, 1))
    old = f"tidy{suffix(month(-5))}"
    # what a run killed between DETACH and DROP leaves behind, and a bystander with a similar comment
    db.run_script(f"""
        COMMENT ON TABLE {old} IS 'pg-maintainer: retiring partition of public.tidy FROM (x) TO (y); dropped';
        ALTER TABLE tidy DETACH PARTITION {old};
        CREATE TABLE bystander (id int);
        COMMENT ON TABLE bystander IS 'pg-maintainer: retiring partition of public.tidy_other FROM (x) TO (y)';
    """)
    workspace.job("partitions", unit="partitions",
                  params={"premake": 2, "interval": "1 month", "retention": "3 months"},
                  items=[{"table": "public.keep", "retention_mode": "detach"}, {"table": "public.tidy"}])
    keep, tidy = runs(workspace, "partitions")
    assert keep["status"] == "ok" and tidy["status"] == "ok", (keep["error"], tidy["error"])
    detached = [f"keep{suffix(month(n))}" for n in (-5, -4)]
    for name in detached:
        assert name not in partitions(db, "keep")
        [(comment,)] = db.execute("SELECT obj_description(%s::regclass, 'pg_class')", (name,))
        assert comment.startswith("pg-maintainer: detached from public.keep FROM (")
    assert keep["findings"][0]["retired"] == 2
    assert db.execute("SELECT to_regclass(%s)", (old,)) == [(None,)]
    assert any(a["sql"] == f'DROP TABLE "public"."{old}"' for a in tidy["actions"])
    assert db.execute("SELECT to_regclass('bystander')") == [("bystander",)]
    keep2, tidy2 = runs(workspace, "partitions")
    assert keep2["actions"] == [] and tidy2["actions"] == []
    assert all(db.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)) == [(True,)] for name in detached)


def test_gaps_are_filled_around_odd_existing_bounds(workspace: Workspace, db: Database) -> None:
    monthly_table(db, "holes", range(0, 1))
    odd_lo, odd_hi = month(1) + dt.timedelta(days=14), month(2) + dt.timedelta(days=9)
    db.execute(f"CREATE TABLE holes_odd PARTITION OF holes FOR VALUES FROM ('{odd_lo:%Y-%m-%d}+00') "
               f"TO ('{odd_hi:%Y-%m-%d}+00')")
    workspace.job("partitions", unit="partitions", items=[{"table": "public.holes", "interval": "1 month"}])
    run, finding = only(runs(workspace, "partitions"))
    assert run["status"] == "ok", run["error"]
    names = partitions(db, "holes")
    assert names[f"holes{suffix(month(1))}"] == bound(month(1), odd_lo)
    assert names[f"holes{suffix(odd_hi)}"] == bound(odd_hi, month(3))
    assert names[f"holes{suffix(month(4))}"] == bound(month(4), month(5))
    assert finding["created"] == 4 and finding["partitions_ahead"] == 5 and finding["level"] == "ok"


def test_long_table_names_keep_the_suffix_and_stay_apart(workspace: Workspace, db: Database) -> None:
    long_a = "a" * 58 + "_one"
    long_b = "a" * 58 + "_two"
    for name in (long_a, long_b):
        db.execute(f"CREATE TABLE {name} (k date NOT NULL) PARTITION BY RANGE (k)")
    workspace.job("partitions", unit="partitions", params={"premake": 0, "interval": "1 month"},
                  items=[{"table": f"public.{long_a}"}, {"table": f"public.{long_b}"}])
    results = runs(workspace, "partitions")
    assert [r["status"] for r in results] == ["ok", "ok"]
    [a] = partitions(db, long_a)
    [b] = partitions(db, long_b)
    assert a != b and len(a.encode()) <= 63 and len(b.encode()) <= 63
    assert a.endswith(suffix(month(0))) and b.endswith(suffix(month(0)))


def test_the_sample_jobs_manage_the_sample_schema(workspace: Workspace, db: Database) -> None:
    db.run_script((ROOT / "maintainer" / "sample" / "schema.sql").read_text())
    db.execute("INSERT INTO workspace_webhook_payloads (workspace_id, source, event, delivery_id, payload, created_at)"
               " VALUES (1, 'github', 'push', 'stray', '{}', '1970-01-01 00:00:05+00')")
    shutil.copy(ROOT / "jobs" / "partitions.yaml", workspace.root / "jobs" / "partitions.yaml")
    results = runs(workspace, "partitions")
    by_table = {r["findings"][0]["table"]: r for r in results}
    assert set(by_table) == {"public.workspace_operations_metrics", "public.workspace_user_activities",
                             "public.workspace_webhook_payloads"}
    assert all(r["status"] == "ok" for r in results), [r["error"] for r in results]
    metrics = by_table["public.workspace_operations_metrics"]["findings"][0]
    assert metrics["retired"] == 2 and metrics["partitions_ahead"] == 4 and metrics["level"] == "ok"
    hooks = by_table["public.workspace_webhook_payloads"]["findings"][0]
    assert hooks["retired"] == 2 and hooks["default_rows"] == 1 and hooks["level"] == "warn"
    assert all(not r["actions"] for r in runs(workspace, "partitions"))


# -- engine: the prepare block --------------------------------------------------------------------

PREPARED_UNIT = """---
description: count the rows of the newest pick_* table, found by prepare
---
{% block prepare %}
SELECT relname::text AS name FROM pg_class WHERE relname LIKE 'pick\\_%' AND relkind = 'r' ORDER BY relname DESC LIMIT 1
{% endblock %}
{% block discover %}
SELECT {{ prepared.name | literal }} AS name, count(*) AS n FROM {{ 'public' | ident(prepared.name) }}
{% endblock %}
"""


def test_prepare_lets_discover_name_what_the_catalog_holds(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE TABLE pick_a (x int); CREATE TABLE pick_b (x int); INSERT INTO pick_b VALUES (1), (2);")
    workspace.unit("picker", PREPARED_UNIT)
    workspace.job("picker", unit="picker")
    for extra in ((), ("--dry-run",)):
        [run] = runs(workspace, "picker", *extra)
        assert run["status"] in ("ok", "planned"), run["error"]
        assert run["findings"] == [{"name": "pick_b", "n": 2}]

"""The `anonymize` unit against real PostgreSQL: batched, resumable, audited, safe for a live table.

Also the engine pieces it needs: `sql_with_args` (`%(name)s` in operator SQL bound from `--arg`),
`{expr: …}` values in `map` params, verify seeing `discovered`, and committed batches staying on
record when a later batch fails.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pglast
import psycopg
import pytest

from maintainer.project import load_project, parse_args
from maintainer.render import ArgValue, RenderError, TrustedSql
from maintainer.runner import Progress, RunOptions, run
from maintainer.units import ParamSpec, coerce_param, parse_unit
from tests.conftest import Database, Workspace

HOSTILE = "x' OR '1'='1"
CUTOFF = "2024-03-01"  # fixed, so "inside where" never drifts while a test runs
RETENTION = f"created_at < '{CUTOFF}'"
ERASE = {"actor_email": None, "actor_ip": None, "user_agent": {"expr": "'erased-' || id"}}


def make_activities(db: Database, rows: int = 3000, *, table: str = "activities") -> None:
    """An audit trail with personal data; created_at spreads over Jan-May 2024 (hourly)."""
    db.run_script(
        f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id bigint NOT NULL,"
        " action text NOT NULL, actor_email text, actor_ip inet, user_agent text, created_at timestamptz NOT NULL);"
        f"INSERT INTO {table} (user_id, action, actor_email, actor_ip, user_agent, created_at)"
        " SELECT g % 40, 'login', 'user' || (g % 40) || '@example.com', '192.0.2.0'::inet + (g % 250),"
        "        'Mozilla/5.0 (X11; Linux x86_64) ' || g, timestamptz '2024-01-01 00:00+00' + g * interval '1 hour'"
        f" FROM generate_series(1, {rows}) g;"
    )


def fingerprint(db: Database, where: str, table: str = "activities") -> str:
    """Every byte of the chosen rows plus their row version (xmin): equal means not even rewritten."""
    return str(db.execute(
        f"SELECT md5(coalesce(string_agg(t::text || '/' || t.xmin::text, '|' ORDER BY id), '')) FROM {table} t"
        f" WHERE {where}"
    )[0][0])


def sweep_job(ws: Workspace, name: str = "sweep", **item: Any) -> None:
    ws.job(name, unit="anonymize", items=[{
        "table": "public.activities", "where": RETENTION, "set": ERASE, "pause": "0s", **item,
    }])


def trigger(ws: Workspace, job: str, *args: str) -> list[dict[str, Any]]:
    result = ws.cli("trigger", job, *args, "--json")
    runs: list[dict[str, Any]] = json.loads(result.output)["runs"]
    return runs


def ledger_text(db: Database) -> str:
    """Everything the ledger holds, as one string (to look for values that must not be there)."""
    tables = [r[0] for r in db.execute(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'maintainer'")]
    return " ".join(str(db.execute(f"SELECT coalesce(string_agg(t::text, ' '), '') FROM {t} t")[0][0]) for t in tables)


# -- engine pieces (no database) ------------------------------------------------------------------


def test_sql_with_args_binds_placeholders_and_refuses_what_it_must(tmp_path: Path) -> None:
    path = tmp_path / "u.sql.j2"
    path.write_text("---\ndescription: t\nparams:\n  where: {type: sql}\n  note: {type: string}\n---\n"
                    "{% block apply %}SELECT 1 FROM t WHERE {{ params[name] | sql_with_args(args) }}{% endblock %}")
    unit = parse_unit(path)
    where = TrustedSql("email = %(email)s OR note LIKE 'a%' OR id = %(id)s OR email = %(email)s")
    text, values = unit.render_block("apply", {"params": {"where": where}, "name": "where",
                                               "args": {"email": ArgValue(HOSTILE), "id": ArgValue("7")}})
    assert text == "SELECT 1 FROM t WHERE email = $1 OR note LIKE 'a%' OR id = $2 OR email = $3"
    assert values == [HOSTILE, "7", HOSTILE] and HOSTILE not in text
    assert len(pglast.parse_sql(text)) == 1
    with pytest.raises(RenderError, match=r"run it with --arg email=… --arg id=…"):
        unit.render_block("apply", {"params": {"where": where}, "name": "where", "args": {}})
    with pytest.raises(RenderError, match="only accepts params declared `type: sql`"):
        unit.render_block("apply", {"params": {"note": "id = %(id)s"}, "name": "note", "args": {"id": "1"}})


def test_expr_in_a_map_param_is_trusted_sql_and_nothing_else_is() -> None:
    spec = ParamSpec(type="map")
    value = coerce_param(spec, {"a": {"expr": "'erased-' || id"}, "b": None, "c": "text", "d": {"x": 1}})
    assert isinstance(value["a"]["expr"], TrustedSql)
    assert value["b"] is None and type(value["c"]) is str and value["d"] == {"x": 1}
    with pytest.raises(ValueError, match="expr: expected SQL text"):
        coerce_param(spec, {"a": {"expr": 5}})


# -- sweeps ---------------------------------------------------------------------------------------


def test_retention_sweep_changes_only_matching_rows_and_a_rerun_changes_nothing(
    workspace: Workspace, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_activities(db)
    matching = db.execute(f"SELECT count(*) FROM activities WHERE {RETENTION}")[0][0]
    outside = fingerprint(db, f"NOT ({RETENTION})")
    sweep_job(workspace, batch_size=500)
    monkeypatch.setenv("MAINTAINER_USER", "sre-alice")

    run = trigger(workspace, "sweep")[0]
    assert run["status"] == "ok", run
    finding = run["findings"][0]
    assert finding["table"] == "public.activities"
    assert (finding["rows_anonymized"], finding["rows_remaining"], finding["level"]) == (matching, 0, "ok")
    assert finding["batches"] == math.ceil(matching / 500)
    assert run["actions"][0]["iterations"] == math.ceil(matching / 500) + 1  # + the batch that found nothing
    assert fingerprint(db, f"NOT ({RETENTION})") == outside
    assert db.execute(
        f"SELECT count(*) FROM activities WHERE {RETENTION} AND actor_email IS NULL AND actor_ip IS NULL"
        " AND user_agent = 'erased-' || id") == [(matching,)]

    everything = fingerprint(db, "true")
    rerun = trigger(workspace, "sweep")[0]
    assert rerun["status"] == "ok" and rerun["actions"] == []
    assert (rerun["findings"][0]["rows_anonymized"], rerun["findings"][0]["rows_remaining"]) == (0, 0)
    assert fingerprint(db, "true") == everything

    # The ledger: table, rows changed, who triggered it; the SQL with placeholders only.
    (trigger_kind, who, item), = db.execute(
        "SELECT trigger, triggered_by, item FROM maintainer.run ORDER BY id LIMIT 1")
    assert (trigger_kind, who, item) == ("manual", "sre-alice", "public.activities")
    assert db.execute("SELECT rows FROM maintainer.action ORDER BY run_id LIMIT 1") == [(matching,)]
    assert db.execute(
        "SELECT (data->>'rows_anonymized')::int, level FROM maintainer.finding ORDER BY run_id LIMIT 1"
    ) == [(matching, "ok")]


def test_without_batch_size_each_batch_is_sized_to_take_about_batch_time(workspace: Workspace, db: Database) -> None:
    """The default sizing: 1000 rows first, then the previous batch's pace scaled to `batch_time`
    (at most 4x per batch); a fixed `batch_size` turns it off (the test above)."""
    make_activities(db, rows=3000)
    # a generous target: the second batch may grow 4x (to 4000) and takes the remaining 2000 rows
    sweep_job(workspace, "roomy", where="user_id >= 0", batch_time="1h")
    # a tiny target: batches shrink to what takes about a millisecond (≈ 10-300 rows), so many more
    sweep_job(workspace, "tight", where="user_id >= 0", batch_time="1ms",
              set={"actor_email": None, "actor_ip": None, "user_agent": "x"})
    sweep_job(workspace, "broken", batch_time="0s")

    roomy = trigger(workspace, "roomy")[0]
    assert roomy["status"] == "ok", roomy
    assert roomy["actions"][0]["iterations"] == 3  # 1000, 2000, then the batch that found nothing
    finding = roomy["findings"][0]
    assert (finding["rows_anonymized"], finding["rows_remaining"], finding["batches"]) == (3000, 0, 2)
    assert finding["message"] == "3000 row(s) anonymized in 2 batch(es); none remaining"

    tight = trigger(workspace, "tight")[0]
    assert tight["status"] == "ok", tight
    assert (tight["findings"][0]["rows_anonymized"], tight["findings"][0]["rows_remaining"]) == (3000, 0)
    assert tight["actions"][0]["iterations"] > 5, tight["actions"]  # fixed 1000-row batches would be 4
    assert tight["findings"][0]["batches"] == tight["actions"][0]["iterations"] - 1  # the last found nothing
    assert db.execute("SELECT count(*) FROM activities WHERE user_agent = 'x' AND actor_email IS NULL") == [(3000,)]

    broken = trigger(workspace, "broken")[0]
    assert broken["status"] == "failed"
    assert broken["findings"][0]["message"] == "batch_time must be positive (or set batch_size)"


def test_a_sweep_reads_each_row_a_bounded_number_of_times(workspace: Workspace, db: Database) -> None:
    """O(N), not O(N²/batch): the key cursor never rescans finished rows (counted by the server)."""
    rows = 4000
    make_activities(db, rows=rows)
    db.execute("ANALYZE activities")
    sweep_job(workspace, where="user_id >= 0", batch_size=100)
    assert trigger(workspace, "sweep")[0]["findings"][0]["rows_anonymized"] == rows
    deadline = time.monotonic() + 30
    # a backend flushes its table statistics when it exits
    while db.execute("SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'pg-maintainer%'"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (read,) = db.execute(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables"
        " WHERE relname = 'activities'")[0]
    # discover's count and report's count scan it once each; the batches fetch each row twice (lock, update).
    # Rescanning from the start each batch would read ~rows²/(2·batch) = 80,000 here.
    assert read <= 5 * rows, read


def test_a_partitioned_parent_is_swept_leaf_by_leaf_with_progress(workspace: Workspace, db: Database) -> None:
    db.run_script("""
        CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, user_id bigint NOT NULL, email text,
                             created_at timestamptz NOT NULL, PRIMARY KEY (id, created_at))
            PARTITION BY RANGE (created_at);
        CREATE TABLE events_p202401 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
        -- a sub-partitioned month: its leaves are what holds rows
        CREATE TABLE events_p202402 PARTITION OF events FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')
            PARTITION BY HASH (id);
        CREATE TABLE events_p202402_h0 PARTITION OF events_p202402 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE events_p202402_h1 PARTITION OF events_p202402 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
        CREATE TABLE events_p202403 PARTITION OF events FOR VALUES FROM ('2024-03-01') TO ('2024-04-01');
        CREATE TABLE events_default PARTITION OF events DEFAULT;
        CREATE INDEX ON events (created_at);
        INSERT INTO events (user_id, email, created_at)
        SELECT g % 7, 'u' || g || '@example.com', timestamptz '2023-12-20 00:00+00' + g * interval '1 hour'
          FROM generate_series(1, 2400) g;
    """)
    where = "created_at < '2024-03-15'"
    per_leaf = dict(db.execute(
        f"SELECT tableoid::regclass::text, count(*) FROM events WHERE {where} GROUP BY 1"))
    assert len(per_leaf) == 5  # default (December), January, both February leaves, March
    outside = fingerprint(db, f"NOT ({where})", table="events")
    # key: created_at -> pages by (created_at, id): the operator's column, then the rest of the primary key
    workspace.job("sweep", unit="anonymize", items=[{
        "table": "public.events", "where": where, "key": "created_at", "set": {"email": None}, "batch_size": 250,
        "pause": "0s"}])
    project = load_project(str(workspace.config))
    seen: list[Progress] = []
    result = run(project.run_specs(project.job("sweep"))[0], RunOptions(progress=seen.append))
    assert result.status == "ok", result.error
    finding = result.findings[0]
    assert (finding["rows_anonymized"], finding["rows_remaining"]) == (sum(per_leaf.values()), 0)
    assert finding["relations"] == 5
    assert db.execute(f"SELECT count(*) FROM events WHERE {where} AND email IS NOT NULL") == [(0,)]
    assert fingerprint(db, f"NOT ({where})", table="events") == outside
    # progress: one bar per leaf, its total the leaf's estimate, its last report every row of it
    finals = {p.step: p for p in seen}
    assert sorted((p.estimate, p.rows) for p in finals.values()) == sorted((n, n) for n in per_leaf.values())
    assert all(p.steps == 5 for p in seen)


def test_erasure_binds_the_argument_and_a_hostile_value_matches_nothing(
    workspace: Workspace, db: Database
) -> None:
    make_activities(db, rows=800)
    workspace.job("erase", unit="anonymize", items=[
        {"table": "public.activities", "where": "user_id = %(user_id)s", "set": ERASE}])
    workspace.job("erase-email", unit="anonymize", items=[
        {"table": "public.activities", "where": "actor_email = %(email)s", "set": ERASE}])
    before = fingerprint(db, "true")

    typed = trigger(workspace, "erase", "--arg", f"user_id={HOSTILE}")[0]
    assert typed["status"] == "failed" and typed["sqlstate"] == "22P02"  # not a bigint: nothing matched
    text = trigger(workspace, "erase-email", "--arg", f"email={HOSTILE}")[0]
    assert text["status"] == "ok", text
    assert (text["findings"][0]["rows_anonymized"], text["findings"][0]["rows_remaining"]) == (0, 0)
    assert fingerprint(db, "true") == before

    missing = trigger(workspace, "erase")[0]
    assert missing["status"] == "failed" and "run it with --arg user_id=…" in missing["error"]

    others = fingerprint(db, "user_id <> 7")
    done = trigger(workspace, "erase", "--arg", "user_id=7")[0]
    assert done["status"] == "ok"
    assert done["findings"][0]["rows_anonymized"] == 20
    assert db.execute("SELECT count(*) FROM activities WHERE user_id = 7 AND actor_email IS NOT NULL") == [(0,)]
    assert fingerprint(db, "user_id <> 7") == others
    stored = ledger_text(db)
    assert HOSTILE not in stored and "OR '1'" not in stored and "user7@" not in stored


def test_now_placeholder_is_the_run_start_and_not_an_argument(workspace: Workspace, db: Database) -> None:
    db.run_script(
        "CREATE TABLE stamps (id bigint PRIMARY KEY, email text, at timestamptz NOT NULL);"
        "INSERT INTO stamps SELECT g, 'a' || g || '@example.com', now() + (g - 10) * interval '1 hour'"
        " + interval '30 minutes' FROM generate_series(1, 20) g;")  # ids 1-9 in the past, 10-20 ahead
    workspace.job("stamp", unit="anonymize", items=[
        {"table": "public.stamps", "where": "at < %(now)s", "set": {"email": None}}])
    run = trigger(workspace, "stamp", "--arg", "now=2999-01-01")[0]
    assert run["status"] == "ok", run
    assert db.execute("SELECT array_agg(id ORDER BY id) FROM stamps WHERE email IS NULL") == [(list(range(1, 10)),)]
    assert "$" in run["actions"][0]["sql"] and "2999" not in run["actions"][0]["sql"]


def test_a_locked_row_is_skipped_reported_and_taken_by_the_next_run(workspace: Workspace, db: Database) -> None:
    make_activities(db, rows=1200)
    sweep_job(workspace, batch_size=100)
    matching = db.execute(f"SELECT count(*) FROM activities WHERE {RETENTION}")[0][0]
    with db.connect() as holder:
        holder.autocommit = False
        holder.execute("SELECT id FROM activities WHERE id = 150 FOR UPDATE")  # the application, mid-transaction
        run = trigger(workspace, "sweep")[0]
        assert run["status"] == "ok", run
        finding = run["findings"][0]
        assert (finding["rows_anonymized"], finding["rows_remaining"]) == (matching - 1, 1)
        assert finding["level"] == "warn" and "still match" in finding["message"]
        assert run["actions"][0].get("attempts", 1) == 1  # skipped at once, never waited on
        assert db.execute("SELECT count(*) FROM activities WHERE id = 150 AND actor_email IS NOT NULL") == [(1,)]
        holder.rollback()
    assert db.execute("SELECT level FROM maintainer.finding") == [("warn",)]
    later = trigger(workspace, "sweep")[0]
    assert (later["findings"][0]["rows_anonymized"], later["findings"][0]["rows_remaining"]) == (1, 0)
    assert later["findings"][0]["level"] == "ok"


def test_sigkill_mid_sweep_leaves_whole_batches_and_a_rerun_finishes(workspace: Workspace, db: Database) -> None:
    make_activities(db, rows=4000)
    sweep_job(workspace, where="id > 0", batch_size=100, pause="40ms")
    command = [sys.executable, "-m", "maintainer.cli", "trigger", "sweep", "--json", "--config", str(workspace.config)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    try:
        while db.execute("SELECT count(*) FROM activities WHERE actor_email IS NULL")[0][0] < 500:
            assert victim.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "the sweep never started"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    # Its session ends (rolling back any open batch) once the server notices the closed socket.
    while db.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-maintainer sweep'"):
        assert time.monotonic() < deadline + 30
        time.sleep(0.05)
    # every row is either untouched or has the whole `set` applied
    done, partial, total = db.execute(
        "SELECT count(*) FILTER (WHERE email AND ip AND ua), count(*) FILTER (WHERE (email OR ip OR ua)"
        " AND NOT (email AND ip AND ua)), count(*) FROM (SELECT actor_email IS NULL AS email, actor_ip IS NULL AS ip,"
        " user_agent = 'erased-' || id AS ua FROM activities) t")[0]
    assert 500 <= done < total and partial == 0
    assert done % 100 == 0  # whole batches only
    # batches go in key order: what is done is exactly the first `done` ids
    assert db.execute("SELECT max(id) FROM activities WHERE actor_email IS NULL") == [(done,)]

    rerun = trigger(workspace, "sweep")[0]
    assert rerun["status"] == "ok", rerun
    assert (rerun["findings"][0]["rows_anonymized"], rerun["findings"][0]["rows_remaining"]) == (total - done, 0)
    assert db.execute("SELECT count(*) FROM activities WHERE actor_email IS NOT NULL") == [(0,)]
    assert sorted(r[0] for r in db.execute("SELECT status FROM maintainer.run")) == ["interrupted", "ok"]


def test_plan_shows_the_batch_and_changes_nothing(workspace: Workspace, db: Database) -> None:
    make_activities(db, rows=600)
    sweep_job(workspace, vacuum_after=100)
    before = fingerprint(db, "true")
    result = workspace.cli("plan", "sweep", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["runs"][0]
    matching = db.execute(f"SELECT count(*) FROM activities WHERE {RETENTION}")[0][0]
    assert plan["status"] == "planned"
    assert plan["findings"][0]["message"] == f"would anonymize {matching} row(s) in 1 relation(s)"
    batch, vacuum = (a["sql"] for a in plan["actions"])
    assert "FOR UPDATE SKIP LOCKED" in batch and 'UPDATE ONLY "public"."activities"' in batch
    assert vacuum == 'VACUUM (ANALYZE, SKIP_LOCKED) "public"."activities"'
    assert fingerprint(db, "true") == before
    assert db.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'maintainer'") == [(0,)]


def test_vacuum_runs_after_a_large_sweep_only(workspace: Workspace, db: Database) -> None:
    make_activities(db, rows=600)
    sweep_job(workspace, "small", where="id <= 50", vacuum_after=100_000)
    sweep_job(workspace, "large", where="true", vacuum_after=100)
    small = trigger(workspace, "small")[0]
    assert small["status"] == "ok" and not any("VACUUM" in a["sql"] for a in small["actions"])
    assert db.execute("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'activities'") == [(0,)]
    large = trigger(workspace, "large")[0]
    assert large["status"] == "ok", large
    assert large["actions"][-1]["sql"] == 'VACUUM (ANALYZE, SKIP_LOCKED) "public"."activities"'
    assert db.execute("SELECT vacuum_count, analyze_count FROM pg_stat_user_tables WHERE relname = 'activities'") == [
        (1, 1)]


def test_a_table_without_a_usable_key_fails_with_the_reason(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE TABLE loose (user_id bigint, email text);"
                  "INSERT INTO loose SELECT g % 3, 'a' || g || '@example.com' FROM generate_series(1, 30) g;"
                  "CREATE TABLE keyed (id bigint PRIMARY KEY, user_id bigint, email text);"
                  "INSERT INTO keyed SELECT g, g % 3, 'a' || g || '@example.com' FROM generate_series(1, 30) g;")
    workspace.job("nokey", unit="anonymize", items=[
        {"table": "public.loose", "where": "true", "set": {"email": None}},
        {"table": "public.loose", "where": "true", "set": {"email": None}, "key": "user_id"},
        {"table": "public.loose", "where": "true", "set": {"user_id": None}, "key": "missing"},
        {"table": "public.keyed", "where": "true", "set": {"email": None}, "key": "user_id"},
        {"table": "public.keyed", "where": "true", "set": {"id": None}}])
    runs = trigger(workspace, "nokey")
    assert [r["status"] for r in runs] == ["failed"] * 5
    assert all(r["error"] == "verify: 1 check(s) failed" for r in runs)
    messages = [r["findings"][0]["message"] for r in runs]
    assert messages[0] == "public.loose has no primary key: set `key` to the columns of a unique index"
    assert messages[1].startswith("key (user_id) is not unique in public.loose")
    assert messages[2] == "key column(s) missing not in public.loose"
    # (user_id, id) is unique thanks to the primary key, but nothing serves that order: O(N²) batches
    assert messages[3].startswith("no index of public.keyed starts with user_id")
    assert messages[4].startswith("set changes key column(s) id")
    assert all(r["findings"][0]["level"] == "error" for r in runs)
    assert db.execute("SELECT count(*) FROM loose WHERE email IS NULL OR user_id IS NULL") == [(0,)]
    assert db.execute("SELECT count(*) FROM keyed WHERE email IS NULL") == [(0,)]


def test_nothing_personal_reaches_the_ledger_or_the_output(workspace: Workspace, db: Database) -> None:
    make_activities(db, rows=400)
    # A constraint the sweep runs into: PostgreSQL's DETAIL would quote the whole row, PII included.
    db.run_script("ALTER TABLE activities ADD CONSTRAINT ua_kept CHECK (id <= 250 OR user_agent IS NOT NULL)")
    workspace.job("erase", unit="anonymize", items=[{
        "table": "public.activities", "where": "user_id >= %(min_user)s",
        "set": {"actor_email": None, "user_agent": None},
        "batch_size": 100, "pause": "0s"}])
    out = workspace.cli("trigger", "erase", "--arg", "min_user=-987654", "--json").output
    run = json.loads(out)["runs"][0]
    assert run["status"] == "failed" and run["sqlstate"] == "23514"
    assert run["error"] == "CheckViolation (SQLSTATE 23514)"
    # The two batches committed before the failing one stay on record, with the rows they changed.
    ok, failed = run["actions"]
    assert (ok["status"], ok["rows"], ok["iterations"]) == ("ok", 200, 2)
    assert (failed["status"], failed["sqlstate"]) == ("failed", "23514")
    assert run["findings"][0]["rows_anonymized"] == 200 and run["findings"][0]["level"] == "error"
    assert db.execute("SELECT count(*) FROM activities WHERE actor_email IS NULL") == [(200,)]
    assert db.execute("SELECT sum(rows) FROM maintainer.action WHERE status = 'ok'") == [(200,)]

    personal = [r[0] for r in db.execute(
        "SELECT v FROM activities, LATERAL (VALUES (actor_email), (host(actor_ip)), (user_agent)) AS x (v)"
        " WHERE v IS NOT NULL")]
    stored = ledger_text(db)
    assert personal and not [v for v in personal if v in stored or v in out]
    assert "Failing row" not in stored + out and "DETAIL" not in stored + out
    assert "987654" not in stored + out  # --arg values are never recorded (only job-file params)


def test_arguments_reach_sql_only_as_bind_parameters(workspace: Workspace, db: Database) -> None:
    """Through the runner API too: an ArgValue never becomes SQL text, in any block."""
    make_activities(db, rows=100)
    workspace.job("erase", unit="anonymize", items=[
        {"table": "public.activities", "where": "actor_email = %(email)s", "set": ERASE}])
    project = load_project(str(workspace.config))
    spec = project.run_specs(project.job("erase"))[0]
    result = run(spec, RunOptions(args=parse_args(["email=user3@example.com"]), dry_run=True))
    assert result.status == "planned"
    assert all("user3@" not in a.sql and "$" in a.sql for a in result.actions)
    with psycopg.connect(db.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM activities WHERE actor_email IS NULL").fetchone() == (0,)

"""The `partitions` unit against pg_partman 4.x on PostgreSQL 15, measured side by side.

Both tools get the same 200 monthly parents (RANGE on created_at, a primary key, one more index,
an empty DEFAULT partition: pg_partman creates one, so the unit's parents get one too), in two
databases of one throwaway cluster. Printed as ours / pg_partman:

  (a) cold creation: the current month and 4 ahead for every parent. pg_partman: create_parent()
      per parent (what an operator runs to set a table up); ours: one run of a job with 200 items
      (engine included: connection, advisory lock, ledger, retries bookkeeping per item). Several
      rounds, each in new databases (fresh catalogs, the ledger already in place), the tools taking
      turns to go first. With --lanes N (default 2), also the same job with `lanes: N` (the items
      in N lanes whose steps take turns), in a database of its own.
  (b) a steady-state pass with nothing to do: partman.run_maintenance() against the same job run,
      as `maintainer trigger` runs it and as the daemon runs it (one more ledger query per item:
      did another replica already run this tick?). The configuration is loaded once, as the
      daemon does; the unit's `survey` vouches for the idle tables in one query.
  (c) discovery over 10,000 daily partitions of one parent (the unit's prepare + discover
      queries), and a whole steady-state run of that item. The parent has no index, so building it
      is quick; discovery reads the catalog only. With --partman-big, pg_partman's
      run_maintenance() on the same shape for reference (building it twice takes minutes).

Needs pg_partman for PostgreSQL 15 (Debian: apt-get install postgresql-15-partman) and the
PostgreSQL 15 binaries in /usr/lib/postgresql/15/bin.

Usage: .venv/bin/python bench/partitions_vs_partman.py [--parents 200] [--partitions 10000 (0: skip c)] [--repeat 5]
                                                       [--cold-rounds 3] [--lanes 2 (1: skip)]
                                                       [--partman-big] [--data-dir /dev/shm]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maintainer.ledger import Ledger
from maintainer.pgserver import LocalCluster, system15_kind
from maintainer.project import RunSpec, load_project
from maintainer.runner import RunOptions, run_all
from maintainer.scheduler import ran_since
from maintainer.session import Session
from maintainer.survey import survey_items
from maintainer.units import builtin_templates_dir, parse_unit, render_select

PARTMAN_CONTROL = Path("/usr/share/postgresql/15/extension/pg_partman.control")


def parent_ddl(name: str) -> str:
    return (
        f"CREATE TABLE {name} (id bigserial, workspace_id bigint NOT NULL, payload text,"
        f" created_at timestamptz NOT NULL, PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);"
        f"CREATE INDEX {name}_ws ON {name} (workspace_id, created_at);"
    )


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def month_start() -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    return dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(data_dir: Path) -> float:
    """CPU time the cluster has used so far: the postmaster, its live processes, and those it reaped
    (the backend of a closed connection counts in the postmaster's children's times). Read from
    /proc, so a busy neighbour on the machine does not count, as it does in wall-clock time."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue  # a process that just ended
        if int(stat.parent.name) == postmaster:
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        elif int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def count_partitions(conn: psycopg.Connection[Any], like: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE n.nspname = 'public' AND p.relname LIKE %s AND c.relkind IN ('r', 'p')",
        (like,),
    ).fetchone()
    assert row is not None
    return int(row[0])


# The engine's own cost per item (connection, replica check, advisory lock, ledger records): a
# unit that finds nothing, over the same items.
NOOP_UNIT = """---
description: finds nothing (engine overhead per item)
params:
  table: {type: table, required: true}
---
{% block discover %}
SELECT 1 AS nothing WHERE false
{% endblock %}
"""


class Ours:
    """A config directory with one job of N items, run in-process like `maintainer trigger`."""

    def __init__(self, dsn: str, root: Path, tables: list[str], interval: str = "1 month", lanes: int = 1) -> None:
        for sub in ("jobs", "templates"):
            (root / sub).mkdir()
        (root / "templates" / "noop.sql.j2").write_text(NOOP_UNIT)
        (root / "maintainer.yaml").write_text(yaml.safe_dump({
            "targets": {"bench": {"dsn": dsn}},
            "jobs_dir": "jobs",
            "templates_dir": "templates",
            "defaults": {"lock_timeout": "2s", "statement_timeout": "5min"},
            "log_format": "text",
        }))
        items = [{"table": f"public.{t}"} for t in tables]
        (root / "jobs" / "partitions.yaml").write_text(yaml.safe_dump({
            "name": "partitions", "unit": "partitions", "params": {"interval": interval, "premake": 4},
            "items": items, "lanes": lanes,
        }))
        (root / "jobs" / "noop.yaml").write_text(yaml.safe_dump({"name": "noop", "unit": "noop", "items": items}))
        self.config = root / "maintainer.yaml"

        # Loaded once, as the daemon loads its configuration at start (and on SIGHUP), not per pass.
        self.project = load_project(str(self.config))
        # of the last pass: time spent executing the steps' statements (a block's time is on its COMMIT)
        self.statement_seconds = 0.0

    def run_all(self, job_name: str = "partitions", *, daemon: bool = False) -> list[str]:
        """One pass over the job's items as `maintainer trigger` runs it (the items share one session
        per target). `daemon`: as a scheduled run, which asks the ledger under each item's lock whether
        another replica already ran this tick."""
        specs = self.project.run_specs(self.project.job(job_name))
        since = dt.datetime.now(dt.UTC)

        def tick_check(spec: RunSpec) -> Callable[[Ledger], str | None]:
            def on_locked(ledger: Ledger) -> str | None:
                ran_since(ledger, spec, since)  # the daemon's query; every bench pass counts as a new tick
                return None

            return on_locked

        results = run_all(specs, lambda spec: RunOptions(trigger="schedule", on_locked=tick_check(spec))
                          if daemon else RunOptions())
        self.statement_seconds = sum(a.seconds or 0 for r in results for a in r.actions)
        return [r.status for r in results]


def discovery_seconds(dsn: str, table: str, repeat: int) -> tuple[float, int]:
    """The unit's prepare + discover queries alone, as the runner renders them."""
    unit = parse_unit(builtin_templates_dir() / "partitions.sql.j2", builtin=True)
    params = unit.validate_params({"table": table, "interval": "1 day", "premake": 4}, "bench")
    samples, rows = [], 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(repeat):
            context: dict[str, Any] = {"params": params, "now": dt.datetime.now(dt.UTC), "args": {}, "row": {},
                                       "prev": None, "dry_run": True, "target": "bench", "job": "partitions"}
            started = time.perf_counter()
            for block in ("prepare", "discover"):
                statement = render_select(unit, block, context)
                with psycopg.RawCursor(conn, row_factory=psycopg.rows.dict_row) as cur:
                    cur.execute(statement.sql, statement.params or None)
                    result = cur.fetchall()
                context["prepared"] = result[0]
            samples.append(time.perf_counter() - started)
            rows = len(result)
    return statistics.median(samples), rows


def survey_seconds(dsn: str, root: Path, repeat: int) -> float:
    """The unit's `survey` of the big parent alone (what a steady pass of its job costs in SQL)."""
    (root / "survey").mkdir()
    project = Ours(dsn, root / "survey", ["big"], interval="1 day").project
    specs = project.run_specs(project.job("partitions"))
    samples = []
    with Session() as session:
        for _ in range(repeat):
            started = time.perf_counter()
            vouched = survey_items(specs, RunOptions(), session)
            samples.append(time.perf_counter() - started)
            assert list(vouched) == [0], "the big parent should be in a steady state"
    return statistics.median(samples)


def make_big(conn: psycopg.Connection[Any], name: str, partitions: int, style: str = "YYYYMMDD") -> None:
    """`partitions` daily partitions ending a few days ahead, created in batches of 1,000 (named the
    way the tool expects: pg_partman recognises only its own names)."""
    conn.execute(f"CREATE TABLE {name} (id bigint, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at)")
    first = dt.date.today() + dt.timedelta(days=5) - dt.timedelta(days=partitions)
    for start in range(0, partitions, 1000):
        conn.execute(f"""
            DO $$
            DECLARE d date;
            BEGIN
                FOR i IN {start} .. {min(start + 1000, partitions) - 1} LOOP
                    d := date '{first.isoformat()}' + i;
                    EXECUTE format('CREATE TABLE %I PARTITION OF {name} FOR VALUES FROM (%L) TO (%L)',
                                   '{name}_p' || to_char(d, '{style}'), d::text || ' 00:00+00',
                                   (d + 1)::text || ' 00:00+00');
                END LOOP;
            END $$""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parents", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold-rounds", type=int, default=3)
    parser.add_argument("--lanes", type=int, default=2, help="also time (a) with the job in this many lanes (1: skip)")
    parser.add_argument("--partman-big", action="store_true", help="also time pg_partman on the big parent")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the throwaway cluster lives (default: the temp dir); /dev/shm keeps the"
                             " disk's noise out of the comparison")
    args = parser.parse_args()
    # a SIGTERM must still stop the throwaway cluster and remove its files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kind = system15_kind()
    if kind is None or not PARTMAN_CONTROL.exists():
        print("needs PostgreSQL 15 binaries and pg_partman: apt-get install postgresql-15-partman", file=sys.stderr)
        return 2
    tables = [f"m{n:03d}" for n in range(args.parents)]
    settings = {"max_locks_per_transaction": "1024"}
    with LocalCluster(kind, base_dir=args.data_dir, settings=settings) as cluster, tempfile.TemporaryDirectory() as tmp:
        admin = cluster.connect()
        start = month_start().strftime("%Y-%m-%d 00:00:00+00")
        partman = ours_conn = None
        laned: dict[str, Any] = {}  # the --lanes contender's connection and tool

        def fresh_databases(number: int) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any], Ours]:
            """New databases for both tools with the same parents, without partitions. Dropping and
            recreating 1,200 tables per round would leave ~90,000 dead catalog rows per database, more
            than autovacuum clears between rounds, slowing every later round; a real system creates a
            few partitions a day. The ledger exists already, as on a target that ran jobs before."""
            for conn in (partman, ours_conn, laned.get("conn")):
                if conn is not None:
                    conn.close()
            for db in ("partman", "ours", "lanes") if args.lanes > 1 else ("partman", "ours"):
                admin.execute(f"DROP DATABASE IF EXISTS {db}")
                admin.execute(f"CREATE DATABASE {db}")
            partman_db = psycopg.connect(cluster.dsn("partman"), autocommit=True)
            partman_db.execute("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman")
            ours_db, ours_tool = ours_database("ours", Path(tmp) / f"round{number}", lanes=1)
            if args.lanes > 1:
                laned["conn"], laned["tool"] = ours_database("lanes", Path(tmp) / f"lanes{number}", lanes=args.lanes)
            for name in tables:
                partman_db.execute(parent_ddl(name))
            return partman_db, ours_db, ours_tool

        def ours_database(db: str, root: Path, lanes: int) -> tuple[psycopg.Connection[Any], Ours]:
            conn = psycopg.connect(cluster.dsn(db), autocommit=True)
            root.mkdir()
            tool = Ours(cluster.dsn(db), root, tables, lanes=lanes)
            tool.run_all("noop")
            for name in tables:
                conn.execute(parent_ddl(name) + f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT;")
            return conn, tool

        def settle() -> None:
            """Write out what the previous step dirtied (new databases, the other tool's tables), so
            neither tool pays for the other's writeback: whoever ran first after a CREATE DATABASE
            was up to 2x slower."""
            admin.execute("CHECKPOINT")
            os.sync()
            time.sleep(1)

        partman, ours_conn, ours = fresh_databases(0)
        version = partman.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_partman'").fetchone()
        print(f"PostgreSQL {cluster.version_num}, pg_partman {version[0] if version else '?'}, "
              f"{args.parents} monthly parents, median of {args.cold_rounds} rounds for (a),"
              f" of {args.repeat} for (b) and (c)\n")

        # (a) cold creation: the current month and 4 ahead, per parent
        def partman_create() -> None:
            for name in tables:
                partman.execute(
                    "SELECT partman.create_parent(%s, 'created_at', 'native', 'monthly', p_premake := 4,"
                    " p_start_partition := %s, p_jobmon := false)",
                    (f"public.{name}", start),
                )

        in_ddl: list[float] = []

        def ours_create() -> None:
            statuses = ours.run_all()
            assert set(statuses) == {"ok"}, statuses
            in_ddl.append(ours.statement_seconds)

        def lanes_create() -> None:
            statuses = laned["tool"].run_all()
            assert set(statuses) == {"ok"}, statuses

        # rounds on fresh parents, the contenders taking turns to go first, so a busy moment of the
        # machine does not land on one of them only
        cold: dict[str, list[float]] = {"partman": [], "ours": [], "lanes": []}
        cpu: dict[str, list[tuple[float, float]]] = {"partman": [], "ours": [], "lanes": []}  # (client, server) seconds
        for number in range(args.cold_rounds):
            if number:
                partman, ours_conn, ours = fresh_databases(number)
            order = [("partman", partman_create), ("ours", ours_create)]
            if args.lanes > 1:
                order.append(("lanes", lanes_create))
            for name, create in order[number % len(order):] + order[:number % len(order)]:
                settle()
                server_before, client_before = server_cpu_seconds(cluster.data_dir), time.process_time()
                cold[name].append(timed(create))
                time.sleep(0.3)  # the backends of the connections just closed are reaped
                cpu[name].append((time.process_time() - client_before,
                                  server_cpu_seconds(cluster.data_dir) - server_before))
            # pg_partman adds its DEFAULT as a sixth child; ours had it from the start
            assert count_partitions(partman, "m%") == count_partitions(ours_conn, "m%") == 6 * args.parents
            if args.lanes > 1:
                assert count_partitions(laned["conn"], "m%") == 6 * args.parents
            progress(f"(a) round {number + 1}: pg_partman {cold['partman'][-1]:.2f} s, ours {cold['ours'][-1]:.2f} s"
                     + (f", ours in {args.lanes} lanes {cold['lanes'][-1]:.2f} s" if args.lanes > 1 else ""))
        a_partman, a_ours = statistics.median(cold["partman"]), statistics.median(cold["ours"])
        a_ratio = statistics.median(o / p for o, p in zip(cold["ours"], cold["partman"], strict=True))
        # (b) steady state: nothing to create, nothing to retire
        # interleaved rounds, so a busy moment of the machine hits every contender alike
        rounds: dict[str, list[float]] = {"partman": [], "ours": [], "daemon": [], "floor": []}
        for _ in range(args.repeat):
            rounds["partman"].append(timed(lambda: partman.execute("SELECT partman.run_maintenance(p_jobmon := false)")))
            rounds["ours"].append(timed(ours.run_all))
            rounds["daemon"].append(timed(lambda: ours.run_all(daemon=True)))
            rounds["floor"].append(timed(lambda: ours.run_all("noop")))
        b_partman, b_ours, b_daemon, floor = (statistics.median(rounds[k]) for k in ("partman", "ours", "daemon", "floor"))
        assert count_partitions(partman, "m%") == count_partitions(ours_conn, "m%") == 6 * args.parents

        progress(f"(b) ours {b_ours:.2f} s (as the daemon runs it {b_daemon:.2f} s), pg_partman {b_partman:.2f} s,"
                 f" engine floor without survey {floor:.2f} s")
        admin.close()
        if not args.partitions:  # --partitions 0: (a) and (b) only
            partman.close()
            ours_conn.close()
            return report(args, cold, cpu, in_ddl, a_ours, a_partman, a_ratio, b_ours, b_partman, b_daemon, floor, None)
        # (c) discovery over 10,000 partitions of one parent
        build = timed(lambda: make_big(ours_conn, "big", args.partitions))
        progress(f"(c) {args.partitions} partitions built in {build:.0f} s")
        c_discover, rows = discovery_seconds(cluster.dsn("ours"), "public.big", args.repeat)
        c_survey = survey_seconds(cluster.dsn("ours"), Path(tmp), args.repeat)
        big_root = Path(tmp) / "big"
        big_root.mkdir()
        big = Ours(cluster.dsn("ours"), big_root, ["big"], interval="1 day")
        big.run_all()  # first run: nothing should be missing, but make sure (b)-style runs are steady
        c_run = statistics.median(timed(big.run_all) for _ in range(args.repeat))
        progress(f"(c) discovery {c_discover:.3f} s, steady run {c_run:.3f} s")
        c_partman = None
        if args.partman_big:
            make_big(partman, "big", args.partitions, style="YYYY_MM_DD")
            partman.execute("SELECT partman.create_parent('public.big', 'created_at', 'native', 'daily',"
                            " p_premake := 4, p_jobmon := false)")
            c_partman = statistics.median(
                timed(lambda: partman.execute("SELECT partman.run_maintenance('public.big', p_jobmon := false)"))
                for _ in range(args.repeat))
        partman.close()
        ours_conn.close()
    return report(args, cold, cpu, in_ddl, a_ours, a_partman, a_ratio, b_ours, b_partman, b_daemon, floor,
                  (c_discover, rows, c_survey, c_run, c_partman))


def report(args: argparse.Namespace, cold: dict[str, list[float]], cpu: dict[str, list[tuple[float, float]]],
           in_ddl: list[float], a_ours: float,
           a_partman: float, a_ratio: float,
           b_ours: float, b_partman: float, b_daemon: float, floor: float,
           big: tuple[float, int, float, float, float | None] | None) -> int:
    def line(label: str, mine: float, theirs: float, goal: str) -> None:
        print(f"{label:<58} ours {mine:8.3f} s   pg_partman {theirs:8.3f} s   ratio {mine / theirs:5.2f}x   goal {goal}")

    line(f"(a) cold creation, {args.parents} parents x 5 partitions", a_ours, a_partman, "<= 1.0x")
    print(f"    (a) per round: ours {', '.join(f'{x:.2f}' for x in cold['ours'])} s; pg_partman"
          f" {', '.join(f'{x:.2f}' for x in cold['partman'])} s; median of the per-round ratios {a_ratio:.2f}x")
    print(f"    (a) ours executing DDL (the steps' statements) per round: {', '.join(f'{x:.2f}' for x in in_ddl)} s;"
          f" the rest (locks, catalog queries, rendering, ledger): "
          f"{', '.join(f'{t - d:.2f}' for t, d in zip(cold['ours'], in_ddl, strict=True))} s")
    (ours_client, ours_server), (partman_client, partman_server) = (
        (statistics.median(c for c, _ in cpu[tool]), statistics.median(s for _, s in cpu[tool])) for tool in ("ours", "partman")
    )
    cpu_ratio = statistics.median(
        (oc + os_) / (pc + ps) for (oc, os_), (pc, ps) in zip(cpu["ours"], cpu["partman"], strict=True)
    )
    print(f"    (a) CPU time, median of the rounds (client + server, not counting time spent waiting): ours"
          f" {ours_client:.2f} + {ours_server:.2f} s, pg_partman {partman_client:.2f} + {partman_server:.2f} s;"
          f" median of the per-round ratios {cpu_ratio:.2f}x")
    if cold["lanes"]:
        lanes_ratio = statistics.median(o / p for o, p in zip(cold["lanes"], cold["partman"], strict=True))
        line(f"(a) the same job in {args.lanes} lanes (steps taking turns)", statistics.median(cold["lanes"]), a_partman,
             "<= 1.0x")
        lanes_client, lanes_server = (statistics.median(c for c, _ in cpu["lanes"]),
                                      statistics.median(s for _, s in cpu["lanes"]))
        print(f"    (a) in lanes, per round: {', '.join(f'{x:.2f}' for x in cold['lanes'])} s; median of the per-round"
              f" ratios {lanes_ratio:.2f}x; CPU {lanes_client:.2f} + {lanes_server:.2f} s")
    line(f"(b) steady-state pass, {args.parents} parents", b_ours, b_partman, "<= 1.0x")
    line("    the same pass as the daemon runs it (tick check per item)", b_daemon, b_partman, "<= 1.0x")
    print(f"    engine floor without a survey (a unit that finds nothing, same {args.parents} items, each a full"
          f" run): {floor:.3f} s")
    if big is None:
        return 0
    c_discover, rows, c_survey, c_run, c_partman = big
    print(f"(c) discovery over {args.partitions} partitions (prepare + discover, {rows} row): "
          f"{c_discover * 1000:.0f} ms (goal < 1 s); the survey of that parent {c_survey * 1000:.0f} ms;"
          f" whole steady run of that item {c_run * 1000:.0f} ms"
          + (f"; pg_partman run_maintenance on it {c_partman * 1000:.0f} ms" if c_partman is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

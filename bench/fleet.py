"""Fleet sizing: one daemon, many targets (databases of one cluster) × 5 jobs, against its goals.

1. Idle: `maintainer run` with every job scheduled once a year (none due while measuring): peak
   RSS and CPU of the process over `--idle` seconds, and the connections it holds to the cluster
   (pg_stat_activity, sampled every second). Goals: RSS <= 150 MB, no connection held while idle.
2. A shared tick: every (job, target) on `* * * * *`, once with `scheduler.jitter: 0s` (the
   default) and once with `--jitter`; for every run, the delay from its cron tick to the moment
   it started in the database (the ledger's `started_at`, after connecting and taking the
   advisory lock, just before the unit's first statement), p50/p99/max, and how long the whole
   fleet's tick takes (tick to the last run's `finished_at`) with the default `max_workers`.
   Goal: p99 < 60 s with the default jitter.

The five jobs are the built-in units on a small schema in every database: `sequences`,
`autovacuum` (recommend only), `reindex`, `partitions` (one monthly parent) and an `anonymize`
sweep whose `where` matches no row.

Usage: .venv/bin/python bench/fleet.py [--targets 200] [--idle 60] [--jitter 30s] [--workers 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import cpu_seconds, percentile, rss_mb, start, stop  # noqa: E402 - bench/daemon.py, same folder

from maintainer.pgserver import LocalCluster, available_kinds  # noqa: E402 - after the path insert

SCHEMA = """
CREATE TABLE accounts (id serial PRIMARY KEY, email text, created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO accounts (email) SELECT 'user' || g || '@example.invalid' FROM generate_series(1, 200) g;
CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, created_at timestamptz NOT NULL)
    PARTITION BY RANGE (created_at);
"""


def database_names(count: int) -> list[str]:
    return [f"fleet_{number:03d}" for number in range(count)]


def create_fleet(cluster: LocalCluster, count: int) -> None:
    """`count` databases with the same small schema and current monthly partitions."""
    month = dt.date.today().replace(day=1)
    bounds = [(month.replace(year=month.year + (month.month + k - 1) // 12, month=(month.month + k - 1) % 12 + 1))
              for k in range(0, 4)]
    partitions = "".join(
        f"CREATE TABLE events_{lo:%Y%m} PARTITION OF events FOR VALUES FROM ('{lo}') TO ('{hi}');"
        for lo, hi in itertools.pairwise(bounds)
    )
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE fleet_template")
    with psycopg.connect(cluster.dsn("fleet_template"), autocommit=True) as conn:
        conn.execute(SCHEMA + partitions)
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        for name in database_names(count):
            conn.execute(f"CREATE DATABASE {name} TEMPLATE fleet_template")


def write_project(root: Path, cluster: LocalCluster, count: int, schedule: str, jitter: str, workers: int) -> Path:
    jobs = root / "jobs"
    jobs.mkdir(exist_ok=True)
    definitions = {
        "sequences": {"unit": "sequences"},
        "autovacuum": {"unit": "autovacuum", "params": {"apply": False}},
        "reindex": {"unit": "reindex"},
        "partitions": {"unit": "partitions",
                       "items": [{"table": "public.events", "interval": "1 month", "retention": "12 months"}]},
        "anonymize": {"unit": "anonymize",
                      "items": [{"table": "public.accounts", "where": "created_at < %(now)s - interval '10 years'",
                                 "set": {"email": None}}]},
    }
    for name, fields in definitions.items():
        (jobs / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "schedule": schedule, **fields}))
    config = root / "maintainer.yaml"
    config.write_text(yaml.safe_dump({
        "targets": {name: {"dsn": cluster.dsn(name)} for name in database_names(count)},
        "jobs_dir": "jobs", "log_format": "json", "http": {"listen": "127.0.0.1:0"},
        "scheduler": {"catch_up": False, "jitter": jitter, "max_workers": workers},
    }))
    return config


def held_connections(cluster: LocalCluster) -> int:
    """Backends of the daemon (every connection of the cluster but this one and the server's own)."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def idle(root: Path, cluster: LocalCluster, count: int, seconds: float, workers: int) -> dict[str, float]:
    config = write_project(root, cluster, count, "0 3 1 1 *", "0s", workers)  # never due while measuring
    proc = start(config, root / "idle.log")
    time.sleep(10)  # past start-up (imports, each target's ledger read)
    cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
    peak_rss, peak_connections = 0.0, 0
    while time.monotonic() - started < seconds:
        peak_rss = max(peak_rss, rss_mb(proc.pid))
        peak_connections = max(peak_connections, held_connections(cluster))
        time.sleep(1)
    cpu = (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - started) * 100
    stop(proc)
    return {"rss_mb": peak_rss, "cpu_percent": cpu, "connections": peak_connections}


def ledger_runs(cluster: LocalCluster, count: int) -> list[tuple[dt.datetime, dt.datetime | None, str]]:
    """(started_at, finished_at, status) of every scheduled run, from every database's ledger."""
    runs = []
    for name in database_names(count):
        with psycopg.connect(cluster.dsn(name), autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('maintainer.run') IS NULL").fetchone() == (True,):
                continue
            runs.extend(conn.execute(
                "SELECT started_at, finished_at, status FROM maintainer.run WHERE trigger = 'schedule'"
            ).fetchall())
    return runs


def reset_ledgers(cluster: LocalCluster, count: int) -> None:
    for name in database_names(count):
        with psycopg.connect(cluster.dsn(name), autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS maintainer CASCADE")


def shared_tick(root: Path, cluster: LocalCluster, count: int, jitter: str, workers: int) -> dict[str, float]:
    """One tick shared by every (job, target): all are scheduled at the same minute of the hour,
    chosen so that the daemon's start-up ends before it, and the runs of that tick are read back."""
    reset_ledgers(cluster, count)
    now = dt.datetime.now(dt.UTC)
    tick = (now + dt.timedelta(minutes=2 if now.second > 30 else 1)).replace(second=0, microsecond=0)
    config = write_project(root, cluster, count, f"{tick.minute} * * * *", jitter, workers)
    proc = start(config, root / f"tick-{jitter}.log")
    expected = count * 5
    sampler_stop = threading.Event()
    peak = [0]

    def sample_connections() -> None:
        while not sampler_stop.wait(1):
            peak[0] = max(peak[0], held_connections(cluster))

    sampler = threading.Thread(target=sample_connections, daemon=True)
    sampler.start()
    runs: list[tuple[dt.datetime, dt.datetime | None, str]] = []
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            time.sleep(10)
            runs = ledger_runs(cluster, count)
            if sum(1 for r in runs if r[1] is not None) >= expected:
                break
    finally:
        sampler_stop.set()
        stop(proc)
    delays = sorted((r[0] - tick).total_seconds() for r in runs)
    finished = [r[1] for r in runs if r[1] is not None]
    return {
        "runs": len(runs), "failed": sum(1 for r in runs if r[2] == "failed"),
        "p50_s": percentile(delays, 0.5), "p99_s": percentile(delays, 0.99), "max_s": delays[-1],
        "fleet_tick_s": (max(finished) - tick).total_seconds(), "peak_connections": peak[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--idle", type=float, default=60.0, help="idle measurement, seconds")
    parser.add_argument("--jitter", default="30s", help="the jittered tick's scheduler.jitter")
    parser.add_argument("--workers", type=int, default=8, help="scheduler.max_workers (default: the default, 8)")
    args = parser.parse_args()
    kind = available_kinds()[0]
    with LocalCluster(kind, settings={"max_connections": "300"}) as cluster, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.monotonic()
        create_fleet(cluster, args.targets)
        print(f"{args.targets} databases created in {time.monotonic() - started:.0f} s", file=sys.stderr)
        footprint = idle(root, cluster, args.targets, args.idle, args.workers)
        plain = shared_tick(root, cluster, args.targets, "0s", args.workers)
        jittered = shared_tick(root, cluster, args.targets, args.jitter, args.workers)
    result = {"server": kind.name, "targets": args.targets, "jobs": 5, "max_workers": args.workers,
              "idle": footprint, "tick_jitter_0s": plain, f"tick_jitter_{args.jitter}": jittered}
    print(json.dumps(result, default=str))
    print(f"idle RSS            {footprint['rss_mb']:7.1f} MB  goal 150 MB  ratio {footprint['rss_mb'] / 150:.2f}")
    print(f"idle CPU            {footprint['cpu_percent']:7.2f} %   (one core)")
    print(f"idle connections    {footprint['connections']:7d}     goal 0")
    for label, tick in (("jitter 0s", plain), (f"jitter {args.jitter}", jittered)):
        print(f"tick→start p50/p99  {tick['p50_s']:6.1f} / {tick['p99_s']:6.1f} s  ({label}; goal p99 < 60 s, "
              f"ratio {tick['p99_s'] / 60:.2f}); fleet tick {tick['fleet_tick_s']:.1f} s, "
              f"{tick['runs']} runs, {tick['failed']} failed, peak {tick['peak_connections']} connections")


if __name__ == "__main__":
    main()

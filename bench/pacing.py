"""Pacing: what it costs when nothing lags, and what it saves when a standby replays slowly.

One throwaway primary with one streaming standby (a physical slot, `synchronous_commit = on`):

1. cost: the same `anonymize` sweep (fixed batches, no pause) over identical copies of a table,
   with `throttle` at its defaults (the replication state read before every batch) and with
   `throttle: off`, alternating for `--rounds` rounds; ratio = paced rows/s ÷ unpaced rows/s
   (median). Goal: within 5%.
2. benefit: the standby's replay is slowed (a thread pauses replay for 2.7 s of every 3 s, so it
   replays in bursts and falls behind a busy primary), and the sweep runs with and without pacing
   (`max_replica_lag_bytes: 4MB`); the primary's `pg_stat_replication` is sampled every 100 ms,
   and the worst replay lag (bytes, and time) during each sweep is reported, with its duration.
   Pacing bounds the bytes a standby is behind; its replay lag in *time* grows while replay is
   paused whatever the primary does (it is the age of the oldest WAL not yet replayed).

Usage: .venv/bin/python bench/pacing.py [--rows 300000] [--rounds 5] [--server pg17-wheel|pg18-embedded|pg15-system]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maintainer.pgserver import LocalCluster, available_kinds
from maintainer.project import load_project
from maintainer.runner import run

SETTINGS = {"wal_receiver_status_interval": "1s", "synchronous_commit": "on", "max_wal_size": "4GB"}


def build(conn: psycopg.Connection[Any], name: str, rows: int) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute(
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, actor_email text, actor_ip inet, created_at timestamptz)")
    conn.execute(
        f"INSERT INTO {name} SELECT g, 'user' || g || '@example.com', '192.0.2.1', now() - interval '1 year'"
        f" FROM generate_series(1, {rows}) g")
    conn.execute(f"VACUUM ANALYZE {name}")


def sweep(dsn: str, table: str, throttle: Any) -> tuple[float, int, dict[str, float]]:
    root = Path(tempfile.mkdtemp())
    (root / "jobs").mkdir()
    (root / "maintainer.yaml").write_text(yaml.safe_dump({
        "targets": {"app": {"dsn": dsn}}, "jobs_dir": "jobs", "log_format": "text",
        "defaults": {"throttle": throttle} if isinstance(throttle, dict) else {},
    }))
    job: dict[str, Any] = {"name": "sweep", "unit": "anonymize", "items": [{
        "table": f"public.{table}", "where": "created_at < now() - interval '90 days'",
        "set": {"actor_email": None, "actor_ip": None}, "batch_size": 1000, "pause": "0s"}]}
    if throttle == "off":
        job["throttle"] = "off"
    (root / "jobs" / "sweep.yaml").write_text(yaml.safe_dump(job))
    project = load_project(str(root / "maintainer.yaml"))
    started = time.perf_counter()
    result = run(project.run_specs(project.job("sweep"))[0])
    seconds = time.perf_counter() - started
    assert result.status == "ok", result.error
    return seconds, int(result.findings[0]["rows_anonymized"]), result.throttled_seconds


def caught_up(primary: LocalCluster) -> None:
    with primary.connect() as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_replication WHERE replay_lsn >= pg_current_wal_insert_lsn()"
                           ).fetchone() != (1,):
            time.sleep(0.05)


def cost(primary: LocalCluster, rows: int, rounds: int) -> None:
    ratios = []
    with primary.connect() as conn:
        for number in range(rounds):
            results = {}
            for mode in (("paced", {}), ("off", "off")) if number % 2 == 0 else (("off", "off"), ("paced", {})):
                build(conn, "t", rows)
                caught_up(primary)
                seconds, done, waited = sweep(primary.dsn(), "t", mode[1])
                results[mode[0]] = done / seconds
                assert not waited, waited
            ratios.append(results["paced"] / results["off"])
            print(f"  round {number + 1}: paced {results['paced']:,.0f} rows/s, off {results['off']:,.0f} rows/s,"
                  f" ratio {ratios[-1]:.3f}", flush=True)
    print(f"cost when nothing lags: paced / unpaced throughput = {statistics.median(ratios):.3f}"
          f" (median of {rounds}; rounds {min(ratios):.3f}-{max(ratios):.3f})")


def slow_replay(standby: LocalCluster, stop: threading.Event) -> None:
    with standby.connect() as conn:
        while not stop.is_set():
            conn.execute("SELECT pg_wal_replay_pause()")
            stop.wait(2.7)
            conn.execute("SELECT pg_wal_replay_resume()")
            stop.wait(0.3)


def sample_lag(primary: LocalCluster, stop: threading.Event, worst: dict[str, float]) -> None:
    with primary.connect() as conn:
        while not stop.is_set():
            row = conn.execute(
                "SELECT coalesce(extract(epoch FROM replay_lag), 0)::float8,"
                " pg_wal_lsn_diff(pg_current_wal_insert_lsn(), replay_lsn)::float8 FROM pg_stat_replication"
            ).fetchone()
            if row is not None and row[1] is not None:
                worst["lag"] = max(worst["lag"], row[0])
                worst["bytes"] = max(worst["bytes"], row[1])
            stop.wait(0.1)


def benefit(primary: LocalCluster, standby: LocalCluster, rows: int) -> None:
    for label, throttle in (("off", "off"), ("paced (max_replica_lag_bytes 4MB)",
                                             {"max_replica_lag_bytes": "4MB", "check_every": "200ms"})):
        with primary.connect() as conn:
            build(conn, "t", rows)
        caught_up(primary)
        stop = threading.Event()
        worst = {"lag": 0.0, "bytes": 0.0}
        threads = [threading.Thread(target=slow_replay, args=(standby, stop)),
                   threading.Thread(target=sample_lag, args=(primary, stop, worst))]
        for thread in threads:
            thread.start()
        try:
            seconds, done, waited = sweep(primary.dsn(), "t", throttle)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        print(f"slowed replay, {label}: sweep {seconds:.1f} s ({done:,} rows), worst replay lag"
              f" {worst['bytes'] / 1024**2:.1f} MB / {worst['lag']:.1f} s, waited {sum(waited.values()):.1f} s",
              flush=True)
        with standby.connect() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
        caught_up(primary)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", default="pg17-wheel")
    args = parser.parse_args()
    kind = next(k for k in available_kinds() if k.name == args.server)
    with LocalCluster(kind, settings=SETTINGS) as primary:
        standby = LocalCluster(kind, settings=SETTINGS).start_standby(primary, "standby1")
        try:
            print(f"{kind.name}: {args.rows:,} rows, batches of 1000, no pause")
            cost(primary, args.rows, args.rounds)
            benefit(primary, standby, args.rows)
        finally:
            standby.stop()


if __name__ == "__main__":
    main()

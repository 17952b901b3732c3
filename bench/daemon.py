"""The daemon's footprint and punctuality, against its goals.

1. Idle: `maintainer run` with 20 jobs configured (none due during the window), RSS and CPU of the
   process over 60 s, read from /proc. Goals: RSS <= 100 MB, CPU < 1% of one core.
2. Punctuality: 20 jobs on `* * * * *` against one target; for every run, the delay from its cron
   tick to the moment the run started in the database (the ledger's `started_at`, taken by
   PostgreSQL's clock after connecting and taking the advisory lock, just before the unit's first
   statement). Goal: p99 < 1 s. Jitter is 0 here: jitter is a delay on purpose.

Usage: .venv/bin/python bench/daemon.py [--idle 60] [--ticks 2] [--jobs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maintainer.pgserver import LocalCluster, available_kinds  # noqa: E402 - after the path insert

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_project(root: Path, dsn: str, jobs: int, schedule: str) -> Path:
    (root / "jobs").mkdir(exist_ok=True)
    for old in (root / "jobs").glob("*.yaml"):
        old.unlink()
    for number in range(jobs):
        (root / "jobs" / f"job-{number:02d}.yaml").write_text(
            yaml.safe_dump({"name": f"job-{number:02d}", "unit": "sequences", "schedule": schedule})
        )
    config = root / "maintainer.yaml"
    config.write_text(yaml.safe_dump({
        "targets": {"app": {"dsn": dsn}}, "jobs_dir": "jobs", "log_format": "json",
        "http": {"listen": "127.0.0.1:0"}, "scheduler": {"catch_up": False, "jitter": "0s"},
    }))
    return config


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "maintainer.cli", "run", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=handle)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "listening on port" not in log.read_text():
        time.sleep(0.1)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def idle(root: Path, dsn: str, jobs: int, seconds: float) -> dict[str, float]:
    config = write_project(root, dsn, jobs, "0 3 1 1 *")  # once a year: never due while measuring
    proc = start(config, root / "idle.log")
    time.sleep(5)  # past start-up (imports, ledger read)
    cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
    peak = 0.0
    while time.monotonic() - started < seconds:
        peak = max(peak, rss_mb(proc.pid))
        time.sleep(1)
    cpu = (cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - started) * 100
    stop(proc)
    return {"rss_mb": peak, "cpu_percent": cpu}


def punctuality(root: Path, dsn: str, jobs: int, ticks: int) -> list[float]:
    config = write_project(root, dsn, jobs, "* * * * *")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS maintainer CASCADE")
    proc = start(config, root / "ticks.log")
    try:
        deadline = time.monotonic() + 60 * (ticks + 1) + 30
        while time.monotonic() < deadline:
            with psycopg.connect(dsn, autocommit=True) as conn:
                present = conn.execute("SELECT to_regclass('maintainer.run') IS NOT NULL").fetchone()
                done = conn.execute("SELECT count(*) FROM maintainer.run WHERE status <> 'running'").fetchone() \
                    if present and present[0] else (0,)
            if done and done[0] >= jobs * ticks:
                break
            time.sleep(1)
    finally:
        stop(proc)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM started_at - date_trunc('minute', started_at))::float8"
            " FROM maintainer.run WHERE trigger = 'schedule' ORDER BY id LIMIT %s", (jobs * ticks,)
        ).fetchall()
    return sorted(r[0] for r in rows)


def percentile(samples: list[float], share: float) -> float:
    index = min(len(samples) - 1, max(0, round(share * (len(samples) - 1))))
    return samples[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=60.0, help="idle measurement, seconds")
    parser.add_argument("--ticks", type=int, default=2, help="cron ticks to measure punctuality over")
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    kind = available_kinds()[0]
    with LocalCluster(kind) as cluster, tempfile.TemporaryDirectory() as tmp:
        dsn = cluster.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS accounts (id serial PRIMARY KEY);"
                         "CREATE TABLE IF NOT EXISTS events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY)")
        root = Path(tmp)
        footprint = idle(root, dsn, args.jobs, args.idle)
        delays = punctuality(root, dsn, args.jobs, args.ticks)
    p50, p99 = percentile(delays, 0.50), percentile(delays, 0.99)
    result = {
        "server": kind.name, "jobs": args.jobs, "idle_seconds": args.idle,
        "idle_rss_mb": round(footprint["rss_mb"], 1), "idle_cpu_percent": round(footprint["cpu_percent"], 3),
        "tick_to_start_runs": len(delays), "tick_to_start_p50_s": round(p50, 3), "tick_to_start_p99_s": round(p99, 3),
        "tick_to_start_max_s": round(max(delays), 3) if delays else None,
    }
    print(json.dumps(result))
    print(f"idle RSS        {footprint['rss_mb']:7.1f} MB   goal 100 MB   ratio {footprint['rss_mb'] / 100:.2f}")
    print(f"idle CPU        {footprint['cpu_percent']:7.3f} %    goal 1 %      ratio {footprint['cpu_percent'] / 1:.3f}")
    print(f"tick→start p50  {p50:7.3f} s    ({len(delays)} runs, {args.jobs} jobs on one tick)")
    print(f"tick→start p99  {p99:7.3f} s    goal 1 s      ratio {p99 / 1:.3f}")


if __name__ == "__main__":
    main()

"""`anonymize` sweep vs one plain `UPDATE … WHERE …`, side by side on one throwaway server.

The same 1M-row audit table (personal data in three columns, every row older than the retention
cutoff) is built several times from one template, so each contender starts from identical data:

1. throughput, nothing else running: one plain UPDATE vs the sweep with the unit's default
   batch sizing (each batch sized to take about `batch_time`, 50 ms) and with fixed 1000-row
   batches (the previous default), both without pause, alternating for `--rounds` rounds; the
   ratio is sweep rows/s ÷ plain rows/s (median);
2. batch transactions: the time of every batch, from the runner's per-batch progress callback
   (interval between two batches minus the configured pause, so it also counts rendering);
3. a live application: a separate process updates single random rows of the table (~200/s,
   its own connection, no lock_timeout, latency counted from each request's scheduled start)
   while the plain UPDATE runs, and while the sweep runs with its default settings (unless
   `--live-batch` / `--live-pause` say otherwise). The sweep goes through the table in 10 slices; before each a 5 s idle window,
   after each a 5 s CPU control (a backend burning CPU with the batches' duty cycle but touching
   no table), so baseline, sweep and control are measured interleaved under the same machine
   load. Its p99 during each is compared with the idle baseline; the control shows how much of
   a slowdown is plain CPU contention on this (small, shared) machine.

Usage: .venv/bin/python bench/anonymize.py [--rows 1000000] [--rounds 3] [--server pg18-embedded|pg15-system|all]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maintainer.pgserver import LocalCluster, available_kinds
from maintainer.project import load_project
from maintainer.runner import Progress, RunOptions, run

WHERE = "created_at < now() - interval '90 days'"
SWEEP_WHERE = "created_at < %(now)s - interval '90 days'"  # the same cutoff, fixed for the whole run
SET = {"actor_email": None, "actor_ip": None, "user_agent": None}
PREDICATE = "(actor_email IS NOT NULL OR actor_ip IS NOT NULL OR user_agent IS NOT NULL)"
WORKLOAD_RATE = 200  # single-row updates per second
SEGMENTS = 10  # slices of the live sweep, each after an idle window
IDLE_WINDOW = 5.0  # seconds


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98] if len(samples) >= 2 else (samples or [0.0])[0]


def build_template(conn: psycopg.Connection[Any], rows: int) -> None:
    conn.execute(
        "CREATE TABLE template (id bigint PRIMARY KEY, user_id bigint NOT NULL, action text NOT NULL,"
        " actor_email text, actor_ip inet, user_agent text, hits integer NOT NULL DEFAULT 0,"
        " created_at timestamptz NOT NULL)"
    )
    conn.execute(
        "INSERT INTO template SELECT g, g %% 50000, 'auth.login', 'user' || (g %% 50000) || '@example.com',"
        " '192.0.2.0'::inet + (g %% 250), 'Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0',"
        " 0, now() - interval '120 days' - g * interval '1 second' FROM generate_series(1, %s) g",
        (rows,),
    )


def copy_table(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute(f"CREATE TABLE {name} (LIKE template INCLUDING ALL)")
    conn.execute(f"INSERT INTO {name} SELECT * FROM template")
    conn.execute(f"VACUUM (ANALYZE) {name}")


def workload(dsn: str, table: str, rows: int, stop_at: Any, out: Any) -> None:
    """The application: single-row updates on a fixed schedule; reports every latency.

    Latency is measured from the request's scheduled start, not from when it was sent, and every
    request scheduled before `stop_at` is issued (a backlog after a stall too), so a stall counts
    against every request it held up (no coordinated omission)."""
    samples: list[tuple[float, float]] = []  # (scheduled start on the system-wide monotonic clock, latency)
    rng = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as conn:
        query = f"UPDATE {table} SET hits = hits + 1 WHERE id = %s"
        scheduled = time.monotonic()
        while scheduled <= stop_at.value:
            time.sleep(max(0.0, scheduled - time.monotonic()))
            conn.execute(query, (rng.randint(1, rows),))
            samples.append((scheduled, time.monotonic() - scheduled))
            scheduled += 1 / WORKLOAD_RATE
    out.put(samples)


class Workload:
    """Runs `workload` in its own process (no GIL shared with the sweep's runner)."""

    def __init__(self, dsn: str, table: str, rows: int) -> None:
        self.stop_at: Any = mp.Value("d", float("inf"))
        self.out: Any = mp.Queue()
        self.process = mp.Process(target=workload, args=(dsn, table, rows, self.stop_at, self.out))

    def __enter__(self) -> Workload:
        self.process.start()
        time.sleep(1.0)  # connected and warmed up
        self.started = time.monotonic()
        return self

    def finish(self) -> list[float]:
        """Latencies of the requests scheduled since `__enter__` returned (the measured window)."""
        ended = time.monotonic()
        return within(self.samples(), self.started, ended)

    def samples(self) -> list[tuple[float, float]]:
        """Stop (after issuing every request scheduled until now): (scheduled start, latency) pairs."""
        self.stop_at.value = time.monotonic()
        samples: list[tuple[float, float]] = self.out.get(timeout=120)
        self.process.join(timeout=30)
        return samples

    def __exit__(self, *exc: object) -> None:
        if self.process.is_alive():
            self.process.kill()


def cpu_control(dsn: str, busy: float, pause: float, seconds: float) -> None:
    """A backend that only burns CPU, `busy` seconds then `pause`, like the sweep's batches but
    touching no table: how much of the workload's slowdown is plain CPU contention."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute("SELECT count(*) FROM generate_series(1, 100000)")
        per_row = (time.perf_counter() - started) / 100_000
        count = max(1000, int(busy / per_row))
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            conn.execute("SELECT count(*) FROM generate_series(1, %s)", (count,))
            time.sleep(pause)


def within(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [latency for at, latency in samples if start <= at <= end]


def plain_update(conn: psycopg.Connection[Any], table: str) -> tuple[float, int]:
    started = time.perf_counter()
    cur = conn.execute(
        f"UPDATE {table} SET actor_email = NULL, actor_ip = NULL, user_agent = NULL WHERE {WHERE} AND {PREDICATE}"
    )
    return time.perf_counter() - started, cur.rowcount


def sweep(dsn: str, table: str, *, pause: str | None = None, batch_size: int | None = None,
          where: str = SWEEP_WHERE) -> dict[str, Any]:
    """One run of the unit; `None` leaves a param at the unit's default."""
    item: dict[str, Any] = {"table": f"public.{table}", "where": where, "set": SET, "vacuum_after": 0}
    if batch_size is not None:
        item["batch_size"] = batch_size
    if pause is not None:
        item["pause"] = pause
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "jobs").mkdir()
        (root / "maintainer.yaml").write_text(yaml.safe_dump({
            "targets": {"bench": {"dsn": dsn}}, "jobs_dir": "jobs",
            "defaults": {"lock_timeout": "2s", "statement_timeout": "1h"}}))
        (root / "jobs" / "sweep.yaml").write_text(yaml.safe_dump({
            "name": "sweep", "unit": "anonymize", "items": [item]}))
        project = load_project(str(root / "maintainer.yaml"))
        spec = project.run_specs(project.job("sweep"))[0]
        pause_s = spec.params["pause"].total_seconds()
        reports: list[Progress] = []
        started = time.perf_counter()
        result = run(spec, RunOptions(progress=reports.append))
        seconds = time.perf_counter() - started
    if result.status != "ok":
        raise SystemExit(f"sweep failed: {result.error}")
    elapsed = [p.elapsed for p in reports]
    batches = [elapsed[0]] + [b - a - pause_s for a, b in itertools.pairwise(elapsed)]
    finding = result.findings[0]
    return {"seconds": seconds, "rows": finding["rows_anonymized"], "remaining": finding["rows_remaining"],
            "batches": batches[:-1] or batches,  # the last batch only checks that nothing is left
            "pause": pause_s}


def bench(kind_name: str, cluster: LocalCluster, rows: int, rounds: int, live_batch: int | None,
          live_pause: str | None) -> None:
    dsn = cluster.dsn()
    tag = f"[{kind_name}]"
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        build_template(conn, rows)
        print(f"{tag} {rows:,}-row template built in {time.perf_counter() - t0:.0f}s", flush=True)

        # 1. throughput on an idle server; rounds alternate so machine noise hits both contenders alike
        ratios: list[float] = []
        fixed_ratios: list[float] = []
        batch_times: list[float] = []
        fixed_times: list[float] = []
        plain_rates: list[float] = []
        for number in range(1, rounds + 1):
            copy_table(conn, "plain_t")
            plain_s, plain_rows = plain_update(conn, "plain_t")
            copy_table(conn, "sweep_t")
            sized = sweep(dsn, "sweep_t", pause="0s")  # the unit's default batch sizing
            copy_table(conn, "sweep_t")
            fixed = sweep(dsn, "sweep_t", pause="0s", batch_size=1000)
            plain_rates.append(plain_rows / plain_s)
            ratios.append((sized["rows"] / sized["seconds"]) / plain_rates[-1])
            fixed_ratios.append((fixed["rows"] / fixed["seconds"]) / plain_rates[-1])
            batch_times += sized["batches"]
            fixed_times += fixed["batches"]
            print(f"{tag} round {number}: plain UPDATE {plain_rows:,} rows in {plain_s:.1f}s; sweep (pause 0) "
                  f"{sized['rows']:,} rows in {sized['seconds']:.1f}s with default batch sizing, "
                  f"{len(sized['batches'])} batches ({ratios[-1]:.2f}x); {fixed['seconds']:.1f}s with fixed "
                  f"batch_size 1000 ({fixed_ratios[-1]:.2f}x)", flush=True)
        ratio = statistics.median(ratios)
        print(f"{tag} throughput ratio (median of {rounds}): default batch sizing {ratio:.2f}x (goal >= 0.5x: "
              f"{'met' if ratio >= 0.5 else 'MISSED'}); fixed batch 1000 {statistics.median(fixed_ratios):.2f}x",
              flush=True)
        for size, times in (("default sizing", batch_times), ("fixed 1000", fixed_times)):
            print(f"{tag} batch transactions, {size} (pause 0, all rounds): n={len(times)} "
                  f"p50 {statistics.median(times) * 1000:.1f} ms, p99 {p99(times) * 1000:.1f} ms, "
                  f"max {max(times) * 1000:.1f} ms (goal p99 < 250 ms: "
                  f"{'met' if p99(times) < 0.25 else 'MISSED'})", flush=True)

        # 2. a live application on the table. The machine's load drifts (other work, checkpoints), so the
        #    sweep runs in SEGMENTS slices of the key range with idle windows of similar length between
        #    them, the workload running throughout; each request is classed by its scheduled start.
        copy_table(conn, "plain_t")
        copy_table(conn, "sweep_t")
        with Workload(dsn, "plain_t", rows) as load:
            live_plain_s, _ = plain_update(conn, "plain_t")
            during_plain = load.finish()
        live: dict[str, Any] = {"rows": 0, "seconds": 0.0, "remaining": 0, "batches": []}
        windows: list[tuple[str, float, float]] = []
        with Workload(dsn, "sweep_t", rows) as load:
            for segment in range(SEGMENTS):
                started = time.monotonic()
                time.sleep(IDLE_WINDOW)
                windows.append(("idle", started, time.monotonic()))
                low, high = segment * rows // SEGMENTS, (segment + 1) * rows // SEGMENTS
                started = time.monotonic()
                part = sweep(dsn, "sweep_t", pause=live_pause, batch_size=live_batch,
                             where=f"id > {low} AND id <= {high} AND {SWEEP_WHERE}")
                windows.append(("sweep", started, time.monotonic()))
                for key in ("rows", "seconds", "batches"):
                    live[key] += part[key]
                live["remaining"] = part["remaining"]  # rows of this slice still matching
                started = time.monotonic()
                cpu_control(dsn, statistics.median(part["batches"]), part["pause"], IDLE_WINDOW)
                windows.append(("control", started, time.monotonic()))
            samples = load.samples()

        def during(what: str) -> list[float]:
            return [x for kind, start, end in windows if kind == what for x in within(samples, start, end)]

        idle, during_sweep, during_control = during("idle"), during("sweep"), during("control")
        base = p99(idle)
        live_rate = live["rows"] / live["seconds"]
        setting = (f"batch {live_batch or 'sized to batch_time'}, pause {live_pause or 'default'}")
        print(f"{tag} live sweep ({setting}): {live['rows']:,} rows in {live['seconds']:.1f}s "
              f"({live_rate:,.0f} rows/s, {live_rate / statistics.median(plain_rates):.2f}x the idle plain UPDATE); "
              f"{live['remaining']} row(s) left for the next run; batch p99 {p99(live['batches']) * 1000:.1f} ms, "
              f"max {max(live['batches']) * 1000:.1f} ms", flush=True)
        print(f"{tag} single-row update p99: idle {base * 1000:.2f} ms (n={len(idle)}); "
              f"during plain UPDATE ({live_plain_s:.1f}s) {p99(during_plain) * 1000:.2f} ms = "
              f"{p99(during_plain) / base:.1f}x, max {max(during_plain) * 1000:.0f} ms (n={len(during_plain)}); "
              f"during sweep {p99(during_sweep) * 1000:.2f} ms = {p99(during_sweep) / base:.2f}x, "
              f"max {max(during_sweep) * 1000:.0f} ms (n={len(during_sweep)}) "
              f"(goal <= 1.5x: {'met' if p99(during_sweep) / base <= 1.5 else 'MISSED'}); CPU control (a backend "
              f"burning CPU like the batches, no table) {p99(during_control) * 1000:.2f} ms = "
              f"{p99(during_control) / base:.2f}x (n={len(during_control)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--server", default="pg18-embedded", help="pg18-embedded, pg15-system or all")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (plain, then sweep)")
    parser.add_argument("--live-batch", type=int, default=None,
                        help="fixed batch_size of the sweep beside the workload (default: the unit's sizing)")
    parser.add_argument("--live-pause", default=None, help="pause of the sweep beside the workload (default: the unit's)")
    options = parser.parse_args()
    kinds = [k for k in available_kinds() if options.server in ("all", k.name)]
    if not kinds:
        raise SystemExit(f"no server {options.server!r} available")
    for kind in kinds:
        # autovacuum off: it would visit the contenders' tables at different moments and blur the comparison
        with LocalCluster(kind, settings={"shared_buffers": "256MB", "autovacuum": "off"}) as cluster:
            bench(kind.name, cluster, options.rows, options.rounds, options.live_batch, options.live_pause)


if __name__ == "__main__":
    main()

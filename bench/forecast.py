"""Forecasts: how wrong they are on synthetic histories, and what they add to a `sequences` run.

1. Error. Synthetic histories of a counter consumed at a long-run rate r over a week of hourly
   runs, in four shapes: steady; bursty (each hour consumes 10 r with probability 1/10, else
   nothing); a weekly cycle (weekdays 1.3 r, weekends 0.25 r: r on average); a reset (steady, set
   back to a low value on a random day). Each hourly run is recorded in a real ledger as the
   runner records it (`Ledger.finish_run`, which keeps where each key's stretch began), the runs a
   forecast reads are picked by `Ledger.forecast_runs`, and the rate is measured by the real SQL of
   `templates/lib/forecast.sql.j2` (`observed`, `fit`). The error of `days_left` is
   |r / rate - 1|; for comparison, the naive rate of the last two runs.
2. Cost. One throwaway cluster, 5,000 sequences (serial and identity columns), a
   ledger holding a week of earlier runs (each sequence consumed a value an hour): the wall time and
   the machine's CPU time of a whole `sequences` run (`run()`, as `maintainer trigger` does) with
   forecasts on, and off (the history hidden from the unit and nothing observed kept in the
   ledger), in interleaved rounds (each mode twice per round, the faster of the two kept).

Usage: .venv/bin/python bench/forecast.py [--trials 200] [--sequences 5000] [--rounds 50]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml
from psycopg.rows import dict_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maintainer import runner
from maintainer.ledger import Ledger
from maintainer.pgserver import LocalCluster, available_kinds
from maintainer.project import load_project
from maintainer.units import Unit, parse_unit, split_statements

FIT_UNIT = """---
description: the forecast library over the bench's ledger and the values of now
params:
  min_span: {type: duration, default: 1h}
---
{% from "lib/forecast.sql.j2" import observed, fit %}
{% block discover %}
WITH points AS (
    SELECT o.key, o.at, o.v FROM ({{ observed(history, state_schema) }}) o
    UNION ALL
    SELECT key::text, at, v FROM bench_points
),
rates AS ({{ fit('points', params.min_span) }})
SELECT key::int, rate_per_day FROM rates ORDER BY key
{% endblock %}
"""

HOUR = 3600.0
RATE_PER_HOUR = 1000.0


def history(shape: str, rng: random.Random) -> list[tuple[float, float]]:
    """(seconds, value) of hourly runs over 7 days, ending now (t = 0)."""
    hours = 7 * 24
    start_dow = rng.randrange(7)
    reset_at = rng.randrange(24, hours - 24)
    value, points = 1_000_000.0, []
    for hour in range(hours + 1):
        points.append(((hour - hours) * HOUR, value))
        if shape == "steady":
            value += RATE_PER_HOUR
        elif shape == "bursty":
            value += 10 * RATE_PER_HOUR if rng.random() < 0.1 else 0.0
        elif shape == "weekly":
            weekday = (start_dow + hour // 24) % 7 < 5
            value += RATE_PER_HOUR * (1.3 if weekday else 0.25)
        elif shape == "reset":
            value = 1000.0 if hour == reset_at else value + RATE_PER_HOUR
    return points


# The forecast's window: a week, and a little more, so that the week's first run is still in it
# after the seconds the bench takes to record the week.
WINDOW = dt.timedelta(days=7, minutes=30)


def bench_error(dsn: str, trials: int) -> dict[str, tuple[float, float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fit.sql.j2"
        path.write_text(FIT_UNIT)
        unit = parse_unit(path)
    params = unit.validate_params({}, "bench")
    truth = RATE_PER_HOUR * 24
    results = {}
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        ledger = Ledger(conn, "bench_ledger")
        ledger.ensure()
        conn.execute("CREATE TEMP TABLE bench_points (key int, at timestamptz, v numeric)")
        for shape in ("steady", "bursty", "weekly", "reset"):
            rng = random.Random(42)
            series = [history(shape, rng) for _ in range(trials)]
            now = dt.datetime.now(dt.UTC)
            # every run of the week but now's, recorded as the runner records a run
            newest = None
            for hour, (at, _) in enumerate(series[0][:-1]):
                run_id = ledger.start_run(job=shape, unit="fit", target="bench", item=None, lock_key=hour,
                                          trigger="bench", params={})
                conn.execute("UPDATE bench_ledger.run SET started_at = %s WHERE id = %s",
                             (now + dt.timedelta(seconds=at), run_id))
                ledger.finish_run(run_id, status="ok", attempts=1, sqlstate=None, error=None, actions=[],
                                  findings=[], summary=None, level_field=None,
                                  observed={str(key): points[hour][1] for key, points in enumerate(series)},
                                  observed_since=(newest, WINDOW) if newest is not None else None)
                newest = run_id
            context = {"params": params, "args": {}, "state_schema": "bench_ledger",
                       "history": ledger.forecast_runs(shape, "bench", None, window=WINDOW)}
            text, values = unit.render_block("discover", context)
            statement = split_statements(text, values)[0]
            conn.execute("TRUNCATE bench_points")
            with conn.cursor().copy("COPY bench_points (key, at, v) FROM STDIN") as copy:
                for key, points in enumerate(series):
                    copy.write_row((key, now, points[-1][1]))
            started = time.perf_counter()
            with psycopg.RawCursor(conn) as cur:
                cur.execute(statement.sql, statement.params)
                rates = {row["key"]: row["rate_per_day"] for row in cur.fetchall()}
            seconds = time.perf_counter() - started
            errors = [abs(truth / float(rates[k]) - 1) if rates.get(k) else float("inf") for k in range(trials)]
            naive = []
            for points in series:
                (t0, v0), (t1, v1) = points[-2], points[-1]
                rate = (v1 - v0) / (t1 - t0) * 86400
                naive.append(abs(truth / rate - 1) if rate > 0 else float("inf"))
            results[shape] = (statistics.median(errors), statistics.median(naive), seconds)
    return results


def bench_cost(dsn: str, sequences: int, rounds: int) -> tuple[dict[str, dict[bool, list[float]]], int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA seqbench")
        # half serial, half identity columns: one sequence and one finding each
        conn.execute(f"""
            DO $$ BEGIN
              FOR i IN 1..{sequences} LOOP
                EXECUTE format('CREATE TABLE seqbench.t%s (id %s)', i,
                               CASE WHEN i % 2 = 0 THEN 'serial' ELSE 'int GENERATED BY DEFAULT AS IDENTITY' END);
              END LOOP;
            END $$;
            SELECT nextval(c.oid) FROM pg_class c WHERE c.relkind = 'S';
            ANALYZE;
        """)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "jobs").mkdir()
        (root / "maintainer.yaml").write_text(yaml.safe_dump({
            "targets": {"bench": {"dsn": dsn}}, "jobs_dir": "jobs", "log_format": "text",
            "defaults": {"history_retention": "90 days"},
        }))
        (root / "jobs" / "sequences.yaml").write_text(yaml.safe_dump({
            "name": "sequences", "unit": "sequences", "params": {"schemas": ["seqbench"]},
        }))
        project = load_project(str(root / "maintainer.yaml"))
        spec = project.run_specs(project.jobs["sequences"])[0]
        first = runner.run(spec)
        assert first.status == "ok", first.error
        findings = len(first.findings)
        # a week of hourly runs: copies of the first run's record, one an hour back in time
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("""
                WITH src AS (SELECT * FROM maintainer.run WHERE id = %(id)s),
                copies AS (
                    INSERT INTO maintainer.run (job, unit, target, item, lock_key, trigger, status, started_at,
                                                finished_at, params, observed)
                    SELECT s.job, s.unit, s.target, s.item, s.lock_key, s.trigger, 'ok',
                           s.started_at - h * interval '1 hour', s.finished_at - h * interval '1 hour', s.params,
                           -- each sequence consumed one value an hour: a forecast for every one
                           (SELECT jsonb_object_agg(o.key, o.value::numeric - h) FROM jsonb_each(s.observed) o)
                      FROM src s, generate_series(1, 168) h
                    RETURNING id)
                INSERT INTO maintainer.finding (run_id, seq, level, data)
                SELECT c.id, f.seq, f.level, f.data
                  FROM copies c, maintainer.finding f WHERE f.run_id = %(id)s
            """, {"id": first.run_id})
            conn.execute("ANALYZE maintainer.run")
            conn.execute("ANALYZE maintainer.finding")
        history, observations = runner._Run._history, Unit.observations

        def timed(forecasts: bool) -> tuple[float, float]:
            # off: no earlier runs read, and nothing kept for later ones
            if not forecasts:
                runner._Run._history = lambda self: []  # type: ignore[method-assign]
                Unit.observations = lambda self, findings: None  # type: ignore[method-assign]
            cpu, started = machine_cpu_seconds(), time.perf_counter()
            result = runner.run(spec)
            elapsed, cpu = time.perf_counter() - started, machine_cpu_seconds() - cpu
            runner._Run._history, Unit.observations = history, observations  # type: ignore[method-assign]
            assert result.status == "ok", result.error
            return elapsed, cpu

        timed(True)
        timed(False)
        samples: dict[str, dict[bool, list[float]]] = {"wall": {True: [], False: []}, "cpu": {True: [], False: []}}
        # A round runs each mode twice (on, off, off, on; the order flips every round) and keeps the
        # faster of the two: a run slowed by something else on the machine is dropped, not averaged in.
        for number in range(rounds):
            order = (True, False, False, True) if number % 2 == 0 else (False, True, True, False)
            runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for forecasts in order:
                runs[forecasts].append(timed(forecasts))
            for forecasts, pair in runs.items():
                samples["wall"][forecasts].append(min(wall for wall, _ in pair))
                samples["cpu"][forecasts].append(min(cpu for _, cpu in pair))
    return samples, findings


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent working (user, nice, system, irq, softirq: client and
    server alike), from /proc/stat. Unlike wall time it does not count waiting for the disk or
    for a core, which is most of what makes single runs of this bench swing."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--sequences", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    kind = next(k for k in available_kinds() if k.name == "pg18-embedded")
    with LocalCluster(kind) as cluster:
        dsn = cluster.dsn()
        errors = bench_error(dsn, args.trials)
        print(f"forecast error of days_left, median over {args.trials} histories per shape (PostgreSQL 18):")
        print(f"{'shape':<8} {'forecast':>9} {'last two runs':>14} {'fit time':>9}")
        for shape, (error, naive, seconds) in errors.items():
            print(f"{shape:<8} {error:>9.1%} {naive:>14.1%} {seconds * 1000:>7.1f}ms")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE seqcost")
        samples, findings = bench_cost(dsn.rsplit("/", 1)[0] + "/seqcost", args.sequences, args.rounds)
        print(f"\nsequences run, {args.sequences} sequences ({findings} findings), 169 earlier runs in the ledger,"
              f" {args.rounds} interleaved rounds (the faster of two runs per mode and round):")
        for measure, label in (("wall", "wall time"), ("cpu", "CPU time of the machine")):
            on, off = samples[measure][True], samples[measure][False]
            m_on, m_off = statistics.median(on), statistics.median(off)
            # each round ran both, back to back: the median of those differences is less exposed to drift
            paired = statistics.median(a - b for a, b in zip(on, off, strict=True))
            print(f"{label}: forecasts on {m_on * 1000:.0f} ms, off {m_off * 1000:.0f} ms (medians);"
                  f" added {(m_on - m_off) * 1000:.0f} ms = {(m_on - m_off) / m_on:.1%} of the run;"
                  f" median of the rounds' differences {paired * 1000:.0f} ms = {paired / m_on:.1%}")

if __name__ == "__main__":
    main()

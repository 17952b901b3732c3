"""Forecasts: how wrong they are on synthetic histories, and what they add to a `sequences` run.

1. Error. Synthetic histories of a counter consumed at a long-run rate r over a week of hourly
   runs, in four shapes: steady; bursty (each hour consumes 10 r with probability 1/10, else
   nothing); a weekly cycle (weekdays 1.3 r, weekends 0.25 r: r on average); a reset (steady, set
   back to a low value on a random day). The runs a forecast reads are picked as
   `Ledger.forecast_runs` does (the oldest run of each of 6 slices of the window, plus the run
   of now), and the rate is measured by the real SQL of `templates/lib/forecast.sql.j2`. The error
   of `days_left` is |r / rate - 1|; for comparison, the naive rate of the last two runs.
2. Cost. One throwaway cluster, 5,000 sequences (serial and identity columns), a
   ledger holding a week of earlier runs: the wall time of a whole `sequences` run (`run()`, as
   `maintainer trigger` does) with forecasts on, and off (the history hidden from the unit and
   nothing observed kept in the ledger), in interleaved rounds.

Usage: .venv/bin/python bench/forecast.py [--trials 200] [--sequences 5000] [--rounds 50]
"""

from __future__ import annotations

import argparse
import datetime as dt
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

from maintainer import runner
from maintainer.ledger import FORECAST_POINTS
from maintainer.pgserver import LocalCluster, available_kinds
from maintainer.project import load_project
from maintainer.units import Unit, parse_unit, split_statements

FIT_UNIT = """---
description: the forecast library's fit over the bench's points
params:
  min_span: {type: duration, default: 1h}
---
{% from "lib/forecast.sql.j2" import fit %}
{% block discover %}
WITH points AS (SELECT key, at, v FROM bench_points),
rates AS ({{ fit('points', params.min_span) }})
SELECT key, rate_per_day FROM rates ORDER BY key
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


def picked(points: list[tuple[float, float]], slices: int) -> list[tuple[float, float]]:
    """The earlier runs `Ledger.forecast_runs` would hand over, plus the current observation."""
    earlier, now = points[:-1], points[-1]
    lo, hi = earlier[0][0], now[0]
    chosen: dict[int, tuple[float, float]] = {}
    for at, value in earlier:
        chosen.setdefault(min(int((at - lo) / (hi - lo) * slices), slices - 1), (at, value))
    return [chosen[k] for k in sorted(chosen)] + [now]


def bench_error(conn: psycopg.Connection[Any], trials: int) -> dict[str, tuple[float, float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fit.sql.j2"
        path.write_text(FIT_UNIT)
        unit = parse_unit(path)
    text, values = unit.render_block("discover", {"params": unit.validate_params({}, "bench"), "args": {}})
    statement = split_statements(text, values)[0]
    conn.execute("CREATE TEMP TABLE bench_points (key int, at timestamptz, v numeric)")
    now = dt.datetime.now(dt.UTC)
    truth = RATE_PER_HOUR * 24
    results = {}
    for shape in ("steady", "bursty", "weekly", "reset"):
        rng = random.Random(42)
        series = [history(shape, rng) for _ in range(trials)]
        conn.execute("TRUNCATE bench_points")
        with conn.cursor().copy("COPY bench_points (key, at, v) FROM STDIN") as copy:
            for key, points in enumerate(series):
                for at, value in picked(points, FORECAST_POINTS):
                    copy.write_row((key, now + dt.timedelta(seconds=at), value))
        started = time.perf_counter()
        with psycopg.RawCursor(conn) as cur:
            cur.execute(statement.sql, statement.params)
            rates = {row[0]: row[1] for row in cur.fetchall()}
        seconds = time.perf_counter() - started
        errors = [abs(truth / float(rates[k]) - 1) if rates.get(k) else float("inf") for k in range(trials)]
        naive = []
        for points in series:
            (t0, v0), (t1, v1) = points[-2], points[-1]
            rate = (v1 - v0) / (t1 - t0) * 86400
            naive.append(abs(truth / rate - 1) if rate > 0 else float("inf"))
        results[shape] = (statistics.median(errors), statistics.median(naive), seconds)
    return results


def bench_cost(dsn: str, sequences: int, rounds: int) -> tuple[list[float], list[float], int]:
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
                           s.observed
                      FROM src s, generate_series(1, 168) h
                    RETURNING id)
                INSERT INTO maintainer.finding (run_id, seq, level, data)
                SELECT c.id, f.seq, f.level, f.data
                  FROM copies c, maintainer.finding f WHERE f.run_id = %(id)s
            """, {"id": first.run_id})
            conn.execute("ANALYZE maintainer.run")
            conn.execute("ANALYZE maintainer.finding")
        history, observations = runner._Run._history, Unit.observations

        def timed(forecasts: bool) -> float:
            # off: no earlier runs read, and nothing kept for later ones
            if not forecasts:
                runner._Run._history = lambda self: []  # type: ignore[method-assign]
                Unit.observations = lambda self, findings: None  # type: ignore[method-assign]
            started = time.perf_counter()
            result = runner.run(spec)
            elapsed = time.perf_counter() - started
            runner._Run._history, Unit.observations = history, observations  # type: ignore[method-assign]
            assert result.status == "ok", result.error
            return elapsed

        on: list[float] = []
        off: list[float] = []
        timed(True)
        timed(False)
        for number in range(rounds):
            for forecasts in ((True, False) if number % 2 == 0 else (False, True)):
                (on if forecasts else off).append(timed(forecasts))
    return on, off, findings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--sequences", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    kind = next(k for k in available_kinds() if k.name == "pg18-embedded")
    with LocalCluster(kind) as cluster:
        dsn = cluster.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            errors = bench_error(conn, args.trials)
        print(f"forecast error of days_left, median over {args.trials} histories per shape (PostgreSQL 18):")
        print(f"{'shape':<8} {'forecast':>9} {'last two runs':>14} {'fit time':>9}")
        for shape, (error, naive, seconds) in errors.items():
            print(f"{shape:<8} {error:>9.1%} {naive:>14.1%} {seconds * 1000:>7.1f}ms")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE seqcost")
        on, off, findings = bench_cost(dsn.rsplit("/", 1)[0] + "/seqcost", args.sequences, args.rounds)
        m_on, m_off = statistics.median(on), statistics.median(off)
        print(f"\nsequences run, {args.sequences} sequences ({findings} findings), 169 earlier runs in the ledger,"
              f" median of {args.rounds} interleaved rounds:")
        print(f"forecasts on  {m_on * 1000:.0f} ms  ({', '.join(f'{t * 1000:.0f}' for t in on)})")
        print(f"forecasts off {m_off * 1000:.0f} ms  ({', '.join(f'{t * 1000:.0f}' for t in off)})")
        print(f"added: {(m_on - m_off) * 1000:.0f} ms = {(m_on - m_off) / m_on:.1%} of the run (on/off ratio {m_on / m_off:.2f}x)")
        # each round ran both, back to back: the median of those differences is less exposed to drift
        paired = statistics.median(a - b for a, b in zip(on, off, strict=True))
        print(f"paired: median of the {args.rounds} rounds' differences {paired * 1000:.0f} ms = {paired / m_on:.1%}")


if __name__ == "__main__":
    main()

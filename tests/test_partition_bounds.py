"""Property tests of the partitions unit's bound generator, run as SQL on the real servers.

The unit's own `discover` block is rendered with an arbitrary `now` and executed: the bounds it
plans must be contiguous, aligned to the interval (calendar months, ISO weeks, ...), start with
the period holding `now`, match an independent Python model, and not depend on the session's
TimeZone (DST) at all. With random existing partitions, the planned pieces must fill every gap
of the horizon without overlapping anything, which PostgreSQL itself confirms by accepting them.
"""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.rows import dict_row

from maintainer.units import Unit, builtin_templates_dir, parse_unit, split_statements
from tests.conftest import Database

UTC = dt.UTC
MONDAY = dt.date(1970, 1, 5)  # the grid origin of day and week intervals
INTERVALS = ["1 day", "2 days", "1 week", "2 weeks", "1 month", "2 months", "3 months", "6 months", "1 year", "2 years"]
ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kathmandu", "Pacific/Chatham"]
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def load_unit() -> Unit:
    return parse_unit(Path(builtin_templates_dir()) / "partitions.sql.j2", builtin=True)


def discover(
    conn: psycopg.Connection[Any], unit: Unit, params: dict[str, Any], now: dt.datetime
) -> list[dict[str, Any]]:
    """The unit's prepare and discover queries, exactly as the runner renders them, for a chosen `now`."""
    values = unit.validate_params(params, "test")
    context: dict[str, Any] = {"params": values, "now": now, "target": "t", "job": "j", "args": {},
                               "dry_run": True, "prev": None, "row": {}}
    for block in ("prepare", "discover"):
        text, binds = unit.render_block(block, context)
        [statement] = split_statements(text, binds)
        with psycopg.RawCursor(conn, row_factory=dict_row) as cur:
            cur.execute(statement.sql, statement.params or None)
            rows = list(cur.fetchall())
        context["prepared"] = rows[0]
    return rows


# -- the independent model ---------------------------------------------------------------------

def _month_start(index: int) -> dt.datetime:
    return dt.datetime(index // 12, index % 12 + 1, 1)


def model_periods(now: dt.datetime, interval: str, premake: int) -> list[tuple[dt.datetime, dt.datetime]]:
    """[lower, upper) of the current period and `premake` more, as naive UTC datetimes."""
    count, unit = interval.split()
    n = int(count)
    wall = now.astimezone(UTC).replace(tzinfo=None)
    if unit.startswith(("month", "year")):
        months = n * (12 if unit.startswith("year") else 1)
        index = wall.year * 12 + wall.month - 1
        first = index - index % months
        return [(_month_start(first + k * months), _month_start(first + (k + 1) * months)) for k in range(premake + 1)]
    days = n * (7 if unit.startswith("week") else 1)
    offset = (wall.date() - MONDAY).days
    first = MONDAY + dt.timedelta(days=offset - offset % days)
    start = dt.datetime.combine(first, dt.time())
    step = dt.timedelta(days=days)
    return [(start + k * step, start + (k + 1) * step) for k in range(premake + 1)]


def parse_literal(text: str) -> dt.datetime:
    """A bound literal of the unit: '2025-01-01 00:00:00+00', '2025-01-01 00:00:00' or '2025-01-01'."""
    if text.endswith("+00"):
        return dt.datetime.fromisoformat(text[:-3])
    return dt.datetime.fromisoformat(text)


def creates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every range the plan creates (a `create` step stands for a batch of them, in `parts`)."""
    ranges = [{**r, **part} for r in rows if r["kind"] == "create" for part in r["parts"]]
    return sorted(ranges, key=lambda r: parse_literal(r["lower"]))


# -- properties --------------------------------------------------------------------------------

KEYS = {"timestamptz": "timestamptz", "timestamp": "timestamp", "date": "date"}


def _make_parents(db: Database) -> None:
    db.run_script("".join(
        f"CREATE TABLE bounds_{name} (id bigint, k {sql_type} NOT NULL) PARTITION BY RANGE (k);"
        for name, sql_type in KEYS.items()
    ))


@SETTINGS
@given(
    now=st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2199, 12, 1), timezones=st.just(UTC)),
    interval=st.sampled_from(INTERVALS),
    premake=st.integers(min_value=0, max_value=6),
    zone=st.sampled_from(ZONES),
    key=st.sampled_from(sorted(KEYS)),
)
def test_planned_periods_are_contiguous_aligned_and_independent_of_the_time_zone(
    db: Database, now: dt.datetime, interval: str, premake: int, zone: str, key: str
) -> None:
    unit = load_unit()
    with db.connect() as conn:
        if conn.execute("SELECT to_regclass('bounds_date')").fetchone() == (None,):
            _make_parents(db)
        conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
        rows = discover(conn, unit, {"table": f"public.bounds_{key}", "interval": interval, "premake": premake}, now)
    planned = creates(rows)
    expected = model_periods(now, interval, premake)
    got = [(parse_literal(r["lower"]), parse_literal(r["upper"])) for r in planned]
    assert got == expected
    wall = now.replace(tzinfo=None)
    assert got[0][0] <= wall < got[0][1]
    for (_, upper), (lower, _) in itertools.pairwise(got):
        assert upper == lower  # no gap, no overlap
    for row, (lower, _) in zip(planned, got, strict=True):
        assert row["part_name"] == f"bounds_{key}_p{lower:%Y%m%d}"
        if key == "timestamptz":
            assert row["lower"].endswith("+00") and row["upper"].endswith("+00")
        if key == "date":
            assert len(row["lower"]) == 10
    [summary] = [r["summary"] for r in rows if r["kind"] == "summary"]
    assert summary["to_create"] == premake + 1 and summary["ahead_before"] == 0 and not summary["covered_before"]
    assert summary["ahead_planned"] == premake and summary["covered_planned"]


existing_ranges = st.lists(
    st.tuples(st.integers(min_value=-90, max_value=220), st.integers(min_value=1, max_value=75)),
    max_size=6,
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    ranges=existing_ranges,
    interval=st.sampled_from(["1 day", "1 week", "1 month", "3 months"]),
    premake=st.integers(min_value=0, max_value=5),
    key=st.sampled_from(["timestamptz", "date"]),
    zone=st.sampled_from(ZONES),
)
def test_planned_pieces_fill_every_gap_and_overlap_nothing(
    db: Database, ranges: list[tuple[int, int]], interval: str, premake: int, key: str, zone: str
) -> None:
    """Existing partitions at arbitrary day bounds: the plan covers the horizon exactly."""
    unit = load_unit()
    now = dt.datetime(2024, 2, 29, 13, 30, tzinfo=UTC)  # a leap day
    base = dt.datetime(2024, 2, 1)
    # keep only non-overlapping existing ranges, as PostgreSQL would
    taken: list[tuple[dt.datetime, dt.datetime]] = []
    for start, length in ranges:
        lo, hi = base + dt.timedelta(days=start), base + dt.timedelta(days=start + length)
        if all(hi <= a or lo >= b for a, b in taken):
            taken.append((lo, hi))
    with db.connect() as conn:
        conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
        conn.execute(f"DROP TABLE IF EXISTS gaps; CREATE TABLE gaps (k {key} NOT NULL) PARTITION BY RANGE (k)")
        suffix = "+00" if key == "timestamptz" else ""
        for number, (lo, hi) in enumerate(taken):
            conn.execute(
                f"CREATE TABLE gaps_{number} PARTITION OF gaps FOR VALUES FROM ('{lo:%Y-%m-%d}{suffix}') "
                f"TO ('{hi:%Y-%m-%d}{suffix}')"
            )
        rows = discover(conn, unit, {"table": "public.gaps", "interval": interval, "premake": premake}, now)
        planned = creates(rows)
        pieces = [(parse_literal(r["lower"]), parse_literal(r["upper"])) for r in planned]
        horizon = model_periods(now, interval, premake)
        start, end = horizon[0][0], horizon[-1][1]
        # every piece lies within the horizon, has positive width and overlaps nothing
        everything = sorted(pieces + taken)
        for lo, hi in pieces:
            assert start <= lo < hi <= end
        for (_, hi1), (lo2, _) in itertools.pairwise(everything):
            assert hi1 <= lo2
        # and the horizon is covered without a hole
        cursor = start
        for lo, hi in everything:
            if hi <= cursor or lo >= end:
                continue
            assert lo <= cursor, f"hole at {cursor}"
            cursor = hi
        assert cursor >= end
        # PostgreSQL agrees: every planned piece attaches (it would refuse an overlap)
        with conn.transaction(force_rollback=True):
            for number, row in enumerate(planned):
                conn.execute(
                    sql.SQL("CREATE TABLE {} PARTITION OF gaps FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier(f"new_{number}"), sql.Literal(row["lower"]), sql.Literal(row["upper"])
                    )
                )
        names = [r["part_name"] for r in planned]
        assert len(set(names)) == len(names)
        conn.execute("DROP TABLE gaps")

"""Forecasts from the ledger's history (SPEC §13) with real runs seconds apart on every server.

Each test makes history the way production does — runs of the job recorded in the ledger while
something consumes the counter at a known pace — with `forecast_min_span` lowered to seconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Database, Workspace

INT4_MAX = 2147483647


def run_job(workspace: Workspace, job: str) -> list[dict[str, Any]]:
    result = workspace.cli("trigger", job, "--json")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)["runs"]
    assert runs and all(r["error"] is None for r in runs), runs
    return [f for r in runs for f in r["findings"]]


class Pacer:
    """Consumes a counter at `per_second` on the wall clock, in a thread, until stopped; `rate` is
    the pace it really kept (what a forecast should find)."""

    def __init__(self, db: Database, statement: str, per_second: float) -> None:
        self.db, self.statement, self.per_second = db, statement, per_second
        self.stop = threading.Event()
        self.consumed = 0
        self.started = self.ended = 0.0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with self.db.connect() as conn:
            self.started = time.monotonic()
            while not self.stop.is_set():
                due = int(self.per_second * (time.monotonic() - self.started)) - self.consumed
                if due > 0:
                    conn.execute(self.statement, {"n": due})
                    self.consumed += due
                time.sleep(0.02)
            self.ended = time.monotonic()

    @property
    def rate_per_day(self) -> float:
        return self.consumed / (self.ended - self.started) * 86400

    def __enter__(self) -> Pacer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def runs_apart(workspace: Workspace, job: str, count: int, gap: float) -> list[list[dict[str, Any]]]:
    found = []
    for number in range(count):
        if number:
            time.sleep(gap)
        found.append(run_job(workspace, job))
    return found


# -- sequences ------------------------------------------------------------------------------------

SEQUENCE_PARAMS = {"schemas": ["fc"], "forecast_min_span": "2s", "forecast_window": "1h"}


@pytest.fixture
def orders(workspace: Workspace, db: Database) -> Iterator[Workspace]:
    db.run_script("""
        CREATE SCHEMA fc;
        CREATE TABLE fc.orders (id serial PRIMARY KEY, note text);
        SELECT setval('fc.orders_id_seq', 2000000000);
    """)
    workspace.job("sequences", unit="sequences", params=SEQUENCE_PARAMS)
    yield workspace


def orders_finding(findings: list[dict[str, Any]]) -> dict[str, Any]:
    return next(f for f in findings if f["column"] == "fc.orders.id")


CONSUME = "SELECT setval('fc.orders_id_seq', nextval('fc.orders_id_seq') + %(n)s - 1)"


def test_a_single_observation_gives_no_forecast(orders: Workspace) -> None:
    finding = orders_finding(run_job(orders, "sequences"))
    assert finding["rate_per_day"] is None and finding["days_left"] is None
    assert "no earlier observation" in finding["forecast_note"]
    assert finding["level"] == "critical"  # the ratio rule alone: 93% used


def test_days_left_of_a_sequence_consumed_at_a_known_pace(orders: Workspace, db: Database) -> None:
    with Pacer(db, CONSUME, per_second=2000) as pacer:
        history = runs_apart(orders, "sequences", 4, gap=1.5)
    first, last = orders_finding(history[0]), orders_finding(history[-1])
    assert first["days_left"] is None
    left = INT4_MAX - last["last_value"]
    truth = left / pacer.rate_per_day
    assert last["rate_per_day"] == pytest.approx(pacer.rate_per_day, rel=0.10)
    assert last["days_left"] == pytest.approx(truth, rel=0.10)
    assert last["forecast_note"] is None and "Exhausts in ~" in last["forecast"]
    # 147M values left at ~173M a day: less than critical_days
    assert last["days_left"] < 30 and last["level"] == "critical"


def test_the_days_rule_raises_a_level_the_ratio_rule_leaves_ok(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE SCHEMA fc; CREATE TABLE fc.orders (id serial PRIMARY KEY);")
    workspace.job("sequences", unit="sequences", params={**SEQUENCE_PARAMS, "warn_days": 100000})
    with Pacer(db, CONSUME, per_second=50):
        history = runs_apart(workspace, "sequences", 3, gap=1.5)
    first, last = orders_finding(history[0]), orders_finding(history[-1])
    assert first["level"] == "ok" and last["used_ratio"] < 0.01
    # 2^31 values at ~4.3M a day: about 500 days, past critical_days but within warn_days
    assert 300 < last["days_left"] < 1000 and last["level"] == "warn"


def test_a_sequence_that_will_not_run_out_in_a_lifetime_says_so(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE SCHEMA fc; CREATE TABLE fc.orders (id bigserial PRIMARY KEY);")
    workspace.job("sequences", unit="sequences", params=SEQUENCE_PARAMS)
    with Pacer(db, CONSUME, per_second=50):
        history = runs_apart(workspace, "sequences", 3, gap=1.5)
    last = orders_finding(history[-1])
    # 9.2e18 values at a few million a day: billions of days, said as what they mean
    assert last["days_left"] > 1e9 and last["level"] == "ok"
    assert last["forecast"].startswith("Exhausts in more than 100 years at "), last["forecast"]


def test_a_setval_backwards_mid_history_gives_no_negative_or_absurd_rate(orders: Workspace, db: Database) -> None:
    with Pacer(db, CONSUME, per_second=2000) as pacer:
        history = runs_apart(orders, "sequences", 2, gap=1.5)
        db.execute("SELECT setval('fc.orders_id_seq', 1000)")
        # the same gap before the run that sees the reset as between the others: that run keeps
        # where the new stretch began, and the last run measures its rate from there
        time.sleep(1.5)
        history += runs_apart(orders, "sequences", 3, gap=1.5)
    after_reset = orders_finding(history[2])
    assert after_reset["rate_per_day"] is None and "reset" in after_reset["forecast_note"]
    for findings in history:
        rate = orders_finding(findings)["rate_per_day"]
        assert rate is None or 0 <= rate <= 2 * pacer.rate_per_day
    last = orders_finding(history[-1])
    assert last["rate_per_day"] == pytest.approx(pacer.rate_per_day, rel=0.10)
    assert last["days_left"] > 0
    # the run that saw the reset keeps where the stretch began (itself), the runs after it carry
    # that on; before it, a plain value (the stretch began before the oldest run)
    kept = [row[0][str(orders_finding(history[0])["sequence_oid"])]
            for row in db.execute("SELECT observed FROM maintainer.run ORDER BY id")]
    assert kept[1] == orders_finding(history[1])["position"]
    position = orders_finding(history[2])["position"]
    assert kept[2][0] == position and kept[2][2] == position
    assert [k[1:] for k in kept[3:]] == [kept[2][1:]] * 2


def test_report_puts_the_fewest_days_first_within_a_level(orders: Workspace, db: Database) -> None:
    # fc.aaa is fuller but idle; fc.orders, consumed, runs out first: the report says so first
    db.run_script("CREATE TABLE fc.aaa (id serial PRIMARY KEY); SELECT setval('fc.aaa_id_seq', 2100000000);")
    with Pacer(db, CONSUME, per_second=2000):
        history = runs_apart(orders, "sequences", 3, gap=1.5)
    assert [f["column"] for f in history[-1]][:2] == ["fc.aaa.id", "fc.orders.id"]
    result = orders.cli("report", "--json")
    assert result.exit_code == 0, result.output
    section = next(s for s in json.loads(result.output)["sections"] if s["unit"] == "sequences")
    critical = [e["finding"]["column"] for e in section["findings"] if e["level"] == "critical"]
    assert critical == ["fc.orders.id", "fc.aaa.id"]
    assert section["findings"][0]["values"]["days_left"] > 0
    assert "Exhausts in ~" in section["findings"][0]["message"]


def test_a_sequence_recreated_under_the_same_name_starts_afresh(orders: Workspace, db: Database) -> None:
    run_job(orders, "sequences")
    time.sleep(2.1)
    db.run_script("""
        DROP TABLE fc.orders;
        CREATE TABLE fc.orders (id serial PRIMARY KEY, note text);
        SELECT setval('fc.orders_id_seq', 2100000000);
    """)
    finding = orders_finding(run_job(orders, "sequences"))
    assert finding["rate_per_day"] is None and finding["days_left"] is None


# -- autovacuum -----------------------------------------------------------------------------------


class XidBurner(Pacer):
    """Burns transaction IDs at `per_second`, one `txid_current()` transaction each; `rate_per_day`
    is the pace the whole cluster's counter really kept meanwhile (the runs' own IDs included)."""

    def __init__(self, db: Database, per_second: float) -> None:
        super().__init__(db, "SELECT txid_current()", per_second)
        self.first = self.last = 0

    def _run(self) -> None:
        with self.db.connect() as conn:
            self.first = self._position(conn)
            self.started = time.monotonic()
            while not self.stop.is_set():
                due = int(self.per_second * (time.monotonic() - self.started)) - self.consumed
                for _ in range(max(due, 0)):
                    conn.execute(self.statement)
                self.consumed += max(due, 0)
                time.sleep(0.02)
            self.last = self._position(conn)
            self.ended = time.monotonic()

    @staticmethod
    def _position(conn: Any) -> int:
        return int(conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()[0])

    @property
    def rate_per_day(self) -> float:
        return (self.last - self.first) / (self.ended - self.started) * 86400


def test_xid_days_left_at_a_known_pace_of_transactions(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE SCHEMA fc; CREATE TABLE fc.events (id bigint);")
    workspace.job("autovacuum", unit="autovacuum",
                  params={"schemas": ["fc"], "forecast_min_span": "2s", "forecast_window": "1h"})
    with XidBurner(db, per_second=300) as burner:
        history = runs_apart(workspace, "autovacuum", 4, gap=1.5)
    freeze_max_age = int(db.execute("SHOW autovacuum_freeze_max_age")[0][0])
    first = {f["object"]: f for f in history[0]}
    last = {f["object"]: f for f in history[-1]}
    table, database = last["fc.events"], last[f'"{db.name}"' if not db.name.islower() else db.name]
    assert first["fc.events"]["xid_days_left"] is None and first["fc.events"]["forecast_note"]
    assert table["xid_rate_per_day"] == pytest.approx(burner.rate_per_day, rel=0.10)
    for row in (table, database):
        truth = (freeze_max_age - row["xid_age"]) / burner.rate_per_day
        assert row["xid_days_left"] == pytest.approx(truth, rel=0.10), row
        stop = (2147483647 - 3000000 - row["xid_age"]) / burner.rate_per_day
        assert row["wraparound_days_left"] == pytest.approx(stop, rel=0.10), row
    assert "Exhausts transaction IDs" in database["forecast"]


# -- partitions -----------------------------------------------------------------------------------


def test_runway_days_is_the_upper_bound_of_the_last_partition_ahead(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE TABLE public.metrics (at timestamptz NOT NULL, v int) PARTITION BY RANGE (at);")
    workspace.job("partitions", unit="partitions",
                  items=[{"table": "public.metrics", "interval": "1 day", "premake": 3}])
    finding = run_job(workspace, "partitions")[0]
    upper = db.execute("""
        SELECT max((regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz)
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'public.metrics'::regclass""")[0][0]
    now = db.execute("SELECT now()")[0][0]
    assert finding["partitions_ahead"] == 3
    assert finding["runway_days"] == pytest.approx((upper - now).total_seconds() / 86400, abs=0.02)
    # the steady pass (vouched for by the survey) says the same
    again = run_job(workspace, "partitions")[0]
    assert again["runway_days"] == pytest.approx(finding["runway_days"], abs=0.02)


def test_runway_days_of_an_integer_key_at_a_known_pace(workspace: Workspace, db: Database) -> None:
    db.run_script("""
        CREATE TABLE public.events (id bigint NOT NULL, v int) PARTITION BY RANGE (id);
        CREATE SEQUENCE public.events_ids;
        INSERT INTO public.events SELECT 0, 0 WHERE false;
    """)
    workspace.job("partitions", unit="partitions", params={"forecast_min_span": "2s", "forecast_window": "1h"},
                  items=[{"table": "public.events", "interval": 1000000, "premake": 2}])
    run_job(workspace, "partitions")  # creates the partitions the inserts need
    insert = "INSERT INTO public.events SELECT nextval('public.events_ids'), 0 FROM generate_series(1, %(n)s)"
    with Pacer(db, insert, per_second=20) as pacer:
        history = runs_apart(workspace, "partitions", 3, gap=1.5)
    first, last = history[0][0], history[-1][0]
    assert first["runway_days"] is None and first["forecast_note"]
    assert last["key_rate_per_day"] == pytest.approx(pacer.rate_per_day, rel=0.10)
    upper = 1000000 * (last["partitions_ahead"] + 1)
    truth = (upper - last["max_key"]) / pacer.rate_per_day
    assert last["runway_days"] == pytest.approx(truth, rel=0.10)


# -- a user unit ----------------------------------------------------------------------------------

COUNTER_UNIT = """\
---
description: how fast a counter kept in a table grows
params:
  forecast_min_span: {type: duration, default: 2s}
  forecast_window: {type: duration, default: 1h}
forecast: {value: n}
---
{% from "lib/forecast.sql.j2" import observed, fit %}
{% block discover %}
WITH points AS (
    SELECT 0 AS key, o.at, o.v FROM ({{ observed(history, state_schema) }}) o
    UNION ALL
    SELECT 0, now(), c.n FROM fc.counter c
),
rate AS ({{ fit('points', params.forecast_min_span) }})
SELECT c.n, r.rate_per_day, r.forecast_note FROM fc.counter c LEFT JOIN rate r ON true
{% endblock %}
"""


def test_a_user_unit_forecasts_its_own_counter_through_the_ledger(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE SCHEMA fc; CREATE TABLE fc.counter (n bigint); INSERT INTO fc.counter VALUES (0);")
    workspace.unit("counter", COUNTER_UNIT)
    workspace.job("counter", unit="counter")
    with Pacer(db, "UPDATE fc.counter SET n = n + %(n)s", per_second=500) as pacer:
        history = runs_apart(workspace, "counter", 3, gap=1.5)
    assert history[0][0]["rate_per_day"] is None and "no earlier observation" in history[0][0]["forecast_note"]
    assert history[-1][0]["rate_per_day"] == pytest.approx(pacer.rate_per_day, rel=0.10)
    # each run keeps the one number its forecast needs, not a copy of its findings
    observed = [row[0] for row in db.execute("SELECT observed FROM maintainer.run ORDER BY id")]
    assert observed == [{"": run[0]["n"]} for run in history]


def test_a_run_whose_blocks_never_read_history_still_keeps_where_a_new_key_began(
    workspace: Workspace, db: Database
) -> None:
    # `history` is read from the ledger only when a block looks at it. A run that observes values
    # without looking must still keep, for the next forecast, where a key new since the last run began.
    db.run_script("CREATE SCHEMA fc; CREATE TABLE fc.counters (k text, n bigint);"
                  "INSERT INTO fc.counters VALUES ('a', 5);")
    workspace.unit("counters", """---
description: counters by name, observed but never forecast here
forecast: {value: n, key: k}
---
{% block discover %}
SELECT k, n FROM fc.counters ORDER BY k
{% endblock %}
""")
    workspace.job("counters", unit="counters")
    run_job(workspace, "counters")
    db.execute("INSERT INTO fc.counters VALUES ('b', 7)")
    run_job(workspace, "counters")
    (first,), (second,) = db.execute("SELECT observed FROM maintainer.run ORDER BY id")
    assert first == {"a": 5}
    assert second["a"] == 5  # the same stretch as at the first run: a plain value
    assert second["b"][0] == second["b"][2] == 7  # new since the first run: [value, since, value there]


def test_a_ledger_from_before_observations_is_upgraded_and_forecasts_start_from_there(
    orders: Workspace, db: Database
) -> None:
    run_job(orders, "sequences")
    # the ledger as the previous version left it: no `observed` column
    db.run_script("ALTER TABLE maintainer.run DROP COLUMN observed;"
                  " DELETE FROM maintainer.schema_version WHERE version = 2;")
    with Pacer(db, CONSUME, per_second=2000) as pacer:
        history = runs_apart(orders, "sequences", 3, gap=1.5)
    # the runs of the old ledger observed nothing a forecast can read: the rate starts with the upgrade
    assert "no earlier observation" in orders_finding(history[0])["forecast_note"]
    assert orders_finding(history[-1])["rate_per_day"] == pytest.approx(pacer.rate_per_day, rel=0.10)
    assert db.execute("SELECT max(version) FROM maintainer.schema_version")[0][0] == 2


def test_a_run_keeps_finite_numbers_by_key_and_the_largest_of_a_key() -> None:
    from decimal import Decimal

    from maintainer.units import load_units

    sequences = load_units(None)["sequences"]
    observed = sequences.observations([
        {"sequence_oid": 5, "position": Decimal("12")},
        {"sequence_oid": 5, "position": Decimal("13")},  # a second column fed by the same sequence
        {"sequence_oid": 6, "position": float("nan")},
        {"sequence_oid": 7, "position": True},
        {"sequence_oid": 8, "position": None},
        {"sequence_oid": None, "position": 4},
    ])
    assert observed == {"5": 13} and isinstance(observed["5"], int)
    assert sequences.observations([{"sequence_oid": 6, "position": None}]) is None
    assert load_units(None)["reindex"].observations([{"index": "x"}]) is None

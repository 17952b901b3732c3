"""Pacing against a real primary with a streaming standby (SPEC §12).

A standby whose replay is paused falls behind with every batch the primary writes: a sweep must
stop changing rows within one batch, wait, and finish after replay resumes, every row done exactly
once; waiting longer than `max_wait` stops the run at a safe point, and the next run resumes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.rows import dict_row

from maintainer.ledger import Ledger
from maintainer.pgserver import LocalCluster, ServerKind, available_kinds
from maintainer.project import load_project
from maintainer.runner import RunOptions, run
from tests.test_anonymize import make_activities

# Replication is exercised on every server here (15, 17 and 18): a standby costs 2–8 s to build.
KINDS = available_kinds()
# Commits flushed as in production: with the test clusters' asynchronous commit a whole sweep can
# finish before its WAL is even written, let alone sent.
STANDBY_SETTINGS = {"wal_receiver_status_interval": "1s", "synchronous_commit": "on"}


@dataclass
class Replicated:
    primary: LocalCluster
    standby: LocalCluster

    def primary_execute(self, query: str) -> list[tuple[Any, ...]]:
        with self.primary.connect() as conn:
            cur = conn.execute(query)  # type: ignore[call-overload]
            return cur.fetchall() if cur.description else []

    def standby_execute(self, query: str) -> list[tuple[Any, ...]]:
        with self.standby.connect() as conn:
            cur = conn.execute(query)  # type: ignore[call-overload]
            return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module", params=KINDS, ids=lambda kind: kind.name)
def replicated(request: pytest.FixtureRequest) -> Iterator[Replicated]:
    kind: ServerKind = request.param
    with LocalCluster(kind, settings=STANDBY_SETTINGS) as primary:
        standby = LocalCluster(kind, settings=STANDBY_SETTINGS).start_standby(primary, "standby1")
        try:
            yield Replicated(primary, standby)
        finally:
            standby.stop()


@pytest.fixture
def pair(replicated: Replicated, tmp_path: Path) -> Iterator[tuple[Replicated, Path]]:
    """A fresh `activities` table on the primary (replicated), and a workspace whose target is it."""
    replicated.primary_execute("DROP TABLE IF EXISTS activities")
    replicated.primary_execute("DROP SCHEMA IF EXISTS maintainer CASCADE")
    from tests.conftest import Database, Server

    db = Database(Server("primary", replicated.primary.dsn(), 0), "postgres", replicated.primary.dsn())
    make_activities(db, rows=3000)
    with psycopg.connect(replicated.primary.dsn(), autocommit=True, row_factory=dict_row) as conn:
        Ledger(conn, "maintainer").ensure()  # its DDL is WAL of its own, not what the tests measure
    (tmp_path / "jobs").mkdir()
    caught_up(replicated)
    yield replicated, tmp_path
    replicated.standby_execute("SELECT pg_wal_replay_resume()")


def caught_up(replicated: Replicated) -> None:
    """Wait until the standby has replayed everything the primary wrote. The insert position, not
    pg_current_wal_lsn(): test clusters commit asynchronously, so WAL can still be on its way to disk."""
    deadline = time.monotonic() + 30
    while replicated.primary_execute(
            "SELECT count(*) FROM pg_stat_replication WHERE replay_lsn >= pg_current_wal_insert_lsn()") != [(1,)]:
        assert time.monotonic() < deadline, "the standby never caught up"
        time.sleep(0.05)


def write_config(root: Path, dsn: str, throttle: dict[str, Any]) -> Path:
    config = root / "maintainer.yaml"
    config.write_text(yaml.safe_dump({
        "targets": {"app": {"dsn": dsn}},
        "jobs_dir": "jobs",
        "defaults": {"throttle": throttle, "retry_backoff": "50ms"},
        "log_format": "text",
    }))
    (root / "jobs" / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "sweep", "unit": "anonymize",
        "items": [{"table": "public.activities", "where": "created_at < '2024-04-01'",
                   "set": {"actor_email": None, "actor_ip": None}, "batch_size": 100, "pause": "0s"}],
    }))
    return config


def anonymized(replicated: Replicated) -> int:
    return int(replicated.primary_execute(
        "SELECT count(*) FROM activities WHERE created_at < '2024-04-01' AND actor_email IS NULL")[0][0])


def untouched_outside(replicated: Replicated) -> str:
    return str(replicated.primary_execute(
        "SELECT md5(string_agg(t::text || '/' || t.xmin::text, '|' ORDER BY id)) FROM activities t"
        " WHERE created_at >= '2024-04-01'")[0][0])


def test_a_paused_standby_holds_a_sweep_within_a_batch_and_it_finishes_after_replay_resumes(
    pair: tuple[Replicated, Path]
) -> None:
    replicated, root = pair
    config = write_config(root, replicated.primary.dsn(),
                          {"max_replica_lag_bytes": "64kB", "max_wait": "2min", "check_every": "100ms"})
    matching = int(replicated.primary_execute(
        "SELECT count(*) FROM activities WHERE created_at < '2024-04-01'")[0][0])
    outside = untouched_outside(replicated)
    replicated.standby_execute("SELECT pg_wal_replay_pause()")

    waits: list[str | None] = []
    waiting = threading.Event()

    def on_wait(message: str | None) -> None:
        waits.append(message)
        if message:
            waiting.set()

    project = load_project(str(config))
    spec = project.run_specs(project.job("sweep"))[0]
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.update(result=run(spec, RunOptions(on_wait=on_wait))))
    worker.start()
    try:
        assert waiting.wait(60), "the sweep never waited for the paused standby"
        held_at = anonymized(replicated)
        time.sleep(1.5)  # while replay stays paused, not one more row changes
        assert anonymized(replicated) == held_at
        assert 0 < held_at < matching, waits
    finally:
        replicated.standby_execute("SELECT pg_wal_replay_resume()")
        worker.join(timeout=120)
    result = outcome["result"]
    assert result.status == "ok", result.error
    finding = result.findings[0]
    assert (finding["rows_anonymized"], finding["rows_remaining"]) == (matching, 0)  # each row exactly once
    assert anonymized(replicated) == matching
    assert untouched_outside(replicated) == outside
    assert result.throttled_seconds.get("replica_lag_bytes", 0) >= 1.5
    assert any(m and "standby" in m and "WAL" in m for m in waits)
    assert waits[-1] is None  # the wait ended
    # the ledger keeps how long the run waited
    [(summary,)] = replicated.primary_execute("SELECT summary FROM maintainer.run")
    assert summary["throttled_seconds"]["replica_lag_bytes"] >= 1.5


def test_waiting_past_max_wait_stops_at_a_safe_point_and_the_next_run_resumes(pair: tuple[Replicated, Path]) -> None:
    replicated, root = pair
    config = write_config(root, replicated.primary.dsn(),
                          {"max_replica_lag_bytes": "64kB", "max_wait": "1s", "check_every": "100ms"})
    matching = int(replicated.primary_execute(
        "SELECT count(*) FROM activities WHERE created_at < '2024-04-01'")[0][0])
    replicated.standby_execute("SELECT pg_wal_replay_pause()")
    project = load_project(str(config))
    spec = project.run_specs(project.job("sweep"))[0]
    first = run(spec)
    assert first.status == "ok", first.error
    stopped = [f for f in first.findings if "throttled" in f]
    assert len(stopped) == 1 and stopped[0]["level"] == "warn"
    assert "max_wait" in stopped[0]["throttled"] and "next run resumes" in stopped[0]["throttled"]
    done = anonymized(replicated)
    assert 0 < done < matching
    assert first.findings[0]["rows_remaining"] == matching - done

    replicated.standby_execute("SELECT pg_wal_replay_resume()")
    caught_up(replicated)
    second = run(spec)
    assert second.status == "ok", second.error
    assert second.findings[0]["rows_anonymized"] == matching - done
    assert anonymized(replicated) == matching
    statuses = replicated.primary_execute("SELECT status FROM maintainer.run ORDER BY id")
    assert statuses == [("ok",), ("ok",)]


def test_a_disconnected_standby_is_covered_by_its_slot(pair: tuple[Replicated, Path]) -> None:
    replicated, root = pair
    config = write_config(root, replicated.primary.dsn(),
                          {"max_replica_lag_bytes": "64kB", "max_wait": "1s", "check_every": "100ms"})
    # The standby's walreceiver is cut off: it vanishes from pg_stat_replication, its slot stays.
    [(conninfo,)] = replicated.standby_execute("SHOW primary_conninfo")
    replicated.standby_execute("ALTER SYSTEM SET primary_conninfo = ''")
    replicated.standby_execute("SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 30
        while replicated.primary_execute("SELECT count(*) FROM pg_stat_replication") != [(0,)]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        project = load_project(str(config))
        result = run(project.run_specs(project.job("sweep"))[0])
        assert result.status == "ok", result.error
        [stopped] = [f for f in result.findings if "throttled" in f]
        assert "replication slot standby1" in stopped["throttled"]
        assert result.throttled_seconds.get("slot_retained_bytes", 0) > 0
    finally:
        with replicated.standby.connect() as conn:
            conn.execute(sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(conninfo)))
        replicated.standby_execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while replicated.primary_execute("SELECT count(*) FROM pg_stat_replication") != [(1,)]:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_throttle_off_for_a_job_never_asks(pair: tuple[Replicated, Path]) -> None:
    replicated, root = pair
    config = write_config(root, replicated.primary.dsn(),
                          {"max_replica_lag_bytes": "64kB", "max_wait": "1s", "check_every": "100ms"})
    job = yaml.safe_load((root / "jobs" / "sweep.yaml").read_text())
    (root / "jobs" / "sweep.yaml").write_text(yaml.safe_dump({**job, "throttle": "off"}))
    replicated.standby_execute("SELECT pg_wal_replay_pause()")
    project = load_project(str(config))
    result = run(project.run_specs(project.job("sweep"))[0])
    assert result.status == "ok", result.error
    assert result.throttled_seconds == {}
    assert result.findings[0]["rows_remaining"] == 0



def test_a_terminal_shows_what_a_run_waits_for_verbatim() -> None:
    import io

    from rich.console import Console

    from maintainer import output

    buffer = io.StringIO()
    report = output.wait_reporter(Console(file=buffer, width=200), enabled=True)
    assert report is not None
    report("standby [/red]s1 is 40 MB behind (limit 16 MB)")
    report(None)
    lines = buffer.getvalue().splitlines()
    assert lines == ["pacing: standby [/red]s1 is 40 MB behind (limit 16 MB)", "pacing: going on"]
    assert output.wait_reporter(Console(file=buffer), enabled=False) is None

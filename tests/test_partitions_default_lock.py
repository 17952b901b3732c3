"""Issue 16, item 4: a DEFAULT partition plus a long transaction must not stall the parent's readers.

Every ACCESS EXCLUSIVE lock the `partitions` unit needs on a DEFAULT partition (adding the excluding
CHECK, the ATTACH, dropping the CHECK again) is taken with NOWAIT: the run never sits in the lock
queue in front of the readers. These tests hold a long transaction on the parent, keep a reader
busy on it, and watch pg_locks while a run goes on; they assert on what the lock manager saw, never
on how long the tool took.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import Database, Workspace

UTC = dt.UTC
READER = "default-lock-reader"


def month(offset: int) -> dt.datetime:
    now = dt.datetime.now(UTC)
    index = now.year * 12 + now.month - 1 + offset
    return dt.datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def parent_with_default(db: Database, name: str, *, default_rows: bool) -> None:
    """Monthly partitions for the three months before this one (the current month is missing) and a
    DEFAULT partition, holding a row outside every range to create when `default_rows`."""
    script = [
        f"CREATE TABLE {name} (id bigserial, created_at timestamptz NOT NULL, PRIMARY KEY (id, created_at))"
        " PARTITION BY RANGE (created_at);",
    ]
    for offset in (-3, -2, -1):
        lo, hi = month(offset), month(offset + 1)
        script.append(f"CREATE TABLE {name}_p{lo:%Y%m%d} PARTITION OF {name}"
                      f" FOR VALUES FROM ('{lo:%Y-%m-%d} 00:00+00') TO ('{hi:%Y-%m-%d} 00:00+00');")
    script.append(f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT;")
    if default_rows:
        script.append(f"INSERT INTO {name} (created_at) VALUES ('1999-06-01 00:00+00'), ('1999-07-01 00:00+00');")
    db.run_script("\n".join(script))


def trigger(ws: Workspace) -> tuple[dict[str, Any], dict[str, Any]]:
    result = ws.cli("trigger", "partitions", "--json")
    assert result.exit_code in (0, 1), result.output
    [run] = json.loads(result.output)["runs"]
    [finding] = run["findings"]
    return run, finding


def excluding_checks(db: Database, default: str) -> list[str]:
    return [name for (name,) in db.execute(
        "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND conname LIKE 'maintainer\\_excludes\\_%%'"
        " ORDER BY 1", (default,))]


@dataclass
class Observed:
    """What the lock manager showed while a run went on, sampled every few milliseconds."""

    tool_waits: list[tuple[str, str]] = field(default_factory=list)  # (mode, relation) not granted to the tool
    reader_waits: list[tuple[str, str]] = field(default_factory=list)  # (mode, relation) the reader queued for
    reads: list[float] = field(default_factory=list)  # how long each of the reader's SELECTs took
    samples: int = 0
    errors: list[BaseException] = field(default_factory=list)


@contextmanager
def reader_and_watcher(db: Database, parent: str) -> Iterator[Observed]:
    """A reader running `SELECT count(*) FROM parent` over and over (statement_timeout 5 s), and a
    watcher recording every lock request of the tool's backends (application_name 'pg-maintainer …')
    and of the reader that pg_locks shows as not granted."""
    seen = Observed()
    stop = threading.Event()

    def read() -> None:
        try:
            with db.connect(application_name=READER) as conn:
                conn.execute("SET statement_timeout = '5s'")
                while not stop.is_set():
                    started = time.monotonic()
                    conn.execute(f"SELECT count(*) FROM {parent}")
                    seen.reads.append(time.monotonic() - started)
                    time.sleep(0.005)
        except BaseException as exc:  # reported by the test
            seen.errors.append(exc)

    def watch() -> None:
        try:
            with db.connect(application_name="default-lock-watcher") as conn:
                while not stop.is_set():
                    rows = conn.execute(
                        "SELECT a.application_name, l.mode, coalesce(c.relname::text, l.relation::text)"
                        "  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                        "  LEFT JOIN pg_class c ON c.oid = l.relation"
                        " WHERE NOT l.granted AND l.locktype = 'relation'"
                        "   AND (a.application_name LIKE 'pg-maintainer%%' OR a.application_name = %s)",
                        (READER,)).fetchall()
                    seen.samples += 1
                    for app, mode, relation in rows:
                        (seen.reader_waits if app == READER else seen.tool_waits).append((mode, relation))
                    time.sleep(0.005)
        except BaseException as exc:
            seen.errors.append(exc)

    threads = [threading.Thread(target=read), threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)
        yield seen
        time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not seen.errors, seen.errors
    assert seen.samples > 20 and len(seen.reads) > 20


def job(ws: Workspace) -> None:
    ws.write_config(defaults={"lock_timeout": "300ms", "statement_timeout": "20s", "retry_backoff": "50ms",
                              "max_attempts": 3})
    ws.job("partitions", unit="partitions", params={"premake": 2},
           items=[{"table": "public.feed", "interval": "1 month"}])


@pytest.mark.parametrize("default_rows", [True, False], ids=["default-with-rows", "empty-default"])
def test_a_long_transaction_on_default_never_has_the_tool_queue_in_front_of_readers(
    workspace: Workspace, db: Database, default_rows: bool
) -> None:
    parent_with_default(db, "feed", default_rows=default_rows)
    job(workspace)
    holder = db.connect()
    holder.autocommit = False
    # ACCESS SHARE on the parent and every partition, DEFAULT included, for longer than all attempts
    holder.execute("SELECT count(*) FROM feed")
    try:
        with reader_and_watcher(db, "feed") as seen:
            run, finding = trigger(workspace)
    finally:
        holder.rollback()
        holder.close()
    print(f"\nreads: {len(seen.reads)}, slowest {max(seen.reads):.3f}s; tool waits {seen.tool_waits[:3]}")
    # the tool never sat in a lock queue in front of the readers, and no reader queued for anything
    assert [w for w in seen.tool_waits if w[0] == "AccessExclusiveLock"] == [], seen.tool_waits[:5]
    assert seen.reader_waits == [], seen.reader_waits[:5]
    # the run reports the missing partitions with a reason, it does not crash
    assert run["status"] == "failed" and run["sqlstate"] == "55P03", run
    assert "feed_default" in run["error"]
    assert finding["created"] == 0 and finding["to_create"] == 3 and finding["level"] == "critical"
    assert "3 creation(s) failed" in finding["hint"]
    # no excluding CHECK outlives the failed creations, and the release step dropped nothing it had
    # not created: it never tried to lock DEFAULT (a failed DROP CONSTRAINT would be its attempt)
    assert excluding_checks(db, "feed_default") == []
    drops = [a for a in run["actions"] if "DROP CONSTRAINT" in a["sql"] and "maintainer_excludes_" in a["sql"]]
    assert [a["status"] for a in drops] == ["ok"] * len(drops), drops

    # the long transaction is gone: the next run creates the partitions (the tables left are resumed)
    run, finding = trigger(workspace)
    assert run["status"] == "ok", run["error"]
    assert finding["created"] == 3 and finding["partitions_ahead"] == 2
    assert finding["level"] == ("warn" if default_rows else "ok")
    assert excluding_checks(db, "feed_default") == []
    assert db.execute("SELECT count(*) FROM pg_constraint WHERE conname LIKE 'maintainer\\_%'") == [(0,)]
    assert db.execute("SELECT count(*) FROM feed_default") == [(2 if default_rows else 0,)]


def test_an_excluding_check_the_run_added_is_dropped_when_the_attach_fails(
    workspace: Workspace, db: Database
) -> None:
    """The CHECK on DEFAULT is in place (DEFAULT was free), then ATTACH cannot have the parent: the
    release step drops what the creation added, so rows of that range are not rejected meanwhile."""
    parent_with_default(db, "feed", default_rows=True)
    job(workspace)
    holder = db.connect()
    holder.autocommit = False
    # conflicts with ATTACH's SHARE UPDATE EXCLUSIVE on the parent; readers and DEFAULT stay free
    holder.execute("LOCK TABLE ONLY feed IN SHARE UPDATE EXCLUSIVE MODE")
    try:
        with reader_and_watcher(db, "feed") as seen:
            run, finding = trigger(workspace)
    finally:
        holder.rollback()
        holder.close()
    # (readers may wait a moment while the tool holds DEFAULT: never while it waits for it)
    assert [w for w in seen.tool_waits if w[0] == "AccessExclusiveLock"] == [], seen.tool_waits[:5]
    assert run["status"] == "failed" and run["sqlstate"] == "55P03", run
    assert finding["created"] == 0 and finding["level"] == "critical"
    added = [a for a in run["actions"] if "ADD CONSTRAINT" in a["sql"] and a["status"] == "ok"]
    assert len(added) == 3  # each creation put its CHECK on DEFAULT ...
    assert excluding_checks(db, "feed_default") == []  # ... and its release took it off again
    db.execute("INSERT INTO feed (created_at) VALUES (now())")  # the current month is not rejected
    assert db.execute("SELECT count(*) FROM feed_default") == [(3,)]


def test_an_excluding_check_left_by_an_interrupted_run_is_dropped_without_queueing(
    workspace: Workspace, db: Database
) -> None:
    """A run that died between adding the CHECK and the ATTACH left it on DEFAULT: rows of its range
    are rejected until a later run drops it. That run locks DEFAULT the same way: while a long
    transaction holds DEFAULT it gives up without queueing; once the transaction is gone it drops the
    CHECK (and creates the partitions)."""
    parent_with_default(db, "feed", default_rows=True)
    job(workspace)
    lo, hi = month(0), month(1)
    db.execute("ALTER TABLE feed_default ADD CONSTRAINT maintainer_excludes_0123456789"
               f" CHECK (NOT (created_at >= '{lo:%Y-%m-%d} 00:00+00' AND created_at < '{hi:%Y-%m-%d} 00:00+00'))"
               " NOT VALID")
    assert excluding_checks(db, "feed_default") == ["maintainer_excludes_0123456789"]
    holder = db.connect()
    holder.autocommit = False
    holder.execute("SELECT count(*) FROM feed")
    try:
        with reader_and_watcher(db, "feed") as seen:
            run, finding = trigger(workspace)
    finally:
        holder.rollback()
        holder.close()
    assert [w for w in seen.tool_waits if w[0] == "AccessExclusiveLock"] == [], seen.tool_waits[:5]
    assert seen.reader_waits == [], seen.reader_waits[:5]
    assert run["status"] == "failed" and run["sqlstate"] == "55P03", run
    assert finding["created"] == 0 and "helper constraint could not be dropped" in finding["hint"]
    assert excluding_checks(db, "feed_default") == ["maintainer_excludes_0123456789"]

    run, finding = trigger(workspace)
    assert run["status"] == "ok", run["error"]
    assert finding["created"] == 3 and excluding_checks(db, "feed_default") == []
    db.execute("INSERT INTO feed (created_at) VALUES (now())")  # the current month has its partition
    assert db.execute(f"SELECT count(*) FROM feed_p{lo:%Y%m%d}") == [(1,)]


def test_short_readers_keeping_default_busy_do_not_starve_the_creation(workspace: Workspace, db: Database) -> None:
    """Readers back to back: DEFAULT is almost never free, but every transaction holding it is young.
    NOWAIT alone would fail every attempt; the unit queues behind such transactions, briefly."""
    parent_with_default(db, "feed", default_rows=True)
    # each read takes a few milliseconds: with three of them DEFAULT is free only for moments
    db.execute("INSERT INTO feed (created_at) SELECT timestamptz '1999-01-01 00:00+00' + g * interval '1 minute'"
               " FROM generate_series(1, 30000) g")
    job(workspace)
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            with db.connect(application_name=READER) as conn:
                while not stop.is_set():
                    conn.execute("SELECT count(*) FROM feed")
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        time.sleep(0.2)
        run, finding = trigger(workspace)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not errors, errors
    assert run["status"] == "ok", run["error"]
    assert finding["created"] == 3 and finding["partitions_ahead"] == 2
    assert excluding_checks(db, "feed_default") == []

"""Failover under a running daemon (SPEC §12): the primary goes away mid-run, a standby is promoted.

The target's DSN lists both servers with `target_session_attrs=read-write` (libpq). The run in
flight when the primary stops waits for a server that accepts writes, takes its lock again there and
finishes; `/readyz` shows the outage and the recovery; the next scheduled run goes to the new
primary, whose ledger (replicated from the old one) continues the history; no tick runs twice; Sentry
check-ins go on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from maintainer.ledger import Ledger
from maintainer.pgserver import LocalCluster, ServerKind, available_kinds
from tests.conftest import Workspace
from tests.test_daemon import DaemonProcess
from tests.test_sentry import Envelopes, envelopes  # noqa: F401 - the fixture

# The reference user's versions; a standby pair costs a few seconds to build, the test about a minute.
KINDS = [kind for kind in available_kinds() if kind.version_num >= 170000]
SETTINGS = {"wal_receiver_status_interval": "1s", "synchronous_commit": "on"}

SLOW_UNIT = """---
description: three slow steps, so that a failover lands in the middle of a run
transaction: none
---
{% block discover %}
SELECT n FROM generate_series(1, 3) AS n
{% endblock %}
{% block apply %}
SELECT pg_sleep(2);
{% endblock %}
"""


@pytest.fixture(params=KINDS, ids=lambda kind: kind.name)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[LocalCluster, LocalCluster]]:
    kind: ServerKind = request.param
    with LocalCluster(kind, settings=SETTINGS) as primary:
        standby = LocalCluster(kind, settings=SETTINGS).start_standby(primary, "standby1")
        try:
            yield primary, standby
        finally:
            standby.stop()


def query(cluster: LocalCluster, text: str) -> list[dict[str, Any]]:
    with psycopg.connect(cluster.dsn(), autocommit=True, row_factory=dict_row, connect_timeout=3) as conn:
        cur = conn.execute(text)  # type: ignore[call-overload]
        return list(cur.fetchall()) if cur.description else []


def wait_for(condition: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def test_failover_mid_schedule(pair: tuple[LocalCluster, LocalCluster], tmp_path: Path,
                               envelopes: Envelopes) -> None:  # noqa: F811 - the fixture
    primary, standby = pair
    dsn = (f"host={primary.host},{standby.host} port={primary.port},{standby.port} user=postgres dbname=postgres"
           " target_session_attrs=read-write connect_timeout=3")
    ws = Workspace(tmp_path, dsn)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "templates").mkdir()
    ws.unit("slow", SLOW_UNIT)
    ws.job("slow", unit="slow", schedule="* * * * *")
    ws.write_config(log_format="json", http={"listen": "127.0.0.1:0"},
                    sentry={"dsn": envelopes.dsn, "environment": "test"},
                    defaults={"retry_backoff": "200ms", "max_attempts": 3, "reconnect_window": "60s"})
    # A run an hour ago: the daemon catches up the missed tick at once instead of waiting a minute.
    with psycopg.connect(primary.dsn(), autocommit=True, row_factory=dict_row) as conn:
        Ledger(conn, "maintainer").ensure()
        conn.execute("INSERT INTO maintainer.run (job, unit, target, lock_key, trigger, status, started_at,"
                     " finished_at) VALUES ('slow', 'slow', 'app', 0, 'schedule', 'ok', now() - interval '1 hour',"
                     " now() - interval '1 hour')")

    daemon = DaemonProcess(ws.config, tmp_path / "daemon.log")
    try:
        assert daemon.get("/readyz")[0] == 200
        wait_for(lambda: query(primary, "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-maintainer slow'"
                                        " AND query LIKE 'SELECT pg_sleep%'"),
                 "the caught-up run is in its steps on the primary", 30)
        primary.halt("fast")  # fenced first: libpq would otherwise go on writing to it (split brain)

        # The outage: no server accepts writes.
        wait_for(lambda: daemon.get("/readyz")[0] == 503, "/readyz reports the outage", 30)
        body = daemon.get("/readyz")[1]
        assert "unreachable" in body and "password" not in body
        standby.promote()
        wait_for(lambda: daemon.get("/readyz")[0] == 200, "/readyz reports the recovery", 30)

        def schedule_runs() -> list[dict[str, Any]]:
            return query(standby, "SELECT id, status, error, attempts, started_at FROM maintainer.run"
                                  " WHERE job = 'slow' AND started_at > now() - interval '30 minutes' ORDER BY id")

        # The run in flight finishes on the new primary, and the next tick runs there too.
        wait_for(lambda: len(schedule_runs()) >= 2 and all(r["status"] != "running" for r in schedule_runs()),
                 "the next tick ran on the new primary", 100)
        runs = schedule_runs()
    finally:
        code = daemon.stop(timeout=30) if daemon.proc.poll() is None else daemon.proc.returncode
        daemon.kill()
    log = daemon.log_path.read_text()
    assert "Traceback" not in log, log
    assert code == 0

    in_flight, *later = runs
    assert in_flight["status"] == "ok", in_flight  # retried over the new primary, not abandoned
    assert in_flight["attempts"] >= 2
    assert [r["status"] for r in later] == ["ok"] * len(later)  # no tick twice, none skipped as a duplicate
    with psycopg.connect(standby.dsn(), autocommit=True) as conn:
        [(steps,)] = conn.execute("SELECT count(*) FROM maintainer.finding WHERE run_id = %s",
                                  (in_flight["id"],)).fetchall()
    assert steps == 3  # its record is whole: every finding, on the new primary

    checkins = [c for c in envelopes.checkins() if c["monitor_slug"] == "slow-app"]
    statuses = [c["status"] for c in checkins]
    assert statuses[:2] == ["in_progress", "ok"] and statuses[2:4] == ["in_progress", "ok"], statuses
    assert yaml.safe_load(ws.config.read_text())["targets"]["app"]["dsn"] == dsn

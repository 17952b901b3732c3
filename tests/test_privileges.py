"""Least privilege: sequences, reindex and autovacuum run as a role that owns nothing.

PostgreSQL 17+: pg_maintain + pg_monitor + pg_read_all_data (+ CREATE on the database for the
ledger) is enough to rebuild indexes; ALTER TABLE and DROP INDEX still need the owner, so those
become recommendations and reports instead of failures. Before 17 REINDEX needs the owner too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import Database, Workspace
from tests.test_autovacuum import SMALL_BOUNDS, load
from tests.test_reindex import make_table


@pytest.fixture
def role(db: Database) -> Iterator[str]:
    """A login role owning nothing; dropped with everything it was granted or created afterwards."""
    name = f"maint_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {name} LOGIN")  # type: ignore[arg-type]
    try:
        yield name
    finally:
        with db.connect() as conn:  # the ledger schema it created, and its grants, live in this database
            conn.execute(f"DROP OWNED BY {name}")  # type: ignore[arg-type]
            conn.execute(f"DROP ROLE {name}")  # type: ignore[arg-type]


def as_role(workspace: Workspace, db: Database, role: str) -> None:
    workspace.write_config(targets={"app": {"dsn": db.server.dsn(db.name, user=role)}})


def trigger(workspace: Workspace, job: str) -> dict[str, Any]:
    result = workspace.cli("trigger", job, "--json")
    run: dict[str, Any] = json.loads(result.output)["runs"][0]
    return run


def test_monitoring_and_maintenance_roles_are_enough(workspace: Workspace, db: Database, role: str) -> None:
    modern = db.server.version_num >= 170000
    grants = "pg_monitor, pg_read_all_data" + (", pg_maintain" if modern else "")
    db.run_script(
        f"GRANT {grants} TO {role}; GRANT CREATE ON DATABASE {db.name} TO {role};"
        "CREATE EXTENSION pgstattuple;"
        "CREATE TABLE tickets (id serial PRIMARY KEY); SELECT setval('tickets_id_seq', 1500000000);"
    )
    make_table(db, "churned", churn=True)
    load(db, "orders", 50_000, updated=True)
    with db.connect() as holder, db.connect() as rebuilder:  # a leftover of an earlier failed rebuild
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM churned")
        rebuilder.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            rebuilder.execute("REINDEX INDEX CONCURRENTLY churned_pkey")
        holder.execute("ROLLBACK")
    as_role(workspace, db, role)
    workspace.job("sequences", unit="sequences")
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB"})
    workspace.job("autovacuum", unit="autovacuum", params=SMALL_BOUNDS)

    sequences = trigger(workspace, "sequences")
    assert sequences["status"] == "ok", sequences["error"]
    tickets = next(f for f in sequences["findings"] if f["sequence"] == "public.tickets_id_seq")
    assert tickets["level"] == "warn" and tickets["used_ratio"] > 0.69  # readable thanks to pg_read_all_data

    reindex = trigger(workspace, "reindex")
    assert reindex["status"] == "ok", reindex["error"]
    found = {f["index"]: f for f in reindex["findings"]}
    leftover = found["public.churned_pkey_ccnew"]
    assert leftover["decision"] == "report" and "needs the table owner" in leftover["reason"]
    assert leftover["level"] == "warn"
    if modern:  # MAINTAIN allows REINDEX; pg_stat_scan_tables (in pg_monitor) allows pgstatindex()
        assert found["public.churned_code"]["decision"] == "rebuilt"
        assert found["public.churned_code"]["reason"] == "confirmed by pgstatindex"
        assert [a["sql"] for a in reindex["actions"]] == [
            'REINDEX INDEX CONCURRENTLY "public"."churned_code"',
            'REINDEX INDEX CONCURRENTLY "public"."churned_pkey"',
        ]
    else:
        assert reindex["actions"] == []
        assert "needs the table owner" in found["public.churned_code"]["reason"]

    autovacuum = trigger(workspace, "autovacuum")
    assert autovacuum["status"] == "ok", autovacuum["error"]
    assert autovacuum["actions"] == []  # ALTER TABLE needs the owner: recommendations, not failures
    orders = next(f for f in autovacuum["findings"] if f["table"] == "public.orders")
    assert orders["decision"] == "recommend" and "needs the table owner" in orders["reason"]

    check = workspace.cli("check")
    assert "does not own" in check.output
    if modern:
        assert check.exit_code == 0, check.output
        assert "may REINDEX all" in check.output
    else:  # only its own ledger tables can be reindexed; the warning names what is missing
        assert "may not REINDEX 3 of" in check.output, check.output  # tickets, churned, orders
        assert "before PostgreSQL 17 only the table owner" in check.output
    assert db.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'maintainer'") == [(role,)]


def test_statistics_the_role_cannot_read_are_unavailable_not_guessed(
    workspace: Workspace, db: Database, role: str
) -> None:
    db.execute(f"GRANT CREATE ON DATABASE {db.name} TO {role}")  # type: ignore[arg-type]
    make_table(db, "churned", churn=False)
    time.sleep(0.1)
    as_role(workspace, db, role)
    workspace.job("reindex", unit="reindex", params={"min_wasted": "256kB"})
    result = trigger(workspace, "reindex")
    assert result["status"] == "ok", result["error"]
    code = next(f for f in result["findings"] if f["index"] == "public.churned_code")
    assert code["estimated_bloat"] is None and code["bloat"] is None  # not the ~90% a naive query reports
    assert code["estimate_note"].startswith(f"statistics not readable by role {role}")
    check = workspace.cli("check")
    assert "cannot read the statistics of" in check.output and "GRANT pg_read_all_data" in check.output

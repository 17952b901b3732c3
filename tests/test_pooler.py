"""Targets behind a transaction-mode pooler (SPEC §12): a real PgBouncer in front of each server.

Runs through a pooler are refused with exit code 2 and a message asking for a direct DSN, and leave
nothing on the pooler's server connections: no advisory lock (a direct client takes the job's lock
right after), no prepared statement. `check` reports the detection; `history`, `report` and `jobs`
read through a pooler; a port mapping that keeps PostgreSQL's own session is not mistaken for one.
The pgbouncer runs with one server connection per (database, user), so every pooled client lands
on the same server backend and what a run left behind is visible to the next client.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from maintainer import db as dbmod
from maintainer import pooler
from maintainer.project import load_project
from maintainer.results import RunResult, exit_code
from maintainer.scheduler import Daemon
from maintainer.session import Session
from tests.conftest import Database, Server, Workspace
from tests.pgbouncer import PgBouncer, PgBouncerUnavailable

# Sent nowhere (pgbouncer and PostgreSQL trust); must never be printed.
PASSWORD = "s3cret-pw-never-shown"


@pytest.fixture(scope="module")
def bouncer(server: Server) -> Iterator[PgBouncer]:
    """pgbouncer 1.18 in transaction mode, `ignore_startup_parameters = extra_float_digits,options`
    (the common setting: `options` is then silently dropped instead of refused)."""
    instance = PgBouncer(server.admin_dsn, default_pool_size=1)
    try:
        instance.start()
    except PgBouncerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield instance
    finally:
        instance.stop()


def pooled_dsn(bouncer: PgBouncer, db: Database) -> str:
    return f"{bouncer.dsn(db.name)} password={PASSWORD}"


def pooled_workspace(ws: Workspace, dsn: str, **target: Any) -> None:
    ws.write_config(targets={"app": {"dsn": dsn, **target}})


def advisory_locks(db: Database) -> list[tuple[Any, ...]]:
    """Advisory locks held by any backend in the test database (pooled server connections too)."""
    return db.execute(
        "SELECT pid, classid, objid FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )


def prepared_on_pooled_backend(bouncer: PgBouncer, db: Database) -> list[str]:
    """Prepared statements of the pooler's (single) server connection to the test database."""
    with psycopg.connect(bouncer.dsn(db.name), autocommit=True, prepare_threshold=None) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM pg_prepared_statements").fetchall()]


def lock_key(ws: Workspace, job: str) -> int:
    project = load_project(str(ws.config))
    (spec,) = project.run_specs(project.jobs[job])
    return spec.lock_key


def assert_refused(output: str, bouncer: PgBouncer, server_port: int) -> None:
    assert "Traceback" not in output
    assert PASSWORD not in output
    assert "target 'app' answers through a connection pooler such as PgBouncer" in output
    assert "the backend pid handed out at login is not the server's pg_backend_pid()" in output
    assert "needs a direct connection" in output
    assert f"e.g. port {server_port} instead of {bouncer.port}" in output


def server_port(server: Server) -> int:
    return int(psycopg.conninfo.conninfo_to_dict(server.admin_dsn)["port"] or 5432)


# -- the hazards, measured (why refusing is needed) -----------------------------------------------


def test_without_refusal_a_session_lock_outlives_its_pooled_client(bouncer: PgBouncer, db: Database) -> None:
    with psycopg.connect(bouncer.dsn(db.name), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SELECT pg_advisory_lock(4242)")
    try:
        with db.connect() as direct:
            assert direct.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (False,)
    finally:
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242")


def test_without_refusal_psycopg_prepared_statements_stay_on_the_server(bouncer: PgBouncer, db: Database) -> None:
    with psycopg.connect(bouncer.dsn(db.name), autocommit=True) as conn:  # psycopg's default threshold
        for _ in range(6):
            conn.execute("SELECT %s::int", (1,))
    try:
        assert prepared_on_pooled_backend(bouncer, db)
    finally:
        with psycopg.connect(bouncer.dsn(db.name), autocommit=True, prepare_threshold=None) as conn:
            conn.execute("DEALLOCATE ALL")


# -- detection ------------------------------------------------------------------------------------


def test_probe_tells_pooled_from_direct(bouncer: PgBouncer, db: Database, server: Server) -> None:
    assert bouncer.port != 6432  # detection never looks at the port number itself
    direct = dbmod.connect(db.dsn)
    assert direct.prepare_threshold is None  # off until known to be direct
    found = pooler.require_direct(direct, "app")
    assert not found.pooled and not found.port_differs
    assert direct.prepare_threshold == pooler.PSYCOPG_PREPARE_THRESHOLD
    direct.close()

    pooled = dbmod.connect(pooled_dsn(bouncer, db))
    found = pooler.probe(pooled)
    assert found.pooled and found.port_differs
    assert (found.dialled_port, found.server_port) == (bouncer.port, server_port(server))
    with pytest.raises(pooler.PoolerDetected) as refused:
        pooler.require_direct(pooled, "app")
    assert pooled.closed
    assert isinstance(refused.value, dbmod.TargetUnavailable)
    assert PASSWORD not in str(refused.value)


def test_the_session_refuses_a_pooled_ledger_connection_too(
    workspace: Workspace, db: Database, bouncer: PgBouncer
) -> None:
    workspace.job("sequences", unit="sequences")
    pooled_workspace(workspace, pooled_dsn(bouncer, db))
    project = load_project(str(workspace.config))
    (spec,) = project.run_specs(project.jobs["sequences"])
    with Session() as session:
        with pytest.raises(pooler.PoolerDetected):
            session.ledger(spec)
        with pytest.raises(pooler.PoolerDetected):
            session.work_connection(spec)
        assert session.conn is None and session.ledger_conn is None
    assert db.execute("SELECT to_regnamespace('maintainer') IS NULL") == [(True,)]


# -- runs are refused and leave nothing -----------------------------------------------------------


def test_trigger_through_the_pooler_is_refused_and_leaves_no_lock(
    workspace: Workspace, db: Database, bouncer: PgBouncer, server: Server
) -> None:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.job("sequences", unit="sequences")
    pooled_workspace(workspace, pooled_dsn(bouncer, db))

    result = workspace.cli("trigger", "sequences")
    assert result.exit_code == 2, result.output
    assert_refused(result.output, bouncer, server_port(server))

    # Nothing left behind: a direct client takes the job's lock right after, no advisory lock is
    # held by any backend (the pooled server connection included), no prepared statement remains
    # on the pooled server connection, and no ledger was created through the pooler.
    with db.connect() as direct:
        key = lock_key(workspace, "sequences")
        assert direct.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
        direct.execute("SELECT pg_advisory_unlock(%s)", (key,))
    assert advisory_locks(db) == []
    assert prepared_on_pooled_backend(bouncer, db) == []
    assert db.execute("SELECT to_regnamespace('maintainer') IS NULL") == [(True,)]

    as_json = workspace.cli("trigger", "sequences", "--json")
    assert as_json.exit_code == 2
    (run,) = json.loads(as_json.stdout)["runs"]
    assert run["status"] == "failed" and "answers through a connection pooler" in run["error"]
    assert run["actions"] == [] and PASSWORD not in as_json.stdout


def test_ddl_jobs_and_dry_runs_are_refused_too(
    workspace: Workspace, db: Database, bouncer: PgBouncer, server: Server
) -> None:
    db.run_script("CREATE TABLE big (id int PRIMARY KEY)")
    workspace.job("autovacuum", unit="autovacuum")
    pooled_workspace(workspace, pooled_dsn(bouncer, db))
    for command in (("trigger", "autovacuum"), ("plan", "autovacuum"), ("trigger", "autovacuum", "--dry-run")):
        result = workspace.cli(*command)
        assert result.exit_code == 2, (command, result.output)
        assert_refused(result.output, bouncer, server_port(server))
    assert advisory_locks(db) == []
    assert prepared_on_pooled_backend(bouncer, db) == []


def test_a_surveyed_job_is_refused_item_by_item_without_a_survey_warning(
    workspace: Workspace, db: Database, bouncer: PgBouncer, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    db.run_script("CREATE TABLE m1 (at timestamptz NOT NULL) PARTITION BY RANGE (at);"
                  "CREATE TABLE m2 (at timestamptz NOT NULL) PARTITION BY RANGE (at)")
    workspace.job("partitions", unit="partitions", params={"interval": "1 month", "premake": 2},
                  items=[{"table": "public.m1"}, {"table": "public.m2"}])
    pooled_workspace(workspace, pooled_dsn(bouncer, db))
    result = workspace.cli("trigger", "partitions", "--json")
    assert result.exit_code == 2, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [r["status"] for r in runs] == ["failed", "failed"]
    for run in runs:
        assert_refused(run["error"], bouncer, server_port(server))
    assert "survey failed" not in caplog.text
    assert db.execute("SELECT count(*) FROM pg_inherits") == [(0,)]
    assert advisory_locks(db) == []
    assert prepared_on_pooled_backend(bouncer, db) == []


def test_the_direct_dsn_still_works(workspace: Workspace, db: Database, bouncer: PgBouncer) -> None:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.job("sequences", unit="sequences")
    result = workspace.cli("trigger", "sequences")
    assert result.exit_code == 0, result.output
    check = workspace.cli("check")
    assert check.exit_code == 0, check.output
    assert "direct connection to PostgreSQL (no pooler in between)" in check.output


# -- check ----------------------------------------------------------------------------------------


def test_check_reports_the_pooler_and_exits_2(
    workspace: Workspace, db: Database, bouncer: PgBouncer, server: Server
) -> None:
    workspace.job("sequences", unit="sequences")
    pooled_workspace(workspace, pooled_dsn(bouncer, db))
    result = workspace.cli("check")
    assert result.exit_code == 2, result.output
    assert_refused(result.output, bouncer, server_port(server))
    assert "every run on it is refused (exit code 2)" in result.output
    assert "the DSN uses port 6432" not in result.output  # detected without the port convention
    assert advisory_locks(db) == []
    assert prepared_on_pooled_backend(bouncer, db) == []


def test_check_still_warns_about_port_6432(offline_workspace: Workspace) -> None:
    offline_workspace.write_config(targets={"app": {"dsn": "postgresql://nobody@127.0.0.1:6432/none"}})
    result = offline_workspace.cli("check")
    assert "the DSN uses port 6432, usually PgBouncer" in result.output


# -- what still runs through a pooler -------------------------------------------------------------


def test_history_report_and_jobs_read_through_the_pooler(
    workspace: Workspace, db: Database, bouncer: PgBouncer
) -> None:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.job("sequences", unit="sequences")
    assert workspace.cli("trigger", "sequences").exit_code == 0  # direct: creates the ledger
    pooled_workspace(workspace, pooled_dsn(bouncer, db))

    history = workspace.cli("history", "--json")
    assert history.exit_code == 0, history.output
    runs = json.loads(history.stdout)["runs"]
    assert [(r["job"], r["status"]) for r in runs] == [("sequences", "ok")]
    for _ in range(3):  # more than psycopg's prepare threshold of statements, were it on
        report = workspace.cli("report", "--json")
        assert report.exit_code == 0, report.output
        assert json.loads(report.stdout)["targets"] == {"app": "ok"}
        jobs = workspace.cli("jobs", "--json")
        assert jobs.exit_code == 0, jobs.output
    assert PASSWORD not in history.output + report.output + jobs.output
    assert advisory_locks(db) == []
    assert prepared_on_pooled_backend(bouncer, db) == []


# -- a port mapping is not a pooler ---------------------------------------------------------------


class Forwarder:
    """A TCP port forward (as Docker's published ports or an SSH tunnel): the port differs, the
    session is PostgreSQL's own."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_a_port_mapping_is_not_refused(workspace: Workspace, db: Database, server: Server) -> None:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.job("sequences", unit="sequences")
    forward = Forwarder(server_port(server))
    try:
        info = psycopg.conninfo.conninfo_to_dict(db.dsn)
        info["port"] = str(forward.port)
        workspace.write_config(targets={"app": {"dsn": psycopg.conninfo.make_conninfo(**info)}})  # type: ignore[arg-type]
        result = workspace.cli("trigger", "sequences")
        assert result.exit_code == 0, result.output
        check = workspace.cli("check")
        assert check.exit_code == 0, check.output
        assert f"the server listens on port {server_port(server)}, not on the port dialled, {forward.port}" in (
            re.sub(r"\s+", " ", check.output)
        )
        assert "a port mapping, a proxy or a pooler sits in between" in re.sub(r"\s+", " ", check.output)
    finally:
        forward.close()


# -- pooled: true (declared) keeps working --------------------------------------------------------


def test_declared_pooled_refuses_ddl_units_with_exit_2(workspace: Workspace, db: Database) -> None:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.job("autovacuum", unit="autovacuum")  # every target: refused when it runs
    workspace.job("sequences", unit="sequences")
    workspace.write_config(targets={"app": {"dsn": db.dsn, "pooled": True}})
    refused = workspace.cli("trigger", "autovacuum")
    assert refused.exit_code == 2, refused.output
    assert "is declared pooled" in refused.output
    assert workspace.cli("trigger", "sequences").exit_code == 0  # direct after all: not a DDL unit

    workspace.job("autovacuum", unit="autovacuum", targets=["app"])  # named: refused at load time
    loaded = workspace.cli("jobs")
    assert loaded.exit_code == 2 and "is declared pooled" in loaded.output


def test_exit_code_2_wins_for_a_refused_run() -> None:
    refused = RunResult("j", "u", "app", None, status="failed", refused=True)
    assert exit_code([RunResult("j", "u", "b", None, status="failed"), refused]) == 2
    assert exit_code([RunResult("j", "u", "b", None, status="failed")]) == 1


# -- the daemon -----------------------------------------------------------------------------------


def test_the_daemon_is_not_ready_and_scheduled_runs_fail_clearly(
    workspace: Workspace, db: Database, bouncer: PgBouncer, tmp_path: Path
) -> None:
    workspace.job("headroom", unit="sequences", schedule="@daily")
    config = yaml.safe_load(workspace.config.read_text())
    config.update(targets={"app": {"dsn": pooled_dsn(bouncer, db)}}, http={"listen": "127.0.0.1:0"},
                  scheduler={"catch_up": False})
    workspace.config.write_text(yaml.safe_dump(config))
    daemon = Daemon(load_project(str(workspace.config)), str(workspace.config))
    daemon.start()
    try:
        ready, body = daemon.readiness()
        assert not ready
        assert body["targets"]["app"].startswith("refused: target 'app' answers through a connection pooler")
        assert PASSWORD not in json.dumps(body)
        daemon._scheduled("headroom", "app")  # one tick: a failed run, no exception, no retry loop
        metrics = daemon.metrics_payload().decode()
        failed = [line for line in metrics.splitlines() if line.startswith("maintainer_job_runs_total{")
                  and 'job="headroom"' in line and 'status="failed"' in line]
        assert failed and failed[0].endswith(" 1.0"), metrics
    finally:
        daemon.shutdown()
    assert advisory_locks(db) == []
    assert prepared_on_pooled_backend(bouncer, db) == []

"""`maintainer run` as a real process: schedules, replicas, catch-up, windows, signals and reloads."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from maintainer.cron import cron_trigger, cron_weekdays
from maintainer.scheduler import last_tick
from tests.conftest import Database, Workspace

ROOT = Path(__file__).resolve().parent.parent


class DaemonProcess:
    """`python -m maintainer.cli run` with JSON logs captured to a file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "maintainer.cli", "run", "--config", str(config)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log, env={**os.environ, **(env or {})},
        )
        self.port = int(self.wait_for_log(lambda r: "port" in r, timeout=30)["port"])

    def records(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for_log(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if predicate(record):
                    return record
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log_path.read_text()}")
            time.sleep(0.1)
        raise AssertionError(f"no such log line within {timeout}s: {self.log_path.read_text()}")

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait; the issue's bound is 10 s."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Any]:
    started: list[DaemonProcess] = []

    def start(ws: Workspace, name: str = "daemon", env: dict[str, str] | None = None) -> DaemonProcess:
        process = DaemonProcess(ws.config, tmp_path / f"{name}.log", env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def daemon_config(ws: Workspace, **overrides: Any) -> None:
    ws.write_config(**{"log_format": "json", "http": {"listen": "127.0.0.1:0"}, **overrides})


def sample_value(metrics: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text format (labels must all match)."""
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def advisory_locks(db: Database) -> int:
    return int(db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                          "(SELECT oid FROM pg_database WHERE datname = current_database())")[0][0])


# -- pure scheduling logic -------------------------------------------------------------------------


def test_cron_weekdays_count_from_sunday_like_cron() -> None:
    monday = dt.datetime(2025, 1, 6, tzinfo=dt.UTC)
    assert cron_trigger("0 0 * * 0").get_next_fire_time(None, monday).strftime("%a") == "Sun"
    assert cron_trigger("0 3 * * 1-5").get_next_fire_time(None, monday.replace(day=4)).strftime("%a") == "Mon"
    assert cron_weekdays("5-7") == "sun,fri,sat"
    assert cron_weekdays("*/2") == "sun,tue,thu,sat"
    assert cron_weekdays("mon-fri") == "mon,tue,wed,thu,fri"
    for bad in ("8", "5-2", "*/0", "funday"):
        with pytest.raises(ValueError):
            cron_weekdays(bad)


def test_last_tick_looks_back_to_the_newest_fire_time() -> None:
    moment = dt.datetime(2025, 3, 4, 10, 17, 30, tzinfo=dt.UTC)
    assert last_tick("* * * * *", moment) == moment.replace(second=0)
    assert last_tick("*/30 * * * *", moment) == moment.replace(minute=0, second=0)
    assert last_tick("@daily", moment) == moment.replace(hour=0, minute=0, second=0)
    assert last_tick("0 0 1 * *", moment) == dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


# -- the daemon as a process -----------------------------------------------------------------------


def test_scheduled_tick_runs_once_across_two_replicas_and_both_stop_on_sigterm(
    workspace: Workspace, db: Database, daemons: Any
) -> None:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.job("headroom", unit="sequences", schedule="* * * * *")
    daemon_config(workspace)
    first, second = daemons(workspace, "a"), daemons(workspace, "b")
    # Wait for a tick both replicas have seen: one run ok, one skipped (the next minute boundary).
    # (A replica that started a moment before the other may have a tick of its own first.)
    deadline = time.monotonic() + 130
    ticks: dict[Any, list[str]] = {}
    while time.monotonic() < deadline:
        present = db.execute("SELECT to_regclass('maintainer.run') IS NOT NULL")[0][0]
        rows = db.execute("SELECT status, date_trunc('minute', started_at) FROM maintainer.run"
                          " WHERE trigger = 'schedule' AND status <> 'running' ORDER BY id") if present else []
        ticks = {}
        for status, minute in rows:
            ticks.setdefault(minute, []).append(status)
        if any(len(statuses) >= 2 for statuses in ticks.values()):
            break
        time.sleep(0.5)
    shared = [sorted(statuses) for statuses in ticks.values() if len(statuses) >= 2]
    assert shared == [["ok", "skipped"]], ticks
    assert all(statuses.count("ok") == 1 for statuses in ticks.values()), ticks

    def total(name: str, **labels: str) -> float:
        return sum(sample_value(t, name, **labels) or 0 for t in texts)

    # The ledger row is final a moment before the run's outcome reaches the metrics.
    for _ in range(50):
        texts = [d.get("/metrics")[1] for d in (first, second)]
        if total("maintainer_job_runs_total", job="headroom", status="ok") == len(ticks) and \
                total("maintainer_job_runs_total", job="headroom", status="skipped") == 1:
            break
        time.sleep(0.1)

    assert total("maintainer_job_runs_total", job="headroom", target="app", status="ok") == len(ticks)
    assert total("maintainer_job_runs_total", job="headroom", target="app", status="skipped") == 1
    assert total("maintainer_job_duration_seconds_count", job="headroom", target="app") == len(ticks)
    ok_side = next(t for t in texts if sample_value(t, "maintainer_job_runs_total", job="headroom", status="ok"))
    assert sample_value(ok_side, "maintainer_job_last_success_timestamp_seconds", job="headroom", target="app")
    assert sample_value(ok_side, "maintainer_sequence_used_ratio", target="app", sequence="public.accounts_id_seq",
                        column="public.accounts.id") == 0.0
    for daemon in (first, second):
        status, body = daemon.get("/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
    for daemon in (first, second):
        assert daemon.stop(timeout=10) == 0
    assert advisory_locks(db) == 0
    for daemon in (first, second):
        runs = [r for r in daemon.records() if r.get("job") == "headroom" and "status" in r]
        assert runs and {"ts", "level", "msg", "target", "status", "duration"} <= set(runs[0])
        assert runs[0]["trigger"] == "schedule"


def test_start_catches_up_overdue_jobs_restores_gauges_and_skips_outside_window(
    workspace: Workspace, db: Database, daemons: Any
) -> None:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    hour = dt.datetime.now(dt.UTC).hour
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"  # a window that is not now
    workspace.job("overdue", unit="sequences", schedule="@hourly")
    workspace.job("nightly", unit="sequences", schedule="@hourly", window=closed)
    workspace.job("fresh", unit="sequences", schedule="@hourly")
    daemon_config(workspace)
    for job in ("overdue", "nightly"):
        assert workspace.cli("trigger", job).exit_code == 0
    db.execute("UPDATE maintainer.run SET started_at = started_at - interval '3 hours',"
               " finished_at = finished_at - interval '3 hours'")
    daemon = daemons(workspace)
    daemon.wait_for_log(lambda r: r.get("job") == "overdue" and r.get("status") == "ok")
    daemon.wait_for_log(lambda r: r.get("job") == "nightly" and r.get("status") == "skipped"
                        and "window" in r.get("reason", ""))
    _, metrics = daemon.get("/metrics")
    assert sample_value(metrics, "maintainer_job_runs_total", job="nightly", status="skipped") == 1
    # nightly did not run in this process: its gauges come from the ledger.
    assert sample_value(metrics, "maintainer_findings", job="nightly", target="app", level="ok") == 1
    # so does the time of its last success (else the time since it would start again at each restart)
    [(finished,)] = db.execute(
        "SELECT extract(epoch FROM finished_at)::float8 FROM maintainer.run WHERE job = 'nightly'"
    )
    for gauge in ("maintainer_job_last_success_timestamp_seconds", "maintainer_job_last_run_timestamp_seconds"):
        assert sample_value(metrics, gauge, job="nightly", target="app") == pytest.approx(finished, abs=1e-3)
    assert daemon.stop() == 0
    runs = db.execute("SELECT job, trigger, status FROM maintainer.run ORDER BY id")
    assert runs == [("overdue", "manual", "ok"), ("nightly", "manual", "ok"), ("overdue", "schedule", "ok")]
    assert not any(r.get("job") == "fresh" and r.get("status") for r in daemon.records())


def test_sighup_reloads_and_refuses_an_invalid_config(workspace: Workspace, db: Database, daemons: Any) -> None:
    workspace.job("headroom", unit="sequences", schedule="@daily")
    daemon_config(workspace)
    daemon = daemons(workspace)
    text = workspace.config.read_text()
    workspace.config.write_text(text + "defaults_typo: 1\n")
    daemon.signal(signal.SIGHUP)
    refused = daemon.wait_for_log(lambda r: "reload refused" in r["msg"])
    assert "defaults_typo: unknown key" in refused["msg"]
    _, metrics = daemon.get("/metrics")
    assert "maintainer_config_valid 0.0" in metrics
    status, body = daemon.get("/readyz")
    assert status == 200 and "reload refused" in json.loads(body)["config"]
    workspace.config.write_text(text)
    workspace.job("second", unit="sequences", schedule="@hourly")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(lambda r: r["msg"].startswith("configuration reloaded") and r.get("schedules") == 2)
    _, metrics = daemon.get("/metrics")
    assert "maintainer_config_valid 1.0" in metrics
    assert daemon.stop() == 0


SLEEPY_UNIT = """---
description: one long statement
transaction: none
---
{% block apply %}
SELECT pg_sleep(60);
{% endblock %}
"""


def test_sigterm_cancels_a_long_statement_within_the_grace_and_releases_the_lock(
    workspace: Workspace, db: Database, daemons: Any, tmp_path: Path
) -> None:
    workspace.unit("sleepy", SLEEPY_UNIT)
    workspace.job("sleepy", unit="sleepy")
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    daemon_config(workspace, http={"listen": "127.0.0.1:0", "trigger_token_file": str(token)},
                  scheduler={"shutdown_grace": "3s"})
    daemon = daemons(workspace)
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.port}/jobs/sleepy/trigger", method="POST",
                                     headers={"Authorization": "Bearer s3cret-token"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status == 202
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not db.execute(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-maintainer sleepy' AND query LIKE '%pg_sleep%'"
        " AND state = 'active'"
    ):
        time.sleep(0.1)
    assert advisory_locks(db) == 1
    assert daemon.stop(timeout=10) == 0
    assert db.execute("SELECT status FROM maintainer.run WHERE job = 'sleepy'") == [("failed",)]
    error = db.execute("SELECT error, sqlstate FROM maintainer.run WHERE job = 'sleepy'")[0]
    assert error[1] == "57014" or "cancel" in error[0], error
    assert not db.execute(
        "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()"
    )
    assert advisory_locks(db) == 0
    assert any("cancelling 1 running statement" in r["msg"] for r in daemon.records())


def test_run_refuses_an_invalid_config_with_exit_2(offline_workspace: Workspace) -> None:
    offline_workspace.config.write_text(yaml.safe_dump({"targets": {}, "schedulr": {}}))
    config = str(offline_workspace.config)
    result = subprocess.run([sys.executable, "-m", "maintainer.cli", "run", "--config", config],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "schedulr: unknown key" in result.stderr


def test_runner_hooks_see_the_lock_and_the_connection(workspace: Workspace, db: Database) -> None:
    """`on_locked` runs once the advisory lock is held and may skip the run; `on_connect` sees the session."""
    from maintainer.project import load_project
    from maintainer.runner import RunOptions, run

    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.job("headroom", unit="sequences")
    project = load_project(str(workspace.config))
    spec = project.run_specs(project.jobs["headroom"])[0]
    seen: list[Any] = []

    def on_locked(ledger: Any) -> str | None:
        held = ledger.conn.execute("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'").fetchone()
        seen.append(held["n"])
        return "not this time" if len(seen) == 1 else None

    connections: list[Any] = []
    skipped = run(spec, RunOptions(on_locked=on_locked, on_connect=connections.append))
    assert skipped.status == "skipped" and skipped.reason == "not this time"
    assert run(spec, RunOptions(on_locked=on_locked, on_connect=connections.append)).status == "ok"
    assert seen == [1, 1] and len(connections) == 2 and all(c.closed for c in connections)
    assert db.execute("SELECT status, error FROM maintainer.run ORDER BY id") == [
        ("skipped", "not this time"), ("ok", None)]
    assert advisory_locks(db) == 0


def test_log_lines_are_json_or_text_and_never_carry_passwords(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from maintainer import logs
    from maintainer.results import RunResult

    result = RunResult("nightly", "partitions", "app", {"table": "public.events"}, status="failed",
                       error="could not connect to postgresql://app:hunter2@db/app", sqlstate="08006")
    result.finished_at = result.started_at + dt.timedelta(seconds=1.5)
    root = logging.getLogger()
    try:
        logs.setup("json")
        logs.log_run(result)
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["job"] == "nightly" and line["target"] == "app" and line["item"] == "public.events"
        assert line["status"] == "failed" and line["duration"] == 1.5 and line["sqlstate"] == "08006"
        assert line["level"] == "error" and "hunter2" not in json.dumps(line)
        logs.setup("text")
        logs.log_run(result)
        text = capsys.readouterr().err.strip().splitlines()[-1]
        assert "nightly on app [public.events]: failed" in text and "status=failed" in text
        assert "hunter2" not in text
    finally:
        for handler in [h for h in root.handlers if getattr(h, "_maintainer", False)]:
            root.removeHandler(handler)


def test_unit_gauges_come_from_front_matter_and_runs_replace_them() -> None:
    from maintainer.metrics import FindingGauges
    from maintainer.units import FrontMatter, Unit

    unit = Unit("parts", None, FrontMatter(  # type: ignore[arg-type]
        metrics={"maintainer_partitions_ahead": {"value": "ahead", "labels": ["table"], "help": "ahead"}},
        alerts={"level": "level", "key": ["table"]},
    ), None, True, "")
    clash = Unit("other", None, FrontMatter(  # type: ignore[arg-type]
        metrics={"maintainer_partitions_ahead": {"value": "ahead", "labels": ["relation"]}}), None, True, "")
    gauges = FindingGauges()
    gauges.update(unit, "parts", "app", "public.a", [{"table": "public.a", "ahead": 4, "level": "ok"}])
    gauges.update(unit, "parts", "app", "public.b", [{"table": "public.b", "ahead": None, "level": "unknown"}])
    gauges.update(clash, "other", "app", None, [{"relation": "x", "ahead": 1}])
    gauges.seed(unit, "parts", "app", "public.a", [{"table": "public.a", "ahead": 99}])  # older: ignored

    def samples() -> dict[str, set[tuple[tuple[tuple[str, str], ...], float]]]:
        return {f.name: {(tuple(sorted(s.labels.items())), s.value) for s in f.samples} for f in gauges.collect()}

    found = samples()
    # NULL exports nothing (unknown is not 0); the clashing label set is dropped, not mixed in.
    assert found["maintainer_partitions_ahead"] == {((("table", "public.a"), ("target", "app")), 4.0)}
    assert (((("job", "parts"), ("level", "unknown"), ("target", "app"))), 1.0) in found["maintainer_findings"]
    gauges.update(unit, "parts", "app", "public.a", [])  # the table is gone: its series goes too
    assert "maintainer_partitions_ahead" not in samples()
    gauges.retain([])
    assert samples() == {}

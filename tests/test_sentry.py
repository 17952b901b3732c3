"""Sentry as it arrives: the real SDK posts envelopes to a local endpoint, and we read them.

What must arrive: run failures with tags and fingerprints, Crons check-ins from the lock holder,
finding alerts de-duplicated per object. What must not: DSN passwords, PostgreSQL DETAIL (row
values), anything from sensitive units beyond tags and SQLSTATE, local variables.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
import sentry_sdk

from maintainer import alerts
from maintainer.alerts import FindingAlerts, monitor_config, scrub_event
from maintainer.config import Job, Settings
from maintainer.db import advisory_key
from maintainer.project import Project, load_project
from maintainer.runner import RunOptions
from maintainer.scheduler import Daemon
from maintainer.units import FrontMatter, Unit
from tests.conftest import Database, Workspace


@dataclass
class Envelopes:
    """A stand-in for Sentry's ingestion endpoint on 127.0.0.1."""

    port: int = 0
    bodies: list[bytes] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def items(self) -> list[dict[str, Any]]:
        """Every event/check-in payload received, with its item type under `_type`."""
        found = []
        for body in list(self.bodies):
            lines = body.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if not header.strip():
                    continue
                kind = json.loads(header).get("type")
                if kind in ("event", "check_in"):
                    found.append({"_type": kind, **json.loads(payload)})
        return found

    def events(self) -> list[dict[str, Any]]:
        return [i for i in self.items() if i["_type"] == "event"]

    def checkins(self) -> list[dict[str, Any]]:
        return [i for i in self.items() if i["_type"] == "check_in"]

    def raw(self) -> bytes:
        return b"\n".join(self.bodies)


@pytest.fixture
def envelopes() -> Iterator[Envelopes]:
    received = Envelopes()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path.startswith("/api/1/envelope/"):
                received.bodies.append(body)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield received
    sentry_sdk.get_client().close(timeout=2)
    sentry_sdk.init()  # no DSN: the SDK is off for later tests
    server.shutdown()
    server.server_close()


def flush() -> None:
    sentry_sdk.flush(timeout=5)


def sentry_project(ws: Workspace, envelopes: Envelopes) -> Project:
    ws.write_config(sentry={"dsn": envelopes.dsn, "environment": "test"}, http={"listen": "127.0.0.1:0"},
                    scheduler={"catch_up": False})
    return load_project(str(ws.config))


def run_job(daemon: Daemon, job: str) -> list[Any]:
    project = daemon.project
    return [daemon._run(spec, RunOptions(trigger="schedule")) for spec in project.run_specs(project.jobs[job])]


# -- failures -----------------------------------------------------------------------------------

DUPLICATE_UNIT = """---
description: insert a duplicate email
---
{% block apply %}
INSERT INTO people (email) VALUES ('alice@example.com');
{% endblock %}
"""

SENSITIVE_UNIT = """---
description: erase someone, and fail
sensitive: true
---
{% block apply %}
DO $$ BEGIN RAISE EXCEPTION 'cannot erase bob@example.com (postgresql://app:hunter2@db/app)'; END $$;
{% endblock %}
"""


def test_failed_runs_arrive_tagged_fingerprinted_and_scrubbed(
    workspace: Workspace, db: Database, envelopes: Envelopes
) -> None:
    db.run_script("CREATE TABLE people (email text UNIQUE); INSERT INTO people VALUES ('alice@example.com');")
    workspace.unit("duplicate", DUPLICATE_UNIT)
    workspace.unit("erase", SENSITIVE_UNIT)
    workspace.job("dup", unit="duplicate")
    workspace.job("erase", unit="erase")
    daemon = Daemon(sentry_project(workspace, envelopes))
    try:
        assert [r.status for r in run_job(daemon, "dup")] == ["failed"]
        assert [r.status for r in run_job(daemon, "erase")] == ["failed"]
        # An unexpected exception carrying psycopg's DETAIL and a DSN, as a bug would raise it.
        try:
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO people SELECT email FROM people")
        except psycopg.Error as exc:
            secret_dsn = "postgresql://app:" + "hunter" + "2@db:5432/app"  # not a literal: frames carry source lines
            assert "DETAIL" in str(exc)
            try:
                raise RuntimeError(f"while using {secret_dsn}") from exc
            except RuntimeError:
                sentry_sdk.capture_exception()
        flush()
    finally:
        daemon.http.stop()
    events = envelopes.events()
    dup = next(e for e in events if e["tags"].get("job") == "dup")
    assert dup["tags"] == {**dup["tags"], "job": "dup", "unit": "duplicate", "target": "app", "sqlstate": "23505"}
    assert dup["fingerprint"] == ["dup", "app", "-", "23505"]
    assert dup["level"] == "error" and "duplicate key value violates unique constraint" in dup["message"]
    erase = next(e for e in events if e["tags"].get("job") == "erase")
    assert erase["tags"]["sensitive"] == "true" and erase["tags"]["sqlstate"] == "P0001"
    assert erase["message"] == "erase on app: run failed (SQLSTATE P0001)"
    assert set(erase) <= {"event_id", "timestamp", "level", "platform", "fingerprint", "environment", "release",
                          "server_name", "sdk", "type", "tags", "message", "_type"}
    crash = next(e for e in events if "exception" in e)
    values = json.dumps(crash["exception"])
    assert "UniqueViolation" in values and "RuntimeError" in values
    assert all("vars" not in frame for value in crash["exception"]["values"]
               for frame in (value.get("stacktrace") or {}).get("frames", []))
    raw = envelopes.raw()
    for secret in (b"alice@example.com", b"bob@example.com", b"hunter2", b"DETAIL", b"Key (email)"):
        assert secret not in raw, raw[max(0, raw.find(secret) - 400): raw.find(secret) + 100]


# -- crons ----------------------------------------------------------------------------------------


def test_crons_check_in_from_the_lock_holder_only(workspace: Workspace, db: Database, envelopes: Envelopes) -> None:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    workspace.job("headroom", unit="sequences", schedule="*/15 * * * *")
    daemon = Daemon(sentry_project(workspace, envelopes))
    try:
        daemon._scheduled("headroom", "app")
        flush()
        checkins = envelopes.checkins()
        assert [c["status"] for c in checkins] == ["in_progress", "ok"]
        assert checkins[0]["check_in_id"] == checkins[1]["check_in_id"]
        assert checkins[0]["monitor_slug"] == "headroom-app"
        assert checkins[0]["monitor_config"]["schedule"] == {"type": "crontab", "value": "*/15 * * * *"}
        assert checkins[0]["monitor_config"]["timezone"] == "UTC"
        assert checkins[1]["duration"] >= 0
        # Another replica holds the lock: this one records `skipped` and checks in nothing.
        with psycopg.connect(db.dsn, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (advisory_key("headroom", "app", ""),))
            daemon._scheduled("headroom", "app")
        flush()
        assert len(envelopes.checkins()) == 2
        statuses = db.execute("SELECT status FROM maintainer.run ORDER BY id")
        assert statuses == [("ok",), ("skipped",)]
    finally:
        daemon.http.stop()


def test_a_failed_scheduled_run_checks_in_error(workspace: Workspace, db: Database, envelopes: Envelopes) -> None:
    workspace.unit("broken", "---\ndescription: x\n---\n{% block apply %}SELECT 1/0;{% endblock %}\n")
    workspace.job("broken", unit="broken", schedule="@hourly")
    daemon = Daemon(sentry_project(workspace, envelopes))
    try:
        daemon._scheduled("broken", "app")
        flush()
    finally:
        daemon.http.stop()
    assert [c["status"] for c in envelopes.checkins()] == ["in_progress", "error"]
    assert envelopes.events()[0]["tags"]["sqlstate"] == "22012"


def test_monitor_config_follows_schedule_and_window() -> None:
    settings = Settings()
    hourly = Job(name="a", unit="u", schedule="@hourly")
    config = monitor_config(hourly, settings)
    assert config is not None and config["schedule"]["value"] == "0 * * * *"
    assert config["checkin_margin"] == 5 and config["max_runtime"] == 60
    windowed = Job(name="a", unit="u", schedule="*/30 * * * *", window="22:00-02:00")
    config = monitor_config(windowed, settings)
    assert config is not None and config["schedule"]["value"] == "*/30 0,1,22,23 * * *"
    assert monitor_config(Job(name="a", unit="u", schedule="0 * * * *", window="01:30-02:00"), settings) is None
    assert monitor_config(Job(name="a", unit="u"), settings) is None


# -- finding alerts -------------------------------------------------------------------------------


def test_finding_alerts_are_deduplicated_per_object(workspace: Workspace, db: Database, envelopes: Envelopes) -> None:
    db.run_script(
        "CREATE TABLE accounts (id serial PRIMARY KEY); CREATE TABLE quiet (id serial PRIMARY KEY);"
        "SELECT setval('accounts_id_seq', 1500000000);"  # 70% of int4: warn
    )
    workspace.job("headroom", unit="sequences")
    daemon = Daemon(sentry_project(workspace, envelopes))
    try:
        run_job(daemon, "headroom")
        run_job(daemon, "headroom")  # the same level again: nothing new
        flush()
        assert len(envelopes.events()) == 1
        db.execute("SELECT setval('accounts_id_seq', 2000000000)")  # 93%: critical
        run_job(daemon, "headroom")
        flush()
    finally:
        daemon.http.stop()
    first, second = envelopes.events()
    assert first["level"] == "warning" and second["level"] == "error"
    # no forecast yet (one observation): the message is the ratio sentence alone
    assert first["message"] == "app: public.accounts.id uses 70% of its range (sequence limit)."
    assert first["fingerprint"] == second["fingerprint"] == ["finding", "sequences", "app", "public.accounts_id_seq",
                                                             "public.accounts.id"]
    assert first["tags"]["kind"] == "finding" and first["tags"]["job"] == "headroom"
    assert first["contexts"]["finding"]["used_ratio"] == pytest.approx(0.698, abs=0.001)


def _unit(**meta: Any) -> Unit:
    return Unit("u", None, FrontMatter(**meta), None, True, "")  # type: ignore[arg-type]


def test_finding_alert_state_repeats_after_a_day_and_rearms_after_recovery() -> None:
    now = [1_000_000.0]
    state = FindingAlerts(clock=lambda: now[0])
    unit = _unit(alerts={"level": "level", "key": ["t"], "message": "{t} is {level}"})
    warn = [{"t": "a", "level": "warn"}, {"t": "b", "level": "ok"}]
    assert [a.message for a in state.due(unit, "j", "app", warn)] == ["a is warn"]
    assert state.due(unit, "j", "app", warn) == []
    assert state.due(unit, "j", "other-target", warn) != []  # another target is another object
    now[0] += 86400
    assert len(state.due(unit, "j", "app", warn)) == 1
    assert state.due(unit, "j", "app", [{"t": "a", "level": "ok"}]) == []
    assert len(state.due(unit, "j", "app", warn)) == 1  # recovered, then warn again: alert again
    assert len(state.due(unit, "j", "app", [{"t": "a", "level": "critical"}])) == 1
    assert state.due(unit, "j", "app", warn) == []  # falling from critical to warn is no news


def test_scrubber_strips_details_and_passwords() -> None:
    event = {
        "message": 'boom\nDETAIL:  Key (email)=(a@b.c) already exists.\nCONTEXT: x',
        "exception": {"values": [{"value": "password=hunter2 host=db",
                                  "stacktrace": {"frames": [{"vars": {"x": 1}}]}}]},
        "extra": {"dsn": "postgresql://u:hunter2@h/d"},
        "user": {"email": "a@b.c"},
    }
    scrubbed = scrub_event(event, {})
    assert scrubbed is not None
    text = json.dumps(scrubbed)
    assert "hunter2" not in text and "a@b.c" not in text and "DETAIL" not in text and "vars" not in text
    assert scrubbed["message"] == "boom"
    assert scrub_event({"type": "check_in", "monitor_slug": "x"}, {}) == {"type": "check_in", "monitor_slug": "x"}


def test_unit_messages_cannot_reach_attributes() -> None:
    finding = {"t": "a", "level": "warn"}
    assert alerts.format_message("{t.__class__}", finding, "fallback") == "fallback"
    assert alerts.format_message("{missing}", finding, "fallback") == "fallback"
    assert alerts.format_message("{t} at {level}", finding, "fallback") == "a at warn"
    assert dt.timedelta(days=1) == alerts.REPEAT_AFTER


def test_an_invalid_sentry_dsn_is_a_config_error(offline_workspace: Workspace) -> None:
    from maintainer.config import ConfigError

    offline_workspace.write_config(sentry={"dsn": "not-a-dsn"})
    with pytest.raises(ConfigError, match=r"sentry\.dsn: not a valid Sentry DSN"):
        alerts.init(load_project(str(offline_workspace.config)).settings)

"""The ledger: run history kept inside each target (`<state_schema>.run`, `.action`, `.finding`).

History lives next to the data it describes, so it survives restarts and is shared by every
replica of the daemon. The DDL is versioned; each version is applied once under a transaction
advisory lock so replicas starting together do not race. A run is inserted as `running` when it
starts (so an interrupted run leaves a trace) and completed when it ends; the next holder of the
same lock marks such leftovers as interrupted instead of leaving them "running" forever.

Nothing stored here is secret: rendered SQL carries `$n` placeholders, never bound values, and
errors are primary messages only (no DETAIL, which can quote row values).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from maintainer.db import advisory_key, quote_ident, relation_exists

if TYPE_CHECKING:
    from maintainer.config import Settings

LEDGER_VERSION = 2

# What a run keeps of its observations (`run.observed`) when it read an earlier run's (`%(since)s`,
# within `%(window)s`): each key's value as the runner hands it over (`%(observed)s`, `{key: value}`),
# or `[value, since, since_value]` where the key's current stretch began (the run, as an epoch,
# and the value there) when that was within the window: the key is new since that earlier run or its
# value went backwards (a reset: setval, RESTART, a restore) now, or the earlier run already carried
# a stretch that began within the window. A plain value says the stretch began before the oldest
# run of the window (or at the first run: no earlier one), so a later forecast measures from that
# oldest run (lib/forecast.sql.j2 `observed`). Computed here, in the statement that keeps it, so
# the unit's query reads only the two runs it needs and the runner never loads a document.
OBSERVED_SINCE = """
    SELECT CASE WHEN i.now IS NULL OR i.since IS NULL THEN i.now
                ELSE i.now || coalesce((
                    SELECT jsonb_object_agg(
                               n.key,
                               CASE WHEN p.value IS NULL OR n.value::numeric < p.v
                                    THEN jsonb_build_array(n.value, i.at, n.value)
                                    ELSE jsonb_build_array(n.value, p.value -> 1, p.value -> 2) END)
                      FROM jsonb_each(i.now) n
                      LEFT JOIN (SELECT e.key, e.value,
                                        CASE WHEN jsonb_typeof(e.value) = 'array' THEN (e.value ->> 0)::numeric
                                             ELSE e.value::numeric END AS v
                                   FROM {s}.run r, jsonb_each(r.observed) e
                                  WHERE r.id = i.since) p ON p.key = n.key
                     WHERE p.value IS NULL
                        OR n.value::numeric < p.v
                        OR (jsonb_typeof(p.value) = 'array' AND (p.value ->> 1)::numeric >= i.at - i.horizon)), '{{}}')
           END
      FROM (SELECT %(observed)s::jsonb AS now, %(since)s::bigint AS since,
                   extract(epoch FROM %(window)s::interval) AS horizon,
                   (SELECT extract(epoch FROM r.started_at) FROM {s}.run r WHERE r.id = %(run_id)s) AS at) i
"""

INTERRUPTED = "interrupted: the process ended before the run finished"

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS {schema}.schema_version (
        version    integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS {schema}.run (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job          text NOT NULL,
        unit         text NOT NULL,
        target       text NOT NULL,
        item         text,
        lock_key     bigint NOT NULL,
        trigger      text NOT NULL,
        triggered_by text,
        host         text,
        status       text NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'skipped', 'interrupted')),
        started_at   timestamptz NOT NULL DEFAULT now(),
        finished_at  timestamptz,
        attempts     integer NOT NULL DEFAULT 0,
        sqlstate     text,
        error        text,
        params       jsonb,
        summary      jsonb
    );
    CREATE INDEX IF NOT EXISTS run_job_started ON {schema}.run (job, target, started_at DESC);
    CREATE INDEX IF NOT EXISTS run_started ON {schema}.run (started_at);
    CREATE INDEX IF NOT EXISTS run_running ON {schema}.run (lock_key) WHERE status = 'running';
    CREATE TABLE IF NOT EXISTS {schema}.action (
        run_id   bigint NOT NULL REFERENCES {schema}.run (id) ON DELETE CASCADE,
        seq      integer NOT NULL,
        sql      text NOT NULL,
        status   text NOT NULL,
        rows     bigint,
        seconds  double precision,
        attempts integer NOT NULL DEFAULT 1,
        sqlstate text,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE IF NOT EXISTS {schema}.finding (
        run_id bigint NOT NULL REFERENCES {schema}.run (id) ON DELETE CASCADE,
        seq    integer NOT NULL,
        level  text,
        data   jsonb NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    """,
    # What a forecasting unit's run observed, `{key: value}` (see units.ForecastSpec): later runs
    # read these few numbers instead of every finding of the runs they forecast from.
    2: """
    ALTER TABLE {schema}.run ADD COLUMN IF NOT EXISTS observed jsonb
    """,
}


@dataclass
class IdleRun:
    """One record of `Ledger.record_idle_runs`."""

    job: str
    unit: str
    target: str
    item: str | None
    lock_key: int
    trigger: str
    params: dict[str, Any]
    status: str  # ok | skipped
    reason: str | None
    finding: dict[str, Any] | None
    level_field: str | None
    observed: dict[str, Any] | None = None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def to_jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=lambda v: json.dumps(v, default=_json_default))


def who_triggered(trigger: str) -> str | None:
    """For manual runs, the operator as the environment knows them (never a credential)."""
    if trigger == "schedule":
        return None
    for variable in ("MAINTAINER_USER", "SUDO_USER", "USER", "LOGNAME"):
        if os.environ.get(variable):
            return os.environ[variable]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


class Ledger:
    """Writes and reads run history in one target; uses its own autocommit connection."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self._s = sql.Identifier(schema)

    # -- schema ---------------------------------------------------------------------------------

    def current_version(self) -> int:
        if not relation_exists(self.conn, self.schema, "schema_version"):
            return 0
        version = self.conn.execute(
            sql.SQL("SELECT coalesce(max(version), 0) AS v FROM {}.schema_version").format(self._s)
        ).fetchone()
        return int(version["v"]) if version else 0

    def ensure(self) -> None:
        """Create or upgrade the ledger tables; cheap when they are current."""
        if self.current_version() >= LEDGER_VERSION:
            return
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("ledger", self.schema),))
            self.conn.execute("SET LOCAL lock_timeout = '10s'")
            self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self._s))
            version = self.current_version()
            for number in sorted(_MIGRATIONS):
                if number <= version:
                    continue
                for statement in _MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self.conn.execute(sql.SQL(statement.replace("{schema}", "{s}")).format(s=self._s))
                self.conn.execute(
                    sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(self._s), (number,)
                )

    # -- runs -----------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        job: str,
        unit: str,
        target: str,
        item: str | None,
        lock_key: int,
        trigger: str,
        params: dict[str, Any],
        status: str = "running",
        reason: str | None = None,
    ) -> int:
        """Record a run as it starts (`running`), or a run that ends here (`skipped`, with `reason`).

        A run that starts holds its lock, so earlier runs of the same lock still `running` died with
        their process: the same statement marks them `interrupted`."""
        row = self.conn.execute(
            sql.SQL(
                "WITH leftover AS ("
                " UPDATE {s}.run SET status = 'interrupted', finished_at = now(), error = %s"
                " WHERE lock_key = %s AND status = 'running' AND %s = 'running')"
                " INSERT INTO {s}.run (job, unit, target, item, lock_key, trigger, triggered_by, host, status, params,"
                " error, finished_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " CASE WHEN %s = 'running' THEN NULL ELSE now() END) RETURNING id"
            ).format(s=self._s),
            (
                INTERRUPTED,
                lock_key,
                status,
                job,
                unit,
                target,
                item,
                lock_key,
                trigger,
                who_triggered(trigger),
                socket.gethostname(),
                status,
                to_jsonb(params),
                reason,
                status,
            ),
        ).fetchone()
        assert row is not None
        return int(row["id"])

    def record_idle_runs(self, runs: Sequence[IdleRun]) -> list[int]:
        """Finished runs that found nothing to do (vouched for by a unit's `survey`), or were skipped,
        with their one finding, in one statement; an `ok` run also marks earlier `running` records of
        its lock as interrupted, as `start_run` does. Returns the run ids in order."""
        if not runs:
            return []
        # One JSON document for all of them (dumped by the json module's C code): psycopg's array
        # dumper escapes every element in Python, which cost ~50 ms per 200 items. jsonb_to_record
        # reads a JSON null as SQL NULL.
        operators = {trigger: who_triggered(trigger) for trigger in {r.trigger for r in runs}}  # asked once
        document = to_jsonb([
            {
                "job": r.job, "unit": r.unit, "target": r.target, "item": r.item, "lock_key": r.lock_key,
                "trigger": r.trigger, "triggered_by": operators[r.trigger], "status": r.status,
                "params": r.params, "reason": r.reason,
                "level": r.finding.get(r.level_field) if r.finding and r.level_field else None,
                "finding": r.finding, "observed": r.observed,
            }
            for r in runs
        ])
        rows = self.conn.execute(
            sql.SQL(
                "WITH input AS MATERIALIZED ("
                " SELECT u.*, e.n, nextval(pg_get_serial_sequence({run_table}, 'id')) AS id"
                " FROM jsonb_array_elements(%s) WITH ORDINALITY AS e(doc, n),"
                " jsonb_to_record(e.doc) AS u(job text, unit text, target text, item text, lock_key bigint,"
                " trigger text, triggered_by text, status text, params jsonb, reason text, level text,"
                " finding jsonb, observed jsonb)),"
                " leftover AS ("
                " UPDATE {s}.run r SET status = 'interrupted', finished_at = now(), error = %s"
                " FROM (SELECT DISTINCT lock_key FROM input WHERE status = 'ok') i"
                " WHERE r.lock_key = i.lock_key AND r.status = 'running'),"
                " new_run AS ("
                " INSERT INTO {s}.run (id, job, unit, target, item, lock_key, trigger, triggered_by, host, status,"
                " params, error, finished_at, attempts, observed) OVERRIDING SYSTEM VALUE"
                " SELECT id, job, unit, target, item, lock_key, trigger, triggered_by, %s, status, params, reason,"
                " now(), 1, observed FROM input),"
                " new_finding AS ("
                " INSERT INTO {s}.finding (run_id, seq, level, data)"
                " SELECT id, 1, level, finding FROM input WHERE finding IS NOT NULL)"
                " SELECT id FROM input ORDER BY n"
            ).format(s=self._s, run_table=sql.Literal(quote_ident(self.schema, "run"))),
            (document, INTERRUPTED, socket.gethostname()),
        ).fetchall()
        return [int(row["id"]) for row in rows]

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        attempts: int,
        sqlstate: str | None,
        error: str | None,
        actions: Sequence[dict[str, Any]],
        findings: Sequence[dict[str, Any]],
        summary: dict[str, Any] | None,
        level_field: str | None,
        observed: dict[str, Any] | None = None,
        observed_since: tuple[int, timedelta] | None = None,
    ) -> bool:
        """Complete a run's record; False when no record `run_id` exists here (it was written on a
        server whose last commits a failover lost, or the ledger was restored from a backup).
        `observed_since`: the earlier run (id) a forecast of this run read its values from and the
        forecast's window, to keep where each key's stretch began (see `OBSERVED_SINCE`)."""
        # One statement, so one round trip and atomic without BEGIN/COMMIT: the run's outcome, its
        # actions and its findings. Actions and findings travel as one JSON document each (dumped by
        # the json module's C code; psycopg's array dumper escapes element by element in Python).
        # Only an unfinished record is completed, so repeating a finish whose acknowledgement was lost
        # changes nothing; `interrupted` counts as unfinished: another runner marks a record so when
        # it took the lock while this run's server was restarting, and the real outcome is better.
        since, window = observed_since if observed_since is not None else (None, timedelta(0))
        row = self.conn.execute(
            sql.SQL(
                "WITH finished AS ("
                " UPDATE {s}.run SET status = %(status)s, finished_at = now(), attempts = %(attempts)s,"
                " sqlstate = %(sqlstate)s, error = %(error)s, summary = %(summary)s, observed = ("
                + OBSERVED_SINCE +
                ") WHERE id = %(run_id)s AND status IN ('running', 'interrupted')"
                " RETURNING id),"
                " actions AS ("
                " INSERT INTO {s}.action (run_id, seq, sql, status, rows, seconds, attempts, sqlstate)"
                " SELECT f.id, a.seq, a.sql, a.status, a.rows, a.seconds, coalesce(a.attempts, 1), a.sqlstate"
                " FROM finished f, jsonb_to_recordset(%(actions)s) AS a(seq int, sql text, status text, rows bigint,"
                " seconds float8, attempts int, sqlstate text)),"
                " findings AS ("
                " INSERT INTO {s}.finding (run_id, seq, level, data)"
                " SELECT f.id, d.seq, d.level, d.data FROM finished f,"
                " jsonb_to_recordset(%(findings)s) AS d(seq int, level text, data jsonb))"
                " SELECT EXISTS (SELECT 1 FROM {s}.run WHERE id = %(run_id)s) AS present"
            ).format(s=self._s),
            {
                "status": status,
                "attempts": attempts,
                "sqlstate": sqlstate,
                "error": error,
                "summary": to_jsonb(summary) if summary is not None else None,
                "observed": to_jsonb(observed) if observed is not None else None,
                "since": since,
                "window": window,
                "run_id": run_id,
                "actions": to_jsonb([{"seq": i, **a} for i, a in enumerate(actions, 1)]),
                "findings": to_jsonb(
                    [
                        {"seq": i, "level": f.get(level_field) if level_field else None, "data": f}
                        for i, f in enumerate(findings, 1)
                    ]
                ),
            },
        ).fetchone()
        return bool(row and row["present"])

    def purge(self, older_than: timedelta) -> int:
        cur = self.conn.execute(
            sql.SQL("DELETE FROM {}.run WHERE started_at < now() - %s::interval AND status <> 'running'").format(
                self._s
            ),
            (older_than,),
        )
        return cur.rowcount

    # -- reading --------------------------------------------------------------------------------

    def history(self, job: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        if self.current_version() == 0:
            return []
        where = sql.SQL("WHERE job = %s") if job else sql.SQL("")
        params: tuple[Any, ...] = (job, limit) if job else (limit,)
        rows = self.conn.execute(
            sql.SQL(
                "SELECT id, job, unit, target, item, trigger, triggered_by, host, status, started_at, finished_at,"
                " attempts, sqlstate, error, summary,"
                " (SELECT count(*) FROM {s}.action a WHERE a.run_id = r.id) AS actions,"
                " (SELECT count(*) FROM {s}.finding f WHERE f.run_id = r.id) AS findings"
                " FROM {s}.run r {w} ORDER BY started_at DESC, id DESC LIMIT %s"
            ).format(s=self._s, w=where),
            params,
        ).fetchall()
        return [dict(r) for r in rows]

    def last_runs(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The newest finished run per (job, target) (`status`, `started_at`, `finished_at`: for
        `maintainer jobs` and the daemon's catch-up), with when a run of it last finished ok or
        failed (`last_finished`) and last finished ok (`last_success`): what the daemon's run-time
        gauges showed before a restart."""
        if self.current_version() == 0:
            return {}
        rows = self.conn.execute(
            sql.SQL(
                "SELECT DISTINCT ON (job, target) job, target, status, started_at, finished_at,"
                " max(finished_at) FILTER (WHERE status IN ('ok', 'failed')) OVER w AS last_finished,"
                " max(finished_at) FILTER (WHERE status = 'ok') OVER w AS last_success"
                " FROM {}.run WHERE status <> 'running'"
                " WINDOW w AS (PARTITION BY job, target) ORDER BY job, target, started_at DESC"
            ).format(self._s)
        ).fetchall()
        return {(r["job"], r["target"]): dict(r) for r in rows}

    def ran_since(self, job: str, target: str, item: str | None, since: datetime) -> bool:
        """Whether a scheduled run of (job, target, item) started at or after `since` (skipped
        ones do not count)."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {}.run WHERE job = %s AND target = %s AND item IS NOT DISTINCT FROM %s"
                " AND trigger = 'schedule' AND status <> 'skipped' AND started_at >= %s) AS ran"
            ).format(self._s),
            (job, target, item, since),
        ).fetchone()
        return bool(row and row["ran"])

    def latest_findings(self) -> list[dict[str, Any]]:
        """The newest completed run with findings of every (job, target, item):
        `{job, unit, target, item, status, finished_at, findings}`, findings in order.

        A failed run counts when it still recorded findings (a step failed, the report ran); one that
        failed before discovering anything leaves the previous findings in place."""
        if not relation_exists(self.conn, self.schema, "finding"):
            return []
        rows = self.conn.execute(
            sql.SQL(
                """
                WITH latest AS (
                    SELECT DISTINCT ON (r.job, r.target, r.item) r.id, r.job, r.unit, r.target, r.item, r.status,
                           r.finished_at
                      FROM {s}.run r
                     WHERE r.finished_at IS NOT NULL
                       AND (r.status = 'ok'
                            OR (r.status = 'failed' AND EXISTS (SELECT 1 FROM {s}.finding f WHERE f.run_id = r.id)))
                     ORDER BY r.job, r.target, r.item, r.started_at DESC, r.id DESC
                )
                SELECT l.job, l.unit, l.target, l.item, l.status, l.finished_at,
                       coalesce(json_agg(f.data ORDER BY f.seq) FILTER (WHERE f.run_id IS NOT NULL), '[]') AS findings
                  FROM latest l
                  LEFT JOIN {s}.finding f ON f.run_id = l.id
                 GROUP BY l.id, l.job, l.unit, l.target, l.item, l.status, l.finished_at
                 ORDER BY l.job, l.target, l.item
                """
            ).format(s=self._s)
        ).fetchall()
        return [dict(r) for r in rows]

    def forecast_runs(self, job: str, target: str, item: str | None, *, window: timedelta) -> list[dict[str, Any]]:
        """The earlier runs whose observations a forecast reads, oldest first: `[{run_id, observed_at}]`.

        Of the finished `ok` runs of (job, target, item) that observed something (`run.observed`),
        started within `window` before now: the oldest and the newest (one run when there is only
        one). The newest holds each key's value and, where it began within the window, where the
        key's current stretch began (see `OBSERVED_SINCE`); the oldest holds the values at the
        window's start. Two runs however often the job runs: two index probes, nothing sorted."""
        rows = self.conn.execute(
            sql.SQL(
                "WITH recent AS ("
                " SELECT id, started_at FROM {s}.run"
                " WHERE job = %s AND target = %s AND item IS NOT DISTINCT FROM %s AND status = 'ok'"
                " AND finished_at IS NOT NULL AND observed IS NOT NULL"
                " AND started_at >= now() - %s::interval AND started_at < now())"
                " SELECT * FROM ((SELECT id AS run_id, started_at AS observed_at FROM recent"
                " ORDER BY started_at, id LIMIT 1)"
                " UNION (SELECT id, started_at FROM recent ORDER BY started_at DESC, id DESC LIMIT 1)) ends"
                " ORDER BY observed_at, run_id"
            ).format(s=self._s),
            (job, target, item, window),
        ).fetchall()
        return [dict(r) for r in rows]


    def recent_decisions(self, field: str, decision: str, *, within: timedelta) -> dict[str, datetime]:
        """When each object (a finding's `field`) last got a finding whose `decision` says `decision`,
        over the runs of any job on this target started within `within` before now: `{object: the
        start of the newest such run}` (a unit's `cooldown`, see `CooldownSpec`)."""
        rows = self.conn.execute(
            sql.SQL(
                "SELECT f.data ->> %s AS key, max(r.started_at) AS at"
                " FROM {s}.finding f JOIN {s}.run r ON r.id = f.run_id"
                " WHERE r.started_at > now() - %s::interval AND f.data ->> 'decision' = %s"
                " GROUP BY 1"
            ).format(s=self._s),
            (field, within, decision),
        ).fetchall()
        return {r["key"]: r["at"] for r in rows if r["key"] is not None}


def each_ledger(settings: Settings, *, connect_timeout: int = 5) -> Iterator[tuple[str, Ledger | None, str | None]]:
    """(target, its ledger, None) for every reachable target, (target, None, why) for the others.

    The read-only views (`jobs`, `history`, `report`) go through this, so an unreachable target
    is one line of their output, never a failure of the whole command.
    """
    from maintainer.db import TargetUnavailable, connect

    for name, target in sorted(settings.targets.items()):
        try:
            conn = connect(target.conninfo(), application_name="pg-maintainer ledger", connect_timeout=connect_timeout)
        except (TargetUnavailable, OSError, ValueError) as exc:
            yield name, None, f"unreachable: {exc}"
            continue
        try:
            yield name, Ledger(conn, settings.state_schema), None
        finally:
            conn.close()

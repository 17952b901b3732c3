"""Connections to a target: opened with patience for restarts and failovers, refused through a
transaction-mode pooler, and shared by the consecutive runs of one (job, target) (`Session`).
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from maintainer import db, pooler
from maintainer.errors import RunFailed
from maintainer.ledger import Ledger
from maintainer.project import RunSpec


class Session:
    """Connections shared by consecutive runs on one target, e.g. the items of a job.

    Isolation stays per run — each (job, target, item) takes its own advisory lock, runs its own
    transactions and writes its own ledger record — but the items stop paying for two new backends,
    cold catalog caches and a ledger schema check each. Session settings a unit changed are reset
    between runs (`RESET ALL`), and a connection that broke is replaced by the next run. Both
    connections (work and ledger), new ones and replacements alike, are refused when they go
    through a pooler (`connect_retrying`), before anything runs on them.
    """

    def __init__(self, step_turn: threading.Lock | None = None) -> None:
        # Held while a run's transaction (or autocommitted statement) of a step executes: the lanes
        # of a job (see `runner.run_all`) share one, so those take turns while all else overlaps.
        self.step_turn = step_turn or threading.Lock()
        self.conninfo: str | None = None
        self.conn: psycopg.Connection[Any] | None = None
        self.ledger_conn: psycopg.Connection[Any] | None = None
        self.ledger_ready = False
        self.purged = False
        # The work connection last seen on a primary: a server leaves recovery (promotion) but never
        # enters it while a connection lives, so one check per connection is enough.
        self.on_primary: psycopg.Connection[Any] | None = None
        # The work connection as the last run released it: lock gone and settings reset (`release`).
        self.released: psycopg.Connection[Any] | None = None

    @staticmethod
    def usable(conn: psycopg.Connection[Any] | None) -> bool:
        return conn is not None and not conn.closed and not conn.broken

    def close(self) -> None:
        for conn in (self.conn, self.ledger_conn):
            if conn is not None and not conn.closed:
                conn.close()
        self.conn = self.ledger_conn = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ledger(self, spec: RunSpec) -> Ledger:
        """The ledger of `spec`'s target on the session's second connection (schema checked once).

        A connection that broke (the server restarted, failed over, or dropped it) is replaced here,
        with the same patience as the work connection's: a record must not be lost because the
        ledger's connection died while the work went on over a new one."""
        if not Session.usable(self.ledger_conn):
            self.ledger_conn = connect_retrying(
                conninfo_of(spec), spec, application_name="pg-maintainer ledger",
                reconnecting=self.ledger_conn is not None,
            )
            self.ledger_ready = False
        assert self.ledger_conn is not None
        ledger = Ledger(self.ledger_conn, spec.settings.state_schema)
        if not self.ledger_ready:
            ledger.ensure()
            self.ledger_ready = True
        return ledger

    def in_recovery(self, conn: psycopg.Connection[Any]) -> bool:
        if conn is self.on_primary:
            return False
        if db.is_in_recovery(conn):
            return True
        self.on_primary = conn
        return False

    def release(self, conn: psycopg.Connection[Any], key: int) -> None:
        """End a run on the work connection: its advisory lock goes and the settings its unit changed
        are reset, in one round trip, so the next run need not reset them again."""
        db.unlock_and_reset(conn, key)
        self.released = conn if conn is self.conn else None

    def purge_once(self, ledger: Ledger, spec: RunSpec) -> None:
        """Old history goes once per session, not once per item."""
        if not self.purged:
            ledger.purge(spec.settings.defaults.history_retention)
            self.purged = True

    def work_connection(
        self,
        spec: RunSpec,
        *,
        fresh: bool = False,
        on_connect: Callable[[psycopg.Connection[Any]], None] | None = None,
    ) -> psycopg.Connection[Any]:
        """The session's work connection for `spec`'s target, reset to a clean state."""
        conninfo = conninfo_of(spec)
        if self.conninfo != conninfo:
            self.close()  # the DSN changed (a rotated dsn_file): nothing of the old session is reused
            self.conninfo = conninfo
        if not fresh and Session.usable(self.conn):
            assert self.conn is not None
            # Released clean by the previous run, and the server has not said goodbye since (a
            # restart, a failover or a terminated backend leaves its last message or EOF on the
            # socket): nothing to reset. Otherwise RESET ALL, which also finds a connection gone.
            if self.released is not self.conn or db.server_spoke(self.conn):
                try:
                    self.conn.execute("RESET ALL")  # whatever the previous run's unit SET for itself
                except psycopg.OperationalError:
                    fresh = True  # the server went away since the previous item (a restart, a failover)
        self.released = None
        conn = self.conn
        if fresh or conn is None or not Session.usable(conn):
            if conn is not None and not conn.closed:
                conn.close()
            conn = self.conn = connect_retrying(
                conninfo, spec, application_name=f"pg-maintainer {spec.job.name}"[:63],
                reconnecting=conn is not None,
            )
        if on_connect is not None:
            on_connect(conn)
        return conn


def conninfo_of(spec: RunSpec) -> str:
    try:
        return spec.target.conninfo()
    except OSError as exc:
        raise RunFailed(f"cannot read dsn_file of target {spec.target_name!r}: {exc.strerror}") from None


def retry_delay(spec: RunSpec, attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt`: exponential, capped, jittered (so the
    replicas of a daemon that lost the same server do not come back in lockstep)."""
    defaults = spec.settings.defaults
    delay: float = min(
        defaults.retry_backoff.total_seconds() * 2 ** (attempt - 1), defaults.retry_backoff_max.total_seconds()
    )
    return delay * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not crypto


def connect_retrying(
    conninfo: str, spec: RunSpec, *, application_name: str, reconnecting: bool = False
) -> psycopg.Connection[Any]:
    """`db.connect`, tried `max_attempts` times with backoff. A server that is restarting or being
    promoted refuses connections for a few seconds, which must not fail the run: when `reconnecting`
    (the server answered earlier in this session), attempts go on until `reconnect_window` has passed
    too. A first connection gives up sooner, so a wrong host is reported without a long wait.

    Before anything runs on it, the connection is checked for a pooler in between (see `pooler`):
    one that goes through a transaction-mode pooler is closed and `pooler.PoolerDetected` raised,
    never retried (it is configuration, not a passing failure)."""
    defaults = spec.settings.defaults
    deadline = time.monotonic() + (defaults.reconnect_window.total_seconds() if reconnecting else 0.0)
    number = 0
    while True:
        number += 1
        try:
            conn = db.connect(conninfo, application_name=application_name)
        except db.TargetUnavailable:
            left = deadline - time.monotonic()
            if number >= defaults.max_attempts and left <= 0:
                raise
            delay = retry_delay(spec, number)
            time.sleep(min(delay, left) if number >= defaults.max_attempts else delay)
            continue
        pooler.require_direct(conn, spec.target_name)
        return conn


def timeouts_of(spec: RunSpec) -> tuple[dt.timedelta, dt.timedelta]:
    """(lock_timeout, statement_timeout): the job's own, else the configuration's defaults."""
    defaults = spec.settings.defaults
    return spec.job.timeouts.lock or defaults.lock_timeout, spec.job.timeouts.statement or defaults.statement_timeout

"""Pacing: work that waits while the target's standbys fall behind (SPEC §12).

A sweep or a rebuild writes WAL as fast as the primary lets it; a standby that replays slower (or
has stopped replaying) falls further behind with every batch, its readers see older data, and a
replication slot keeps the primary's WAL on disk until the standby catches up. Before each batch of
a repeated step and before each step of a DDL unit, the runner asks the primary how far behind its
standbys and slots are, and waits while any is over its limit. A wait longer than `max_wait` stops
the run at that safe point (between batches, between steps): the next run resumes.

The primary's view is enough: `pg_stat_replication` has each streaming standby's replay position
and lag; a standby that disconnected is gone from it, but its slot still holds `restart_lsn`, so the
WAL it has not received is counted there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from maintainer.config import Throttle
from maintainer.values import human_seconds, human_size

# Asked before every batch, so it must cost next to nothing: the functions behind
# pg_stat_replication and pg_replication_slots (the view also joins every backend's activity), the
# worst value of each signal only, prepared once per connection (~0.2-0.6 ms). replay_lag is NULL
# once a standby has caught up and the primary is idle: no lag then. Bytes count from the insert
# position: WAL of asynchronous commits not yet written out is lag too.
_WORST = """
SELECT (SELECT max(extract(epoch FROM w.replay_lag))::float8 FROM pg_stat_get_wal_senders() w) AS replica_lag,
       (SELECT max(pg_wal_lsn_diff(l.pos, w.replay_lsn))::float8 FROM pg_stat_get_wal_senders() w)
           AS replica_lag_bytes,
       (SELECT max(pg_wal_lsn_diff(l.pos, s.restart_lsn))::float8 FROM pg_get_replication_slots() s)
           AS slot_retained_bytes
  FROM (SELECT pg_current_wal_insert_lsn() AS pos) l
"""

# Only while something is over its limit: which standby or slot, by name, for the message.
_DETAILS = """
SELECT 'replica_lag' AS reason, coalesce(nullif(application_name, ''), client_addr::text, pid::text) AS subject,
       extract(epoch FROM replay_lag)::float8 AS value
  FROM pg_stat_replication
 WHERE replay_lag IS NOT NULL
UNION ALL
SELECT 'replica_lag_bytes', coalesce(nullif(application_name, ''), client_addr::text, pid::text),
       pg_wal_lsn_diff(pg_current_wal_insert_lsn(), replay_lsn)::float8
  FROM pg_stat_replication
 WHERE replay_lsn IS NOT NULL
UNION ALL
SELECT 'slot_retained_bytes', slot_name::text, pg_wal_lsn_diff(pg_current_wal_insert_lsn(), restart_lsn)::float8
  FROM pg_replication_slots
 WHERE restart_lsn IS NOT NULL
"""


# What a run waits for (`Signal.reason`, the `reason` label of maintainer_throttled_seconds_total).
THROTTLE_REASONS = ("replica_lag", "replica_lag_bytes", "slot_retained_bytes")


@dataclass(frozen=True)
class Signal:
    """One measurement over its limit."""

    reason: str  # replica_lag | replica_lag_bytes | slot_retained_bytes
    subject: str  # the standby's application_name, or the slot's name
    value: float
    limit: float

    def describe(self) -> str:
        if self.reason == "replica_lag":
            return (f"standby {self.subject} replays {human_seconds(self.value)} behind"
                    f" (limit {human_seconds(self.limit)})")
        what = "standby" if self.reason == "replica_lag_bytes" else "replication slot"
        verb = "has not replayed" if self.reason == "replica_lag_bytes" else "retains"
        return f"{what} {self.subject} {verb} {human_size(self.value)} of WAL (limit {human_size(self.limit)})"


def over_limits(conn: psycopg.Connection[Any], throttle: Throttle) -> list[Signal]:
    """The signals over their limits right now, worst first (by how far over)."""
    limits = {
        "replica_lag": throttle.max_replica_lag.total_seconds(),
        "replica_lag_bytes": float(throttle.max_replica_lag_bytes),
        "slot_retained_bytes": float(throttle.max_replica_lag_bytes),
    }
    worst = conn.execute(_WORST, prepare=True).fetchone()
    if worst is None or not any(value is not None and value > limits[reason] for reason, value in worst.items()):
        return []
    rows = conn.execute(_DETAILS, prepare=False).fetchall()
    signals = [
        Signal(row["reason"], row["subject"], row["value"], limits[row["reason"]])
        for row in rows
        if row["value"] is not None and row["value"] > limits[row["reason"]]
    ]
    return sorted(signals, key=lambda s: s.value / s.limit if s.limit else float("inf"), reverse=True)


class Throttled(Exception):
    """Waited `max_wait` and the standbys are still behind: stop here, the next run resumes."""


@dataclass
class Pacer:
    """Waits before a batch or a DDL step while the standbys are behind; counts the waiting.

    `on_wait` hears what is being waited for (a terminal progress line), once per change;
    `cancel` (SIGTERM) ends a wait at once."""

    throttle: Throttle | None
    cancel: threading.Event | None = None
    on_wait: Callable[[str | None], None] | None = None
    waited: dict[str, float] = field(default_factory=dict)  # seconds by reason, this run

    @property
    def total_waited(self) -> float:
        return sum(self.waited.values())

    def wait(self, conn: psycopg.Connection[Any], check_cancel: Callable[[], None]) -> None:
        """Return once nothing is over its limit; raise `Throttled` when waiting would exceed
        `max_wait` (counted over the whole run, so a run never waits longer than that)."""
        if self.throttle is None:
            return
        shown: str | None = None
        while signals := over_limits(conn, self.throttle):
            worst = signals[0]
            if self.total_waited >= self.throttle.max_wait.total_seconds():
                self._show(None, shown)
                raise Throttled(
                    f"waited {human_seconds(self.total_waited)} (max_wait) for standbys to catch up: "
                    f"{worst.describe()}; stopped at a safe point, the next run resumes"
                )
            shown = self._show(f"waiting: {worst.describe()}", shown)
            pause = min(self.throttle.check_every.total_seconds(),
                        self.throttle.max_wait.total_seconds() - self.total_waited)
            started = time.monotonic()
            if self.cancel is not None:
                self.cancel.wait(max(pause, 0.0))
            else:
                time.sleep(max(pause, 0.0))
            self.waited[worst.reason] = self.waited.get(worst.reason, 0.0) + time.monotonic() - started
            check_cancel()
        self._show(None, shown)

    def _show(self, message: str | None, shown: str | None) -> str | None:
        if self.on_wait is not None and message != shown:
            self.on_wait(message)
        return message

"""Connection poolers (PgBouncer and alike): detected on every connection the engine opens, right
after connecting and before anything else runs on it, whatever the port.

Through a transaction-mode pooler a session advisory lock stays on the pooled server connection
(another client landing there "gets" it, and it outlives its client), psycopg's automatic prepared
statements break, and `SET` leaks into other clients' transactions. So runs (`trigger`, `plan`,
scheduled and HTTP runs, `check`'s dry runs) refuse such a target — exit code 2, a message asking for
a direct DSN — before taking a lock, preparing a statement or setting anything. `db.connect` opens
every connection with psycopg's automatic preparation off (`prepare_threshold=None`); `require_direct`
turns it back on once the connection is known to be direct. The read-only views (`history`,
`report`, `jobs`, the daemon's readiness probe and its gauges at start) keep it off and read through
a pooler fine: one autocommit SELECT at a time, no session state.

Signals (FIELD_NOTES §8, measured with PgBouncer 1.18 in transaction mode):

* **backend pid** — decisive. PostgreSQL tells its client its process id at login (BackendKeyData,
  psycopg's `conn.info.backend_pid`; cancel requests are addressed with it). A pooler answers the
  login itself and hands out a key of its own, so `pg_backend_pid()` names another process. A TCP
  proxy, a port mapping or a TLS terminator passes PostgreSQL's own key through, and so does a
  pooler that pins one server connection per client for the whole session — those keep a real session.
* **server port** — corroborating only. `inet_server_port()` is the port PostgreSQL accepted the
  connection on; through PgBouncer it is not the port dialled. But Docker's published ports, a
  Kubernetes Service's targetPort, SSH tunnels and cloud SQL proxies change the port too while
  keeping one real session per client, so a different port alone refuses nothing (`check` warns).
  NULL over a Unix socket (ours, or the pooler's to the server): no signal then.

`server_version`, `application_name` and `SHOW` tell nothing (PgBouncer passes them on), and the
`options` startup parameter is refused or — with `ignore_startup_parameters` — silently dropped, so
none of them is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from maintainer import db

# psycopg's own default: statements run this often on a connection are prepared server-side.
PSYCOPG_PREPARE_THRESHOLD = 5

SESSION_WORK = "session work (advisory locks, DDL, CONCURRENTLY, prepared statements) needs a direct connection"


class PoolerDetected(db.TargetUnavailable):
    """The target answers through a connection pooler: no run may use it (exit code 2)."""


@dataclass(frozen=True)
class Probe:
    """What one connection says about the path to its server."""

    login_pid: int  # the pid handed out at login (psycopg's conn.info.backend_pid)
    server_pid: int  # SELECT pg_backend_pid()
    dialled_port: int | None  # the port this connection dialled (None when unknown)
    server_port: int | None  # SELECT inet_server_port(); None over a Unix socket

    @property
    def pooled(self) -> bool:
        return self.login_pid != self.server_pid

    @property
    def port_differs(self) -> bool:
        return None not in (self.dialled_port, self.server_port) and self.dialled_port != self.server_port

    def signal(self) -> str:
        """The evidence, in words (no host, user or password)."""
        words = []
        if self.pooled:
            words.append("the backend pid handed out at login is not the server's pg_backend_pid()")
        if self.port_differs:
            words.append(f"the server listens on port {self.server_port}, not on the port dialled, {self.dialled_port}")
        return "; ".join(words) or "nothing in between"


def probe(conn: psycopg.Connection[Any]) -> Probe:
    """One round trip, nothing prepared and no session state changed: safe on a pooled connection."""
    row = conn.execute("SELECT pg_backend_pid() AS pid, inet_server_port() AS port", prepare=False).fetchone()
    assert row is not None
    values = row if isinstance(row, dict) else {"pid": row[0], "port": row[1]}
    try:
        dialled: int | None = int(conn.info.port)
    except (TypeError, ValueError, psycopg.Error):
        dialled = None
    return Probe(conn.info.backend_pid, int(values["pid"]), dialled, values["port"])


def refusal(target: str, found: Probe) -> str:
    """The one-line reason a run on `target` is refused, with what to configure instead."""
    if found.port_differs:
        where = f", e.g. port {found.server_port} instead of {found.dialled_port}"
    elif found.dialled_port is not None:
        where = f", not at the pooler's port {found.dialled_port}"
    else:
        where = ""
    return (
        f"target {target!r} answers through a connection pooler such as PgBouncer ({found.signal()}): "
        f"{SESSION_WORK}; point its dsn at PostgreSQL itself{where}"
    )


def require_direct(conn: psycopg.Connection[Any], target: str) -> Probe:
    """Refuse (close `conn`, raise `PoolerDetected`) a connection that goes through a pooler; on a
    direct one, turn psycopg's automatic prepared statements back on."""
    try:
        found = probe(conn)
    except BaseException:
        conn.close()
        raise
    if found.pooled:
        conn.close()  # nothing ran on it but the probe: no lock, no prepared statement, no SET
        raise PoolerDetected(refusal(target, found))
    conn.prepare_threshold = PSYCOPG_PREPARE_THRESHOLD
    return found

"""Connections, session settings, advisory locks and SQLSTATE classification.

Every run uses its own direct connection (never a transaction-mode pooler): session advisory
locks and `CONCURRENTLY` need a real session.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from maintainer.values import format_duration

APPLICATION_NAME = "pg-maintainer"

# Lock not available (lock_timeout), deadlock, serialization failure: the same statement may well
# succeed a moment later. Connection-class errors (08xxx) and an administrator's shutdown too.
TRANSIENT_SQLSTATES = {"55P03", "40P01", "40001", "57P01", "57P02", "57P03"}


class TargetUnavailable(Exception):
    """The target database cannot be reached; the message carries no credentials."""


def redact_dsn(text: str) -> str:
    """Remove passwords from anything that may contain a connection string."""
    text = re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.IGNORECASE)


def connect(
    conninfo: str, *, application_name: str = APPLICATION_NAME, connect_timeout: int = 10
) -> psycopg.Connection[Any]:
    """A direct autocommit connection; transactions are opened explicitly by the runner."""
    try:
        return psycopg.connect(
            conninfo,
            autocommit=True,
            application_name=application_name,
            connect_timeout=connect_timeout,
            row_factory=dict_row,
        )
    except psycopg.OperationalError as exc:
        raise TargetUnavailable(
            redact_dsn(str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed")
        ) from None


def set_timeouts(conn: psycopg.Connection[Any], *, lock_timeout: timedelta, statement_timeout: timedelta) -> None:
    """Session-level timeouts: every statement of the run inherits them."""
    conn.execute(
        "SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
        (format_duration(lock_timeout), format_duration(statement_timeout)),
    )


def is_in_recovery(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery() AS recovery").fetchone()
    return bool(row and row["recovery"])


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit key for (job, target, item); identical in every replica."""
    digest = hashlib.sha256("\x1f".join(("pg-maintainer", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def try_advisory_lock(conn: psycopg.Connection[Any], key: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s) AS locked", (key,)).fetchone()
    return bool(row and row["locked"])


def try_advisory_locks(conn: psycopg.Connection[Any], keys: list[int]) -> list[bool]:
    """`try_advisory_lock` for many keys in one round trip, in order (a repeated key locks twice)."""
    rows = conn.execute(
        "SELECT pg_try_advisory_lock(k) AS locked FROM unnest(%s::bigint[]) WITH ORDINALITY AS u(k, n) ORDER BY n",
        (keys,),
    ).fetchall()
    return [bool(row["locked"]) for row in rows]


def advisory_unlocks(conn: psycopg.Connection[Any], keys: list[int]) -> None:
    if keys and not conn.closed:
        conn.execute("SELECT pg_advisory_unlock(k) FROM unnest(%s::bigint[]) AS u(k)", (keys,))


def advisory_unlock(conn: psycopg.Connection[Any], key: int) -> None:
    if not conn.closed:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def sqlstate_of(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: lock timeouts, deadlocks, serialization failures and lost connections."""
    state = sqlstate_of(exc)
    if state in TRANSIENT_SQLSTATES or (state or "").startswith("08"):
        return True
    # A dropped connection surfaces as OperationalError without a SQLSTATE.
    return isinstance(exc, psycopg.OperationalError) and state is None


def error_summary(exc: BaseException, *, sensitive: bool = False) -> str:
    """The primary message only: DETAIL and CONTEXT can quote row values (`Key (email)=(…)`)."""
    state = sqlstate_of(exc)
    if sensitive and state:
        return f"{type(exc).__name__} (SQLSTATE {state})"
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    message = primary or (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return redact_dsn(message)


def query(conn: psycopg.Connection[Any], text: str, params: list[Any], *, read_only: bool) -> list[dict[str, Any]]:
    """One statement with `$n` parameters, in a READ ONLY transaction when asked; its rows."""
    for attempt in (1, 2):
        try:
            # One statement is a transaction of its own: BEGIN and COMMIT are only worth their two
            # round trips when the transaction must be READ ONLY.
            with conn.transaction() if read_only else contextlib.nullcontext():
                if read_only:
                    conn.execute("SET TRANSACTION READ ONLY")
                with psycopg.RawCursor(conn, row_factory=dict_row) as cur:
                    cur.execute(text, params or None)
                    return list(cur.fetchall()) if cur.description else []
        except psycopg.errors.FeatureNotSupported as exc:
            # A prepared statement kept across DDL (see `keeping_plans`) whose result columns changed:
            # forget every prepared statement (psycopg clears its cache on DEALLOCATE ALL) and rerun.
            if attempt == 2 or "cached plan must not change result type" not in str(exc):
                raise
            conn.execute("DEALLOCATE ALL")
    raise AssertionError("unreachable")


# psycopg forgets every prepared statement of a connection (DEALLOCATE ALL) after a statement whose
# command status is ALTER or DROP. A unit's apply steps run such DDL between the same catalog
# queries item after item (partitions: thousands of ALTER TABLE in a pass), which would re-plan those
# queries every time; PostgreSQL itself re-plans a prepared statement when what it reads changes.
_FORGETS_PLANS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*(?:ALTER|DROP)\b", re.IGNORECASE | re.DOTALL)


@contextlib.contextmanager
def keeping_plans(conn: psycopg.Connection[Any], *statements: str) -> Iterator[None]:
    """Run `statements` (inside the block) without psycopg dropping the session's prepared statements."""
    if not any(_FORGETS_PLANS.match(statement) for statement in statements):
        yield
        return
    threshold = conn.prepare_threshold
    conn.prepare_threshold = None
    try:
        yield
    finally:
        conn.prepare_threshold = threshold


def rollback_failed_block(conn: psycopg.Connection[Any]) -> None:
    """After an error inside an explicit BEGIN … COMMIT block: end the aborted transaction, so the
    session is usable for a retry or the next step (a broken connection is left to the reconnect)."""
    if conn.closed or conn.broken or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):
        conn.execute("ROLLBACK")


def catalog_facts(
    conn: psycopg.Connection[Any], relations: list[tuple[str, ...]]
) -> tuple[dict[str, dict[str, str]], list[bool]]:
    """Installed extensions (`{name: {schema, version}}`) and whether each relation (its name quoted
    part by part, e.g. `(schema, name)`) exists, without an error when it does not; one round trip."""
    row = conn.execute(
        "SELECT (SELECT coalesce(json_object_agg(e.extname, json_build_object('schema', n.nspname,"
        " 'version', e.extversion)), '{}') FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace)"
        " AS extensions,"
        " ARRAY(SELECT to_regclass(r) IS NOT NULL FROM unnest(%s::text[]) WITH ORDINALITY AS u(r, n) ORDER BY n)"
        " AS present",
        ([quote_ident(*relation) for relation in relations],),
    ).fetchone()
    assert row is not None
    return dict(row["extensions"]), list(row["present"])


def relation_exists(conn: psycopg.Connection[Any], *name: str) -> bool:
    """Whether `schema.name` (quoted part by part) exists, without an error when it does not."""
    return catalog_facts(conn, [name])[1][0]


def quote_ident(*parts: str) -> str:
    return sql.Identifier(*parts).as_string(None)

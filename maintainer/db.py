"""Connections, session settings, advisory locks and SQLSTATE classification.

Every run uses its own direct connection (never a transaction-mode pooler): session advisory
locks and `CONCURRENTLY` need a real session.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import select
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row

from maintainer.errors import MaintainerError
from maintainer.values import format_duration

APPLICATION_NAME = "pg-maintainer"

# Worth retrying: the statement lost a race or the server went away, and the same statement may
# well succeed a moment later. Class 08 (connection exceptions) are all of these too.
TRANSIENT_ERRORS: tuple[type[psycopg.Error], ...] = (
    errors.LockNotAvailable,  # 55P03: lock_timeout
    errors.DeadlockDetected,  # 40P01
    errors.SerializationFailure,  # 40001
    errors.AdminShutdown,  # 57P01: terminated, or a fast shutdown
    errors.CrashShutdown,  # 57P02
    errors.CannotConnectNow,  # 57P03: starting up, recovering
    errors.ConnectionException,  # 08000
    errors.SqlclientUnableToEstablishSqlconnection,  # 08001
    errors.ConnectionDoesNotExist,  # 08003
    errors.SqlserverRejectedEstablishmentOfSqlconnection,  # 08004
    errors.ConnectionFailure,  # 08006
    errors.TransactionResolutionUnknown,  # 08007
    errors.ProtocolViolation,  # 08P01
)


class TargetUnavailable(MaintainerError):
    """The target database cannot be reached; the message carries no credentials."""


_URL_SCHEME = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
# A URL DSN in free text: the scheme, the token (up to a space or the next URL), and the rest of its
# line up to the next URL (a password with an unescaped space continues there).
_URL_DSN = re.compile(
    r"(postgres(?:ql)?://)(\S*?)(?=postgres(?:ql)?://|\s|\Z)((?:(?!postgres(?:ql)?://)[^\n])*)", re.IGNORECASE
)
# `password=` in a key=value DSN or a URL's query. A value in quotes with `\'` escapes that ends
# cleanly is the whole value; anything else (no quotes, an unclosed quote, text glued to the quote)
# may be a password with an unquoted space, so the words after it go too, up to the next `key=`.
_KV_PASSWORD = re.compile(
    r"(password\s*=\s*)"
    r"(?:'(?:\\.|[^'\\])*'(?=\s|\Z)"
    r"|(?:'(?:\\.|[^'\\])*(?:'|\Z)|\\.|[^\s'])+(?:[ \t]+(?![A-Za-z_][A-Za-z0-9_]*\s*=)\S+)*)",
    re.IGNORECASE,
)
# A host name holding `@` can only come from a URL whose password held an unescaped `@` (libpq cut
# the userinfo at the first one): what follows it in such a name is the rest of the password.
_HOST_WITH_AT = re.compile(r"""((?:host(?:\s+name)?|server\s+at)\s+)(["'])[^"'\n]*@[^"'\n]*\2""", re.IGNORECASE)
_PLAIN_USER = re.compile(r"[^:@/?#\s]*")
_PORT_LIST = re.compile(r"\d*(?:,[^,:/\s]*(?::\d*)?)*")
REDACTED_CONNINFO = "<connection string not shown: it may hold a password>"


def redact_dsn(text: str) -> str:
    """Remove passwords from anything that may contain a connection string.

    Works on any DSN, parsed or not: a text that is one valid DSN is parsed (psycopg's conninfo)
    and rebuilt without its password; in free text, URL userinfo and `password=` values are cut
    out, erring on removing too much when the DSN is malformed (an `@` or a space that should
    have been escaped).
    """
    whole = _redacted_conninfo(text)
    if whole is not None:
        return whole
    text = _URL_DSN.sub(lambda m: m.group(1) + _redact_url(m), text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    return _HOST_WITH_AT.sub(r"\1\2***\2", text)


def _redacted_conninfo(text: str) -> str | None:
    """`text` rebuilt without its password when it is exactly one valid DSN holding one."""
    candidate = text.strip()
    if "\n" in candidate or ("password" not in candidate.lower() and "@" not in candidate):
        return None
    if dsn_problem(candidate) is not None:
        return None
    try:
        params = psycopg.conninfo.conninfo_to_dict(candidate)
    except (psycopg.Error, ValueError, TypeError):
        return None
    if "password" not in params:
        return None
    params["password"] = "***"  # noqa: S105 - the placeholder that replaces it
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def _redact_url(match: re.Match[str]) -> str:
    """One URL DSN (its token, and the rest of its line for when the token ended too early)."""
    token, rest = match.group(2), match.group(3)
    if "@" in token:
        # libpq ends the userinfo at the first `@`; a password with an unescaped `@` continues to
        # the last one. Cutting to the last removes the whole password either way.
        userinfo, _, after = token.rpartition("@")
        user = userinfo.partition(":")[0]
        if ":" not in userinfo:
            return token + _KV_PASSWORD.sub(r"\1***", rest)
        shown = f"{user}:***@" if _PLAIN_USER.fullmatch(user) else "***@"
        return shown + _KV_PASSWORD.sub(r"\1***", after) + rest
    authority = re.split(r"[/?]", token, maxsplit=1)[0]
    authority = re.sub(r"\[[^\]]*\]", "", authority)  # IPv6 literals hold colons of their own
    host_port = [part.partition(":")[2] for part in authority.split(",") if ":" in part]
    if all(_PORT_LIST.fullmatch(port) for port in host_port):
        return token + rest
    # `user:pass word@host`: the token stopped at a space inside the password, which runs to the
    # last `@` of the line (or, without one, to the end of the token).
    user = authority.partition(":")[0]
    shown = f"{user}:***" if _PLAIN_USER.fullmatch(user) else "***"
    _, at, after_at = rest.rpartition("@")
    return f"{shown}@{after_at}" if at else shown + rest


@functools.lru_cache(maxsize=64)
def dsn_problem(dsn: str) -> str | None:
    """Why `dsn` cannot be used as a connection string, in words that never quote it; None if fine.

    libpq's own messages quote the offending part (`missing "=" after "b"`), which is often a piece
    of the password, and a URL whose password holds an unescaped `@` parses "successfully" with the
    rest of the password as the host name. Both are refused here, before any connection attempt.
    """
    if "\x00" in dsn:
        return "the connection string contains a NUL character"
    url = _URL_SCHEME.match(dsn.strip())
    if url:
        rest = dsn.strip()[url.end() :]
        before_query = rest.split("?", 1)[0]
        authority = before_query.split("/", 1)[0]
        if before_query.count("@") > 1 or "@" in before_query[len(authority) :]:
            return (
                "the connection URL holds an '@' besides the one before its host: percent-encode '@', '/' "
                "and '?' in a user name or password (%40, %2F, %3F; the value is not shown: it may hold "
                "a password)"
            )
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except (psycopg.Error, ValueError, TypeError):
        return (
            "not a valid connection string: in key=value form quote a value holding spaces or quotes "
            "(password='a b', a quote inside written \\'); in a URL percent-encode them (%20, %27, %40 for @) "
            "(the text is not shown: it may hold a password)"
        )
    return None


def connect(
    conninfo: str, *, application_name: str = APPLICATION_NAME, connect_timeout: int = 10
) -> psycopg.Connection[Any]:
    """An autocommit connection; transactions are opened explicitly by the runner.

    psycopg's automatic prepared statements are off (`prepare_threshold=None`): on a connection
    that turns out to go through a transaction-mode pooler they would be left on the pooler's server
    connections. `pooler.require_direct` turns them back on once the connection is known to be direct.
    """
    try:
        return psycopg.connect(
            conninfo,
            autocommit=True,
            application_name=application_name,
            connect_timeout=connect_timeout,
            row_factory=dict_row,
            prepare_threshold=None,
        )
    except psycopg.OperationalError as exc:
        raise TargetUnavailable(
            redact_dsn(str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed")
        ) from None


_SET_TIMEOUTS = "set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)"


def set_timeouts(conn: psycopg.Connection[Any], *, lock_timeout: timedelta, statement_timeout: timedelta) -> None:
    """Session-level timeouts: every statement of the run inherits them."""
    conn.execute(f"SELECT {_SET_TIMEOUTS}", (format_duration(lock_timeout), format_duration(statement_timeout)))


def lock_with_timeouts(
    conn: psycopg.Connection[Any], key: int, *, lock_timeout: timedelta, statement_timeout: timedelta
) -> bool:
    """The run's advisory lock and `set_timeouts` in one round trip (a run needs both before it
    starts). The timeouts are set whether or not the lock is free: a run that did not get it runs
    nothing, and the next run on the session resets them."""
    row = conn.execute(
        f"SELECT pg_try_advisory_lock(%s) AS locked, {_SET_TIMEOUTS}",
        (key, format_duration(lock_timeout), format_duration(statement_timeout)),
    ).fetchone()
    return bool(row and row["locked"])


def server_spoke(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server sent something while the connection was idle between statements: a
    server that ends a session (shutdown, restart, pg_terminate_backend) sends a last message, and
    a dead one leaves EOF. Asked without a round trip."""
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return bool(readable)


def is_in_recovery(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery() AS recovery").fetchone()
    return bool(row and row["recovery"])


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit key for (job, target, item); identical in every replica."""
    digest = hashlib.sha256("\x1f".join(("pg-maintainer", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


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


def unlock_and_reset(conn: psycopg.Connection[Any], key: int) -> None:
    """Release `key` and `RESET ALL` in one round trip: what ends a run on a shared connection.
    One message of two statements (no bound value, so the simple protocol takes both): a pipeline
    of two costs the client three times as much."""
    if not conn.closed:
        # `:d` accepts an int only: the key is a number the engine computed, and composing it with
        # sql.Literal costs the client more than the round trip this saves.
        conn.execute(f"SELECT pg_advisory_unlock({key:d}); RESET ALL")


def sqlstate_of(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: lock timeouts, deadlocks, serialization failures and lost connections."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    # A dropped connection surfaces as OperationalError without a SQLSTATE.
    return isinstance(exc, psycopg.OperationalError) and sqlstate_of(exc) is None


# SQLSTATE classes whose primary messages (PostgreSQL's own) name objects (relations, columns,
# constraints, roles, settings) and never quote a value: connection (08), feature not supported
# (0A), invalid transaction initiation (0B), grantor and role (0L, 0P), integrity constraints (23:
# `duplicate key value violates unique constraint "x"`; the values are in DETAIL, never kept),
# invalid cursor state (24), transaction state (25), statement and cursor names (26, 34),
# authorization (28), catalog and schema names (3D, 3F), savepoints (3B), rollback (40), syntax and
# access (42), WITH CHECK OPTION (44), resources and limits (53, 54), prerequisite state (55, lock
# timeouts), operator intervention (57, cancels and shutdowns), system (58), snapshot (72),
# configuration file (F0), internal (XX). Every other class can quote a value from a row: data
# exceptions (22: `invalid input syntax for type integer: "someone@example.com"`), RAISE (P0),
# routines (2F, 38, 39), and any class not listed.
OBJECT_ONLY_CLASSES = frozenset(
    {"08", "0A", "0B", "0L", "0P", "23", "24", "25", "26", "28", "34", "3B", "3D", "3F", "40", "42", "44",
     "53", "54", "55", "57", "58", "72", "F0", "XX"}
)
# libpq's messages about a connection string it cannot parse, which quote the part they dislike.
_CONNINFO_MESSAGE = re.compile(
    r"connection info string|connection option|conninfo|(?-i:\bURI\b)|percent-encod|unexpected spaces|"
    r"unterminated quoted string|missing \"=\"",
    re.IGNORECASE,
)


def error_summary(exc: BaseException, *, sensitive: bool = False, trusted: bool = False) -> str:
    """What a run records and shows of an error: never DETAIL or CONTEXT (`Key (email)=(…)`), and
    the primary message only when it cannot carry personal data.

    `sensitive`: the unit touches personal data; its errors are the exception class and SQLSTATE.
    `trusted`: the unit declares (`messages: trusted`) that PostgreSQL's messages in its runs never
    quote personal data (its own RAISE messages name tables only): every primary message is kept.
    Otherwise the message is kept for SQLSTATE classes that name objects only
    (`OBJECT_ONLY_CLASSES`) and replaced by the condition name elsewhere:
    `invalid_text_representation (SQLSTATE 22P02)`.
    """
    state = sqlstate_of(exc)
    if sensitive and state:
        return f"{type(exc).__name__} (SQLSTATE {state})"
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    message = primary or (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if state is None and _CONNINFO_MESSAGE.search(message):
        return f"invalid connection string: {REDACTED_CONNINFO}"
    if state and not trusted and state[:2] not in OBJECT_ONLY_CLASSES:
        return f"{condition_name(state)} (SQLSTATE {state})"
    return redact_dsn(message)


def condition_name(sqlstate: str) -> str:
    """PostgreSQL's condition name of a SQLSTATE (`22P02` -> `invalid_text_representation`), from
    psycopg's exception classes, which are named after them; `error` for an unknown code."""
    try:
        cls = psycopg.errors.lookup(sqlstate)
    except KeyError:
        return "error"
    if getattr(cls, "sqlstate", None) != sqlstate:
        return "error"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", cls.__name__).lower()


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

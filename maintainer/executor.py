"""Running a unit's statements on the work connection: transactions, retries, and the record of each.

A run hands its rendered statements here and gets back what they did (`Executed`): rows changed,
the last row returned, and the record of every statement (`Action`). When a statement fails,
`StatementsFailed` carries PostgreSQL's error and the record up to it (statements rolled back with
it marked `skipped`), so a failure part-way still leaves an exact account of what committed. A
transient failure (lock timeout, deadlock, lost connection) is retried with backoff, on a replaced
connection when the work connection went down; only the final attempt's actions are returned.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from maintainer import db
from maintainer.results import Action
from maintainer.units import Statement, transaction_blocks

T = TypeVar("T")


@dataclass
class Executed:
    """What statements did: rows affected, the last row returned, and the record of each."""

    rows: int = 0
    last: dict[str, Any] | None = None
    actions: list[Action] = field(default_factory=list)

    def then(self, more: Executed) -> Executed:
        """This, followed by `more`."""
        return Executed(self.rows + more.rows, more.last if more.last is not None else self.last,
                        self.actions + more.actions)


class StatementsFailed(Exception):
    """A statement failed: `error` is PostgreSQL's, `actions` the record up to and including it."""

    def __init__(self, error: psycopg.Error, actions: list[Action]) -> None:
        super().__init__(str(error))
        self.error = error
        self.actions = actions


class Executor:
    def __init__(
        self,
        *,
        connection: Callable[[], psycopg.Connection[Any]],
        reconnect: Callable[[], None],
        max_attempts: int,
        backoff: Callable[[int], float],
        check_cancel: Callable[[], None],
        turn: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        """`connection` gives the current work connection, `reconnect` replaces a broken one (with
        the run's lock and timeouts), `backoff(n)` is the wait after failed attempt n, and
        `check_cancel` raises when the run must stop. `turn` is held while a transaction (or an
        autocommitted statement) runs: the lanes of a job share one (see `Session.step_turn`), so
        the target never runs two of their transactions at once."""
        self.connection = connection
        self.reconnect = reconnect
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.check_cancel = check_cancel
        self.turn = turn if turn is not None else contextlib.nullcontext()
        self.attempts = 0  # the most attempts any statement of the run needed

    def select(self, statement: Statement, *, read_only: bool) -> list[dict[str, Any]]:
        """A one-SELECT block's rows; a SELECT changes nothing, so a transient failure (a restart,
        a lock timeout on a catalog) is simply tried again."""
        return self.with_retries(
            lambda: db.query(self.connection(), statement.sql, statement.params, read_only=read_only)
        )

    @staticmethod
    def plan(statements: list[Statement], mode: str, where: str) -> list[Action]:
        """A dry run: the statements as planned actions, none executed (their transaction blocks are
        still checked, so a dry run refuses what a real run would)."""
        transaction_blocks(statements, mode, where=where)
        return [Action(s.sql, "planned") for s in statements]

    def run(self, statements: list[Statement], mode: str, where: str, *, retry: bool = True) -> Executed:
        """Run one step's statements in `mode` (`none`: each autocommits, explicit BEGIN … COMMIT
        blocks aside; `per_step`: one transaction). Each transaction (or autocommitted statement)
        is retried on its own unless `retry` is false (the caller retries the whole step)."""
        done = Executed()
        for group in transaction_blocks(statements, mode, where=where):
            self.check_cancel()
            if group[0].control == "begin":
                attempt = functools.partial(self._explicit_transaction, group)
            elif len(group) == 1:
                # A single statement is atomic on its own: BEGIN and COMMIT would only add two round
                # trips per step (per batch, for repeated steps).
                attempt = functools.partial(self._one, group[0])
            else:
                attempt = functools.partial(self._transaction, group)
            attempt = functools.partial(self._in_turn, attempt)
            try:
                done = done.then(self._retrying(attempt) if retry else attempt())
            except StatementsFailed as failed:
                raise StatementsFailed(failed.error, done.actions + failed.actions) from None
        return done

    def _in_turn(self, attempt: Callable[[], Executed]) -> Executed:
        """One attempt, holding the turn (a backoff between attempts does not)."""
        with self.turn:
            return attempt()

    def with_retries(self, attempt: Callable[[], T]) -> T:
        """`attempt`, tried again after a transient error (lock timeout, deadlock, lost connection)
        up to `max_attempts` times, with backoff."""
        for number in range(1, self.max_attempts + 1):
            self.attempts = max(self.attempts, number)
            try:
                return attempt()
            except psycopg.Error as exc:
                if not db.is_transient(exc) or number == self.max_attempts:
                    raise
                self.before_retry(number)
        raise AssertionError("unreachable")

    def _retrying(self, attempt: Callable[[], Executed]) -> Executed:
        """`with_retries` for statements: only the final attempt's actions are kept, marked with the
        number of attempts it took."""
        for number in range(1, self.max_attempts + 1):
            try:
                return self.took(attempt(), number)
            except StatementsFailed as failed:
                self.took(failed.actions, number)
                if not db.is_transient(failed.error) or number == self.max_attempts:
                    raise
                self.before_retry(number)
        raise AssertionError("unreachable")

    def took(self, done: Executed | Iterable[Action], attempts: int) -> Executed:
        """Mark these actions (an `Executed`'s, or a failure's) as having taken `attempts` tries."""
        self.attempts = max(self.attempts, attempts)
        executed = done if isinstance(done, Executed) else Executed(actions=list(done))
        for action in executed.actions:
            action.attempts = attempts
        return executed

    def before_retry(self, failed_attempt: int) -> None:
        """Wait out the backoff; replace the work connection if the failure took it down."""
        self.check_cancel()
        time.sleep(self.backoff(failed_attempt))
        conn = self.connection()
        if conn.closed or conn.broken:
            self.reconnect()

    # -- one transaction ------------------------------------------------------------------------

    def _one(self, statement: Statement) -> Executed:
        conn = self.connection()
        started = time.monotonic()
        action = Action(statement.sql, "ok")
        try:
            with psycopg.RawCursor(conn, row_factory=dict_row) as cur, db.keeping_plans(conn, statement.sql):
                cur.execute(statement.sql, statement.params or None)
                rows, last = outcome_of(cur)
        except psycopg.Error as exc:
            action.status, action.sqlstate = "failed", db.sqlstate_of(exc)
            action.seconds = time.monotonic() - started
            raise StatementsFailed(exc, [action]) from None
        action.seconds = time.monotonic() - started
        action.rows = rows
        return Executed(rows, last, [action])

    def _explicit_transaction(self, block: list[Statement]) -> Executed:
        """An explicit `BEGIN … COMMIT` block of a `transaction: none` unit: its statements travel in
        one round trip (psycopg's pipeline mode) and commit or roll back together. The block's time is
        recorded on its COMMIT: the statements' own times cannot be told apart."""
        conn = self.connection()
        started = time.monotonic()
        cursors: list[psycopg.RawCursor[dict[str, Any]]] = []
        try:
            with db.keeping_plans(conn, *(s.sql for s in block)), conn.pipeline():
                for statement in block:
                    cursor = psycopg.RawCursor(conn, row_factory=dict_row)
                    cursors.append(cursor)
                    # BEGIN and COMMIT repeat in every block: never worth a prepared statement.
                    prepare = False if statement.control else None
                    cursor.execute(statement.sql, statement.params or None, prepare=prepare)
        except psycopg.Error as exc:
            db.rollback_failed_block(conn)
            # The first statement without a result is the one that failed; the others did not happen.
            failed = next((i for i, c in enumerate(cursors) if c.pgresult is None), len(block) - 1)
            actions = []
            for number, statement in enumerate(block):
                action = Action(statement.sql, "failed" if number == failed else "skipped")
                if number == failed:
                    action.sqlstate = db.sqlstate_of(exc)
                    action.seconds = time.monotonic() - started
                actions.append(action)
            raise StatementsFailed(exc, actions) from None
        seconds = time.monotonic() - started
        done = Executed()
        for statement, cursor in zip(block, cursors, strict=True):
            action = Action(statement.sql, "ok")
            if statement.control is None:
                action.rows, last_row = outcome_of(cursor)
                done.rows += action.rows
                done.last = last_row if last_row is not None else done.last
            elif statement.control == "commit":
                action.seconds = seconds
            done.actions.append(action)
        return done

    def _transaction(self, statements: list[Statement]) -> Executed:
        done = Executed()
        try:
            with self.connection().transaction():
                for statement in statements:
                    done = done.then(self._one(statement))
        except StatementsFailed as failed:
            raise StatementsFailed(failed.error, rolled_back(done.actions) + failed.actions) from None
        except psycopg.Error as exc:  # the COMMIT itself
            raise StatementsFailed(exc, rolled_back(done.actions)) from None
        return done


def rolled_back(actions: list[Action]) -> list[Action]:
    """The whole transaction rolled back: statements that "succeeded" in it did not happen."""
    for action in actions:
        action.status = "skipped"
    return actions


def outcome_of(cursor: psycopg.RawCursor[dict[str, Any]]) -> tuple[int, dict[str, Any] | None]:
    """(rows affected, last row returned) of an executed statement."""
    fetched = list(cursor.fetchall()) if cursor.description else []
    rows = cursor.rowcount if cursor.rowcount >= 0 else len(fetched)
    last = fetched[-1] if fetched else None
    # A step may report its own progress count (`SELECT count(*) AS rows …`) instead of rowcount.
    if last is not None and len(fetched) == 1 and "rows" in last and isinstance(last["rows"], int):
        rows = last["rows"]
    return rows, last


def merge_actions(merged: list[Action], new: list[Action], iteration: int) -> list[Action]:
    """Fold a repeated step's batch of actions into one per statement position (rows and seconds
    summed, the number of batches in `iterations`)."""
    if not merged:
        for action in new:
            action.iterations = 1
        return list(new)
    for position, action in enumerate(new):
        if position < len(merged):
            target = merged[position]
            target.rows = (target.rows or 0) + (action.rows or 0)
            target.seconds = (target.seconds or 0) + (action.seconds or 0)
            target.iterations = iteration
            target.attempts = max(target.attempts, action.attempts)
            if action.status != "ok":
                target.status, target.sqlstate = action.status, action.sqlstate
        else:
            merged.append(action)
    return merged

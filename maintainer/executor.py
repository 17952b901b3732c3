"""Running a unit's statements on the work connection: transactions, retries, and the record of each.

A run hands its rendered statements here and gets back what they changed; every statement that
was executed, failed or was rolled back is appended to `actions` (the run's ledger record) as it
happens, so a failure part-way still leaves an exact account of what committed. A transient
failure (lock timeout, deadlock, lost connection) is retried with backoff on a replaced connection
when the work connection went down; only the final attempt's actions are kept.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from maintainer import db
from maintainer.results import Action
from maintainer.units import Statement, transaction_blocks

T = TypeVar("T")

Outcome = tuple[int, dict[str, Any] | None]  # (rows affected, last row returned)


class Executor:
    def __init__(
        self,
        *,
        connection: Callable[[], psycopg.Connection[Any]],
        reconnect: Callable[[], None],
        max_attempts: int,
        backoff: Callable[[int], float],
        check_cancel: Callable[[], None],
        actions: list[Action],
    ) -> None:
        """`connection` gives the current work connection, `reconnect` replaces a broken one (with
        the run's lock and timeouts), `backoff(n)` is the wait after failed attempt n, and
        `check_cancel` raises when the run must stop. `actions` is the run's record."""
        self.connection = connection
        self.reconnect = reconnect
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.check_cancel = check_cancel
        self.actions = actions
        self.attempts = 0  # the most attempts any statement of the run needed

    def select(self, statement: Statement, *, read_only: bool) -> list[dict[str, Any]]:
        """A one-SELECT block's rows; a SELECT changes nothing, so a transient failure (a restart,
        a lock timeout on a catalog) is simply tried again."""
        return self.with_retries(
            lambda: db.query(self.connection(), statement.sql, statement.params, read_only=read_only)
        )

    def plan(self, statements: list[Statement], mode: str, where: str) -> None:
        """A dry run: the statements are recorded as planned, none is executed (their transaction
        blocks are still checked, so a dry run refuses what a real run would)."""
        transaction_blocks(statements, mode, where=where)
        self.actions.extend(Action(s.sql, "planned") for s in statements)

    def run(self, statements: list[Statement], mode: str, where: str, *, retry: bool = True) -> Outcome:
        """Run one step's statements in `mode` (`none`: each autocommits, explicit BEGIN … COMMIT
        blocks aside; `per_step`: one transaction). Each transaction (or autocommitted statement)
        is retried on its own unless `retry` is false (the caller retries the whole step)."""
        total, last = 0, None
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
            rows, last_row = self.with_retries(attempt) if retry else attempt()
            total += rows
            last = last_row if last_row is not None else last
        return total, last

    def with_retries(self, attempt: Callable[[], T]) -> T:
        """`attempt`, tried again after a transient error (lock timeout, deadlock, lost connection)
        up to `max_attempts` times, with backoff; only the final attempt's actions are kept."""
        for number in range(1, self.max_attempts + 1):
            self.attempts = max(self.attempts, number)
            mark = len(self.actions)
            try:
                outcome = attempt()
            except psycopg.Error as exc:
                if not db.is_transient(exc) or number == self.max_attempts:
                    self.count_attempts(mark, number)
                    raise
                del self.actions[mark:]
                self.before_retry(number)
                continue
            self.count_attempts(mark, number)
            return outcome
        raise AssertionError("unreachable")

    def before_retry(self, failed_attempt: int) -> None:
        """Wait out the backoff; replace the work connection if the failure took it down."""
        self.check_cancel()
        time.sleep(self.backoff(failed_attempt))
        conn = self.connection()
        if conn.closed or conn.broken:
            self.reconnect()

    def count_attempts(self, mark: int, attempts: int) -> None:
        """The actions recorded since `mark` took `attempts` tries."""
        self.attempts = max(self.attempts, attempts)
        for action in self.actions[mark:]:
            action.attempts = attempts

    # -- one transaction ------------------------------------------------------------------------

    def _one(self, statement: Statement) -> Outcome:
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
            self.actions.append(action)
            raise
        action.seconds = time.monotonic() - started
        action.rows = rows
        self.actions.append(action)
        return rows, last

    def _explicit_transaction(self, block: list[Statement]) -> Outcome:
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
            for number, statement in enumerate(block):
                action = Action(statement.sql, "failed" if number == failed else "skipped")
                if number == failed:
                    action.sqlstate = db.sqlstate_of(exc)
                    action.seconds = time.monotonic() - started
                self.actions.append(action)
            raise
        seconds = time.monotonic() - started
        total, last = 0, None
        for statement, cursor in zip(block, cursors, strict=True):
            action = Action(statement.sql, "ok")
            if statement.control is None:
                action.rows, last_row = outcome_of(cursor)
                total += action.rows
                last = last_row if last_row is not None else last
            elif statement.control == "commit":
                action.seconds = seconds
            self.actions.append(action)
        return total, last

    def _transaction(self, statements: list[Statement]) -> Outcome:
        total, last = 0, None
        mark = len(self.actions)
        try:
            with self.connection().transaction():
                for statement in statements:
                    rows, row = self._one(statement)
                    total += rows
                    last = row if row is not None else last
        except psycopg.Error:
            # The whole transaction rolled back: statements that "succeeded" in it did not happen.
            for action in self.actions[mark:]:
                if action.status == "ok":
                    action.status = "skipped"
            raise
        return total, last


def outcome_of(cursor: psycopg.RawCursor[dict[str, Any]]) -> Outcome:
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

"""One run of one unit for one (job, target, item): the careful machine every front door calls.

Order of a run: connect → refuse a connection through a pooler (exit 2) → refuse on a replica →
take the (job, target, item) advisory lock → set timeouts → resolve table params → discover → one
step per finding (apply, retried on transient errors) → verify → report → write the ledger. A dry
run (`plan`, `trigger --dry-run`) runs discover inside a READ ONLY transaction, renders the apply
steps without executing them, and writes nothing, not even the ledger.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psycopg

from maintainer import context as render_context
from maintainer import db, pooler
from maintainer.errors import RunFailed
from maintainer.executor import Executed, Executor, StatementsFailed, merge_actions
from maintainer.ledger import Ledger
from maintainer.pacing import Pacer, Throttled
from maintainer.project import RunSpec
from maintainer.render import ArgValue, RenderError
from maintainer.results import Action, RunResult, json_safe, merge_findings
from maintainer.session import Session, retry_delay, timeouts_of
from maintainer.survey import LOCK_HELD, Surveyed, settle, survey_items
from maintainer.units import (
    Statement,
    UnitError,
    render_select,
    render_statements,
)
from maintainer.values import QualifiedName

log = logging.getLogger("maintainer")

T = TypeVar("T")

DEFAULT_FORECAST_WINDOW = dt.timedelta(days=7)  # for a unit that has no `forecast_window` param


@dataclass
class Progress:
    """Reported after every batch of a repeated step (manual runs draw a progress bar from it)."""

    step: int
    steps: int
    iterations: int
    rows: int
    estimate: int | None
    elapsed: float


@dataclass
class RunOptions:
    trigger: str = "manual"  # manual | schedule | http
    args: Mapping[str, ArgValue] = field(default_factory=dict)
    dry_run: bool = False
    progress: Callable[[Progress], None] | None = None
    cancel: threading.Event | None = None  # set by SIGTERM: stop at the next safe point
    # Called once the advisory lock is held, before the run is recorded; a returned reason skips the
    # run (recorded as skipped). The daemon uses it to run a scheduled tick once across replicas and
    # to check in to Sentry Crons from the lock holder only.
    on_locked: Callable[[Ledger], str | None] | None = None
    # Called with every work connection the run opens (reconnects too), so a daemon shutting down can
    # cancel a statement that outlives its grace period.
    on_connect: Callable[[psycopg.Connection[Any]], None] | None = None
    # Hears what pacing waits for ("waiting: standby … replays 42 s behind"), None when it stops waiting.
    on_wait: Callable[[str | None], None] | None = None


@dataclass
class StepRecord:
    """One step's record as it runs: its actions (one per statement position for a repeated step,
    see `merge_actions`) and how many of its batches changed rows."""

    actions: list[Action] = field(default_factory=list)
    batches: int = 0

    def committed_rows(self) -> int:
        return sum(a.rows or 0 for a in self.actions if a.status == "ok")


class Runner(Protocol):
    """What runs one item: `run`, or the daemon's wrapper around it that tracks the run."""

    def __call__(
        self, spec: RunSpec, options: RunOptions, *, session: Session | None = None, surveyed: Surveyed | None = None
    ) -> RunResult: ...


def run_all(
    specs: list[RunSpec],
    options: Callable[[RunSpec], RunOptions] | RunOptions,
    *,
    runner: Runner | None = None,
) -> list[RunResult]:
    """Run several specs in order, sharing one session per target (see `Session`).

    Before the first item of a (job, target) whose unit has a `survey` block, the survey looks at
    all of that group's items in one query; the items it vouches for record its finding instead of
    running their own discovery (`runner` defaults to `run`; the daemon wraps it to track runs).

    A job with `lanes: N` runs the items of each group in N lanes, each with a session of its own:
    while one lane's transaction runs, the others take their next item's lock, record it, read the
    catalog and render. The lanes' transactions on a target take turns (`Session.step_turn`), so
    the target never runs two of the job's transactions at once.
    """
    sessions: dict[str, Session] = {}
    all_options = [options(spec) if callable(options) else options for spec in specs]
    surveyed: dict[int, Surveyed] = {}
    surveyed_groups: set[tuple[str, str]] = set()
    results: list[RunResult | None] = [None] * len(specs)
    groups: dict[tuple[str, str], list[int]] = {}
    for number, spec in enumerate(specs):
        groups.setdefault((spec.job.name, spec.target_name), []).append(number)
    try:
        for number, (spec, opts) in enumerate(zip(specs, all_options, strict=True)):
            if results[number] is not None:
                continue  # ran in lanes with the rest of its group
            if opts.cancel is not None and opts.cancel.is_set():
                break
            session = sessions.setdefault(spec.target_name, Session())
            group = (spec.job.name, spec.target_name)
            members = groups[group]
            if spec.unit.has_block("survey") and group not in surveyed_groups:
                surveyed_groups.add(group)
                pairs = [(specs[i], all_options[i]) for i in members]
                found = survey_items([s for s, _ in pairs], opts, session)
                for index, settled in settle(pairs, found, session).items():
                    surveyed[members[index]] = settled
            if spec.job.lanes > 1 and len(members) > 1:
                lanes = _Lanes(specs, all_options, surveyed, runner or run, results)
                lanes.run(members, session, spec.job.lanes)
                continue
            results[number] = (runner or run)(spec, opts, session=session, surveyed=surveyed.get(number))
    finally:
        for session in sessions.values():
            session.close()
    return [result for result in results if result is not None]


@dataclass
class _Lanes:
    """The items of one (job, target) group, run by several lanes that take them in order."""

    specs: list[RunSpec]
    options: list[RunOptions]
    surveyed: dict[int, Surveyed]
    runner: Runner
    results: list[RunResult | None]

    def run(self, members: list[int], session: Session, lanes: int) -> None:
        """Lane 1 is this thread with the group's `session`; the others get sessions of their own
        that share its step turn, and end with the group."""
        pending = collections.deque(members)
        others = [Session(step_turn=session.step_turn) for _ in range(min(lanes, len(members)) - 1)]
        try:
            with concurrent.futures.ThreadPoolExecutor(max(len(others), 1), thread_name_prefix="lane") as pool:
                futures = [pool.submit(self._lane, pending, own) for own in others]
                self._lane(pending, session)
                for future in futures:
                    future.result()  # a lane's crash (a bug: runs never raise) is the caller's
        finally:
            for own in others:
                own.close()

    def _lane(self, pending: collections.deque[int], session: Session) -> None:
        while True:
            try:
                number = pending.popleft()  # atomic: each item goes to one lane
            except IndexError:
                return
            opts = self.options[number]
            if opts.cancel is not None and opts.cancel.is_set():
                return
            try:
                self.results[number] = self.runner(self.specs[number], opts, session=session,
                                                   surveyed=self.surveyed.get(number))
            except BaseException:
                pending.clear()  # Ctrl-C, or a bug: the other lanes end with their current item
                raise


class Cancelled(Exception):
    pass


def run(
    spec: RunSpec,
    options: RunOptions | None = None,
    *,
    session: Session | None = None,
    surveyed: Surveyed | None = None,
) -> RunResult:
    """Run (or plan) one unit on one target for one item; never raises for run-time problems.

    `session`: connections shared with the other items of the same (job, target) (None: a fresh
    pair). `surveyed`: what `run_all` settled for an item the unit's survey vouched for (nothing
    to do), recorded instead of a full run."""
    return _Run(spec, options or RunOptions(), session, surveyed).execute()


class _Run:
    def __init__(self, spec: RunSpec, options: RunOptions, session: Session | None, surveyed: Surveyed | None) -> None:
        self.spec = spec
        self.opts = options
        self.unit = spec.unit
        self.result = RunResult(
            spec.job.name,
            spec.unit.name,
            spec.target_name,
            spec.item,
            trigger=options.trigger,
            display=spec.unit.meta.display,
        )
        self.lock_timeout, self.statement_timeout = timeouts_of(spec)
        self.lock_key = spec.lock_key
        self.conn: psycopg.Connection[Any] | None = None
        self.ledger: Ledger | None = None
        self.recorded = False
        self.history = render_context.LazyRuns(list)  # earlier runs a forecast reads (see `_context`)
        self.locked = False
        self.owns_session = session is None
        self.session = session or Session()
        self.surveyed = surveyed
        self.pacer = Pacer(None if options.dry_run else spec.throttle, cancel=options.cancel, on_wait=self._waiting)
        self.throttle_stop: str | None = None  # why pacing stopped the run at a safe point
        self.executor = Executor(
            connection=self._work_conn,
            reconnect=self._reconnect,
            max_attempts=spec.settings.defaults.max_attempts,
            backoff=functools.partial(retry_delay, spec),
            check_cancel=self._check_cancel,
            turn=self.session.step_turn,
        )

    # -- top level ------------------------------------------------------------------------------

    def execute(self) -> RunResult:
        try:
            self._execute()
        except RunFailed as exc:
            self._fail(str(exc), exc.sqlstate)
        except Cancelled:
            self._fail("cancelled: the daemon is shutting down", None)
        except (RenderError, UnitError) as exc:
            self._fail(str(exc), None)
        except pooler.PoolerDetected as exc:
            self.result.refused = True  # configuration, not a failed run: exit code 2
            self._fail(str(exc), None)
        except db.TargetUnavailable as exc:
            self._fail(f"target {self.spec.target_name!r} unreachable: {exc}", None)
        except psycopg.Error as exc:
            self._fail(self._describe(exc), db.sqlstate_of(exc))
        finally:
            self.result.finished_at = dt.datetime.now(dt.UTC)
            self.result.attempts = max(self.executor.attempts, 1)
            self._close()
        return self.result

    def _execute(self) -> None:
        spec, unit = self.spec, self.unit
        if spec.target.pooled and unit.meta.ddl:
            self.result.refused = True
            raise RunFailed(
                f"target {spec.target_name!r} is declared pooled; unit {unit.name!r} runs DDL and needs a direct "
                "connection (set a direct dsn for this target)"
            )
        if self.surveyed is not None:
            self._execute_surveyed(self.surveyed)
            return
        self.conn = self._connect()
        # Every query on the work connection survives a restart or failover (a new connection, the
        # lock again), like the blocks' own: here, before the lock and right after the ledger record.
        if self.executor.with_retries(lambda: self.session.in_recovery(self._work_conn())):
            self._skip("target is a replica in recovery; maintenance runs on the primary only")
            return
        if not self.opts.dry_run:
            self._open_ledger()
            if not self.executor.with_retries(lambda: self._start_session(lock=True)):
                self._skip(LOCK_HELD)
                self._record_skip()
                return
            self.locked = True
            on_locked = self.opts.on_locked
            reason = self._write_ledger(on_locked) if on_locked is not None else None
            if reason:
                self._skip(reason)
                self._record_skip()
                return
            self.result.run_id = self._write_ledger(
                lambda ledger: ledger.start_run(
                    job=spec.job.name,
                    unit=unit.name,
                    target=spec.target_name,
                    item=spec.item_label,
                    lock_key=self.lock_key,
                    trigger=self.opts.trigger,
                    params=spec.logged_params,
                )
            )
        else:
            self.executor.with_retries(lambda: self._start_session(lock=False))
        context = self._context()
        context["prepared"] = self._prepare(context)
        discovered = self._discover(context)
        step_rows = [r for r in discovered if r.get("action", True) not in (False, None)]
        step_outcomes = self._apply(context, step_rows)
        self._after(context, discovered, step_outcomes)
        self._verify(render_context.after_steps_context(context, discovered, step_outcomes))
        findings = self._report(context, discovered, step_outcomes)
        self.result.findings = [json_safe(f) for f in findings]
        self.result.throttled_seconds = {k: round(v, 3) for k, v in self.pacer.waited.items()}
        if self.throttle_stop is not None:
            self.result.findings.append(
                {"throttled": self.throttle_stop, self.unit.level_field or "level": "warn",
                 "waited_seconds": round(self.pacer.total_waited, 3)}
            )
        if self.result.status != "failed":
            self.result.status = "planned" if self.opts.dry_run else "ok"
        self._record()

    def _execute_surveyed(self, surveyed: Surveyed) -> None:
        """`run_all` already took this item's lock, asked `on_locked` and recorded it (see `_settle`)."""
        self.result.findings = [json_safe(surveyed.finding)] if surveyed.status != "skipped" else []
        self.result.status = surveyed.status
        self.result.reason = surveyed.reason
        self.result.run_id = surveyed.run_id

    # -- connection and ledger ------------------------------------------------------------------

    def _connect(self, fresh: bool = False) -> psycopg.Connection[Any]:
        return self.session.work_connection(self.spec, fresh=fresh, on_connect=self.opts.on_connect)

    def _open_ledger(self) -> None:
        """The ledger's connection, opened and its schema checked (see `_write_ledger`)."""
        self._write_ledger(lambda _ledger: None)

    def _write_ledger(self, write: Callable[[Ledger], T]) -> T:
        """A ledger write, tried again over a new ledger connection when the old one was lost (the
        work connection recovers from a restart or failover by itself; the record must too). Every
        ledger write is safe to repeat: a start that went through unacknowledged is marked
        interrupted by the repeat, a finish only completes a record that is not finished yet."""
        attempts = self.spec.settings.defaults.max_attempts
        for number in range(1, attempts + 1):
            try:
                self.ledger = self.session.ledger(self.spec)
                return write(self.ledger)
            except psycopg.Error as exc:
                if number == attempts or not db.is_transient(exc):
                    raise
                time.sleep(retry_delay(self.spec, number))
        raise AssertionError("unreachable")

    def _reconnect(self) -> None:
        """After a lost connection: new session, same timeouts, and the advisory lock again."""
        self.conn = self._connect(fresh=True)
        if not self._start_session(lock=self.locked):
            self.locked = False
            raise RunFailed("lost the connection and another runner took the lock meanwhile")

    def _start_session(self, *, lock: bool) -> bool:
        """The run's timeouts on the work connection and, with `lock`, its advisory lock in the same
        round trip; False when another runner holds the lock."""
        assert self.conn is not None
        if lock:
            return db.lock_with_timeouts(self.conn, self.lock_key, lock_timeout=self.lock_timeout,
                                         statement_timeout=self.statement_timeout)
        db.set_timeouts(self.conn, lock_timeout=self.lock_timeout, statement_timeout=self.statement_timeout)
        return True

    def _close(self) -> None:
        if self.conn is not None and not self.conn.closed and self.locked:
            try:
                self.session.release(self.conn, self.lock_key)
            except psycopg.Error:
                # Cannot tell whether the lock is gone: end the session, which releases it for sure.
                self.conn.close()
        if self.owns_session:
            self.session.close()

    # -- phases ---------------------------------------------------------------------------------

    def _context(self) -> dict[str, Any]:
        run = render_context.run_context(
            target=self.spec.target_name, job=self.spec.job.name, state_schema=self.spec.settings.state_schema,
            args=self.opts.args, dry_run=self.opts.dry_run,
        )
        extensions, ledger_exists = self._catalog_facts()
        self.history = render_context.LazyRuns(self._history) if ledger_exists else render_context.LazyRuns(list)
        return render_context.item_context(
            run, self.spec.params, extensions=extensions, ledger_exists=ledger_exists, history=self.history,
            cooldowns=self._cooldowns() if ledger_exists else {},
        )

    def _cooldowns(self) -> dict[str, dt.datetime]:
        """A unit with `cooldown` front matter: when each object last got its decision (see
        `CooldownSpec`), read on the work connection so that a dry run sees it too."""
        spec = self.unit.meta.cooldown
        if spec is None:
            return {}
        within = self.spec.params[spec.within]
        return self.executor.with_retries(
            lambda: self._ledger_on_work_conn().recent_decisions(spec.key, spec.decision, within=within)
        )

    def _observed_since(self, observed: Mapping[str, Any] | None) -> tuple[int, dt.timedelta] | None:
        """The newest earlier run a forecast reads: this run's record keeps where each observed key's
        stretch began from it. No observation, no question; otherwise `history` is read here if no
        block looked at it."""
        if not observed or not self.history:
            return None
        return self.history[-1]["run_id"], self._forecast_window()

    def _forecast_window(self) -> dt.timedelta:
        window = self.spec.params.get("forecast_window")
        return window if isinstance(window, dt.timedelta) else DEFAULT_FORECAST_WINDOW

    def _history(self) -> list[dict[str, Any]]:
        """A forecasting unit's (one with `forecast` front matter) earlier runs: one ledger query per
        run, read on the work connection so that a dry run sees them too and writes nothing."""
        if self.unit.meta.forecast is None:
            return []
        return self.executor.with_retries(lambda: self._ledger_on_work_conn().forecast_runs(
            self.spec.job.name, self.spec.target_name, self.spec.item_label, window=self._forecast_window(),
        ))

    def _ledger_on_work_conn(self) -> Ledger:
        """The ledger read through the current work connection (a new one after a reconnect)."""
        return Ledger(self._work_conn(), self.spec.settings.state_schema)

    def _catalog_facts(self) -> tuple[dict[str, Any], bool]:
        """Read in one query: whether every `table` param names an existing relation (else fail
        clearly before doing anything), and what a unit may adapt its SQL to at render time (a
        SELECT naming a missing function or table fails when parsed): installed extensions, and
        whether the ledger tables exist yet (a dry run on a target that never ran a job has none)."""
        tables = [
            (name, value)
            for name, spec in self.unit.meta.params.items()
            if spec.type == "table" and isinstance(value := self.spec.params.get(name), QualifiedName)
        ]
        ledger = (self.spec.settings.state_schema, "finding")
        relations: list[tuple[str, ...]] = [ledger, *((value.schema, value.name) for _, value in tables)]
        extensions, (ledger_exists, *tables_exist) = self.executor.with_retries(
            lambda: db.catalog_facts(self._work_conn(), relations)
        )
        for (name, value), exists in zip(tables, tables_exist, strict=True):
            if not exists:
                raise RunFailed(f"{name}: table {value} does not exist on target {self.spec.target_name!r}")
        return extensions, ledger_exists

    def _prepare(self, context: dict[str, Any]) -> dict[str, Any]:
        """`prepare`: one SELECT before discover; its first row (`prepared`) lets discover name what
        it must read directly, e.g. a partition found in the catalog (emitted through `ident`)."""
        if not self.unit.has_block("prepare"):
            return {}
        rows = self._select("prepare", context, read_only=self.opts.dry_run)
        return rows[0] if rows else {}

    def _discover(self, context: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.unit.has_block("discover"):
            return [{}] if self.unit.has_block("apply") else []
        return self._select("discover", context, read_only=self.opts.dry_run)

    def _apply(self, context: dict[str, Any], step_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        outcomes: list[dict[str, Any]] = []
        if not self.unit.has_block("apply"):
            return outcomes
        for index, row in enumerate(step_rows):
            self._check_cancel()
            if self.unit.meta.ddl and self.unit.meta.repeat is None and not self._pace():
                break  # the step never started: the next run finds it again
            outcome = {"row": row, "status": "planned" if self.opts.dry_run else "ok", "rows": 0, "batches": 0}
            outcomes.append(outcome)
            step = StepRecord()
            try:
                outcome["rows"] = self._run_step(context, row, step, index, len(step_rows))
            except (RunFailed, psycopg.Error) as exc:
                outcome["status"] = "failed"
                outcome["rows"] = step.committed_rows()  # what it changed before it failed
                if self.unit.meta.on_step_error == "continue":
                    self._note_failure(exc)
                    continue
                raise
            finally:
                outcome["batches"] = step.batches
                self.result.actions.extend(step.actions)
            if self.throttle_stop is not None:
                break  # a repeated step stopped between batches: what it committed stands
        return outcomes

    def _pace(self) -> bool:
        """Wait while the target's standbys are behind (see `pacing`); False when waiting longer
        than `max_wait` stopped the run here, at a safe point."""
        try:
            self.executor.with_retries(lambda: self.pacer.wait(self._work_conn(), self._check_cancel))
        except Throttled as exc:
            self.throttle_stop = str(exc)
            return False
        return True

    def _waiting(self, message: str | None) -> None:
        if message is not None:
            log.info(f"{self.spec.job.name} on {self.spec.target_name}: {message}",
                     extra={"job": self.spec.job.name, "target": self.spec.target_name})
        if self.opts.on_wait is not None:
            self.opts.on_wait(message)

    def _work_conn(self) -> psycopg.Connection[Any]:
        assert self.conn is not None
        return self.conn

    def _run_step(self, context: dict[str, Any], row: dict[str, Any], step: StepRecord, index: int, count: int) -> int:
        step_context = render_context.step_context(context, row)
        if not self.opts.dry_run and self.unit.meta.repeat is None and self.unit.has_block("recheck"):
            return self._run_rechecked(step_context, step)
        if self.opts.dry_run or self.unit.meta.repeat is None:
            done = self._execute_statements(self._render("apply", step_context), step)
            step.batches = 1 if done.rows else 0
            return done.rows
        return self._run_repeated(step_context, row, step, index, count)

    def _run_rechecked(self, context: dict[str, Any], step: StepRecord) -> int:
        """A step of a unit with a `recheck` block: after a transient failure the step is not resumed
        statement by statement but looked at again. `recheck` (one SELECT, with the step's `row`)
        says what is true now: no row = the step's work is done (its last statement went through but
        the acknowledgement was lost); a row whose `action` is false = do not try again (the step
        fails with its error); otherwise the row's columns update `row` and the step is rendered and
        run again from its first statement. So a non-idempotent statement is never blindly repeated,
        a timed-out DETACH CONCURRENTLY is finalized rather than detached twice, and a REINDEX
        CONCURRENTLY drops its own half-built copy before building another."""
        attempts = self.spec.settings.defaults.max_attempts
        row = context["row"]
        for number in range(1, attempts + 1):
            statements = self._render("apply", render_context.step_context(context, row))
            try:
                done = self.executor.run(statements, self.unit.meta.transaction, self._where("apply"), retry=False)
            except StatementsFailed as failed:
                # The failed attempt's actions stay in the record: what it did is part of what the
                # recheck finds.
                step.actions += self.executor.took(failed.actions, number).actions
                if not db.is_transient(failed.error) or number == attempts:
                    raise failed.error from None
                self.executor.before_retry(number)
                now = self._select("recheck", render_context.step_context(context, row), read_only=False)
                if not now:
                    return 0
                if now[0].get("action", True) in (False, None):
                    raise failed.error from None
                row = {**row, **now[0]}
                continue
            step.actions += self.executor.took(done, number).actions
            return done.rows
        raise AssertionError("unreachable")

    def _run_repeated(self, context: dict[str, Any], row: dict[str, Any], step: StepRecord, index: int,
                      count: int) -> int:
        """`repeat: until_zero_rows`: batches until one touches nothing; `prev` carries the keyset cursor."""
        pause = self.spec.params.get("pause")
        pause_seconds = pause.total_seconds() if isinstance(pause, dt.timedelta) else 0.0
        started = time.monotonic()
        total = 0
        for iteration in range(1, self.unit.meta.max_iterations + 1):
            self._check_cancel()
            if not self._pace():
                break
            statements = self._render("apply", {**context, "prev": context["prev"]})
            try:
                done = self.executor.run(statements, self.unit.meta.transaction, self._where("apply"))
            except StatementsFailed as failed:
                step.actions += failed.actions  # after the committed batches, the failed one as it ran
                raise failed.error from None
            # The step's record is complete after every batch: if a later batch fails or the run is
            # cancelled, the ledger still shows the rows the committed batches changed.
            step.actions = merge_actions(step.actions, done.actions, iteration)
            total += done.rows
            if done.rows:
                step.batches += 1  # batches that changed something, committed so far
            context["prev"] = done.last
            if self.opts.progress is not None:
                estimate = row.get("estimate")
                self.opts.progress(
                    Progress(
                        index + 1,
                        count,
                        iteration,
                        total,
                        int(estimate) if estimate is not None else None,
                        time.monotonic() - started,
                    )
                )
            if done.rows == 0:
                break
            if pause_seconds:
                time.sleep(pause_seconds)
        return total

    def _after(self, context: dict[str, Any], discovered: list[dict[str, Any]], outcomes: list[dict[str, Any]]) -> None:
        """Once after all steps, autocommit (VACUUM, ANALYZE): `steps` says what happened."""
        if not self.unit.has_block("after") or self.result.status == "failed":
            return
        statements = self._render("after", render_context.after_steps_context(context, discovered, outcomes))
        record = StepRecord()
        try:
            self._execute_statements(statements, record, "after")
        finally:
            self.result.actions.extend(record.actions)

    def _verify(self, context: dict[str, Any]) -> None:
        if self.opts.dry_run or not self.unit.has_block("verify") or self.result.status == "failed":
            return
        if self.throttle_stop is not None:
            return  # stopped on purpose before the work was done: the next run finishes and verifies
        failures = self._select("verify", context, read_only=False)
        if failures:
            self.result.status = "failed"
            self.result.error = f"verify: {len(failures)} check(s) failed"
            self.result.findings.extend({"verify_failed": True, **f} for f in failures)

    def _report(
        self, context: dict[str, Any], discovered: list[dict[str, Any]], outcomes: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        if not self.unit.has_block("report"):
            return discovered if self.unit.has_block("discover") else []
        report_context = render_context.after_steps_context(context, discovered, outcomes)
        rows = self._select("report", report_context, read_only=self.opts.dry_run)
        spec = self.unit.meta.report
        if spec is None:
            return rows
        return merge_findings(discovered, rows, spec.merge_on, spec.omit)

    # -- statements -----------------------------------------------------------------------------

    def _render(self, block: str, context: Mapping[str, Any]) -> list[Statement]:
        return render_statements(self.unit, block, context)

    def _select(self, block: str, context: Mapping[str, Any], *, read_only: bool) -> list[dict[str, Any]]:
        """A one-SELECT block's rows; a SELECT changes nothing, so a transient failure (a restart,
        a lock timeout on a catalog) is simply tried again."""
        return self.executor.select(render_select(self.unit, block, context), read_only=read_only)

    def _execute_statements(self, statements: list[Statement], step: StepRecord, block_name: str = "apply") -> Executed:
        """Run one step's statements (or only plan them in a dry run), recording them in `step`.
        `after` always runs outside a transaction (VACUUM cannot run in one), like
        `transaction: none`."""
        mode = "none" if block_name == "after" else self.unit.meta.transaction
        if self.opts.dry_run:
            step.actions += self.executor.plan(statements, mode, self._where(block_name))
            return Executed()
        try:
            done = self.executor.run(statements, mode, self._where(block_name))
        except StatementsFailed as failed:
            step.actions += failed.actions
            raise failed.error from None
        step.actions += done.actions
        return done

    def _where(self, block_name: str) -> str:
        return f"{self.unit.path.name} ({block_name}): "

    # -- outcome --------------------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self.opts.cancel is not None and self.opts.cancel.is_set():
            raise Cancelled()

    def _describe(self, exc: BaseException) -> str:
        message = db.error_summary(exc, sensitive=self.unit.meta.sensitive,
                                   trusted=self.unit.meta.trusted_messages)
        # Untrusted arguments (a user id, an email to erase) must not reach the ledger or alerts.
        for value in self.opts.args.values():
            if value and len(value) >= 2:
                message = message.replace(value, "<arg>")
        return message

    def _note_failure(self, exc: BaseException) -> None:
        self.result.status = "failed"
        if self.result.error is None:
            self.result.error = str(exc) if isinstance(exc, RunFailed) else self._describe(exc)
            self.result.sqlstate = db.sqlstate_of(exc)

    def _fail(self, message: str, sqlstate: str | None) -> None:
        self.result.status = "failed"
        self.result.error = message
        self.result.sqlstate = sqlstate
        self._record()

    def _skip(self, reason: str) -> None:
        self.result.status = "skipped"
        self.result.reason = reason

    def _record(self) -> None:
        """Complete the run's ledger record with its outcome, actions and findings. The record is
        the audit trail (an erasure's only proof) and what cooldowns and reports read: when it
        cannot be written even after reconnecting, the run says so and counts as failed."""
        if self.ledger is None or self.result.run_id is None or self.recorded:
            return
        self.recorded = True
        run_id = self.result.run_id
        summary = {"throttled_seconds": self.result.throttled_seconds} if self.result.throttled_seconds else None

        observed = self.unit.observations(self.result.findings) if self.result.status == "ok" else None

        def finish(ledger: Ledger, record: int) -> bool:
            return ledger.finish_run(
                record,
                status=self.result.status,
                attempts=max(self.executor.attempts, 1),
                sqlstate=self.result.sqlstate,
                error=self.result.error,
                actions=[a.to_json() | {"attempts": a.attempts} for a in self.result.actions],
                findings=self.result.findings,
                summary=summary,
                level_field=self.unit.level_field,
                observed=observed,
                observed_since=self._observed_since(observed),
            )

        try:
            if not self._write_ledger(lambda ledger: finish(ledger, run_id)):
                # The start record is gone: written on a primary whose last commits the failover lost.
                # The run happened all the same; it gets a record of its own on this server.
                log.warning(f"{self.spec.job.name} on {self.spec.target_name}: run {run_id} has no ledger record on "
                            "this server (lost in a failover?); recording it anew",
                            extra={"job": self.spec.job.name, "target": self.spec.target_name})
                self.result.run_id = run_id = self._write_ledger(
                    lambda ledger: ledger.start_run(
                        job=self.spec.job.name, unit=self.unit.name, target=self.spec.target_name,
                        item=self.spec.item_label, lock_key=self.lock_key, trigger=self.opts.trigger,
                        params=self.spec.logged_params,
                    )
                )
                self._write_ledger(lambda ledger: finish(ledger, run_id))
        except (psycopg.Error, db.TargetUnavailable) as exc:
            problem = db.error_summary(exc) if isinstance(exc, psycopg.Error) else str(exc)
            log.error(
                f"{self.spec.job.name} on {self.spec.target_name}: run {run_id} could not be recorded in the "
                f"ledger: {problem}",
                extra={"job": self.spec.job.name, "target": self.spec.target_name},
            )
            note = f"the ledger record of run {run_id} could not be written: {problem}"
            self.result.status = "failed"
            self.result.error = f"{self.result.error}; {note}" if self.result.error else note
            return
        with contextlib.suppress(psycopg.Error, db.TargetUnavailable):
            # Old history can go next time; it never decides this run's outcome.
            self.session.purge_once(self.session.ledger(self.spec), self.spec)

    def _record_skip(self) -> None:
        if self.ledger is None or self.recorded:
            return
        self.recorded = True
        with contextlib.suppress(psycopg.Error, db.TargetUnavailable):
            self._write_ledger(
                lambda ledger: ledger.start_run(
                    job=self.spec.job.name,
                    unit=self.unit.name,
                    target=self.spec.target_name,
                    item=self.spec.item_label,
                    lock_key=self.lock_key,
                    trigger=self.opts.trigger,
                    params={},
                    status="skipped",
                    reason=self.result.reason,
                )
            )


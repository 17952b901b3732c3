"""The survey path: one query over all the items of a (job, target) instead of one run each.

A unit's `survey` block looks at every item of a job at once and vouches for those with nothing to
do (`survey_items`); `settle` locks, checks and records those items in one batch. Everything else,
and everything when the survey fails, runs in full (`runner.run`). A survey is only a shortcut.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from maintainer import context as render_context
from maintainer import db, pooler
from maintainer.errors import MaintainerError
from maintainer.ledger import IdleRun
from maintainer.project import RunSpec
from maintainer.results import Status
from maintainer.session import Session, timeouts_of
from maintainer.units import render_select

if TYPE_CHECKING:
    from maintainer.runner import RunOptions

log = logging.getLogger("maintainer")

LOCK_HELD = "another runner holds the lock for this job, target and item"


@dataclass
class Surveyed:
    """An item the survey vouched for, already locked, checked and recorded by `run_all` in one batch
    with the rest of its job: its run only reports this."""

    finding: dict[str, Any]
    status: Status = "planned"  # ok | skipped | planned (dry run)
    reason: str | None = None
    run_id: int | None = None


def survey_items(specs: list[RunSpec], options: RunOptions, session: Session) -> dict[int, dict[str, Any]]:
    """Run the unit's `survey` block once over the items of one (job, target).

    The block gets `items` (`index`, `params`, `item`) and returns one row per item it can prove has
    nothing to do, carrying `item` (the index) and that item's finding. A survey is only ever a
    shortcut: when it fails, or on a replica, every item runs in full and meets the problem there.
    """
    unit, first = specs[0].unit, specs[0]
    try:
        conn = session.work_connection(first, on_connect=options.on_connect)
        if session.in_recovery(conn):
            return {}
        lock_timeout, statement_timeout = timeouts_of(first)
        db.set_timeouts(conn, lock_timeout=lock_timeout, statement_timeout=statement_timeout)
        run = render_context.run_context(
            target=first.target_name, job=first.job.name, state_schema=first.settings.state_schema,
            args=options.args, dry_run=options.dry_run,
        )
        items = [{"index": i, "params": s.params, "item": s.item_label} for i, s in enumerate(specs)]
        context = render_context.survey_context(run, items)
        statement = render_select(unit, "survey", context)
        rows = db.query(conn, statement.sql, statement.params, read_only=True)
    except pooler.PoolerDetected:
        return {}  # every item meets the refusal when it runs
    except (MaintainerError, psycopg.Error) as exc:  # a run failure, a unit, a render, the target
        problem: object = exc
        if isinstance(exc, psycopg.Error):
            problem = db.error_summary(exc, sensitive=unit.meta.sensitive, trusted=unit.meta.trusted_messages)
        log.warning(
            f"{first.job.name} on {first.target_name}: survey failed, every item runs in full: {problem}",
            extra={"job": first.job.name, "target": first.target_name},
        )
        return {}
    found: dict[int, dict[str, Any]] = {}
    for row in rows:
        index = row.pop("item", None)
        if isinstance(index, int) and 0 <= index < len(specs):
            found[index] = row
    return found


def settle(
    members: list[tuple[RunSpec, RunOptions]], found: dict[int, dict[str, Any]], session: Session
) -> dict[int, Surveyed]:
    """Lock, check (`on_locked`) and record the vouched-for items of a group in one batch: one
    statement takes their advisory locks, one writes their ledger records, one releases the locks,
    instead of a full run each. Anything going wrong here leaves them to run in full."""
    if not found:
        return {}
    first, options = members[0]
    if options.dry_run:
        return {index: Surveyed(finding) for index, finding in found.items()}
    assert session.conn is not None
    indexes = sorted(found)
    keys = [members[i][0].lock_key for i in indexes]
    conn = session.conn
    settled: dict[int, Surveyed] = {}
    try:
        ledger = session.ledger(first)
        got = db.try_advisory_locks(conn, keys)
        try:
            records = []
            for index, key, locked in zip(indexes, keys, got, strict=True):
                spec, opts = members[index]
                reason = None
                if not locked:
                    reason = LOCK_HELD
                elif opts.on_locked is not None:
                    reason = opts.on_locked(ledger)
                settled[index] = Surveyed(found[index], "skipped" if reason else "ok", reason)
                records.append(IdleRun(
                    job=spec.job.name, unit=spec.unit.name, target=spec.target_name, item=spec.item_label,
                    lock_key=key, trigger=opts.trigger, params=spec.logged_params,
                    status=settled[index].status, reason=reason, finding=found[index] if not reason else None,
                    level_field=spec.unit.level_field,
                    observed=spec.unit.observations([found[index]]) if not reason else None,
                ))
            for index, run_id in zip(indexes, ledger.record_idle_runs(records), strict=True):
                settled[index].run_id = run_id
            session.purge_once(ledger, first)
        finally:
            db.advisory_unlocks(conn, [key for key, locked in zip(keys, got, strict=True) if locked])
    except (psycopg.Error, db.TargetUnavailable) as exc:
        log.warning(f"{first.job.name} on {first.target_name}: recording the surveyed items failed, they run in full:"
                    f" {db.error_summary(exc) if isinstance(exc, psycopg.Error) else exc}",
                    extra={"job": first.job.name, "target": first.target_name})
        return {}
    return settled

"""`maintainer run`: the daemon — APScheduler, the HTTP endpoints, signals and reloads.

One APScheduler job per scheduled (job, target), UTC cron, `max_instances=1` and `coalesce=True`
(a slow run never overlaps itself; missed ticks collapse into one), an explicit
`misfire_grace_time` (APScheduler's 1 s default silently drops runs after a pause) and optional
jitter. The items of a job run one after another inside its (job, target) run, each with its own
advisory lock, through the same `runner.run()` the CLI uses.

Several replicas may run against the same targets. The advisory lock keeps two runs of a
(job, target, item) from overlapping; on top of it, the lock holder checks the ledger for a
scheduled run that already started since the current tick, so a run that finished before the
other replica's timer fired is not repeated: every tick runs once, the other replica records
`skipped`.

Signals are taken synchronously by the main thread (`sigtimedwait`), never by handlers that
could interrupt a lock: SIGTERM/SIGINT stop scheduling, ask runs to stop at their next safe point,
cancel statements still running near the end of `scheduler.shutdown_grace`, release locks and
exit; SIGHUP reloads the configuration (an invalid one is refused, the old one stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor as Pool
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psycopg
import sentry_sdk
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from maintainer import alerts as sentry
from maintainer import db, logs, pooler
from maintainer.alerts import Alerts, CheckIn
from maintainer.config import ConfigError, Job
from maintainer.cron import cron_trigger
from maintainer.httpserver import HttpServer, TriggerRejected
from maintainer.ledger import Ledger
from maintainer.metrics import Metrics
from maintainer.outcomes import Outcomes
from maintainer.project import Project, RunSpec, load_project, parse_args
from maintainer.report import latest_runs
from maintainer.results import RunResult, exit_code
from maintainer.runner import RunOptions, run, run_all
from maintainer.session import Session
from maintainer.survey import Surveyed

log = logging.getLogger("maintainer")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
READY_CACHE_SECONDS = 10.0
# Replicas' clocks and the database's differ a little; a run that started this much before the
# tick still belongs to it.
CLOCK_SKEW = dt.timedelta(seconds=1)
KEEP_TRIGGERS = 100


def _release() -> str | None:
    try:
        return f"pg-maintainer@{version('pg-maintainer')}"
    except PackageNotFoundError:
        return None


@dataclass
class _Trigger:
    """A run started over HTTP."""

    id: str
    job: str
    done: threading.Event = field(default_factory=threading.Event)
    results: list[RunResult] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        finished = self.done.is_set()
        data: dict[str, Any] = {"id": self.id, "job": self.job, "state": "done" if finished else "running",
                                "runs": [r.to_json() for r in self.results]}
        if finished:
            data["exit_code"] = exit_code(self.results)
        return data


def last_tick(schedule: str, moment: dt.datetime) -> dt.datetime:
    """The newest cron tick at or before `moment` (APScheduler 3 only looks forward)."""
    trigger = cron_trigger(schedule)
    for lookback in (dt.timedelta(hours=1), dt.timedelta(days=2), dt.timedelta(days=40), dt.timedelta(days=800)):
        tick = None
        fire = trigger.get_next_fire_time(None, moment - lookback)
        while fire is not None and fire <= moment:
            tick = fire
            fire = trigger.get_next_fire_time(None, fire + dt.timedelta(microseconds=1))
        if tick is not None:
            return tick  # type: ignore[no-any-return]
    return moment


def ran_since(ledger: Ledger, spec: RunSpec, since: dt.datetime) -> bool:
    """Whether a scheduled run of this (job, target, item) already started at or after `since`
    (give or take the clock skew between replicas)."""
    return ledger.ran_since(spec.job.name, spec.target_name, spec.item_label, since - CLOCK_SKEW)


class Daemon:
    """Scheduler + HTTP + outcomes for one loaded project; `serve()` runs it until a signal."""

    def __init__(self, project: Project, config_path: str | None = None) -> None:
        self.project = project
        self.config_path = config_path
        self.cancel = threading.Event()  # runs stop at their next safe point
        self.stopping = threading.Event()
        self.reload_error: str | None = None
        self.metrics = Metrics()
        self.alerts = Alerts(sentry.init(project.settings, release=_release()))
        self.outcomes = Outcomes(metrics=self.metrics, alerts=self.alerts)
        scheduler_settings = project.settings.scheduler
        self.scheduler = BackgroundScheduler(
            timezone=dt.UTC, executors={"default": ThreadPoolExecutor(scheduler_settings.max_workers)}
        )
        self._signatures: dict[str, tuple[Any, ...]] = {}
        self._active: dict[object, psycopg.Connection[Any] | None] = {}
        self._idle = threading.Condition()
        self._triggers: OrderedDict[str, _Trigger] = OrderedDict()
        self._ready: tuple[float, bool, dict[str, Any]] | None = None
        self._ready_lock = threading.Lock()
        self._triggers_lock = threading.Lock()
        self.http = HttpServer(project.settings.http.listen, self)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.http.start()
        self._sync_schedules()
        self.scheduler.start()
        log.info(f"listening on port {self.http.port}; {len(self._signatures)} schedule(s)",
                 extra={"port": self.http.port, "jobs": len(self.project.jobs), "schedules": len(self._signatures)})
        threading.Thread(target=self._restore, name="restore", daemon=True).start()

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; SIGHUP reloads. Signals must be blocked before threads start."""
        self.start()
        while True:
            info = signal.sigtimedwait(SIGNALS, 3600)
            if info is None:
                continue
            if info.si_signo == signal.SIGHUP:
                self.reload()
                continue
            log.info(f"received {signal.Signals(info.si_signo).name}: shutting down")
            return self.shutdown()

    def shutdown(self) -> int:
        grace = self.project.settings.scheduler.shutdown_grace.total_seconds()
        deadline = time.monotonic() + grace
        self.stopping.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)  # no new runs; running ones continue below
        self.cancel.set()
        if not self._wait_idle(deadline - min(5.0, grace / 3)):
            connections = self._connections()
            log.warning(f"cancelling {len(connections)} running statement(s): the shutdown grace is nearly over")
            for conn in connections:
                with contextlib.suppress(Exception):  # the run may have closed it meanwhile
                    conn.cancel_safe(timeout=2)
        idle = self._wait_idle(deadline)
        self.http.stop()
        self.alerts.flush(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        if not idle:
            log.error("runs still active at the end of the shutdown grace; exiting anyway "
                      "(their sessions end with the process, which releases their locks)")
            logging.shutdown()
            os._exit(1)
        log.info("stopped")
        return 0

    def _wait_idle(self, until: float) -> bool:
        with self._idle:
            while self._active:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def _connections(self) -> list[psycopg.Connection[Any]]:
        with self._idle:
            return [c for c in self._active.values() if c is not None and not c.closed]

    # -- configuration --------------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: load everything again; a configuration with errors is refused as a whole."""
        try:
            project = load_project(self.config_path)
        except ConfigError as exc:
            self.reload_error = "; ".join(exc.problems)
            self.metrics.config_valid.set(0)
            log.error("configuration reload refused, the previous configuration stays in force: "
                      + self.reload_error, extra={"problems": exc.problems})
            return False
        old = self.project.settings
        self.project = project
        self.reload_error = None
        self.metrics.config_valid.set(1)
        logs.setup(project.settings.log_format)
        if old.http != project.settings.http or old.sentry != project.settings.sentry:
            log.warning("changes to http and sentry settings take effect at the next restart")
        self._sync_schedules()
        self.metrics.findings.retain((j.name, t) for j in project.jobs.values() for t in project.targets_of(j))
        with self._ready_lock:
            self._ready = None
        log.info(f"configuration reloaded: {len(project.jobs)} job(s), {len(self._signatures)} schedule(s)",
                 extra={"jobs": len(project.jobs), "schedules": len(self._signatures)})
        return True

    def _sync_schedules(self) -> None:
        """Make APScheduler's jobs match the project: add, reschedule and remove (job, target) pairs."""
        settings = self.project.settings.scheduler
        jitter = int(settings.jitter.total_seconds()) or None
        wanted: dict[str, tuple[Job, str]] = {}
        for job in self.project.jobs.values():
            if job.schedule:
                for target in self.project.targets_of(job):
                    wanted[f"{job.name}@{target}"] = (job, target)
        for job_id in [j for j in self._signatures if j not in wanted]:
            if self.scheduler.get_job(job_id) is not None:
                self.scheduler.remove_job(job_id)
            del self._signatures[job_id]
        for job_id, (job, target) in wanted.items():
            signature = (job.schedule, jitter, settings.misfire_grace_time)
            if self._signatures.get(job_id) == signature:
                continue
            assert job.schedule is not None
            self.scheduler.add_job(
                self._scheduled_run, cron_trigger(job.schedule, jitter=jitter), args=[job.name, target],
                id=job_id, name=job_id, replace_existing=True, max_instances=1, coalesce=True,
                misfire_grace_time=int(settings.misfire_grace_time.total_seconds()),
            )
            self._signatures[job_id] = signature

    # -- restart: gauges and catch-up -----------------------------------------------------------

    def _restore(self) -> None:
        """From each target's ledger: last findings and run times into the gauges, and runs missed
        while down."""
        project = self.project
        now = dt.datetime.now(dt.UTC)
        for name, target in sorted(project.settings.targets.items()):
            if self.stopping.is_set():
                return
            try:
                conn = db.connect(target.conninfo(), application_name="pg-maintainer ledger", connect_timeout=5)
            except (db.TargetUnavailable, OSError, ValueError) as exc:
                log.warning(f"target {name}: cannot read its ledger at start: {exc}", extra={"target": name})
                continue
            try:
                for latest in latest_runs(conn, project.settings.state_schema):
                    unit = project.units.get(latest.unit)
                    if latest.target == name and unit is not None and latest.job in project.jobs:
                        self.metrics.findings.seed(unit, latest.job, name, latest.item, latest.findings)
                last = Ledger(conn, project.settings.state_schema).last_runs()
                for (job_name, target_name), newest in last.items():
                    if target_name == name and job_name in project.jobs:
                        self.metrics.seed_finish_times(
                            job_name, name, _epoch(newest["last_finished"]), _epoch(newest["last_success"])
                        )
                if project.settings.scheduler.catch_up:
                    self._catch_up(name, last, now)
            except psycopg.Error as exc:
                log.warning(f"target {name}: cannot read its ledger at start: {db.error_summary(exc)}",
                            extra={"target": name})
            finally:
                conn.close()

    def _catch_up(self, target: str, last: dict[tuple[str, str], dict[str, Any]], now: dt.datetime) -> None:
        """A (job, target) whose newest run is older than its latest tick missed that tick: run it now.

        A job that never ran is not overdue; it starts at its next tick like a new cron entry.
        """
        for job in self.project.jobs.values():
            previous = last.get((job.name, target))
            if not job.schedule or previous is None or target not in self.project.targets_of(job):
                continue
            due = cron_trigger(job.schedule).get_next_fire_time(None, previous["started_at"] + CLOCK_SKEW)
            if due is not None and due < now - CLOCK_SKEW:
                job_id = f"{job.name}@{target}"
                if self.scheduler.get_job(job_id) is not None:
                    log.info(f"{job.name} on {target}: missed its run at {due.isoformat()}; running it now",
                             extra={"job": job.name, "target": target})
                    self.scheduler.modify_job(job_id, next_run_time=dt.datetime.now(dt.UTC))

    # -- runs -----------------------------------------------------------------------------------

    def _scheduled_run(self, job_name: str, target: str) -> None:
        try:
            self._scheduled(job_name, target)
        except Exception:
            # A bug, not a run failure (those are results): report it and keep the scheduler going.
            log.exception(f"{job_name} on {target}: the scheduled run crashed",
                          extra={"job": job_name, "target": target})
            if self.alerts.enabled:
                sentry_sdk.capture_exception()

    def _scheduled(self, job_name: str, target: str) -> None:
        fired = dt.datetime.now(dt.UTC)
        project = self.project
        job = project.jobs.get(job_name)
        if job is None or not job.schedule or self.cancel.is_set():
            return
        window = job.parsed_window
        if window is not None and not window.contains(fired.time()):
            self.outcomes.skipped(job.name, target, f"outside its window {job.window} (UTC)")
            return
        try:
            specs = project.run_specs(job, target)
        except ConfigError:
            return  # the target left the configuration in a reload
        tick = last_tick(job.schedule, fired)
        config = sentry.monitor_config(job, project.settings) if self.alerts.enabled else None
        checkin = CheckIn(sentry.monitor_slug(job.name, target), config) if config is not None else None
        results = run_all(
            specs,
            lambda spec: RunOptions(
                trigger="schedule", cancel=self.cancel, on_locked=self._once_per_tick(spec, tick, checkin)
            ),
            runner=self._run,
        )
        if checkin is not None:
            checkin.finish(ok=len(results) == len(specs) and all(r.status != "failed" for r in results))

    @staticmethod
    def _once_per_tick(spec: RunSpec, tick: dt.datetime, checkin: CheckIn | None) -> Any:
        def on_locked(ledger: Ledger) -> str | None:
            if ran_since(ledger, spec, tick):
                return f"already ran for the {tick.isoformat()} tick (another replica)"
            if checkin is not None:
                checkin.start()
            return None

        return on_locked

    def _run(
        self, spec: RunSpec, options: RunOptions, *, session: Session | None = None, surveyed: Surveyed | None = None
    ) -> RunResult:
        """One run, tracked so a shutdown can wait for it and cancel its statement."""
        token = object()

        def remember(conn: psycopg.Connection[Any]) -> None:
            with self._idle:
                self._active[token] = conn

        with self._idle:
            self._active[token] = None
        try:
            result = run(spec, dataclasses.replace(options, on_connect=remember), session=session, surveyed=surveyed)
        finally:
            with self._idle:
                del self._active[token]
                self._idle.notify_all()
        self.outcomes.record(spec.unit, result, cancelled=self.cancel.is_set())
        return result

    # -- HTTP service ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        thread = getattr(self.scheduler, "_thread", None)
        alive = self.scheduler.running and thread is not None and thread.is_alive()
        ok = alive and not self.stopping.is_set()
        with self._idle:
            active = len(self._active)
        return ok, {"status": "ok" if ok else ("stopping" if self.stopping.is_set() else "scheduler stopped"),
                    "schedules": len(self._signatures), "active_runs": active}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Config valid and every target reachable; cached briefly so probes do not hammer targets."""
        with self._ready_lock:
            if self._ready is not None and time.monotonic() - self._ready[0] < READY_CACHE_SECONDS:
                cached_ok, cached_body = self._ready[1], self._ready[2]
                return cached_ok and not self.stopping.is_set(), cached_body
            targets = self.project.settings.targets
            with Pool(max_workers=min(8, max(1, len(targets)))) as pool:
                states = dict(zip(targets, pool.map(_probe, targets, targets.values()), strict=True))
            ok = all(state == "ok" for state in states.values())
            body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "targets": states,
                                    "config": "ok" if self.reload_error is None else
                                    f"reload refused, previous configuration in force: {self.reload_error}"}
            self._ready = (time.monotonic(), ok, body)
            return ok and not self.stopping.is_set(), body

    def metrics_payload(self) -> bytes:
        return self.metrics.exposition()

    def trigger_token(self) -> str | None:
        path = self.project.settings.http.trigger_token_file
        if path is None:
            return None
        try:
            token = path.read_text().strip()
        except OSError as exc:
            log.error(f"cannot read http.trigger_token_file: {exc.strerror}")
            return None
        return token or None  # an empty file never matches an empty header

    def start_trigger(self, job: str, target: str | None, args: dict[str, str], dry_run: bool) -> str:
        if self.stopping.is_set():
            raise TriggerRejected(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down")
        project = self.project
        if job not in project.jobs:
            raise TriggerRejected(HTTPStatus.NOT_FOUND, f"unknown job {job!r}")
        try:
            specs = project.run_specs(project.jobs[job], target)
            parsed = parse_args([f"{k}={v}" for k, v in args.items()])
        except ConfigError as exc:
            raise TriggerRejected(HTTPStatus.BAD_REQUEST, "; ".join(exc.problems)) from None
        trigger = _Trigger(uuid.uuid4().hex, job)
        with self._triggers_lock:
            self._triggers[trigger.id] = trigger
            while len(self._triggers) > KEEP_TRIGGERS:
                self._triggers.popitem(last=False)

        def tracked(
            spec: RunSpec, options: RunOptions, *, session: Session | None = None, surveyed: Surveyed | None = None
        ) -> RunResult:
            result = self._run(spec, options, session=session, surveyed=surveyed)
            trigger.results.append(result)  # visible to GET /trigger/<id> while the rest still runs
            return result

        def work() -> None:
            try:
                run_all(specs, RunOptions(trigger="http", args=parsed, dry_run=dry_run, cancel=self.cancel),
                        runner=tracked)
            finally:
                trigger.done.set()

        log.info(f"{job}: triggered over HTTP", extra={"job": job, "target": target, "trigger": "http"})
        threading.Thread(target=work, name=f"trigger-{job}", daemon=True).start()
        return trigger.id

    def trigger_state(self, trigger_id: str, wait: bool = False) -> dict[str, Any] | None:
        with self._triggers_lock:
            trigger = self._triggers.get(trigger_id)
        if trigger is None:
            return None
        if wait:
            trigger.done.wait()
        return trigger.state()


def _probe(name: str, target: Any) -> str:
    try:
        conn = db.connect(target.conninfo(), application_name="pg-maintainer probe", connect_timeout=3)
    except (db.TargetUnavailable, OSError, ValueError) as exc:
        return f"unreachable: {exc}"
    try:
        found = pooler.probe(conn)
        if found.pooled:  # every run on it is refused: not ready, and say why
            return f"refused: {pooler.refusal(name, found)}"
        return "ok"
    except psycopg.Error as exc:
        return f"error: {db.error_summary(exc)}"
    finally:
        conn.close()


def run_daemon(config_path: str | None) -> int:
    """`maintainer run`. Signals are blocked first, so every thread started later inherits the mask
    and they reach only the main thread's `sigtimedwait`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    project = load_project(config_path)
    logs.setup(project.settings.log_format)
    try:
        daemon = Daemon(project, config_path)
    except OSError as exc:
        raise ConfigError([f"http.listen {project.settings.http.listen}: cannot listen: {exc.strerror}"]) from None
    return daemon.serve()


def _epoch(at: dt.datetime | None) -> float | None:
    return None if at is None else at.timestamp()

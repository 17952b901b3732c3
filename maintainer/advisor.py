"""`maintainer advise`: the advisor's runs with the standbys' index usage, and its migration script.

The runner works on primaries only, yet an index that no query uses on the primary may serve every
read on a standby. Before an advisor job runs on a target, the scan counters of each standby named
in its `replicas` param are read here over a read-only connection (`pg_stat_user_indexes` and the
database's `stats_reset`: statistics only) and handed to the run as the bound `replica_usage`
argument, so they land in the run's `index_usage` record in the ledger like the primary's. A
standby that cannot be read is left out: its counters are then "not read", and no index is called
unused in that run.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import psycopg

from maintainer import db
from maintainer.config import ConfigError
from maintainer.project import Project, RunSpec
from maintainer.render import ArgValue
from maintainer.results import RunResult
from maintainer.runner import RunOptions, run_all

UNIT = "advisor"
# The bookkeeping row of every run: not a recommendation.
USAGE_RECORD = "index_usage"

_USAGE_QUERY = """
SELECT (SELECT to_jsonb(d.stats_reset) #>> '{}' FROM pg_stat_database d
         WHERE d.datname = current_database()) AS stats_reset,
       coalesce((SELECT jsonb_object_agg(format('%I.%I', s.schemaname, s.indexrelname), s.idx_scan)
                   FROM pg_stat_user_indexes s), '{}') AS indexes,
       pg_is_in_recovery() AS in_recovery
"""


@dataclass
class Advice:
    """One advisor run and the standbys it could not read."""

    result: RunResult
    unread: dict[str, str] = field(default_factory=dict)  # standby target -> why

    @property
    def recommendations(self) -> list[dict[str, Any]]:
        return [f for f in self.result.findings if f.get("check") not in (USAGE_RECORD, None)]


def advisor_jobs(project: Project) -> list[str]:
    names = sorted(name for name, job in project.jobs.items() if job.unit == UNIT)
    if not names:
        raise ConfigError([f"no job runs the {UNIT!r} unit (add one to {project.settings.jobs_dir})"])
    return names


def read_standby(project: Project, name: str) -> dict[str, Any]:
    """The index scan counters of target `name` (a standby), read in a read-only transaction."""
    target = project.settings.targets[name]
    with db.connect(target.conninfo(), connect_timeout=5) as conn:
        conn.execute("SET default_transaction_read_only = on")
        row = conn.execute(_USAGE_QUERY).fetchone()
    assert row is not None
    return {"read_at": dt.datetime.now(dt.UTC).isoformat(), "stats_reset": row["stats_reset"],
            "indexes": row["indexes"], "in_recovery": row["in_recovery"]}


def replica_usage(project: Project, spec: RunSpec) -> tuple[dict[str, Any], dict[str, str]]:
    """What the standbys of `spec` say: counters per readable standby, and why the others were not read."""
    names = [str(n) for n in spec.params.get("replicas") or []]
    unknown = [n for n in names if n not in project.settings.targets]
    if unknown:
        raise ConfigError([f"job {spec.job.name!r}: replicas: unknown target(s) {', '.join(unknown)}"])
    usage: dict[str, Any] = {}
    unread: dict[str, str] = {}
    for name in names:
        try:
            usage[name] = read_standby(project, name)
        except (psycopg.Error, db.TargetUnavailable, OSError, ValueError) as exc:
            unread[name] = db.redact_dsn(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return usage, unread


def advise(project: Project, target: str | None = None, job: str | None = None) -> list[Advice]:
    """Run every advisor job (or `job`) on its targets (or `target`), standbys read first."""
    advice: list[Advice] = []
    for name in [job] if job else advisor_jobs(project):
        found = project.job(name)
        if found.unit != UNIT:
            raise ConfigError([f"job {name!r} runs unit {found.unit!r}, not {UNIT!r}"])
        for spec in project.run_specs(found, target):
            usage, unread = replica_usage(project, spec)
            options = RunOptions(trigger="manual", args={"replica_usage": ArgValue(json.dumps(usage))})
            advice.extend(Advice(result, unread) for result in run_all([spec], options))
    return advice


# Statements of a migration script, in the order that keeps a live database safe: new indexes
# first (a BRIN replacement exists before its B-tree goes), then storage settings, drops last.
_PHASES = ("CREATE INDEX", "ALTER TABLE", "DROP INDEX")


def _phase(statement: str) -> int:
    upper = statement.lstrip().upper()
    return next((i for i, prefix in enumerate(_PHASES) if upper.startswith(prefix)), len(_PHASES))


def _comment(text: str) -> str:
    return "\n".join("-- " + line for line in str(text).splitlines() or [""])


def migration_script(advice: list[Advice]) -> str:
    """One reviewed migration script: each statement preceded by the reasons behind it, statements
    in a safe order, each on its own (psql's autocommit: CONCURRENTLY refuses a transaction block).
    Recommendations without a statement are listed as comments at the end."""
    out = [
        "-- pg-maintainer advise: a migration script to review, not to run blindly.",
        "-- Each statement runs on its own (psql's default autocommit): CONCURRENTLY cannot run in a",
        "-- transaction block. Indexes are created before any is dropped. Dropping an index is your",
        "-- decision: check rare jobs (month-end reports) and every standby before you do.",
    ]
    for item in advice:
        result = item.result
        out += ["", f"-- target {result.target}, job {result.job}: {result.status}"]
        if result.error:
            out.append(_comment(f"error: {result.error}"))
        for name, why in item.unread.items():
            out.append(_comment(f"standby {name} not read ({why}): no index is called unused without it"))
        planned: dict[str, list[str]] = {}
        without: list[dict[str, Any]] = []
        for finding in item.recommendations:
            statements = [s.strip() for s in str(finding.get("sql") or "").splitlines() if s.strip()]
            if not statements and not (finding["check"] == "unused_index" and finding["level"] == "info"):
                without.append(finding)  # an index still being watched is not a decision yet
            for statement in statements:
                planned.setdefault(statement, []).append(f"{finding['check']} {finding['object']}: {finding['reason']}")
        for statement in sorted(planned, key=_phase):
            out += [""] + [_comment(reason) for reason in planned[statement]] + [statement]
        if without:
            out += ["", "-- Without a statement (a migration to plan, or not yet decided):"]
            out += [_comment(f"{f['check']} {f['object']} [{f['level']}]: {f['reason']}") for f in without]
    return "\n".join(out) + "\n"

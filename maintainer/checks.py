"""`maintainer check`: everything that can be verified without changing anything.

Files (already validated when the project loaded), then per target: connection, role, replica
state, pooler, ledger privileges, each unit's own `check` block (missing privileges or
extensions), and finally a dry run of every job so every template is rendered and every
statement parsed against the real catalog.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import psycopg

from maintainer import context as render_context
from maintainer import db, pooler
from maintainer.project import Project
from maintainer.render import RenderError
from maintainer.runner import RunOptions, run_all
from maintainer.units import Unit, UnitError, split_statements


class PlaceholderArgs(dict[str, Any]):
    """`--arg` values for dry runs by `check`: every name exists and binds as NULL.

    Manual jobs (`erase-user --arg user_id=…`) then render and parse like any other; a NULL
    argument matches no row, so their discover stays cheap and read-only.
    """

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: str) -> None:
        return None


@dataclass
class Check:
    level: Literal["ok", "warn", "error"]
    subject: str
    detail: str


def run_checks(project: Project, *, connect: bool = True) -> list[Check]:
    settings = project.settings
    overridden = [u.name for u in project.units.values() if not u.builtin]
    checks = [
        Check("ok", "config", f"{project.path}: {len(settings.targets)} target(s), {len(project.jobs)} job(s)"),
        Check(
            "ok",
            "units",
            f"{len(project.units)} unit(s) parsed"
            + (f"; user units: {', '.join(sorted(overridden))}" if overridden else ""),
        ),
    ]
    if not connect:
        return checks
    for name in sorted(settings.targets):
        checks.extend(_check_target(project, name))
    fields_seen: dict[str, set[str]] = {}
    for job in sorted(project.jobs.values(), key=lambda j: j.name):
        specs = project.run_specs(job)
        results = run_all(specs, RunOptions(dry_run=True, trigger="check", args=PlaceholderArgs()))
        for result in results:
            for finding in result.findings:
                fields_seen.setdefault(job.unit, set()).update(finding)
        for spec, result in zip(specs, results, strict=True):
            subject = f"job {job.name} on {spec.target_name}" + (f" [{spec.item_label}]" if spec.item_label else "")
            if result.status == "failed":
                checks.append(Check("error", subject, result.error or "failed"))
            else:
                checks.append(
                    Check(
                        "ok", subject, f"{len(result.findings)} finding(s), {len(result.actions)} statement(s) planned"
                    )
                )
    for unit_name, seen in sorted(fields_seen.items()):
        checks.extend(_declared_fields_check(project.units[unit_name], seen))
    return checks


def _declared_fields_check(unit: Unit, seen: set[str]) -> list[Check]:
    """Front matter that names a finding field the unit's findings never carry (a typo in `metrics`,
    `alerts` or `display` would otherwise silently export nothing, never alert, show an empty
    column). Judged on the findings of the dry runs above: a query's rows all have the same columns."""
    problems = []
    for where, fields in unit.finding_fields().items():
        missing = sorted({name for name in fields if name not in seen})
        if missing:
            problems.append(f"{where} names {', '.join(repr(name) for name in missing)}")
    if not problems:
        return []
    return [Check("warn", f"unit {unit.name}",
                  f"{'; '.join(problems)}: not a field of its findings ({', '.join(sorted(seen))})")]


def _check_target(project: Project, name: str) -> list[Check]:
    target = project.settings.targets[name]
    subject = f"target {name}"
    try:
        conninfo = target.conninfo()
    except OSError as exc:
        return [Check("error", subject, f"cannot read dsn_file: {exc.strerror}")]
    except db.TargetUnavailable as exc:  # a DSN libpq cannot parse; the message never quotes it
        return [Check("error", subject, str(exc))]
    checks: list[Check] = []
    if re.search(r"(:|port\s*=\s*)6432\b", conninfo):
        checks.append(
            Check(
                "warn",
                subject,
                "the DSN uses port 6432, usually PgBouncer: transaction pooling breaks advisory locks and "
                "CONCURRENTLY; use a direct connection (or declare pooled: true to refuse DDL units)",
            )
        )
    try:
        conn = db.connect(conninfo, connect_timeout=5)
    except db.TargetUnavailable as exc:
        return [*checks, Check("error", subject, f"cannot connect: {exc}")]
    try:
        pooled = _pooler_check(name, pooler.probe(conn))  # first, before anything else runs on it
        info = conn.execute(
            "SELECT current_setting('server_version') AS version, current_user AS role,"
            " pg_is_in_recovery() AS recovery,"
            " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,"
            " has_database_privilege(current_database(), 'CREATE') AS can_create,"
            " (SELECT has_schema_privilege(n.oid, 'CREATE') AND has_schema_privilege(n.oid, 'USAGE')"
            "    FROM pg_namespace n WHERE nspname = %s) AS ledger_writable",
            (project.settings.state_schema,),
        ).fetchone()
        assert info is not None
        role = f"role {info['role']}" + (" (superuser)" if info["superuser"] else "")
        checks.append(Check("ok", subject, f"connected: PostgreSQL {info['version']}, {role}"))
        checks.append(pooled)
        if info["recovery"]:
            checks.append(Check("warn", subject, "is a replica in recovery: every run will be skipped"))
        if info["ledger_writable"] is False or (info["ledger_writable"] is None and not info["can_create"]):
            checks.append(
                Check(
                    "error",
                    subject,
                    f"cannot create or write the ledger schema {project.settings.state_schema!r}: "
                    f"GRANT CREATE ON DATABASE to {info['role']} or create the schema for it",
                )
            )
        checks.extend(_unit_checks(project, name, conn))
    except psycopg.Error as exc:
        checks.append(Check("error", subject, db.error_summary(exc)))
    finally:
        conn.close()
    return checks


def _pooler_check(target: str, found: pooler.Probe) -> Check:
    """Whether the target's connection goes through a pooler (SPEC §12): an error when it does,
    since every run on it would be refused with exit code 2."""
    subject = f"target {target}"
    if found.pooled:
        return Check(
            "error", subject,
            f"{pooler.refusal(target, found)}; until then every run on it is refused (exit code 2); "
            "history, report and jobs still read through it",
        )
    if found.port_differs:
        return Check(
            "warn", subject,
            f"{found.signal()}: a port mapping, a proxy or a pooler sits in between; PostgreSQL's own session "
            "comes through (the backend pid matches), so runs go on",
        )
    return Check("ok", subject, "direct connection to PostgreSQL (no pooler in between)")


def _unit_checks(project: Project, target: str, conn: psycopg.Connection[Any]) -> list[Check]:
    """Each used unit's `check` block: rows with `level` and `message` (missing grants, extensions)."""
    checks: list[Check] = []
    used = sorted({job.unit for job in project.jobs.values() if target in project.targets_of(job)})
    extensions, _ = db.catalog_facts(conn, [])
    for name in used:
        unit = project.units[name]
        if not unit.has_block("check"):
            continue
        try:
            run = render_context.run_context(
                target=target, job=None, state_schema=project.settings.state_schema, args={}, dry_run=True
            )
            text, values = unit.render_block("check", render_context.check_context(run, extensions=extensions))
            statements = split_statements(text, values, where=f"{unit.path.name} (check): ")
        except (RenderError, UnitError) as exc:
            checks.append(Check("error", f"unit {name} on {target}", str(exc)))
            continue
        for statement in statements:
            for row in db.query(conn, statement.sql, statement.params, read_only=True):
                level, message = str(row["level"]), str(row["message"])
                checks.append(
                    Check(
                        "warn" if level not in ("ok", "error") else level,  # type: ignore[arg-type]
                        f"unit {name} on {target}",
                        message,
                    )
                )
    return checks

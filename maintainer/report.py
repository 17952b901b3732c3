"""`maintainer report`: the state of every target at a glance, the worst first.

Built from the ledger, not from new queries: the newest findings of every configured (job,
target, item) — sequence headroom, bloat candidates, partitions ahead, rows in DEFAULT,
wraparound — grouped by unit. How a finding reads (its level, its object, its message, its
numbers) comes from the unit's front matter (`alerts`, `metrics`), so a new unit appears here
without Python. The daemon uses the same query to restore its gauges after a restart.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table
from rich.text import Text

from maintainer import db
from maintainer.alerts import finding_message
from maintainer.ledger import Ledger, each_ledger
from maintainer.project import Project, item_label
from maintainer.results import LEVEL_RANK, LEVEL_STYLE, RunResult, json_safe
from maintainer.units import Unit


@dataclass
class LatestRun:
    job: str
    unit: str
    target: str
    item: str | None
    status: str
    finished_at: dt.datetime
    findings: list[dict[str, Any]] = field(default_factory=list)


def latest_runs(conn: psycopg.Connection[Any], schema: str) -> list[LatestRun]:
    """The newest completed run with findings of every (job, target, item) in one target's ledger
    (see `Ledger.latest_findings`), minus the findings a failed verification withdrew."""
    rows = Ledger(conn, schema).latest_findings()
    return [
        LatestRun(
            r["job"],
            r["unit"],
            r["target"],
            r["item"],
            r["status"],
            r["finished_at"],
            [f for f in r["findings"] if not f.get("verify_failed")],
        )
        for r in rows
    ]


def collect(project: Project) -> tuple[list[LatestRun], dict[str, str]]:
    """Latest runs of the configured jobs on every target, and each target's reachability."""
    wanted = {(job.name, target) for job in project.jobs.values() for target in project.targets_of(job)}
    runs: list[LatestRun] = []
    status: dict[str, str] = {}
    for name, ledger, problem in each_ledger(project.settings):
        if ledger is None:
            status[name] = problem or "unreachable"
            continue
        try:
            found = latest_runs(ledger.conn, project.settings.state_schema)
            runs.extend(r for r in found if r.target == name and (r.job, r.target) in wanted)
            status[name] = "ok"
        except psycopg.Error as exc:
            status[name] = f"error: {db.error_summary(exc)}"
    return runs, status


def build(project: Project) -> dict[str, Any]:
    """The report as plain data (what `--json` prints)."""
    runs, targets = collect(project)
    return assemble(project, runs, targets)


def from_results(results: list[RunResult]) -> list[LatestRun]:
    """Runs that have not been recorded (e.g. a dry run of every job) in the report's shape."""
    return [
        LatestRun(
            r.job, r.unit, r.target, item_label(r.item), r.status, r.finished_at or r.started_at, list(r.findings)
        )
        for r in results
    ]


def assemble(project: Project, runs: list[LatestRun], targets: dict[str, str]) -> dict[str, Any]:
    """Group findings by unit, the worst first."""
    sections: dict[str, dict[str, Any]] = {}
    for run in runs:
        unit = project.units.get(run.unit)
        if unit is None:
            continue
        section = sections.setdefault(
            unit.name,
            {
                "unit": unit.name,
                "description": unit.meta.description,
                "counts": {},
                "findings": [],
            },
        )
        for finding in run.findings:
            section["findings"].append(_entry(unit, run, finding))
    for section in sections.values():
        # The worst level first, within a level the fewest days left (forecasts); among equals, the
        # unit's own order (its discover ORDER BY) and then target order (the sort is stable).
        section["findings"].sort(key=lambda e: (-LEVEL_RANK.get(str(e["level"]), 0), days_left(e["finding"])))
        counts: dict[str, int] = {}
        for entry in section["findings"]:
            counts[str(entry["level"] or "none")] = counts.get(str(entry["level"] or "none"), 0) + 1
        section["counts"] = counts
        section["worst"] = section["findings"][0]["level"] if section["findings"] else None
    ordered = sorted(sections.values(), key=lambda s: (-LEVEL_RANK.get(str(s["worst"]), 0), s["unit"]))
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "targets": targets,
        "sections": ordered,
    }


# Forecast fields of the built-in units (SPEC §13): how many days until a limit is reached.
DAYS_FIELDS = ("days_left", "wraparound_days_left", "xid_days_left", "runway_days")


def days_left(finding: Mapping[str, Any]) -> float:
    """The fewest days any forecast of `finding` gives (infinity without one), for sorting by urgency."""
    days = [float(v) for k in DAYS_FIELDS if isinstance(v := finding.get(k), int | float) and not isinstance(v, bool)]
    return min(days, default=math.inf)


def _entry(unit: Unit, run: LatestRun, finding: Mapping[str, Any]) -> dict[str, Any]:
    level_field = unit.level_field
    level = finding.get(level_field) if level_field else None
    values = {m.value: finding.get(m.value) for m in unit.meta.metrics.values() if m.value in finding}
    if unit.meta.alerts:
        message = finding_message(unit, finding)
    else:
        message = ", ".join(f"{k}={v}" for k, v in list(finding.items())[:3] if k != "action")
    return {
        "target": run.target,
        "job": run.job,
        "item": run.item,
        "level": level,
        "message": message,
        "values": json_safe(values),
        "as_of": run.finished_at.isoformat(timespec="seconds"),
        "run_status": run.status,
        "finding": json_safe(dict(finding)),
    }


def print_report(console: Console, report: Mapping[str, Any], *, limit: int = 10) -> None:
    """One screen: each unit's worst findings first, the rest summarised."""
    unreachable = {name: state for name, state in report["targets"].items() if state != "ok"}
    reachable = len(report["targets"]) - len(unreachable)
    console.print(
        f"[bold]pg-maintainer report[/bold]  {reachable} target(s) read, generated {report['generated_at']}",
        highlight=False,
    )
    for name, state in unreachable.items():
        console.print(Text(f"  target {name}: {state}", style="red"), highlight=False)
    if not report["sections"]:
        console.print(
            "no findings recorded yet: run the jobs (maintainer trigger JOB) or start the daemon", style="dim"
        )
        return
    for section in report["sections"]:
        counts = ", ".join(
            f"{n} {level}" for level, n in sorted(section["counts"].items(), key=lambda kv: -LEVEL_RANK.get(kv[0], 0))
        )
        console.print()
        console.print(Text.assemble((section["unit"], "bold"), f"  {counts}"), highlight=False)
        value_names: list[str] = []
        for entry in section["findings"]:
            value_names.extend(k for k in entry["values"] if k not in value_names)
        # Names and messages come from units and findings (data): Text, never markup.
        table = Table(box=None, pad_edge=False, show_edge=False)
        for header in ("level", "target", *value_names, "finding"):
            table.add_column(Text(header))
        shown = section["findings"][:limit]
        for entry in shown:
            level = str(entry["level"] or "")
            table.add_row(
                Text(level, style=LEVEL_STYLE.get(level, "white")),
                Text(str(entry["target"])),
                *(Text(_fmt(name, entry["values"].get(name))) for name in value_names),
                Text(str(entry["message"])),
            )
        console.print(table)
        hidden = section["findings"][limit:]
        if hidden:
            attention = sum(1 for e in hidden if LEVEL_RANK.get(str(e["level"]), 0) >= 2)
            more = f"  … {len(hidden)} more" + (f" ({attention} warn or worse)" if attention else "")
            console.print(more + " — maintainer report --json for all", style="dim", highlight=False)


def _fmt(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and "ratio" in name and 0 <= value <= 1:
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

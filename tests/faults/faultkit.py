"""The fault-injection kit of issue 16: private clusters that may be restarted, one database per trial,
the CLI as a real subprocess (so it can be killed and its stdout/stderr are real), and the invariants.

Nothing here restarts the shared `server` fixture's cluster: every scenario runs on a `FaultCluster`
of its own (see tests/faults/conftest.py).

Knobs (environment):
  MAINTAINER_FAULT_SCALE   integer, default 1: trials per scenario are multiplied by it
  MAINTAINER_FAULT_SEED    integer: the seed every trial's random choices derive from (printed; random
                           when unset), so a failing trial reproduces with the same seed and scale
  MAINTAINER_FAULT_REPORT  a file: each scenario appends one JSON line with its counts

A trial never stops at the first broken invariant: every trial runs and is checked, violations are
counted by kind (with evidence), and the test fails at the end with the counts and the evidence.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import yaml
from click.testing import CliRunner
from psycopg import sql

from maintainer.cli import main
from maintainer.pgserver import LocalCluster, PgServerError, ServerKind
from maintainer.project import item_label

ROOT = Path(__file__).resolve().parents[2]


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"{name} must be an integer, not {raw!r}") from None


SCALE = max(1, _env_int("MAINTAINER_FAULT_SCALE", 1) or 1)
SEED: int = _env_int("MAINTAINER_FAULT_SEED", None) or random.SystemRandom().randrange(1, 2**31)
REPORT = os.environ.get("MAINTAINER_FAULT_REPORT") or None

CLI_TIMEOUT = 120.0  # a trigger that has not ended after this long is a hang (and is killed)
WINDOW_TIMEOUT = 30.0  # waiting for the run to be active
SESSION_GRACE = 8.0  # a CLI that exited must have no session left after this long
TRACEBACK = "Traceback (most recent call last)"
LEFTOVER_RE = re.compile(r"_cc(new|old)[0-9]*$")
UTC = dt.UTC


def banner() -> str:
    return f"fault injection: MAINTAINER_FAULT_SEED={SEED} MAINTAINER_FAULT_SCALE={SCALE}"


def trial_rng(scenario: str, server: str, trial: int) -> random.Random:
    """Every random choice of one trial: the same seed gives the same choices, trial by trial."""
    return random.Random(f"{SEED}:{scenario}:{server}:{trial}")


def timeout_for(trials: int, per_trial: float) -> int:
    """pytest-timeout for a scenario: generous, but no test hangs forever."""
    return int(120 + trials * per_trial)


# --------------------------------------------------------------------------- the scenario databases

ANON_TABLES = ("activities_a", "activities_b")
ANON_WHERE = "created_at < '2024-06-01'"
ANON_SET: dict[str, Any] = {"actor_email": None, "actor_ip": None, "user_agent": {"expr": "'erased-' || id"}}
# A matching row that still holds personal data (what ANON_SET would change)
ANON_PENDING = "(actor_email IS NOT NULL OR actor_ip IS NOT NULL OR user_agent IS DISTINCT FROM 'erased-' || id)"
PART_TABLES = ("metrics", "events")
PART_PREMAKE = 8
PART_RETENTION_DAYS = 30
REINDEX_TABLES = ("churn_a", "churn_b")
REINDEX_INDEXES = ("churn_a_pkey", "churn_a_code", "churn_b_pkey", "churn_b_code", "bystander_pkey")


def _reindex_schema() -> list[str]:
    """Two tables whose B-trees are bloated (two thirds of the rows deleted, then VACUUM ANALYZE),
    and an unrelated table for long transactions to read."""
    script = []
    for table in REINDEX_TABLES:
        script.append(
            f"CREATE TABLE {table} (id int PRIMARY KEY, code text NOT NULL) WITH (autovacuum_enabled = false);"
            f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, 60000) g;"
            f"CREATE INDEX {table}_code ON {table} (code);"
            f"DELETE FROM {table} WHERE id % 3 <> 0;"
        )
    script.append("CREATE TABLE bystander (id int PRIMARY KEY); INSERT INTO bystander SELECT generate_series(1, 100);")
    return ["\n".join(script), *(f"VACUUM (ANALYZE) {t}" for t in (*REINDEX_TABLES, "bystander"))]


def _anonymize_schema() -> list[str]:
    """Audit trails with personal data: 6000 hourly rows from 2024-01-01, 3648 of them before June."""
    script = []
    for table in ANON_TABLES:
        script.append(
            f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id bigint NOT NULL,"
            " action text NOT NULL, actor_email text, actor_ip inet, user_agent text, created_at timestamptz NOT NULL);"
            f"INSERT INTO {table} (user_id, action, actor_email, actor_ip, user_agent, created_at)"
            " SELECT g % 40, 'login', 'user' || (g % 40) || '@example.com', '192.0.2.0'::inet + (g % 250),"
            "        'Mozilla/5.0 ' || g, timestamptz '2024-01-01 00:00+00' + g * interval '1 hour'"
            " FROM generate_series(1, 6000) g;"
        )
    return ["\n".join(script), *(f"VACUUM (ANALYZE) {t}" for t in ANON_TABLES)]


def _partitions_schema() -> list[str]:
    """Daily RANGE partitions from 40 days ago to tomorrow, an hourly row in each hour: with a 30-day
    retention and premake 8 a run retires ~10 partitions per table and creates ~7."""
    today = dt.datetime.now(UTC).date()
    script = []
    for table in PART_TABLES:
        script.append(
            f"CREATE TABLE {table} (id bigserial, created_at timestamptz NOT NULL, v int NOT NULL,"
            f" PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);"
        )
        for offset in range(-40, 2):
            lo = today + dt.timedelta(days=offset)
            hi = lo + dt.timedelta(days=1)
            script.append(
                f"CREATE TABLE {table}_p{lo:%Y%m%d} PARTITION OF {table}"
                f" FOR VALUES FROM ('{lo} 00:00+00') TO ('{hi} 00:00+00');"
            )
        script.append(
            f"INSERT INTO {table} (created_at, v) SELECT timestamptz '{today - dt.timedelta(days=40)} 00:00+00'"
            f" + g * interval '1 hour', g FROM generate_series(0, 42 * 24 - 1) g;"
        )
    return ["\n".join(script), *(f"ANALYZE {t}" for t in PART_TABLES)]


SCHEMAS: dict[str, Callable[[], list[str]]] = {
    "reindex": _reindex_schema,
    "anonymize": _anonymize_schema,
    "partitions": _partitions_schema,
}

# The job each unit's trials run, and the statements of a run's "work" (restart / kill windows).
JOBS: dict[str, dict[str, Any]] = {
    "reindex": {"name": "reindex", "unit": "reindex", "params": {"min_wasted": "256kB", "max_indexes": 4}},
    "anonymize": {
        "name": "sweep",
        "unit": "anonymize",
        "items": [
            {"table": f"public.{t}", "where": ANON_WHERE, "set": ANON_SET, "batch_size": 400, "pause": "50ms"}
            for t in ANON_TABLES
        ],
    },
    "partitions": {
        "name": "partitions",
        "unit": "partitions",
        "params": {"interval": "1 day", "premake": PART_PREMAKE, "retention": f"{PART_RETENTION_DAYS} days"},
        "items": [{"table": f"public.{t}"} for t in PART_TABLES],
    },
}
WORK_PATTERNS = {
    "reindex": r"^\s*REINDEX INDEX CONCURRENTLY",
    "anonymize": r"\mUPDATE\M",
    "partitions": r"\m(CREATE|ALTER|DROP) TABLE\M",
}


# --------------------------------------------------------------------------- clusters


class FaultCluster:
    """A private LocalCluster that scenarios may restart (fast or immediate), kill clients of, and
    fill with one fresh database per trial (copied from a per-unit template built once)."""

    SETTINGS: ClassVar[dict[str, str]] = {
        # LocalCluster's default (off) lets an immediate shutdown lose commits it had acknowledged:
        # a ledger record would vanish for reasons no engine can help. fsync stays off (no OS crash).
        "synchronous_commit": "on",
        # Backends of a killed CLI notice it at once, even while waiting for a lock (PostgreSQL 14+).
        "client_connection_check_interval": "100ms",
        "max_connections": "60",
    }

    def __init__(self, kind: ServerKind, index: int = 0) -> None:
        self.kind = kind
        # Position among the server kinds: scenarios start their rotation of units and restart modes
        # there, so that at the default size the kinds together cover every combination.
        self.index = index
        self.cluster = LocalCluster(kind, settings=self.SETTINGS)
        self._templates: dict[str, str] = {}
        self.restarts = 0

    @property
    def name(self) -> str:
        return self.kind.name

    def start(self) -> FaultCluster:
        self.cluster.start()
        return self

    def stop(self) -> None:
        self.cluster.stop()

    def dsn(self, dbname: str) -> str:
        return self.cluster.dsn(dbname)

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10)

    def execute(self, dbname: str, query: str | sql.Composed, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    # -- restarts ---------------------------------------------------------------------------------

    def restart(self, mode: str, downtime: float = 0.0) -> float:
        """`pg_ctl restart -m MODE` (downtime 0), or `pg_ctl stop -m MODE`, `downtime` seconds with no
        server, `pg_ctl start` (a production restart or failover takes seconds, not 0.2 s). Returns
        the seconds the server was unavailable, as seen from here."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"restart mode {mode!r}")
        cluster = self.cluster
        port = cluster.port
        started = time.monotonic()
        self.restarts += 1
        start_args = ("-t", "60", "-l", str(cluster.log_path), "-o", f"-p {port}")
        if downtime <= 0:
            rc, out = cluster._pg_ctl("restart", "-m", mode, *start_args)
        else:
            rc, out = cluster._pg_ctl("stop", "-m", mode, "-t", "60")
            if rc == 0:
                time.sleep(downtime)
                rc, out = cluster._pg_ctl("start", *start_args)
        if rc != 0:
            raise PgServerError(f"pg_ctl restart ({mode}) failed:\n{out.strip()}")
        self.wait_ready()
        return time.monotonic() - started

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.execute("postgres", "SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- databases --------------------------------------------------------------------------------

    def template(self, unit: str) -> str:
        """A database holding `unit`'s scenario schema, built once per cluster; trials copy it."""
        if unit not in self._templates:
            name = f"tmpl_{unit}"
            self.execute("postgres", f"DROP DATABASE IF EXISTS {name}")
            self.execute("postgres", f"CREATE DATABASE {name}")
            with self.connect(name) as conn:
                for statement in SCHEMAS[unit]():
                    conn.execute(statement.encode())  # bytes: plain SQL text
            self._templates[unit] = name
        return self._templates[unit]

    def new_database(self, unit: str) -> str:
        name = f"f_{unit}_{uuid.uuid4().hex[:10]}"
        self.execute(
            "postgres",
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(self.template(unit))),
        )
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(psycopg.Error):
            self.execute("postgres", sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --------------------------------------------------------------------------- the CLI as a process


@dataclass
class CliOutcome:
    command: str
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    killed: bool = False  # by the scenario (kill -9), on purpose

    @property
    def runs(self) -> list[dict[str, Any]] | None:
        try:
            data = json.loads(self.stdout)
        except ValueError:
            return None
        runs = data.get("runs") if isinstance(data, dict) else None
        return runs if isinstance(runs, list) else None


class CliProcess:
    """`maintainer --config … trigger JOB --json` in its own session, output in files (not pipes)."""

    def __init__(self, trial: Trial, args: list[str], tag: str) -> None:
        self.tag = tag
        self.out_path = trial.root / f"{tag}.stdout"
        self.err_path = trial.root / f"{tag}.stderr"
        self.command = [sys.executable, "-m", "maintainer.cli", *args, "--config", str(trial.config)]
        # The tree under test (not whatever an editable install points at), and no MAINTAINER_* of ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAINTAINER_")}
        env["PYTHONPATH"] = str(ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=trial.root,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.killed = False

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9, now."""
        if self.running():
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float = CLI_TIMEOUT) -> CliOutcome:
        timed_out = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        return CliOutcome(
            " ".join(self.command[2:]),
            self.proc.returncode,
            self.out_path.read_text(errors="replace"),
            self.err_path.read_text(errors="replace"),
            timed_out=timed_out,
            killed=self.killed,
        )


# --------------------------------------------------------------------------- one trial


class ViewError(Exception):
    """`maintainer history/report --json` did not print its JSON object."""


@dataclass
class Trial:
    """One database (a copy of the unit's template), a config directory, and the processes started."""

    cluster: FaultCluster
    unit: str
    root: Path
    db: str = ""
    processes: list[CliProcess] = field(default_factory=list)
    connections: list[psycopg.Connection[Any]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "maintainer.yaml"

    @property
    def job(self) -> str:
        return str(JOBS[self.unit]["name"])

    @property
    def app_name(self) -> str:
        return f"pg-maintainer {self.job}"[:63]

    def write_config(self, **defaults: Any) -> None:
        settings = {"lock_timeout": "2s", "retry_backoff": "300ms", "max_attempts": 3, **defaults}
        self.config.write_text(yaml.safe_dump({
            "targets": {"app": {"dsn": self.cluster.dsn(self.db)}},
            "jobs_dir": "jobs",
            "defaults": settings,
            "log_format": "json",
        }))

    def write_job(self, **overrides: Any) -> None:
        job = {**JOBS[self.unit], **overrides}
        (self.root / "jobs" / f"{job['name']}.yaml").write_text(yaml.safe_dump(job, sort_keys=False))

    def start(self, tag: str = "trigger") -> CliProcess:
        process = CliProcess(self, ["trigger", self.job, "--json"], f"{tag}{len(self.processes)}")
        self.processes.append(process)
        return process

    def cli_json(self, *args: str) -> dict[str, Any]:
        """A read-only command (`history`, `report`) in-process; its JSON object."""
        result = CliRunner().invoke(main, [*args, "--json", "--config", str(self.config)], catch_exceptions=True)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise ViewError(f"maintainer {' '.join(args)} --json raised {result.exception!r}: {result.output[:300]!r}")
        try:
            data = json.loads(result.output)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ViewError(f"maintainer {' '.join(args)} --json exit {result.exit_code}: {result.output[:300]!r}")
        return data

    def execute(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.cluster.execute(self.db, query, params)

    def holder(self) -> psycopg.Connection[Any]:
        """A connection closed (its transaction rolled back) when the trial ends, whatever happens."""
        conn = psycopg.connect(self.cluster.dsn(self.db), autocommit=True, connect_timeout=10)
        self.connections.append(conn)
        return conn

    def ledger_max_id(self) -> int:
        if self.execute("SELECT to_regclass('maintainer.run')") == [(None,)]:
            return 0
        return int(self.execute("SELECT coalesce(max(id), 0) FROM maintainer.run")[0][0])

    def wait_window(self, process: CliProcess, phase: str) -> bool:
        """Block until the run is known to be active: `early` = the ledger holds a `running` record of
        this job; `work` = the run's backend is executing its work statement (REINDEX / UPDATE / DDL).
        False when the CLI ended first (the trial then tests nothing but is still checked)."""
        pattern = WORK_PATTERNS[self.unit] if phase == "work" else None
        deadline = time.monotonic() + WINDOW_TIMEOUT
        with self.cluster.connect(self.db) as conn:
            while time.monotonic() < deadline:
                if not process.running():
                    return False
                if pattern is not None:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = %s AND state = 'active' AND query ~* %s",
                        (self.app_name, pattern),
                    ).fetchone()
                elif conn.execute("SELECT to_regclass('maintainer.run')").fetchone() == (None,):
                    row = None  # the ledger does not exist yet: the run has not started
                else:
                    row = conn.execute(
                        "SELECT count(*) FROM maintainer.run WHERE status = 'running' AND job = %s", (self.job,)
                    ).fetchone()
                if row is not None and row[0]:
                    return True
                time.sleep(0.005)
        return False

    def tool_sessions(self) -> list[tuple[Any, ...]]:
        return self.execute(
            "SELECT pid, application_name, state, left(query, 80) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'pg-maintainer%' AND pid <> pg_backend_pid()"
        )

    def close(self) -> None:
        for process in self.processes:
            if process.running():
                with contextlib.suppress(Exception):
                    process.kill()
        for conn in self.connections:
            with contextlib.suppress(Exception):
                conn.close()
        if self.db:
            self.cluster.drop_database(self.db)


@contextlib.contextmanager
def new_trial(cluster: FaultCluster, unit: str, root: Path, **defaults: Any) -> Iterator[Trial]:
    root.mkdir(parents=True)
    (root / "jobs").mkdir()
    trial = Trial(cluster, unit, root)
    try:
        trial.db = cluster.new_database(unit)
        trial.write_config(**defaults)
        trial.write_job()
        yield trial
    finally:
        trial.close()


# --------------------------------------------------------------------------- counting


# "The ledger is consistent with what the CLI printed" (issue 16's first done criterion) is these.
LEDGER_KINDS = frozenset({"ledger_missing", "ledger_status", "ledger_detail", "ledger_extra", "report_findings"})


class Tally:
    """Violations by kind (counted once per trial), with evidence, plus neutral outcome counts."""

    def __init__(self, scenario: str, server: str) -> None:
        self.scenario = scenario
        self.server = server
        self.trials = 0
        self.violations: Counter[str] = Counter()
        self.evidence: dict[str, list[str]] = defaultdict(list)
        self.outcomes: Counter[str] = Counter()
        self.failed_trials = 0  # trials with any violation
        self.ledger_trials = 0  # trials whose ledger or report disagreed with the CLI
        self.started = time.monotonic()
        self._label = ""
        self._kinds: set[str] = set()

    @contextlib.contextmanager
    def trial(self, label: str) -> Iterator[None]:
        self._label, self._kinds = label, set()
        try:
            yield
        finally:
            self.trials += 1
            self.violations.update(self._kinds)
            self.failed_trials += bool(self._kinds)
            self.ledger_trials += bool(self._kinds & LEDGER_KINDS)

    def violation(self, kind: str, text: str) -> None:
        self._kinds.add(kind)
        if len(self.evidence[kind]) < 4:
            self.evidence[kind].append(f"[{self._label}] {text}")

    def note(self, key: str) -> None:
        self.outcomes[key] += 1

    def record(self) -> dict[str, Any]:
        line = {
            "scenario": self.scenario,
            "server": self.server,
            "seed": SEED,
            "scale": SCALE,
            "trials": self.trials,
            "failed_trials": self.failed_trials,
            "ledger_inconsistent_trials": self.ledger_trials,
            "violations": dict(sorted(self.violations.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
            "seconds": round(time.monotonic() - self.started, 1),
            "engine": _engine_version(),
            "at": dt.datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if REPORT:
            with open(REPORT, "a") as fh:
                fh.write(json.dumps(line, sort_keys=True) + "\n")
        return line

    def verdict(self) -> str | None:
        """None when every trial held every invariant, else what broke, how often, and evidence."""
        if not self.violations:
            return None
        lines = [
            f"{self.scenario} on {self.server}: {self.failed_trials} of {self.trials} trials broke an invariant"
            f" ({self.ledger_trials} with the ledger or report disagreeing with the CLI; {banner()})"
        ]
        for kind, count in sorted(self.violations.items()):
            lines.append(f"  {kind}: {count}/{self.trials} trials")
            lines.extend(f"      {e}" for e in self.evidence[kind])
        lines.append(f"  outcomes: {dict(sorted(self.outcomes.items()))}")
        return "\n".join(lines)


def _engine_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "maintainer", "templates"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"


# --------------------------------------------------------------------------- invariants


def describe(run: dict[str, Any]) -> str:
    label = item_label(run.get("item"))
    return f"{run.get('job')}{'/' + label if label else ''}"


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check_cli(tally: Tally, outcome: CliOutcome, counted_as: str = "run") -> list[dict[str, Any]]:
    """No traceback; stdout is the JSON object; the exit code is 0/1/3 and the one its runs call for.
    Run statuses are counted as `<counted_as>_<status>` outcomes."""
    if outcome.timed_out:
        tally.violation("hang", f"`{outcome.command}` still running after {CLI_TIMEOUT:.0f}s; killed")
    for stream, text in (("stderr", outcome.stderr), ("stdout", outcome.stdout)):
        if TRACEBACK in text:
            tally.violation("traceback", f"`{outcome.command}` {stream}:\n{_tail(text)}")
    if outcome.killed or outcome.timed_out:
        return []
    runs = outcome.runs
    if runs is None:
        tally.violation("exit_code", f"`{outcome.command}` exit {outcome.returncode}, stdout is not the JSON object:"
                                     f" {outcome.stdout[:300]!r}; stderr: {_tail(outcome.stderr, 4)}")
        return []
    statuses = [r.get("status") for r in runs]
    expected = 1 if "failed" in statuses else 3 if "skipped" in statuses else 0
    if outcome.returncode != expected or not set(statuses) <= {"ok", "failed", "skipped"}:
        tally.violation("exit_code", f"`{outcome.command}` exit {outcome.returncode} but runs {statuses}")
    for run in runs:
        tally.note(f"{counted_as}_{run.get('status')}")
    return runs


def check_ledger(tally: Tally, trial: Trial, printed: list[dict[str, Any]], baseline: int) -> dict[int, dict[str, Any]]:
    """`maintainer history --json` holds exactly the runs the CLI printed (records newer than
    `baseline`), each with the printed status, action count and finding count."""
    try:
        history = trial.cli_json("history", "-n", "1000")["runs"]
    except (ViewError, KeyError) as exc:
        tally.violation("view_error", str(exc))
        return {}
    rows = {h["id"]: h for h in history if isinstance(h.get("id"), int) and h["id"] > baseline}
    matched: set[int] = set()
    skipped: Counter[tuple[Any, Any]] = Counter()
    for run in printed:
        status, run_id = run.get("status"), run.get("run_id")
        if status == "skipped" and run_id is None:
            skipped[(run.get("job"), item_label(run.get("item")))] += 1
            continue
        row = rows.get(run_id) if isinstance(run_id, int) else None
        if row is None or not isinstance(run_id, int):
            tally.violation("ledger_missing", f"{describe(run)}: the CLI printed {status} (error {run.get('error')!r})"
                                              f" {'without a run_id' if run_id is None else f'as run {run_id}'};"
                                              " no such ledger record")
            continue
        matched.add(run_id)
        findings = len(run.get("findings") or [])
        actions = len(run.get("actions") or [])
        if row.get("status") != status:
            tally.violation("ledger_status", f"{describe(run)} run {run_id}: the CLI printed {status} with {findings}"
                                             f" findings and {actions} actions; history says {row.get('status')}"
                                             f" with {row.get('findings')} findings, {row.get('actions')} actions,"
                                             f" error {row.get('error')!r}")
        elif row.get("findings") != findings or row.get("actions") != actions:
            tally.violation("ledger_detail", f"{describe(run)} run {run_id}: the CLI printed {findings} findings and"
                                             f" {actions} actions; history has {row.get('findings')} and"
                                             f" {row.get('actions')}")
    for run_id, row in sorted(rows.items()):
        if run_id in matched:
            continue
        key = (row.get("job"), row.get("item"))
        if row.get("status") == "skipped" and skipped[key] > 0:
            skipped[key] -= 1
            continue
        tally.violation("ledger_extra", f"ledger record {run_id} ({row.get('job')}/{row.get('item')},"
                                        f" {row.get('status')}, error {row.get('error')!r}) matches no printed run")
    for (job, item), count in skipped.items():
        if count > 0:
            tally.violation("ledger_missing", f"{count} skipped run(s) of {job}/{item} printed, not in the ledger")
    return rows


def _canonical(finding: Any) -> str:
    return json.dumps(finding, sort_keys=True, default=str)


def check_report(tally: Tally, trial: Trial, printed: list[dict[str, Any]]) -> None:
    """`maintainer report --json` shows the findings of the newest printed run of every item (ok, or
    failed with findings: the report keeps those too)."""
    newest: dict[tuple[Any, Any], dict[str, Any]] = {}
    for run in printed:
        findings = [f for f in run.get("findings") or [] if not f.get("verify_failed")]
        if run.get("status") == "ok" or (run.get("status") == "failed" and findings):
            key = (run.get("job"), item_label(run.get("item")))
            if key not in newest or str(run.get("finished_at")) > str(newest[key].get("finished_at")):
                newest[key] = run
    if not newest:
        return
    try:
        report = trial.cli_json("report")
    except ViewError as exc:
        tally.violation("view_error", str(exc))
        return
    shown: dict[tuple[Any, Any], list[str]] = defaultdict(list)
    for section in report.get("sections", []):
        for entry in section.get("findings", []):
            shown[(entry.get("job"), entry.get("item"))].append(_canonical(entry.get("finding")))
    for key, run in newest.items():
        want = sorted(_canonical(f) for f in run.get("findings") or [] if not f.get("verify_failed"))
        got = sorted(shown.get(key, []))
        if want != got:
            missing = next((f for f in want if f not in got), None)
            tally.violation("report_findings", f"{describe(run)}: the CLI printed {run.get('status')} with"
                                               f" {len(want)} findings; report --json shows {len(got)}"
                                               f" (first missing: {(missing or '')[:160]})")


def leftovers(trial: Trial) -> list[str]:
    """Invalid copies left by concurrent rebuilds (`<index>_ccnew[N]`, `<index>_ccold[N]`)."""
    return [r[0] for r in trial.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE NOT i.indisvalid AND c.relname ~ '_cc(new|old)[0-9]*$' ORDER BY 1")]


def check_leftovers_reported(tally: Tally, trial: Trial, printed: list[dict[str, Any]]) -> None:
    """After a run that may have failed rebuilds: at most one leftover per index, and every leftover
    present is named in a printed finding or error."""
    names = leftovers(trial)
    per_index: dict[str, list[str]] = defaultdict(list)
    for name in names:
        per_index[LEFTOVER_RE.sub("", name)].append(name)
    for index, copies in sorted(per_index.items()):
        tally.note(f"leftovers_{len(copies)}")
        if len(copies) > 1:
            tally.violation("leftovers_per_index", f"{index}: {len(copies)} invalid copies {copies}")
    text = json.dumps([r.get("findings") for r in printed], default=str) + " " + " ".join(
        str(r.get("error") or "") for r in printed)
    for name in names:
        if not re.search(rf"(?<![\w$]){re.escape(name)}(?![\w$])", text):
            tally.violation("leftover_unreported", f"{name} is left (invalid) and no printed finding or error names it"
                                                   f" (runs: {[(describe(r), r.get('status')) for r in printed]})")


def check_sessions_end(tally: Tally, trial: Trial) -> None:
    """Once the CLI has exited, none of its sessions (or advisory locks) stays behind."""
    deadline = time.monotonic() + SESSION_GRACE
    while True:
        sessions = trial.tool_sessions()
        locks = trial.execute("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                              " WHERE l.locktype = 'advisory' AND d.datname = current_database()")[0][0]
        if not sessions and not locks:
            return
        if time.monotonic() > deadline:
            tally.violation("session_leak", f"{len(sessions)} session(s) {sessions[:3]} and {locks} advisory lock(s)"
                                            f" {SESSION_GRACE:.0f}s after the CLI exited")
            return
        time.sleep(0.1)


def wait_orphans_gone(tally: Tally, trial: Trial, timeout: float = 15.0) -> None:
    """After kill -9: the server ends the dead client's backends (client_connection_check_interval);
    ones still there after `timeout` are terminated (counted) so the next run can take the lock."""
    deadline = time.monotonic() + timeout
    while trial.tool_sessions():
        if time.monotonic() > deadline:
            tally.note("orphans_terminated")
            trial.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                          " AND application_name LIKE 'pg-maintainer%' AND pid <> pg_backend_pid()")
            deadline = time.monotonic() + timeout
        time.sleep(0.1)


def follow_up(tally: Tally, trial: Trial) -> list[dict[str, Any]]:
    """The next normal run (no fault): it must end ok, its ledger record must match."""
    baseline = trial.ledger_max_id()
    outcome = trial.start("followup").wait()
    runs = check_cli(tally, outcome, counted_as="followup")
    if not runs:
        tally.violation("followup_not_ok", f"follow-up printed no runs: exit {outcome.returncode}")
    for run in runs:
        if run.get("status") != "ok":
            tally.violation("followup_not_ok", f"{describe(run)}: follow-up {run.get('status')}: {run.get('error')!r}"
                                               f" {run.get('reason') or ''}")
    if runs:
        check_ledger(tally, trial, runs, baseline)
    return runs


def check_catalog(tally: Tally, trial: Trial) -> None:
    """After a normal run following the fault: no invalid index, no _ccnew/_ccold, no helper CHECK,
    no pending detach, no ledger record still `running`."""
    invalid = [r[0] for r in trial.execute(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid ORDER BY 1")]
    if invalid:
        tally.violation("invalid_index", f"invalid indexes after the next run: {invalid}")
    copies = [r[0] for r in trial.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'i' AND relname ~ '_cc(new|old)[0-9]*$' ORDER BY 1")]
    if copies:
        tally.violation("cc_leftover", f"_ccnew/_ccold indexes after the next run: {copies}")
    helpers = trial.execute("SELECT conrelid::regclass::text, conname FROM pg_constraint"
                            " WHERE conname LIKE 'maintainer\\_%' ORDER BY 1, 2")
    if helpers:
        tally.violation("helper_constraint", f"helper CHECK constraints after the next run: {helpers}")
    pending = trial.execute("SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhdetachpending")
    if pending:
        tally.violation("pending_detach", f"pending detaches after the next run: {pending}")
    if trial.execute("SELECT to_regclass('maintainer.run')") != [(None,)]:
        running = trial.execute("SELECT id, job, item FROM maintainer.run WHERE status = 'running'")
        if running:
            tally.violation("ledger_running", f"ledger records still running after the next run: {running}")


# -- per unit: a snapshot of what must not change, and the state a run must reach ----------------


def snapshot(trial: Trial) -> dict[str, Any]:
    if trial.unit == "anonymize":
        shot = {}
        for table in ANON_TABLES:
            # the rows outside `where`, every byte and the row version (xmin: not even rewritten);
            # the rows inside, every column the sweep must not touch
            shot[table] = trial.execute(
                f"SELECT (SELECT md5(coalesce(string_agg(t::text || '/' || t.xmin::text, '|' ORDER BY id), ''))"
                f"          FROM {table} t WHERE NOT ({ANON_WHERE})),"
                f"       (SELECT md5(coalesce(string_agg(concat_ws(',', id, user_id, action, created_at), '|'"
                f"                                       ORDER BY id), '')) FROM {table} WHERE {ANON_WHERE}),"
                f"       (SELECT count(*) FROM {table})"
            )[0]
        return shot
    if trial.unit == "partitions":
        keep = dt.datetime.now(UTC).date() - dt.timedelta(days=PART_RETENTION_DAYS - 1)
        return {table: trial.execute(
            f"SELECT md5(coalesce(string_agg(concat_ws(',', id, created_at, v), '|' ORDER BY id), ''))"
            f" FROM {table} WHERE created_at >= %s", (keep,))[0] for table in PART_TABLES}
    return {}


def check_converged(tally: Tally, trial: Trial, before: dict[str, Any]) -> None:
    """What the follow-up run must have left, per unit."""
    if trial.unit == "reindex":
        valid = {r[0] for r in trial.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indisvalid")}
        lost = [name for name in REINDEX_INDEXES if name not in valid]
        if lost:
            tally.violation("index_lost", f"indexes gone or invalid: {lost}")
    elif trial.unit == "anonymize":
        after = snapshot(trial)
        for table in ANON_TABLES:
            pending = trial.execute(f"SELECT count(*) FROM {table} WHERE ({ANON_WHERE}) AND {ANON_PENDING}")[0][0]
            if pending:
                tally.violation("not_anonymized", f"{table}: {pending} matching rows still hold personal data")
            if after[table][0] != before[table][0] or after[table][2] != before[table][2]:
                tally.violation("other_rows_changed", f"{table}: rows outside `where` changed (or rows lost/added)")
            if after[table][1] != before[table][1]:
                tally.violation("other_rows_changed", f"{table}: columns outside `set` changed in matching rows")
    elif trial.unit == "partitions":
        today = dt.datetime.now(UTC).date()
        for table in PART_TABLES:
            names = {r[0] for r in trial.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = %s::regclass", (table,))}
            missing = [f"{table}_p{today + dt.timedelta(days=d):%Y%m%d}" for d in range(PART_PREMAKE)]
            missing = [name for name in missing if name not in names]
            # upper bound <= now - retention is past retention (one day of slack around midnight)
            limit = today - dt.timedelta(days=PART_RETENTION_DAYS + 1)
            expired = sorted(n for n in names if re.fullmatch(rf"{table}_p\d{{8}}", n)
                             and dt.datetime.strptime(n[-8:], "%Y%m%d").date() + dt.timedelta(days=1) <= limit)
            if missing or expired:
                tally.violation("partitions_not_converged", f"{table}: missing {missing}, expired still attached"
                                                            f" {expired}")
        after = snapshot(trial)
        for table in PART_TABLES:
            if after[table] != before[table]:
                tally.violation("partition_rows_changed", f"{table}: rows inside the retention changed")


CONNECTION_ERROR_RE = re.compile(
    r"unreachable|connection|terminat|shut ?down|starting up|not accepting|server closed|recovery|no such",
    re.IGNORECASE,
)


def check_no_failure(tally: Tally, printed: list[dict[str, Any]], cause: str) -> None:
    """A run the fault should not have failed (the server came back within seconds; the engine
    reconnects and retries): a failed run is a violation, named by what it failed with."""
    for run in printed:
        if run.get("status") != "failed":
            continue
        error = str(run.get("error") or "")
        state = str(run.get("sqlstate") or "")
        connection = state.startswith("08") or state in ("57P01", "57P02", "57P03") or CONNECTION_ERROR_RE.search(error)
        kind = f"{cause}_failure" if connection else f"failed_after_{cause}"
        tally.violation(kind, f"{describe(run)} failed: {error!r} (sqlstate {state or None})")


def check_exclusive(tally: Tally, rows: dict[int, dict[str, Any]]) -> None:
    """Never two runs doing the same item at once: ledger records of the same (job, item) that ran
    (ok or failed) must not overlap in time (the ledger's timestamps are taken while the lock is held)."""
    ran: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for row in rows.values():
        if row.get("status") in ("ok", "failed", "running", "interrupted"):
            ran[(row.get("job"), row.get("item"))].append(row)
    for (job, item), runs in ran.items():
        for i, a in enumerate(runs):
            for b in runs[i + 1:]:
                if not (a.get("finished_at") and b.get("finished_at")):
                    continue
                if a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]:
                    tally.violation("both_ran", f"{job}/{item}: runs {a['id']} ({a['started_at']}..{a['finished_at']})"
                                                f" and {b['id']} ({b['started_at']}..{b['finished_at']}) overlap")

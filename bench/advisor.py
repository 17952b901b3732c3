"""The advisor: run time over 2,000 tables and 5,000 indexes, and precision/recall on the planted corpus.

1. Cost: a schema `bulk` of 2,000 tables (bigint key, a foreign key to the previous table, some
   with an index behind it, some duplicated or redundant indexes) with 5,000 indexes in all, next
   to the planted corpus; the advisor job with `min_size: 0` (every object is considered by every
   check: the worst case) and with its defaults, run through the engine like `maintainer trigger`
   does. The first run has no `index_usage` record to compare with; later ones read the previous
   one from the ledger, as the daemon's runs do. Goal: under 2 s.
2. Accuracy: tests/sql/advisor_cases.sql alone (schema `adv`), every check's planted cases and
   healthy twins as listed in tests/test_advisor.py. Goal: 100% precision, 100% recall.

Usage: .venv/bin/python bench/advisor.py [--tables 2000] [--indexes 5000] [--runs 5] [--server pg18-embedded|all]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maintainer.pgserver import LocalCluster, available_kinds  # noqa: E402
from maintainer.project import load_project  # noqa: E402
from maintainer.runner import RunOptions, run  # noqa: E402
from tests.test_advisor import CHECKS, PLANTED, TWINS  # noqa: E402

CASES = ROOT / "tests" / "sql" / "advisor_cases.sql"


def bulk_schema(conn: psycopg.Connection, tables: int, indexes: int) -> int:
    """`tables` tables, each with a primary key; extra indexes spread over them up to `indexes`."""
    conn.execute("CREATE SCHEMA bulk")
    extra = indexes - tables
    for n in range(tables):
        ref = f", ref bigint REFERENCES bulk.t{n - 1} (id)" if n else ""
        conn.execute(f"CREATE TABLE bulk.t{n} (id bigint PRIMARY KEY, a int, b int, c timestamptz, secret_token text{ref})")
    made = tables
    shapes = ["(a)", "(b, c)", "(ref)", "(a, b)", "(c)"]
    n = 0
    while made < tables + extra:
        table = n % tables
        shape = shapes[(n // tables) % len(shapes)]
        if shape == "(ref)" and table == 0:
            shape = "(b)"
        conn.execute(f"CREATE INDEX ON bulk.t{table} {shape}")
        made += 1
        n += 1
    conn.execute("ANALYZE")
    return made


def write_workspace(root: Path, dsn: str, params: Mapping[str, object]) -> Path:
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    (root / "templates").mkdir(exist_ok=True)
    config = root / "maintainer.yaml"
    config.write_text(yaml.safe_dump({"targets": {"app": {"dsn": dsn}}, "jobs_dir": "jobs",
                                      "templates_dir": "templates", "log_format": "text"}))
    (root / "jobs" / "advisor.yaml").write_text(yaml.safe_dump({"name": "advisor", "unit": "advisor", "params": dict(params)}))
    return config


def run_advisor(config: Path) -> tuple[float, list[dict[str, object]]]:
    project = load_project(str(config))
    [spec] = project.run_specs(project.job("advisor"))
    result = run(spec, RunOptions())
    assert result.status == "ok", result.error
    return result.seconds, result.findings


def timing(config: Path, runs: int) -> tuple[float, list[float], int]:
    first, findings = run_advisor(config)
    later = [run_advisor(config)[0] for _ in range(runs)]
    return first, later, len(findings)


def accuracy(config: Path) -> tuple[float, float, set[tuple[str, str]], set[tuple[str, str]]]:
    _, findings = run_advisor(config)
    found = {(str(f["check"]), str(f["object"])) for f in findings if f["check"] in CHECKS}
    hits = found & PLANTED
    precision = len(hits) / len(found) if found else 1.0
    recall = len(hits) / len(PLANTED)
    return precision, recall, found - PLANTED, PLANTED - found


def bench(kind_name: str, tables: int, indexes: int, runs: int) -> None:
    kind = next(k for k in available_kinds() if k.name == kind_name)
    with LocalCluster(kind) as cluster, tempfile.TemporaryDirectory() as tmp:
        with cluster.connect() as conn:
            conn.execute("CREATE DATABASE corpus")
            conn.execute("CREATE DATABASE big")
        with psycopg.connect(cluster.dsn("corpus"), autocommit=True) as conn:
            conn.execute(CASES.read_text())
            conn.execute("ANALYZE")
        with psycopg.connect(cluster.dsn("big"), autocommit=True) as conn:
            conn.execute(CASES.read_text())
            started = time.perf_counter()
            made = bulk_schema(conn, tables, indexes)
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                "         WHERE c.relkind = 'r' AND n.nspname IN ('bulk', 'adv')),"
                "       (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                "         WHERE c.relkind = 'i' AND n.nspname IN ('bulk', 'adv'))").fetchone()
            print(f"{kind_name}: built {made} bulk indexes in {time.perf_counter() - started:.1f}s; "
                  f"user tables {counts[0]}, indexes {counts[1]}")  # type: ignore[index]
        time.sleep(1.0)  # table statistics of the load reach the shared statistics
        root = Path(tmp)
        precision, recall, extra, missed = accuracy(
            write_workspace(root / "corpus", cluster.dsn("corpus"), {"schemas": ["adv"], "min_size": 0,
                                                                     "large_size": "1MB"}))
        print(f"{kind_name}: corpus precision {precision:.0%}, recall {recall:.0%} "
              f"({len(PLANTED)} planted, {len(TWINS)} twins); extra {sorted(extra)}; missed {sorted(missed)}")
        cases: list[tuple[str, dict[str, object]]] = [("min_size 0", {"min_size": 0}), ("defaults", {})]
        for label, params in cases:
            config = write_workspace(root / label.replace(" ", "_"), cluster.dsn("big"), params)
            first, later, findings = timing(config, runs)
            print(f"{kind_name}: advisor run ({label}): first {first:.2f}s, then median {statistics.median(later):.2f}s"
                  f" (min {min(later):.2f}, max {max(later):.2f}, {runs} runs), {findings} findings")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tables", type=int, default=2000)
    parser.add_argument("--indexes", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--server", default="pg18-embedded")
    args = parser.parse_args()
    names = [k.name for k in available_kinds()] if args.server == "all" else [args.server]
    for name in names:
        bench(name, args.tables, args.indexes, args.runs)


if __name__ == "__main__":
    main()

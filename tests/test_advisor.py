"""The advisor (SPEC §14) end to end: the planted corpus of tests/sql/advisor_cases.sql on every
server, the statements it proposes run on the same database, unused_index over time, and a standby
whose index usage counts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import Database, Workspace
from tests.test_pacing import Replicated, replicated  # noqa: F401  (the primary + standby fixture)

CASES = Path(__file__).parent / "sql" / "advisor_cases.sql"
PARAMS = {"schemas": ["adv"], "min_size": 0, "large_size": "1MB"}

# (check, object) of every planted case.
PLANTED = {
    ("duplicate_index", "adv.dup_a_again_idx"),
    ("duplicate_index", "adv.dup_uniq_a_idx"),
    ("redundant_index", "adv.red_a_idx"),
    ("fk_without_index", "adv.child_noidx.child_noidx_parent_id_fkey"),
    ("brin_candidate", "adv.events_created_at_idx"),
    ("fillfactor", "adv.append_ff"),
    ("fillfactor", "adv.churn"),
    ("int4_key", "adv.orders.id"),
    ("int4_key", "adv.order_lines.order_id"),
    ("partition_candidate", "adv.logs"),
    ("no_primary_key", "adv.nopk"),
    ("plaintext_secret", "adv.accounts.password"),
    ("plaintext_secret", "adv.accounts.api_token"),
}
# The healthy twins: never raised by the check next to them.
TWINS = {
    ("duplicate_index", "adv.dup_a_idx"),
    ("duplicate_index", "adv.dup_uniq_a_key"),
    ("duplicate_index", "adv.dup_ok_a_idx"),
    ("duplicate_index", "adv.dup_ok_a_partial_idx"),
    ("duplicate_index", "adv.dup_ok_a_hash_idx"),
    ("redundant_index", "adv.red_ok_b_idx"),
    ("redundant_index", "adv.red_ok_a_uniq"),
    ("redundant_index", "adv.red_a_b_idx"),
    ("fk_without_index", "adv.child_idx.child_idx_parent_id_fkey"),
    ("fk_without_index", "adv.child_multi.child_multi_a_b_fkey"),
    ("brin_candidate", "adv.events_shuffled_created_at_idx"),
    ("brin_candidate", "adv.events_pkey"),
    ("fillfactor", "adv.append_ok"),
    ("fillfactor", "adv.churn_ok"),
    ("int4_key", "adv.invoices.id"),
    ("int4_key", "adv.invoice_lines.invoice_id"),
    ("partition_candidate", "adv.logs_kept"),
    ("plaintext_secret", "adv.accounts.password_hash"),
    ("plaintext_secret", "adv.accounts.token_expires_at"),
    ("plaintext_secret", "adv.sessions.session_token"),
}
# Checks judged by the corpus (unused_index needs time: tested on its own below).
CHECKS = {check for check, _ in PLANTED}


def load_cases(db: Database) -> None:
    db.run_script(CASES.read_text())
    db.execute("ANALYZE")
    wait_for_stats(db, "SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = 'adv.logs'::regclass", 10000)


def wait_for_stats(db: Database, query: str, expected: int) -> None:
    """Counters reach the shared statistics when a backend ends or goes idle: wait for them."""
    deadline = time.monotonic() + 10
    while db.execute(query) != [(expected,)]:
        assert time.monotonic() < deadline, f"statistics never showed {expected}: {query}"
        time.sleep(0.1)


def advice(workspace: Workspace, *args: str) -> list[dict[str, Any]]:
    result = workspace.cli(*(args or ("trigger", "advisor")), "--json")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)["runs"]
    assert len(runs) == 1 and runs[0]["error"] is None, runs
    return list(runs[0]["findings"])


def pairs(findings: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(f["check"], f["object"]) for f in findings if f["check"] in CHECKS}


@pytest.fixture
def corpus(workspace: Workspace, db: Database) -> Workspace:
    load_cases(db)
    workspace.job("advisor", unit="advisor", params=PARAMS)
    return workspace


def test_every_planted_case_is_found_and_no_twin_is_flagged(corpus: Workspace) -> None:
    findings = advice(corpus)
    found = pairs(findings)
    assert found >= PLANTED, PLANTED - found
    assert not TWINS & found, TWINS & found
    assert found == PLANTED, found - PLANTED  # precision on the corpus: nothing else either
    for finding in findings:
        assert set(finding) >= {"check", "object", "evidence", "sql", "level", "reason"}
        assert finding["level"] in ("info", "warn") and finding["reason"]
    by_pair = {(f["check"], f["object"]): f for f in findings}
    assert by_pair[("duplicate_index", "adv.dup_uniq_a_idx")]["evidence"]["duplicate_of"] == "adv.dup_uniq_a_key"
    assert by_pair[("fk_without_index", "adv.child_noidx.child_noidx_parent_id_fkey")]["level"] == "warn"
    brin = by_pair[("brin_candidate", "adv.events_created_at_idx")]
    assert brin["evidence"]["correlation"] >= 0.95 and brin["evidence"]["saves"] > 0
    assert [f["check"] for f in findings][-1] == "index_usage"  # the record the next run compares with


def test_drops_are_never_proposed_for_indexes_that_enforce_something(corpus: Workspace, db: Database) -> None:
    protected = {
        row[0] for row in db.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE i.indisunique OR i.indisprimary"
            "    OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)")
    }
    dropped = {line.split()[-1].rstrip(";") for f in advice(corpus) for line in (f["sql"] or "").splitlines()
               if line.startswith("DROP INDEX")}
    assert dropped and not dropped & protected, dropped & protected


def script_statements(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.strip() and not line.startswith("--")]


def test_every_statement_runs_and_the_next_run_no_longer_raises_what_it_fixed(corpus: Workspace, db: Database) -> None:
    first = advice(corpus)
    fixed = {(f["check"], f["object"]) for f in first if f["sql"]}
    assert {c for c, _ in fixed} >= {"duplicate_index", "redundant_index", "fk_without_index", "brin_candidate",
                                     "fillfactor"}
    result = corpus.cli("advise", "--sql")
    assert result.exit_code == 0, result.output
    statements = script_statements(result.output)
    # safe order: every CREATE INDEX before any DROP INDEX, each CONCURRENTLY
    kinds = [s.split()[0] for s in statements]
    assert kinds.index("DROP") > max(i for i, k in enumerate(kinds) if k == "CREATE")
    assert all("CONCURRENTLY" in s for s in statements if "INDEX" in s)
    with db.connect() as conn:
        for statement in statements:
            conn.execute(statement)  # autocommit: CONCURRENTLY runs outside a transaction block
    again = pairs(advice(corpus))
    assert not fixed & again, fixed & again


def test_dismissed_recommendations_stay_quiet(corpus: Workspace) -> None:
    corpus.job("advisor", unit="advisor",
               params={**PARAMS, "dismiss": ["no_primary_key:adv.nopk", "redundant_index:adv.red_a_idx"]})
    found = pairs(advice(corpus))
    assert ("no_primary_key", "adv.nopk") not in found and ("redundant_index", "adv.red_a_idx") not in found
    assert ("duplicate_index", "adv.dup_a_again_idx") in found
    script = corpus.cli("advise", "--sql").output
    assert "redundant_index adv.red_a_idx" not in script and "adv.nopk" not in script
    assert "duplicate_index adv.dup_a_again_idx" in script


USAGE_SCHEMA = """
CREATE SCHEMA usage;
CREATE TABLE usage.t (id bigint PRIMARY KEY, a int, b int);
CREATE INDEX t_a_idx ON usage.t (a);
CREATE INDEX t_b_idx ON usage.t (b);
INSERT INTO usage.t SELECT g, g, g FROM generate_series(1, 1000) g;
ANALYZE usage.t;
"""
USE_B = "SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT count(*) FROM usage.t WHERE b = 7"


def unused(findings: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f["object"]: f for f in findings if f["check"] == "unused_index"}


def use_b(execute: Any, scans_query: Any) -> None:
    before = scans_query()
    execute(USE_B)
    deadline = time.monotonic() + 10
    while scans_query() == before:
        assert time.monotonic() < deadline, "the scan never reached the statistics"
        time.sleep(0.1)


def test_unused_index_needs_its_window_and_a_used_index_is_never_raised(workspace: Workspace, db: Database) -> None:
    db.run_script(USAGE_SCHEMA)
    params = {"schemas": ["usage"], "min_size": 0}
    workspace.job("advisor", unit="advisor", params={**params, "unused_window": "1 hour"})

    def scans() -> Any:
        return db.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 't_b_idx'")

    first = unused(advice(workspace))
    assert set(first) == {"usage.t_a_idx", "usage.t_b_idx"}  # never the primary key
    assert all(f["sql"] is None and f["level"] == "info" and "more needed" in f["reason"] for f in first.values())
    use_b(db.execute, scans)
    second = unused(advice(workspace))
    assert set(second) == {"usage.t_a_idx"} and second["usage.t_a_idx"]["sql"] is None  # inside the window

    workspace.job("advisor", unit="advisor", params={**params, "unused_window": "2s"})
    time.sleep(2.2)
    use_b(db.execute, scans)
    third = unused(advice(workspace))
    assert set(third) == {"usage.t_a_idx"}
    assert third["usage.t_a_idx"]["level"] == "warn"
    assert third["usage.t_a_idx"]["sql"] == "DROP INDEX CONCURRENTLY IF EXISTS usage.t_a_idx;"
    db.execute(third["usage.t_a_idx"]["sql"])
    assert "usage.t_a_idx" not in unused(advice(workspace))


# -- a standby target whose index usage counts -------------------------------------------------------


def test_an_index_used_on_a_standby_is_not_unused(replicated: Replicated, tmp_path: Path) -> None:  # noqa: F811
    primary, standby = replicated.primary, replicated.standby
    with primary.connect() as conn:
        conn.execute("DROP SCHEMA IF EXISTS usage CASCADE")
        conn.execute("DROP SCHEMA IF EXISTS maintainer CASCADE")
        conn.execute(USAGE_SCHEMA)
    deadline = time.monotonic() + 30
    while True:
        with standby.connect() as conn:
            if conn.execute("SELECT to_regclass('usage.t_b_idx') IS NOT NULL").fetchone() == (True,):
                break
        assert time.monotonic() < deadline, "the standby never replayed the schema"
        time.sleep(0.1)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "templates").mkdir()
    workspace = Workspace(tmp_path, primary.dsn())
    workspace.write_config(targets={"app": {"dsn": primary.dsn()}, "standby": {"dsn": standby.dsn()}})
    params = {"schemas": ["usage"], "min_size": 0, "replicas": ["standby"], "unused_window": "2s"}
    workspace.job("advisor", unit="advisor", targets=["app"], params=params)

    def on_standby(query: str) -> Any:
        with psycopg.connect(standby.dsn(), autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []

    def standby_scans() -> Any:
        return on_standby("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 't_b_idx'")

    first = unused(advice(workspace, "advise"))
    assert set(first) == {"usage.t_a_idx", "usage.t_b_idx"}
    assert set(first["usage.t_a_idx"]["evidence"]["sources"]) == {"app", "standby"}
    time.sleep(2.2)
    use_b(on_standby, standby_scans)  # only the standby uses t_b_idx
    second = unused(advice(workspace, "advise"))
    assert set(second) == {"usage.t_a_idx"} and second["usage.t_a_idx"]["sql"] is not None

    # a run that could not read the standby (the scheduler's) judges nothing
    third = unused(advice(workspace, "trigger", "advisor"))
    assert third["usage.t_a_idx"]["sql"] is None and "standby" in third["usage.t_a_idx"]["reason"]

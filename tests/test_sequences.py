"""The `sequences` unit end to end: every case of tests/sql/sequence_cases.sql on every server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Database, Workspace

CASES = Path(__file__).parent / "sql" / "sequence_cases.sql"
EXPECTATIONS = yaml.safe_load((Path(__file__).parent / "sql" / "sequence_expectations.yaml").read_text())


def findings(workspace: Workspace, *args: str) -> list[dict[str, Any]]:
    result = workspace.cli(*args, "--json")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)["runs"]
    assert len(runs) == 1 and runs[0]["error"] is None, runs
    return list(runs[0]["findings"])


def by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(r["sequence"], r["column"]): r for r in rows}


@pytest.fixture
def cases(workspace: Workspace, db: Database) -> Workspace:
    db.run_script(CASES.read_text())
    workspace.job("sequences", unit="sequences", params={"schemas": ["seqcases"]})
    return workspace


def test_every_case_gets_the_right_level_and_limit(cases: Workspace) -> None:
    got = by_key(findings(cases, "trigger", "sequences"))
    expected = [e for e in EXPECTATIONS if "as_role" not in e]
    assert set(got) == {(e["sequence"], e["column"]) for e in expected}
    for case in expected:
        row = got[(case["sequence"], case["column"])]
        assert (row["level"], row["limited_by"]) == (case["level"], case["limited_by"]), case
        if row["level"] != "unknown":
            assert 0 <= row["used_ratio"] <= 1
            assert isinstance(row["calls_left"], int) and row["calls_left"] >= 0


def test_column_limits_and_remediation_hints(cases: Workspace) -> None:
    got = by_key(findings(cases, "trigger", "sequences"))
    legacy = got[("seqcases.legacy_ids", "seqcases.legacy.id")]
    # A bigint sequence that looks 0% used, but the int4 column overflows at 2^31.
    assert legacy["limited_by"] == "column" and legacy["used_ratio"] == pytest.approx(0.7, abs=0.001)
    assert "bigint" in legacy["hint"] and "migration" in legacy["hint"]
    widened = got[("seqcases.widened_id_seq", "seqcases.widened.id")]
    assert widened["level"] == "critical" and "ALTER SEQUENCE" in widened["hint"]
    countdown = got[("seqcases.countdown_ids", "seqcases.countdown.id")]
    assert countdown["increment"] < 0 and countdown["level"] == "warn"
    ring = got[("seqcases.ring_ids", "seqcases.ring.slot")]
    assert ring["cycle"] is True and "duplicate" in ring["hint"]
    fresh = got[("seqcases.fresh_id_seq", "seqcases.fresh.id")]
    assert fresh["called"] is False and fresh["used_ratio"] == 0


def test_the_findings_are_recorded_with_their_level(cases: Workspace, db: Database) -> None:
    findings(cases, "trigger", "sequences")
    levels = dict(db.execute("SELECT level, count(*) FROM maintainer.finding GROUP BY level"))
    assert levels["critical"] >= 3 and levels["warn"] >= 3


def test_an_unreadable_sequence_is_unknown_not_zero(cases: Workspace, db: Database) -> None:
    db.execute("ALTER ROLE seq_reader LOGIN")
    cases.write_config(targets={"app": {"dsn": db.server.dsn(db.name, user="seq_reader")}})
    got = by_key(findings(cases, "plan", "sequences"))  # plan: the role needs no ledger rights
    for case in (e for e in EXPECTATIONS if e.get("as_role") == "seq_reader"):
        row = got[(case["sequence"], case["column"])]
        assert row["level"] == case["level"], case
        if case["level"] == "unknown":
            assert row["used_ratio"] is None and row["calls_left"] is None


def test_check_reports_unreadable_sequences(cases: Workspace, db: Database) -> None:
    db.execute("ALTER ROLE seq_reader LOGIN")
    db.execute(f'GRANT CREATE ON DATABASE "{db.name}" TO seq_reader')
    cases.write_config(targets={"app": {"dsn": db.server.dsn(db.name, user="seq_reader")}})
    result = cases.cli("check")
    assert "1 sequence(s) cannot be read by role seq_reader" in result.output, result.output

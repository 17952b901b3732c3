"""Issue 16, scenario 4: two `maintainer trigger JOB --json` of the same job started together.

One may be skipped (exit 3: another runner holds the lock) item by item; never may both do the same
item at once, neither may print a traceback, and the ledger must hold exactly the runs they printed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.faultkit import (
    SCALE,
    FaultCluster,
    Tally,
    Trial,
    check_catalog,
    check_cli,
    check_converged,
    check_exclusive,
    check_ledger,
    check_leftovers_reported,
    check_no_failure,
    check_report,
    check_sessions_end,
    follow_up,
    new_trial,
    snapshot,
    timeout_for,
    trial_rng,
)

UNITS = ("anonymize", "partitions", "reindex")
TRIALS = 2 * SCALE  # each server kind starts its rotation of UNITS further along


@pytest.mark.timeout(timeout_for(TRIALS, 60))
def test_double_start(fault_cluster: FaultCluster, tmp_path: Path) -> None:
    tally = Tally("double_start", fault_cluster.name)
    try:
        for n in range(TRIALS):
            rng = trial_rng("double_start", fault_cluster.name, n)
            unit = UNITS[(n + TRIALS * fault_cluster.index) % len(UNITS)]
            gap = rng.uniform(0, 0.2)
            with tally.trial(f"#{n} {unit}, second {gap * 1000:.0f}ms later"), \
                    new_trial(fault_cluster, unit, tmp_path / f"t{n}") as trial:
                double_start_trial(tally, trial, gap)
    finally:
        print(tally.record())
    verdict = tally.verdict()
    assert verdict is None, verdict


def double_start_trial(tally: Tally, trial: Trial, gap: float) -> None:
    before = snapshot(trial)
    baseline = trial.ledger_max_id()
    first = trial.start("first")
    time.sleep(gap)
    second = trial.start("second")
    outcomes = [first.wait(), second.wait()]
    tally.note("exits_" + "_".join(sorted(str(o.returncode) for o in outcomes)))
    printed = [run for outcome in outcomes for run in check_cli(tally, outcome)]
    if printed:
        check_exclusive(tally, check_ledger(tally, trial, printed, baseline))
        check_report(tally, trial, printed)
        check_no_failure(tally, printed, "double_start")
        if trial.unit == "reindex":
            check_leftovers_reported(tally, trial, printed)
    check_sessions_end(tally, trial)
    follow_up(tally, trial)
    check_catalog(tally, trial)
    check_converged(tally, trial, before)

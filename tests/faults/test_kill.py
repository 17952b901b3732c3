"""Issue 16, scenario 2: `kill -9` of the CLI at a random moment of a run.

A killed process prints nothing, so there is nothing to compare; what must hold is the state the
next normal run leaves: no invalid index or _ccnew/_ccold copy, no helper CHECK, no pending detach,
every matching row anonymized and no other row changed, and the killed run's ledger record no longer
`running` (the next holder of the lock marks it interrupted).
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
    check_ledger,
    check_sessions_end,
    follow_up,
    new_trial,
    snapshot,
    timeout_for,
    trial_rng,
    wait_orphans_gone,
)

UNITS = ("reindex", "partitions", "anonymize")
TRIALS = 2 * SCALE  # each server kind starts its rotation of UNITS further along


@pytest.mark.timeout(timeout_for(TRIALS, 60))
def test_kill_minus_nine_mid_run(fault_cluster: FaultCluster, tmp_path: Path) -> None:
    tally = Tally("kill", fault_cluster.name)
    try:
        for n in range(TRIALS):
            rng = trial_rng("kill", fault_cluster.name, n)
            unit = UNITS[(n + TRIALS * fault_cluster.index) % len(UNITS)]
            phase = rng.choice(("early", "work"))
            delay = rng.uniform(0, 0.3)
            with tally.trial(f"#{n} {unit} at {phase}+{delay * 1000:.0f}ms"), \
                    new_trial(fault_cluster, unit, tmp_path / f"t{n}") as trial:
                kill_trial(tally, trial, phase, delay)
    finally:
        print(tally.record())
    verdict = tally.verdict()
    assert verdict is None, verdict


def kill_trial(tally: Tally, trial: Trial, phase: str, delay: float) -> None:
    before = snapshot(trial)
    baseline = trial.ledger_max_id()
    process = trial.start()
    if trial.wait_window(process, phase):
        time.sleep(delay)
        process.kill()
    outcome = process.wait()
    tally.note("killed_during_run" if outcome.killed else "ended_before_kill")
    printed = check_cli(tally, outcome)
    if printed:  # it finished before the kill: then it must be on record like any run
        check_ledger(tally, trial, printed, baseline)
        check_sessions_end(tally, trial)
    else:
        wait_orphans_gone(tally, trial)
    follow_up(tally, trial)
    check_catalog(tally, trial)
    check_converged(tally, trial, before)

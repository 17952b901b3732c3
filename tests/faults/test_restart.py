"""Issue 16, scenario 1: the server restarts (`pg_ctl restart -m fast|immediate`, sometimes with a few
seconds of downtime, as a real restart or failover has) while a run is known to be active.

Each trial: a fresh copy of the unit's database; `maintainer trigger JOB --json` as a subprocess;
wait until the run is active (its ledger record says `running`, or its backend is executing the
REINDEX / UPDATE / DDL), a random 0-300 ms more, restart; then check what the CLI printed against
the ledger and the report, run the job again normally and check the database is whole.
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

UNITS = ("reindex", "anonymize", "partitions")
MODES = ("fast", "immediate")
# Trial i restarts UNITS[i % 3] with MODES[i % 2]: six trials in a row cover every (unit, mode). Each
# server kind starts 4 further along, so at the default size the kinds together cover them all.
TRIALS = 4 * SCALE


@pytest.mark.timeout(timeout_for(TRIALS, 60))
def test_restart_mid_run(fault_cluster: FaultCluster, tmp_path: Path) -> None:
    tally = Tally("restart", fault_cluster.name)
    try:
        for n in range(TRIALS):
            rng = trial_rng("restart", fault_cluster.name, n)
            i = n + TRIALS * fault_cluster.index
            unit, mode = UNITS[i % len(UNITS)], MODES[i % len(MODES)]
            downtime = 0.0 if rng.random() < 0.5 else round(rng.uniform(0.5, 2.5), 2)
            phase = rng.choice(("early", "work"))
            delay = rng.uniform(0, 0.3)
            label = f"#{n} {unit} {mode} at {phase}+{delay * 1000:.0f}ms, down {downtime}s"
            with tally.trial(label), new_trial(fault_cluster, unit, tmp_path / f"t{n}") as trial:
                restart_trial(tally, trial, mode, downtime, phase, delay)
    finally:
        print(tally.record())
    verdict = tally.verdict()
    assert verdict is None, verdict


def restart_trial(tally: Tally, trial: Trial, mode: str, downtime: float, phase: str, delay: float) -> None:
    before = snapshot(trial)
    baseline = trial.ledger_max_id()
    process = trial.start()
    if trial.wait_window(process, phase):
        time.sleep(delay)
        tally.note("restart_during_run" if process.running() else "restart_after_exit")
        trial.cluster.restart(mode, downtime)
    else:
        tally.note("window_missed")
    printed = check_cli(tally, process.wait())
    if printed:
        check_ledger(tally, trial, printed, baseline)
        check_report(tally, trial, printed)
        check_no_failure(tally, printed, "restart")
        if trial.unit == "reindex":
            check_leftovers_reported(tally, trial, printed)
    check_sessions_end(tally, trial)
    follow_up(tally, trial)
    check_catalog(tally, trial)
    check_converged(tally, trial, before)

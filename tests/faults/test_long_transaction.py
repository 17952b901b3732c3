"""Issue 16, scenario 3: a long transaction during `reindex`.

A REPEATABLE READ transaction that read an unrelated table holds its snapshot for longer than the
run; REINDEX CONCURRENTLY waits for it and times out (lock_timeout 300 ms-1 s, max_attempts 3) after
having built a full copy of the index. Invariants after the run: at most one leftover
(_ccnew*/_ccold*, invalid) per index, every leftover present named in the run's findings or error,
the ledger as printed; after the transaction ends, the next run leaves none.
"""

from __future__ import annotations

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
    check_report,
    check_sessions_end,
    follow_up,
    new_trial,
    snapshot,
    timeout_for,
    trial_rng,
)

TRIALS = 1 * SCALE


@pytest.mark.timeout(timeout_for(TRIALS, 90))
def test_long_transaction_during_reindex(fault_cluster: FaultCluster, tmp_path: Path) -> None:
    tally = Tally("long_transaction", fault_cluster.name)
    try:
        for n in range(TRIALS):
            rng = trial_rng("long_transaction", fault_cluster.name, n)
            lock_timeout = rng.randint(300, 1000)
            defaults = {"lock_timeout": f"{lock_timeout}ms", "max_attempts": 3, "retry_backoff": "100ms"}
            with tally.trial(f"#{n} lock_timeout {lock_timeout}ms"), \
                    new_trial(fault_cluster, "reindex", tmp_path / f"t{n}", **defaults) as trial:
                long_transaction_trial(tally, trial)
    finally:
        print(tally.record())
    verdict = tally.verdict()
    assert verdict is None, verdict


def long_transaction_trial(tally: Tally, trial: Trial) -> None:
    # the two worst indexes only: 2 rebuilds x 3 attempts x lock_timeout bounds the run's length
    trial.write_job(params={"min_wasted": "256kB", "max_indexes": 2})
    before = snapshot(trial)
    holder = trial.holder()
    holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT count(*) FROM bystander")  # a snapshot, and no lock on the rebuilt tables
    baseline = trial.ledger_max_id()
    printed = check_cli(tally, trial.start().wait())
    for run in printed:
        for finding in run.get("findings") or []:
            if finding.get("decision") in ("failed", "rebuilt", "pending"):
                tally.note(f"decision_{finding['decision']}")
    if printed:
        check_ledger(tally, trial, printed, baseline)
        check_report(tally, trial, printed)
        check_leftovers_reported(tally, trial, printed)
    check_sessions_end(tally, trial)
    holder.execute("ROLLBACK")
    follow_up(tally, trial)
    check_catalog(tally, trial)
    check_converged(tally, trial, before)

"""Explicit BEGIN … COMMIT blocks in `transaction: none` units, against a real PostgreSQL."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Database, Workspace, release_after_the_first_timeout

# Each statement records the transaction it ran in, so the test can tell what was grouped.
BLOCKS_UNIT = """---
description: an autocommit statement, then two statements in one transaction, then another alone
transaction: none
---
{% block apply %}
INSERT INTO seen (step, xid) VALUES ('alone-1', txid_current());
BEGIN;
INSERT INTO seen (step, xid) VALUES ('block-1', txid_current());
INSERT INTO seen (step, xid) VALUES ('block-2', txid_current()), ('block-3', txid_current());
COMMIT;
INSERT INTO seen (step, xid) VALUES ('alone-2', txid_current());
{% endblock %}
"""


def make_seen(db: Database) -> None:
    db.run_script("CREATE TABLE seen (step text NOT NULL, xid bigint NOT NULL);"
                  " CREATE TABLE guarded (id int PRIMARY KEY); INSERT INTO guarded VALUES (1);")


def trigger(workspace: Workspace, job: str, *extra: str) -> dict:
    result = workspace.cli("trigger", job, "--json", *extra)
    return json.loads(result.output)["runs"][0]


def test_a_block_is_one_transaction_between_autocommit_statements(workspace: Workspace, db: Database) -> None:
    make_seen(db)
    workspace.unit("blocks", BLOCKS_UNIT)
    workspace.job("blocks", unit="blocks")
    run = trigger(workspace, "blocks")
    assert run["status"] == "ok", run
    xids = dict(db.execute("SELECT step, xid FROM seen"))
    assert xids["block-1"] == xids["block-2"] == xids["block-3"]
    assert len({xids["alone-1"], xids["block-1"], xids["alone-2"]}) == 3
    actions = run["actions"]
    assert [a["sql"].split()[0] for a in actions] == ["INSERT", "BEGIN", "INSERT", "INSERT", "COMMIT", "INSERT"]
    assert [a["status"] for a in actions] == ["ok"] * 6
    assert [a["rows"] for a in actions] == [1, None, 1, 2, None, 1]
    # the block's statements travel together: its time is recorded on its COMMIT
    assert actions[4]["seconds"] is not None and actions[2]["seconds"] is None


def test_a_failing_block_rolls_back_whole_and_what_committed_before_stays(workspace: Workspace,
                                                                          db: Database) -> None:
    make_seen(db)
    workspace.unit("half", """---
description: the second statement of the block fails
transaction: none
on_step_error: continue
---
{% block discover %}
SELECT 1 AS n UNION ALL SELECT 2 ORDER BY 1
{% endblock %}
{% block apply %}
INSERT INTO seen (step, xid) VALUES ('before-{{ row.n | literal }}', 0);
BEGIN;
INSERT INTO seen (step, xid) VALUES ('in-block-{{ row.n | literal }}', 0);
SELECT 1 / ({{ row.n | literal }} - 1);
INSERT INTO seen (step, xid) VALUES ('after-failure-{{ row.n | literal }}', 0);
COMMIT;
{% endblock %}
""")
    workspace.job("half", unit="half")
    run = trigger(workspace, "half")
    assert run["status"] == "failed" and run["sqlstate"] == "22012", run
    # step 1 failed inside its block, step 2 (on_step_error: continue) went through
    assert sorted(r[0] for r in db.execute("SELECT step FROM seen")) == [
        "after-failure-2", "before-1", "before-2", "in-block-2"]
    first = [a["status"] for a in run["actions"][:6]]
    assert first == ["ok", "skipped", "skipped", "failed", "skipped", "skipped"]
    assert run["actions"][3]["sqlstate"] == "22012"
    # the session is usable again after the aborted block: the next step ran, the ledger was written
    assert db.execute("SELECT status FROM maintainer.run WHERE job = 'half'") == [("failed",)]


def test_a_block_that_hits_lock_timeout_is_retried_as_a_whole(workspace: Workspace, db: Database) -> None:
    make_seen(db)
    workspace.write_config(defaults={"lock_timeout": "200ms", "retry_backoff": "400ms", "max_attempts": 5})
    workspace.unit("locker", """---
description: a block whose second statement waits for a lock
transaction: none
---
{% block apply %}
BEGIN;
INSERT INTO seen (step, xid) VALUES ('first', txid_current());
LOCK TABLE guarded IN ACCESS EXCLUSIVE MODE;
COMMIT;
{% endblock %}
""")
    workspace.job("locker", unit="locker")
    holder = db.connect()
    holder.autocommit = False
    holder.execute("LOCK TABLE guarded IN ACCESS SHARE MODE")

    releaser = release_after_the_first_timeout(db, holder, "guarded")
    run = trigger(workspace, "locker")
    releaser.join()
    holder.close()
    assert run["status"] == "ok", run
    assert min(a["attempts"] for a in run["actions"]) >= 2
    # the rolled-back attempts left nothing: the block's first statement happened exactly once
    assert db.execute("SELECT count(*) FROM seen WHERE step = 'first'") == [(1,)]


@pytest.mark.parametrize(
    ("apply", "transaction", "message"),
    [
        ("BEGIN;\nINSERT INTO seen VALUES ('x', 0);", "none", "BEGIN without COMMIT"),
        ("INSERT INTO seen VALUES ('x', 0);\nCOMMIT;", "none", "COMMIT without BEGIN"),
        ("BEGIN;\nBEGIN;\nCOMMIT;\nCOMMIT;", "none", "BEGIN inside a BEGIN … COMMIT block"),
        ("BEGIN;\nINSERT INTO seen VALUES ('x', 0);\nROLLBACK;", "none", "only BEGIN … COMMIT blocks"),
        ("BEGIN;\nSAVEPOINT s;\nCOMMIT;", "none", "only BEGIN … COMMIT blocks"),
        ("INSERT INTO seen VALUES ('x', 0);\nCOMMIT AND CHAIN;", "none", "only BEGIN … COMMIT blocks"),
        ("BEGIN;\nINSERT INTO seen VALUES ('x', 0);\nCOMMIT;", "per_step", "need transaction: none"),
    ],
)
def test_a_malformed_block_is_a_clear_error_and_runs_nothing(workspace: Workspace, db: Database, apply: str,
                                                             transaction: str, message: str) -> None:
    make_seen(db)
    workspace.unit("bad", f"""---
description: a malformed transaction block
transaction: {transaction}
---
{{% block apply %}}
INSERT INTO seen VALUES ('first statement of the step', 0);
{apply}
{{% endblock %}}
""")
    workspace.job("bad", unit="bad")
    plan = workspace.cli("plan", "bad")
    assert plan.exit_code != 0 and message in plan.output, plan.output
    run = trigger(workspace, "bad")
    assert run["status"] == "failed" and message in run["error"], run
    assert db.execute("SELECT count(*) FROM seen") == [(0,)]
    check = workspace.cli("check")
    assert check.exit_code != 0 and message in check.output

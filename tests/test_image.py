"""The container image for real: the unchanged Dockerfile built on a Debian stand-in for its base
(tests/dockerd.py), run read-only as its non-root user against a PostgreSQL on the host network.

`check` and `trigger` answer with their exit codes (0 good, 2 bad configuration); `run` turns
healthy by the image's own HEALTHCHECK and ends on SIGTERM within its shutdown grace, exit 0; the
image holds no compiler and no PostgreSQL server. The build time and the image's size are printed.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from maintainer.pgserver import LocalCluster, embedded_kind, system15_kind
from tests import dockerd

TAG = "pg-maintainer:test"
GRACE_S = 10
HTTP_PORT = 9188  # the HEALTHCHECK probes this port; the config must keep it
#: A read-only root filesystem, no capabilities, no privilege escalation: what the chart runs with.
LOCKED_DOWN = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", "host")
COMPILER = re.compile(r"^(?:[\w.]+-)?(?:gcc|g\+\+|cc|c\+\+|cpp|clang|clang\+\+|tcc|cc1|cc1plus)(?:-[\d.]+)?$")
SERVER = {"postgres", "postmaster", "initdb", "pg_ctl", "pg_ctlcluster"}


@dataclass
class Image:
    tag: str
    build_seconds: float
    size: int
    base_size: int


@pytest.fixture(scope="module")
def image(docker_engine: dockerd.DockerEngine) -> Image:
    bases = dockerd.dockerfile_bases()
    try:
        for base in bases:
            docker_engine.base_image(base)
    except dockerd.EngineUnavailable as exc:
        pytest.skip(f"no stand-in base image: {exc}")
    seconds = docker_engine.build(dockerd.REPO, TAG)
    return Image(TAG, seconds, docker_engine.image_size(TAG), docker_engine.image_size(bases[-1]))


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalCluster]:
    kind = embedded_kind() or system15_kind()
    if kind is None:
        pytest.skip("neither the embedded PostgreSQL 18 nor PostgreSQL 15 is installed")
    with LocalCluster(kind) as cluster:
        cluster.psql("CREATE TABLE public.counters (id serial PRIMARY KEY);"
                     "SELECT setval('public.counters_id_seq', 1717986918)")  # 80% of int4
        yield cluster


@pytest.fixture
def config(tmp_path: Path, postgres: LocalCluster) -> Path:
    """/etc/maintainer for the container: maintainer.yaml (good), broken.yaml, jobs/; readable by 10001."""
    root = tmp_path / "etc-maintainer"
    (root / "jobs").mkdir(parents=True)
    settings = {
        "targets": {"app": {"dsn": postgres.dsn()}},
        "jobs_dir": "jobs",
        "http": {"listen": f"127.0.0.1:{HTTP_PORT}"},
        "scheduler": {"shutdown_grace": f"{GRACE_S}s"},
        "log_format": "json",
    }
    (root / "maintainer.yaml").write_text(yaml.safe_dump(settings))
    (root / "broken.yaml").write_text(yaml.safe_dump({**settings, "targets": {"app": {"dns": "typo"}}}))
    (root / "jobs" / "sequences.yaml").write_text(yaml.safe_dump(
        {"name": "sequences", "unit": "sequences", "schedule": "*/15 * * * *"}))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def run(engine: dockerd.DockerEngine, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`docker run` of the image, locked down, with `config` as /etc/maintainer (read-only)."""
    return engine.docker("run", "--rm", *LOCKED_DOWN, "--volume", f"{config}:/etc/maintainer:ro", TAG, *args,
                         timeout=120, check=False)


def test_the_image_builds_runs_as_10001_and_reports_its_size(
    docker_engine: dockerd.DockerEngine, image: Image, capsys: pytest.CaptureFixture[str]
) -> None:
    [inspected] = json.loads(docker_engine.docker("image", "inspect", image.tag).stdout)
    cfg = inspected["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["maintainer"] and cfg["Cmd"] == ["run"]
    assert f"{HTTP_PORT}/tcp" in cfg["ExposedPorts"]
    assert any("/healthz" in part for part in cfg["Healthcheck"]["Test"])
    timings = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in docker_engine.timings.items())
    with capsys.disabled():
        print(f"\nimage {image.tag}: {image.size / 1e6:.0f} MB ({image.base_size / 1e6:.0f} MB of it the Debian "
              f"stand-in base), built in {image.build_seconds:.0f} s ({timings})")


def test_check_exits_0_on_a_good_config_and_2_on_a_bad_one(
    docker_engine: dockerd.DockerEngine, image: Image, config: Path
) -> None:
    good = run(docker_engine, config, "check")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run(docker_engine, config, "check", "--config", "/etc/maintainer/broken.yaml")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "dns" in bad.stdout + bad.stderr
    assert "Traceback" not in good.stderr + bad.stderr


def test_trigger_runs_a_job_and_exits_2_on_a_bad_config(
    docker_engine: dockerd.DockerEngine, image: Image, config: Path
) -> None:
    done = run(docker_engine, config, "trigger", "sequences", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(done.stdout)["runs"]
    assert result["status"] == "ok", result
    counter = next(f for f in result["findings"] if f["sequence"] == "public.counters_id_seq")
    assert counter["level"] == "warn"
    for args in (("trigger", "no-such-job"), ("trigger", "sequences", "--config", "/etc/maintainer/broken.yaml")):
        bad = run(docker_engine, config, *args)
        assert bad.returncode == 2, (args, bad.stdout + bad.stderr)
        assert "Traceback" not in bad.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_run_turns_healthy_and_stops_on_sigterm_within_the_grace(
    docker_engine: dockerd.DockerEngine, image: Image, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not _port_free(HTTP_PORT):
        pytest.skip(f"port {HTTP_PORT} is taken on this host; the HEALTHCHECK probes it")
    name = f"pgm-run-{int(time.time())}"
    launched = time.monotonic()
    docker_engine.docker("run", "--detach", "--name", name, *LOCKED_DOWN,
                         "--volume", f"{config}:/etc/maintainer:ro", TAG)
    try:
        # The image's own HEALTHCHECK (interval 30 s): the first probe runs 30 s after the start.
        deadline = time.monotonic() + 120
        status = ""
        while time.monotonic() < deadline:
            state = json.loads(docker_engine.docker("inspect", "--format", "{{json .State}}", name).stdout)
            status = state.get("Health", {}).get("Status", "")
            assert state["Running"], docker_engine.docker("logs", name, check=False).stderr
            if status == "healthy":
                break
            time.sleep(1)
        assert status == "healthy", docker_engine.docker("logs", name, check=False).stderr
        healthy_after = time.monotonic() - launched
        with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/readyz", timeout=5) as ready:
            assert ready.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/metrics", timeout=5) as metrics:
            assert b"maintainer_" in metrics.read()

        started = time.monotonic()
        docker_engine.docker("stop", "--time", str(GRACE_S + 20), name, timeout=GRACE_S + 60)
        elapsed = time.monotonic() - started
        state = json.loads(docker_engine.docker("inspect", "--format", "{{json .State}}", name).stdout)
        logs = docker_engine.docker("logs", name, check=False)
        assert state["ExitCode"] == 0, logs.stdout + logs.stderr
        assert elapsed < GRACE_S, elapsed
        assert "Traceback" not in logs.stdout + logs.stderr
        assert "SIGTERM" in logs.stdout + logs.stderr
        with capsys.disabled():
            print(f"\nmaintainer run: healthy {healthy_after:.1f} s after the start, stopped {elapsed:.2f} s after "
                  f"SIGTERM (grace {GRACE_S} s), exit 0")
    finally:
        docker_engine.docker("rm", "--force", name, check=False)


def test_the_image_holds_no_compiler_and_no_postgres_server(docker_engine: dockerd.DockerEngine, image: Image) -> None:
    container = docker_engine.docker("create", image.tag).stdout.strip()
    try:
        export = subprocess.Popen([docker_engine.cli, "export", container], stdout=subprocess.PIPE,
                                  env=docker_engine.env)
        assert export.stdout is not None
        names: dict[str, str] = {}
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() or member.issym():
                    names.setdefault(Path(member.name).name, member.name)
        assert export.wait(60) == 0
    finally:
        docker_engine.docker("rm", container, check=False)
    assert "python3" in names and "maintainer" in names  # the scan saw the image
    assert [path for name, path in names.items() if COMPILER.match(name)] == []
    assert [path for name, path in names.items() if name in SERVER] == []


"""The private Docker engine's clean-up of what a killed test run left behind (tests/dockerd.py).

A run killed with its engine leaves the containers' network namespaces bind-mounted under the
engine's root and its shims running; the next engine's first container then gets the same address,
and its published port leads into the dead namespace. The sweep ends such leftovers and leaves a
live engine's root alone. Real mounts and processes; root only (like the engine itself).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import dockerd

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="namespaces and mounts need root and unshare"
)

_AN_HOUR_AGO = time.time() - 3600


def _is_mount(path: Path) -> bool:
    return str(path) in dockerd._mounts_under(path)


def _a_process_naming(root: Path) -> subprocess.Popen[bytes]:
    """A process whose command line names `root`, like a containerd shim of that engine; returned once
    /proc shows that command line (it is empty for a moment after the start)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(root)])
    for _ in range(200):
        if process.pid in dockerd._pids_under(root):
            return process
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"pid {process.pid} never showed its command line")


@pytest.fixture
def engine_root() -> Iterator[Path]:
    """An engine root with a container's network namespace kept by a bind mount, as dockerd keeps it."""
    root = Path(tempfile.mkdtemp(prefix=dockerd.ENGINE_ROOT_PREFIX))
    namespace = root / "exec" / "netns" / "0123456789ab"
    namespace.parent.mkdir(parents=True)
    namespace.touch()
    subprocess.run(["unshare", f"--net={namespace}", "true"], check=True)
    yield root
    for mount in dockerd._mounts_under(root):
        subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(root, ignore_errors=True)


def test_a_killed_engines_namespaces_and_processes_are_cleared(engine_root: Path) -> None:
    namespace = engine_root / "exec" / "netns" / "0123456789ab"
    shim = _a_process_naming(engine_root)
    try:
        (engine_root / "dockerd.pid").write_text(f"{shim.pid + 10**6}\n")  # no such process
        os.utime(engine_root, (_AN_HOUR_AGO, _AN_HOUR_AGO))
        assert _is_mount(namespace)

        cleared: list[str] = []
        dockerd.sweep_left_over_engines(cleared.append)

        assert shim.wait(timeout=30) is not None
        assert not _is_mount(namespace)
        assert not engine_root.exists()
        assert cleared == [f"cleared an engine a killed run left behind: {engine_root}"]
    finally:
        shim.kill()
        shim.wait()


def test_a_running_engine_and_one_being_made_are_left_alone(engine_root: Path) -> None:
    namespace = engine_root / "exec" / "netns" / "0123456789ab"
    dockerd_stand_in = _a_process_naming(engine_root)
    being_made = Path(tempfile.mkdtemp(prefix=dockerd.ENGINE_ROOT_PREFIX))  # no pidfile yet, made just now
    try:
        (engine_root / "dockerd.pid").write_text(f"{dockerd_stand_in.pid}\n")
        os.utime(engine_root, (_AN_HOUR_AGO, _AN_HOUR_AGO))

        cleared: list[str] = []
        dockerd.sweep_left_over_engines(cleared.append)

        assert dockerd_stand_in.poll() is None
        assert _is_mount(namespace)
        assert being_made.exists()
        assert not any(str(engine_root) in line or str(being_made) in line for line in cleared)
    finally:
        dockerd_stand_in.kill()
        dockerd_stand_in.wait()
        shutil.rmtree(being_made, ignore_errors=True)

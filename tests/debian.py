"""Debian packages the tests need (pgbouncer, promtool), installed on demand.

Installing needs root and apt-get (CI runs as root on a clean Debian); anywhere else the caller
gets `PackageUnavailable`, whose message is the reason to skip. Services a package's post-install
would start are not started: a policy-rc.d that denies them is in place during the install
(unless the machine already has one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class PackageUnavailable(Exception):
    """A package that is not installed and cannot be; the message says why."""


def binary(name: str, package: str, path: Path) -> Path:
    """The executable `name` (on PATH or at `path`), installing `package` with apt when missing."""
    found = shutil.which(name)
    if found:
        return Path(found)
    if path.exists():
        return path
    apt_install(package)
    if not path.exists():
        raise PackageUnavailable(f"apt-get install {package} did not provide {path}")
    return path


def apt_install(package: str) -> None:
    """`apt-get install --no-install-recommends` as root, updating the package list once if needed."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PackageUnavailable(f"{package} is not installed (apt-get install {package}, as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", package]
    own_policy = not POLICY_RC_D.exists()
    if own_policy:
        POLICY_RC_D.write_text("#!/bin/sh\n# tests: no service starts while packages install\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:  # an empty or stale package list: update once and try again
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600, check=False)
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        if own_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise PackageUnavailable(f"apt-get install {package} failed:\n{tail}")

"""A real PgBouncer in front of a test server, for the pooler tests.

Debian's `pgbouncer` (installed on demand when this process is root and apt is available), run in
the foreground as the unprivileged OS user the test clusters use (`pgserver.RUN_AS_USER` when
root), on a free port, with its ini and auth files in a private temporary directory. `stop()`
terminates it and removes the directory; it is also registered with atexit, so no pgbouncer is
left running whatever happens to the tests.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from maintainer import pgserver
from tests import debian
from tests.debian import PackageUnavailable

DEBIAN_BINARY = Path("/usr/sbin/pgbouncer")
# Debian's package would run its own instance from this pidfile if its post-install started one.
DEBIAN_PIDFILE = Path("/run/postgresql/pgbouncer.pid")


class PgBouncerUnavailable(PackageUnavailable):
    """No pgbouncer binary and no way to install one; the message is the reason to skip."""


def binary() -> Path:
    """The pgbouncer executable, installed with apt when missing (root only)."""
    found = shutil.which("pgbouncer")
    if found or DEBIAN_BINARY.exists():
        return Path(found or DEBIAN_BINARY)
    try:
        return debian.binary("pgbouncer", "pgbouncer", DEBIAN_BINARY)
    except PackageUnavailable as exc:
        raise PgBouncerUnavailable(str(exc)) from None
    finally:
        _stop_package_service()  # in case the package's post-install started one anyway


def _stop_package_service() -> None:
    """Debian's post-install may start (and enable) a system pgbouncer: stop and disable it."""
    pid = _pid_from(DEBIAN_PIDFILE)
    if pid is None:
        return
    for command in (["service", "pgbouncer", "stop"], ["update-rc.d", "pgbouncer", "disable"]):
        if shutil.which(command[0]):
            subprocess.run(command, capture_output=True, timeout=60, check=False)
    if _alive(pid) and _is_pgbouncer(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
        _wait_gone(pid)


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_pgbouncer(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "pgbouncer"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


class PgBouncer:
    """One pgbouncer process in front of the server of `upstream_dsn` (any database name is passed on)."""

    def __init__(
        self,
        upstream_dsn: str,
        *,
        pool_mode: str = "transaction",
        ignore_startup_parameters: str = "extra_float_digits,options",
        users: tuple[str, ...] = (pgserver.SUPERUSER,),
        default_pool_size: int = 2,
    ) -> None:
        self.upstream = psycopg.conninfo.conninfo_to_dict(upstream_dsn)
        self.pool_mode = pool_mode
        self.ignore_startup_parameters = ignore_startup_parameters
        self.users = users
        self.default_pool_size = default_pool_size
        self.port = 0
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "pgbouncer.log"

    def dsn(self, dbname: str, user: str = pgserver.SUPERUSER) -> str:
        """A DSN for `dbname` through this pgbouncer (the upstream's password, if any, is kept)."""
        info: dict[str, Any] = {"host": pgserver.LISTEN_HOST, "port": self.port, "dbname": dbname, "user": user}
        if "password" in self.upstream:
            info["password"] = self.upstream["password"]
        return psycopg.conninfo.make_conninfo(**info)

    def start(self) -> PgBouncer:
        executable = binary()
        atexit.register(self.stop)
        owner = pgserver._cluster_owner()
        self.root = Path(tempfile.mkdtemp(prefix="pgmaint-pgbouncer-"))
        try:
            if owner is not None:
                os.chown(self.root, owner.uid, owner.gid)
            self.root.chmod(0o700)
            for attempt in range(5):
                self.port = pgserver._free_port()
                self._write_files(owner)
                self.process = subprocess.Popen(
                    [str(executable), str(self.root / "pgbouncer.ini")],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=self.root,
                    env=pgserver._child_env(),
                    user=owner.uid if owner else None,
                    group=owner.gid if owner else None,
                    extra_groups=[] if owner else None,
                )
                if self._wait_ready():
                    return self
                self._terminate()
                if attempt == 4 or "Address already in use" not in self._log_tail():
                    raise RuntimeError(f"pgbouncer did not start on port {self.port}:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self, owner: Any) -> None:
        assert self.root is not None
        upstream = f"host={self.upstream.get('host', pgserver.LISTEN_HOST)} port={self.upstream.get('port', 5432)}"
        if "password" in self.upstream:
            upstream += f" password={self.upstream['password']}"
        ini = f"""\
[databases]
* = {upstream}

[pgbouncer]
listen_addr = {pgserver.LISTEN_HOST}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.root / "userlist.txt"}
logfile = {self.log_path}
pidfile = {self.root / "pgbouncer.pid"}
pool_mode = {self.pool_mode}
ignore_startup_parameters = {self.ignore_startup_parameters}
default_pool_size = {self.default_pool_size}
max_client_conn = 200
server_lifetime = 3600
server_idle_timeout = 600
"""
        users = "".join(f'"{user}" ""\n' for user in self.users)
        for name, text in (("pgbouncer.ini", ini), ("userlist.txt", users)):
            path = self.root / name
            path.write_text(text)
            if owner is not None:
                os.chown(path, owner.uid, owner.gid)

    def _wait_ready(self, timeout: float = 20.0) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(self.dsn(str(self.upstream.get("dbname", "postgres"))), connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-10:])
        except OSError:
            return "(no pgbouncer log)"

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # SIGTERM: immediate shutdown, server connections closed
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        """Stop pgbouncer and remove its directory; safe to call repeatedly."""
        atexit.unregister(self.stop)
        try:
            self._terminate()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

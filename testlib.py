"""Test infrastructure shared by the test-suite (``conftest.py``) and ``bench/``.

Real peers rather than mocks: a real Docker Engine, real containers made from
a locally imported busybox image (no image registry is reachable), a real
``moto_server`` for STS/IAM behind a small counting proxy, and the server under
test as a subprocess in a clean environment.

The Docker Engine is the one the contributor already has (``DOCKER_HOST``, else
``/var/run/docker.sock``) when it answers. Only when none answers do the tests
start a private ``dockerd`` of their own at ``/run/le-docker`` (CI, a bare
machine). On someone's own engine a session creates only objects labelled with
its own session id and removes exactly those; only a private engine may be
stopped and restarted by a test, or swept of leftovers of crashed sessions.

Public interface (``conftest.py`` wraps these in fixtures): ``DockerEngine``,
``engine_session``, ``machine_lock``, ``busybox_image``, ``Containers``,
``Moto``, ``Server``, ``server_env``, ``SecretRegistry`` and the small helpers
below (``free_port``, ``wait_for``, ``http_request``, ``apt_install``,
``unavailable``, ...).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parent
SERVER_SCRIPT = REPO_ROOT / "local_endpoints.py"

# --- Docker Engines ---------------------------------------------------------
# The contributor's engine, where Docker's own clients look for it.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# The private engine, only when no other answers. Only one dockerd can run on a
# machine (they fight over docker0 and iptables); its paths are its own so it
# never collides with a system docker.service.
PRIVATE_RUN_DIR = Path("/run/le-docker")
PRIVATE_SOCKET = PRIVATE_RUN_DIR / "docker.sock"
PRIVATE_HOST = f"unix://{PRIVATE_SOCKET}"
PRIVATE_PIDFILE = PRIVATE_RUN_DIR / "dockerd.pid"
PRIVATE_LOG = PRIVATE_RUN_DIR / "dockerd.log"
PRIVATE_EXEC_ROOT = PRIVATE_RUN_DIR / "exec"
PRIVATE_DATA_ROOT = Path("/var/lib/le-docker")
# Serializes Docker-using sessions on a machine (fixed addresses, one private engine).
MACHINE_LOCK = Path("/run/le-docker.lock")
DOCKERD_START_TIMEOUT = 120.0   # an engine restoring 100 containers at start-up takes a while
DOCKERD_STOP_TIMEOUT = 60.0

# Containers and networks of a session carry TEST_LABEL=SESSION_ID; images
# carry IMAGE_LABEL (an image label is inherited by its containers, so it must
# not be TEST_LABEL).
TEST_LABEL = "local-endpoints-test"
SESSION_ID = secrets.token_hex(4)
IMAGE_LABEL = f"{TEST_LABEL}-image"
BUSYBOX_TAG = "local-endpoints-test/busybox:latest"

# Dummy credentials for talking to moto (which accepts anything). They follow
# the shape of AWS's documented example keys so they are obviously fake.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_DEFAULT_REGION": "us-east-1",
}

SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 15.0


# =============================================================================
# Small helpers
# =============================================================================

def in_ci() -> bool:
    """True when running under CI, where skipping infrastructure is an error."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str):
    """Skip (developer machine) or fail (CI) because infrastructure is missing.

    ``reason`` says in one line what is missing and how to get it.
    """
    if in_ci():
        pytest.fail(f"{reason} (CI is set: refusing to skip)", pytrace=False)
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    There is an unavoidable race between closing the probe socket and the
    caller binding the port, but on loopback it is negligible in practice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it returns truthy or ``timeout`` elapses."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@contextlib.contextmanager
def in_process_server(endpoints) -> Iterator[str]:
    """local_endpoints' own EndpointsServer for endpoints (an ``Endpoints``), in this process: its URL.
    For what only an in-process server lets a test do: a fault put in, calls recorded at the edge."""
    from local_endpoints import EndpointsServer   # imported here: bench/ needs none of it
    server = EndpointsServer(("127.0.0.1", 0), endpoints, 16)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def http_request(url: str, method: str = "GET", path: str = "/", headers=None,
                 body: bytes | None = None, timeout: float = 10.0):
    """One plain HTTP request with http.client: ``(status, headers, body)``.

    Deliberately no requests/urllib3 here: no proxies from the environment, no
    retries, no connection pooling - the tests want to see exactly one request.
    """
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (to ping an engine without the CLI)."""

    def __init__(self, path: str, timeout: float = 2.0):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


_apt_updated = False


def apt_install(*packages: str) -> None:
    """Install Debian packages (root only), running ``apt-get update`` once.

    CI starts from a fresh Debian machine, so the suite provisions what it
    needs itself. A policy-rc.d denying service starts is put in place for the
    duration: the docker.io package would otherwise start a system dockerd
    (docker.service) which would fight the private one over docker0 and iptables.
    """
    global _apt_updated
    if os.geteuid() != 0:
        raise RuntimeError(f"need root to apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    placed_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# written by testlib.py during apt-get install\nexit 101\n")
        policy.chmod(0o755)
        placed_policy = True
    try:
        if not _apt_updated:
            subprocess.run(["apt-get", "update"], check=True, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
            _apt_updated = True
        subprocess.run(["apt-get", "install", "-y", *packages], check=True, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(e.cmd)} failed: {(e.stderr or e.stdout)[-2000:]}") from e
    finally:
        if placed_policy:
            policy.unlink(missing_ok=True)


def ensure_tool(command: str, package: str) -> str:
    """The tool's path, apt-get installing its package when missing (else ``unavailable``)."""
    if not shutil.which(command):
        try:
            apt_install(package)
        except RuntimeError as e:
            unavailable(f"{command} missing ({e}): apt-get install {package}")
    path = shutil.which(command)
    if not path:
        unavailable(f"{command} still missing after apt-get install {package}")
    return path


def console_script(name: str) -> str:
    """A command installed with this Python's packages (``aws``): next to ``sys.executable``,
    so it is found in a virtual environment that is not activated; else on PATH."""
    sibling = Path(sys.executable).with_name(name)
    found = str(sibling) if sibling.is_file() else shutil.which(name)
    if not found:
        unavailable(f"{name} not found: .venv/bin/pip install -r requirements-dev.txt")
    return found


def require_ipv6_loopback() -> None:
    """Skip unless ``::1`` works here (Docker containers usually have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here ({e.strerror})")


def nsenter_net(pid: int) -> list[str]:
    """The command prefix that runs a command in process ``pid``'s network namespace
    (a request "from inside a container"); ``unavailable`` unless root."""
    if os.geteuid() != 0:
        unavailable("needs root to enter a container's network namespace (nsenter): run the tests as root")
    return ["nsenter", f"--net=/proc/{pid}/ns/net"]


# =============================================================================
# Docker Engine
# =============================================================================

class DockerError(subprocess.CalledProcessError):
    """A failed docker CLI call whose message includes the CLI's stderr."""

    def __str__(self):
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()}"


class EngineUnavailable(RuntimeError):
    """No Docker Engine can be had; the message says why and how to get one, in one line."""


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def running_dockerds() -> list[tuple[int, str]]:
    """All dockerd processes on the machine as ``(pid, cmdline)``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0].decode(errors="replace")) == "dockerd" \
                and pid_alive(int(entry.name)):
            found.append((int(entry.name), b" ".join(argv).decode(errors="replace").strip()))
    return found


class DockerEngine:
    """One Docker Engine and what this session created on it.

    ``host`` is its DOCKER_HOST value, ``socket`` the unix socket path (None for
    tcp://). ``private`` is True for the tests' own engine at /run/le-docker,
    which alone may be stopped and restarted (``stop()``/``start()``) and swept
    of leftovers; on any other engine only this session's objects are touched.
    ``label`` is the ``--label`` value every container and network of the
    session carries; images the session created are recorded with
    ``created_image(tag)``.
    """

    def __init__(self, host: str, private: bool):
        self.host = host
        self.private = private
        self.socket = host[len("unix://"):] if host.startswith("unix://") else None
        self.label = f"{TEST_LABEL}={SESSION_ID}"
        self.docker_cli = shutil.which("docker") or "/usr/bin/docker"
        self.images: list[str] = []        # created by this session
        self.proc: subprocess.Popen | None = None  # set when this session spawned dockerd
        self.closed = False  # set at session end; no more automatic restarts

    def __repr__(self) -> str:
        return f"DockerEngine({self.host!r}, private={self.private})"

    @property
    def description(self) -> str:
        owner = "the tests' own" if self.private else "your"
        return f"{owner} Docker Engine at {self.host}"

    # -- talking to it ---------------------------------------------------------
    def ping(self, timeout: float = 2.0) -> bool:
        """True if the engine answers ``GET /_ping`` with 200 OK."""
        if self.socket is not None:
            conn: http.client.HTTPConnection = UnixHTTPConnection(self.socket, timeout=timeout)
        else:
            parts = urllib.parse.urlsplit(self.host)
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 2375, timeout=timeout)
        try:
            conn.request("GET", "/_ping")
            resp = conn.getresponse()
            return resp.status == 200 and resp.read().strip() == b"OK"
        except OSError:
            return False
        finally:
            conn.close()

    def env(self) -> dict:
        """Environment for docker CLI calls: this engine, no context from the user's config."""
        env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY")}
        env["DOCKER_HOST"] = self.host
        return env

    def cli(self, *args: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None, stdin=None) -> subprocess.CompletedProcess:
        """Run the docker CLI against this engine; text output, captured."""
        cmd = [self.docker_cli, *map(str, args)]
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, input=input,
                              stdin=stdin if stdin is not None or input is not None
                              else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise DockerError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def inspect(self, name_or_id: str) -> dict:
        """``docker inspect`` of one object, as a dict."""
        return json.loads(self.cli("inspect", name_or_id).stdout)[0]

    def has_image(self, tag: str) -> bool:
        return self.cli("image", "inspect", tag, check=False).returncode == 0

    def created_image(self, tag: str) -> str:
        """Record an image this session made: removed at session end unless the engine
        is private (where images are kept as a cache for the next run)."""
        self.images.append(tag)
        return tag

    # -- the private engine's lifecycle ----------------------------------------
    def _require_private(self, what: str) -> None:
        if not self.private:
            raise RuntimeError(f"refusing to {what} {self.description}: only the tests' own "
                               f"engine at {PRIVATE_HOST} may be stopped or started")

    @staticmethod
    def _pidfile_pid() -> int | None:
        try:
            return int(PRIVATE_PIDFILE.read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self, timeout: float = DOCKERD_START_TIMEOUT) -> None:
        """Start the private dockerd (if not answering) and wait for _ping."""
        self._require_private("start")
        if self.ping():
            return
        if os.geteuid() != 0:
            raise EngineUnavailable(f"no Docker Engine answers at DOCKER_HOST or {DEFAULT_DOCKER_HOST} "
                                    "(or not to this user): start yours (and join its docker group), "
                                    "or run the tests as root so they start their own")
        pid = self._pidfile_pid()
        if pid and pid_alive(pid):
            # Probably still starting up (or shutting down): give it a chance.
            if wait_for(self.ping, timeout):
                return
            raise EngineUnavailable(f"dockerd pid {pid} (from {PRIVATE_PIDFILE}) is alive but "
                                    f"{self.socket} does not answer; see {PRIVATE_LOG}")
        others = running_dockerds()
        if others:
            listing = "; ".join(f"pid {p}: {c}" for p, c in others)
            raise EngineUnavailable(
                f"a dockerd runs but does not answer at {DEFAULT_DOCKER_HOST} ({listing}): "
                "set DOCKER_HOST to its socket (a second dockerd would fight it over iptables)")
        dockerd = shutil.which("dockerd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        if not dockerd:
            try:
                apt_install("docker.io")
            except RuntimeError as e:
                raise EngineUnavailable(f"dockerd is missing and could not be installed: {e}") from e
            dockerd = "/usr/sbin/dockerd"
        PRIVATE_RUN_DIR.mkdir(parents=True, exist_ok=True)
        PRIVATE_DATA_ROOT.mkdir(parents=True, exist_ok=True)
        with open(PRIVATE_LOG, "ab") as log:
            # A session of its own: when the daemon was already running before the
            # session it is restored, and must outlive pytest (and its ^C).
            self.proc = subprocess.Popen(
                [dockerd, "--data-root", str(PRIVATE_DATA_ROOT),
                 "--exec-root", str(PRIVATE_EXEC_ROOT), "-H", self.host,
                 "--pidfile", str(PRIVATE_PIDFILE)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
            )
        if not wait_for(lambda: self.ping() or self.proc.poll() is not None, timeout, 0.2) \
                or not self.ping():
            tail = PRIVATE_LOG.read_text(errors="replace")[-3000:] if PRIVATE_LOG.exists() else ""
            raise EngineUnavailable(f"dockerd did not answer on {self.socket} within {timeout:.0f}s "
                                    f"(exit code {self.proc.poll()}); log tail:\n{tail}")

    def stop(self, timeout: float = DOCKERD_STOP_TIMEOUT) -> None:
        """SIGTERM the private dockerd (pid from its pidfile) and wait until it has exited."""
        self._require_private("stop")
        pid = self.proc.pid if self.proc and self.proc.poll() is None else self._pidfile_pid()
        if not pid or not pid_alive(pid):
            return
        os.kill(pid, signal.SIGTERM)

        def gone():
            if self.proc is not None and self.proc.pid == pid:
                return self.proc.poll() is not None  # reap our own child
            return not pid_alive(pid)

        if not wait_for(gone, timeout, 0.2):
            os.kill(pid, signal.SIGKILL)
            wait_for(gone, 10, 0.1)
            raise RuntimeError(f"dockerd pid {pid} ignored SIGTERM for {timeout:.0f}s; killed")
        # The socket file may linger briefly; make sure nobody answers any more.
        wait_for(lambda: not self.ping(timeout=0.5), 5)

    def ensure_running(self) -> None:
        """Restart the private engine if a test stopped it and did not start it again."""
        if self.private and not self.ping():
            self.start()

    # -- cleaning up -----------------------------------------------------------
    def remove_labelled(self, label_filter: str) -> None:
        """Remove the containers and networks matching ``label=...`` filter."""
        ids = self.cli("ps", "-aq", "--filter", label_filter).stdout.split()
        if ids:
            self.cli("rm", "-f", "-v", *ids, check=False)
        nets = self.cli("network", "ls", "-q", "--filter", label_filter).stdout.split()
        if nets:
            self.cli("network", "rm", *nets, check=False)

    def remove_session_objects(self) -> None:
        """Remove exactly what this session created: its labelled containers and
        networks, and (on an engine that is not private) the images it made."""
        self.remove_labelled(f"label={self.label}")
        if not self.private:
            for tag in reversed(self.images):
                self.cli("rmi", tag, check=False)
        self.images.clear()

    def remove_leftovers(self) -> None:
        """Private engine only: remove every test-labelled container and network.

        Safe because the session holds the machine lock: no other test run can
        own labelled objects right now, so these are leftovers of a crash.
        """
        self._require_private("sweep")
        self.remove_labelled(f"label={TEST_LABEL}")


def find_engine() -> DockerEngine:
    """The engine to test against: the contributor's when it answers, else the private one.

    ``DOCKER_HOST`` is honoured as Docker's own clients do (a set but silent
    DOCKER_HOST is an error, not a reason to start another engine). The private
    engine is recognised by its socket path as written, so an engine reached
    through another path counts as the contributor's.
    """
    configured = os.environ.get("DOCKER_HOST", "").strip()
    if configured and configured != PRIVATE_HOST:
        engine = DockerEngine(configured, private=False)
        if not engine.ping():
            raise EngineUnavailable(f"DOCKER_HOST={configured} does not answer: start that engine, "
                                    "or unset DOCKER_HOST to use /var/run/docker.sock")
        return engine
    if not configured:
        engine = DockerEngine(DEFAULT_DOCKER_HOST, private=False)
        if engine.ping():
            return engine
    return DockerEngine(PRIVATE_HOST, private=True)


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """Exclusive flock held for the duration: one Docker-using session per machine.

    Several developers (and the benchmarks) may run on one machine; the image
    tests use fixed addresses and the engine-restart tests stop the private
    engine, so whole sessions are serialized and a second one waits here. As
    root the lock is /run/le-docker.lock; otherwise a file in the temp dir.
    """
    path = MACHINE_LOCK if os.geteuid() == 0 else Path(tempfile.gettempdir()) / "le-docker.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            sys.stderr.write(f"\n[testlib] {path} is held by another test run; waiting...\n")
            sys.stderr.flush()
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def engine_session() -> Iterator[DockerEngine]:
    """A Docker Engine held for a session (pytest's or a benchmark's).

    Installs Debian's docker.io when the CLI is missing (root only), takes the
    machine lock, picks the engine (``find_engine``), starts the private one
    when needed (installing dockerd too) and sweeps its leftovers. At the end it removes this session's
    objects and leaves a private engine as found: stopped if it was started
    here, running if it was running (even if a test restarted it meanwhile).
    Raises EngineUnavailable with a one-line reason.
    """
    if not shutil.which("docker"):
        try:
            apt_install("docker.io")
        except RuntimeError as e:
            raise EngineUnavailable(f"the docker CLI is missing ({e}): install Docker, "
                                    "or run the tests as root so they apt-get install docker.io") from e
    with machine_lock():
        engine = find_engine()
        was_running = engine.ping()
        if not was_running:
            engine.start()
        try:
            if engine.private:
                engine.remove_leftovers()
            yield engine
        finally:
            engine.closed = True
            if engine.ping():
                engine.remove_session_objects()
            if engine.private:
                if was_running:
                    engine.ensure_running()
                else:
                    engine.stop()


# =============================================================================
# busybox image
# =============================================================================

def is_static_elf(path: str) -> bool:
    """True if ``path`` is an ELF binary without PT_INTERP (i.e. static).

    Debian's dynamic ``busybox`` package also installs /bin/busybox, but that
    one cannot run in an image with no libc; only busybox-static will do.
    """
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only
                return False
            endian = "<" if ident[5] == 1 else ">"
            phoff, = struct.unpack_from(endian + "Q", ident, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except (OSError, struct.error, IndexError):
        return False
    for i in range(phnum):
        p_type, = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def build_busybox_tar(dest: Path, busybox: str = "/bin/busybox") -> Path:
    """Write a minimal rootfs tarball: /bin/busybox plus a symlink per applet."""
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    tar_path = dest / "busybox-rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev", "var", "usr", "usr/bin"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for name in applets:
            if name == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{name}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                                          "nobody:x:65534:65534:nobody:/:/bin/false\n"),
                           ("etc/group", "root:x:0:\nnogroup:x:65534:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return tar_path


def busybox_image(engine: DockerEngine) -> str:
    """Tag of a tiny image made from Debian's busybox-static (reused when present).

    No image registry is reachable, so the image is made with ``docker import``
    from a rootfs tarball. It has sh, sleep, cat, wget, nc, top, ... and
    ``CMD ["sh"]``. Raises EngineUnavailable when busybox-static cannot be had.
    """
    if engine.has_image(BUSYBOX_TAG):
        return BUSYBOX_TAG
    if not is_static_elf("/bin/busybox"):
        try:
            apt_install("busybox-static")
        except RuntimeError as e:
            raise EngineUnavailable(f"busybox image cannot be built ({e}): "
                                    "apt-get install busybox-static") from e
    with tempfile.TemporaryDirectory(prefix="le-busybox-") as tmp:
        engine.cli("import", "--change", 'CMD ["sh"]', "--change", f"LABEL {IMAGE_LABEL}=1",
                   str(build_busybox_tar(Path(tmp))), BUSYBOX_TAG)
    return engine.created_image(BUSYBOX_TAG)


USER_ID = 1000   # an unprivileged user, as a contributor's shell runs the README's commands


def snapshot(dest: Path) -> Path:
    """A git repository holding the working tree as it is (tracked and new files, not ignored),
    owned by USER_ID: what a contributor's clone would hold."""
    def git(*args, cwd=dest):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout

    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT).split("\0")
    dest.mkdir()
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-q", "-m", "snapshot")
    for path in [dest, *dest.rglob("*")]:
        os.lchown(path, USER_ID, USER_ID)
    return dest


def stock_debian_image(engine: DockerEngine, tag: str, packages: list[str], workdir: Path) -> None:
    """A Debian 12 image with nothing but packages, to run the README's commands as a newcomer
    would (kept on the engine once made); ``unavailable`` without root or a local engine socket."""
    if os.geteuid() != 0:
        unavailable("needs root (debootstrap): run the tests as root")
    if engine.socket is None:
        unavailable(f"needs a local engine to mount the clone into, not {engine.host}")
    if not engine.has_image(tag):
        debootstrap_image(engine, tag, packages, workdir)


PAUSE_TAG = "local-endpoints-test/pause:latest"


def pause_image(engine: DockerEngine) -> str:
    """Tag of an image whose default command waits forever (busybox's sleep), to hold a task's
    network namespaces as the ECS agent's pause image does: `run --pause-image` takes it."""
    if engine.has_image(PAUSE_TAG):
        return PAUSE_TAG
    busybox = busybox_image(engine)
    with tempfile.TemporaryDirectory(prefix="le-pause-") as tmp:
        Path(tmp, "Dockerfile").write_text(f'FROM {busybox}\nENTRYPOINT ["/bin/busybox", "sleep", "2147483647"]\n'
                                           f"LABEL {IMAGE_LABEL}=1\n")
        engine.cli("build", "-q", "-t", PAUSE_TAG, tmp)
    return engine.created_image(PAUSE_TAG)


def bridge_gateway(engine: DockerEngine) -> str:
    """The host's address on the engine's default bridge, which containers there reach."""
    config = engine.inspect("bridge")["IPAM"]["Config"][0]
    # The default bridge's IPAM often names no gateway: Docker then gives the subnet's first address.
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


# =============================================================================
# A Debian bookworm root file system (debootstrap)
# =============================================================================

def debian_mirror() -> str | None:
    """The Debian mirror the host's apt sources use (never hardcoded)."""
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(d.glob("*.list")) + sorted(d.glob("*.sources"))
    for f in files:
        if not f.is_file():
            continue
        if f.suffix == ".sources":  # deb822
            for stanza in f.read_text().split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.split()
                suites = fields.get("suites", [])
                if "deb" in fields.get("types", []) and any(
                        s in ("bookworm", "stable") for s in suites) and fields.get("uris"):
                    return fields["uris"][0]
        else:  # one-line format: deb [options] URI SUITE COMPONENTS...
            for line in f.read_text().splitlines():
                line = line.split("#", 1)[0]
                if "]" in line:
                    line = line.split("[", 1)[0] + line.split("]", 1)[1]
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] in ("bookworm", "stable"):
                    return parts[1]
    return None


HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def debootstrap_image(engine: DockerEngine, tag: str, packages: list[str], workdir: Path,
                      prepare: Callable[[Path], None] = lambda rootfs: None) -> str:
    """Import a Debian bookworm (minbase + ``packages``) as image ``tag``; returns ``tag``.

    The rootfs reaches the network the way the host does: the host's CA bundle
    (a TLS proxy may sit in between) replaces the image's, and pip is told to
    use it. ``prepare(rootfs)`` makes further changes before the import. The
    image is recorded as created by this session (see ``created_image``).
    Calls ``unavailable`` when debootstrap or a Debian mirror cannot be had.
    """
    debootstrap = ensure_tool("debootstrap", "debootstrap")
    mirror = debian_mirror()
    if not mirror:
        unavailable("no Debian bookworm mirror in the host's apt sources: add one to /etc/apt/sources.list")
    rootfs = workdir / "rootfs"
    proc = subprocess.run([debootstrap, "--variant=minbase", "--include=" + ",".join(packages),
                           "bookworm", str(rootfs), mirror],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {(proc.stderr or proc.stdout)[-3000:]}")
    if HOST_CA_BUNDLE.is_file():
        (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
    (rootfs / "etc/pip.conf").write_text(
        "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
        "disable-pip-version-check = true\nroot-user-action = ignore\n")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (rootfs / junk).glob("*"):
            if f.is_file():
                f.unlink()
    prepare(rootfs)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        engine.cli("import",
                   "-c", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "-c", "ENV LANG=C.UTF-8", "-c", f"LABEL {IMAGE_LABEL}=1", "-c", 'CMD ["bash"]',
                   "-", tag, stdin=tar.stdout, timeout=600)
    finally:
        tar.stdout.close()
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    return engine.created_image(tag)


# =============================================================================
# Test containers and networks
# =============================================================================

class Containers:
    """Creates containers/networks labelled with the session and removes them.

    ``run(*docker_run_args) -> id`` runs ``docker run -d --label
    local-endpoints-test=SESSION ARGS`` (pass the image and command in ARGS).
    ``network(name, subnet=None) -> name`` creates a labelled bridge network.
    ``name(prefix)`` returns a unique name for either.
    """

    def __init__(self, engine: DockerEngine):
        self.engine = engine
        self.ids: list[str] = []
        self.networks: list[str] = []

    @staticmethod
    def name(prefix: str = "le-test") -> str:
        return f"{prefix}-{secrets.token_hex(4)}"

    def run(self, *docker_run_args: str) -> str:
        proc = self.engine.cli("run", "-d", "--label", self.engine.label, *docker_run_args)
        cid = proc.stdout.strip().splitlines()[-1]
        self.ids.append(cid)
        return cid

    def network(self, name: str, subnet: str | None = None, *extra_args: str) -> str:
        args = ["network", "create", "--label", self.engine.label]
        if subnet:
            args += ["--subnet", subnet]
        self.engine.cli(*args, *extra_args, name)
        self.networks.append(name)
        return name

    def cleanup(self) -> None:
        self.engine.ensure_running()
        if self.ids:
            self.engine.cli("rm", "-f", "-v", *self.ids, check=False)
        for net in reversed(self.networks):
            self.engine.cli("network", "rm", net, check=False)
        self.ids.clear()
        self.networks.clear()


# =============================================================================
# moto_server behind a counting proxy
# =============================================================================

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
               "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate"}
_SCOPE_RE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([^/]+)/aws4_request")


def aws_action(method: str, path: str, headers, body: bytes) -> tuple[str | None, str | None]:
    """(service, action) of an AWS request: query/JSON-1.0 or query protocol."""
    service = None
    m = _SCOPE_RE.search(headers.get("Authorization", "") or "")
    if m:
        service = m.group(1)
    target = headers.get("X-Amz-Target")
    if target:
        return service, target.rsplit(".", 1)[-1]
    query = urllib.parse.urlsplit(path).query
    fields = urllib.parse.parse_qs(query)
    if body and "x-www-form-urlencoded" in (headers.get("Content-Type") or "") or \
            (body and method == "POST" and b"Action=" in body):
        try:
            fields.update(urllib.parse.parse_qs(body.decode("utf-8")))
        except UnicodeDecodeError:
            pass
    action = fields.get("Action", [None])[0]
    return service, action


class _ProxyHandler(BaseHTTPRequestHandler):
    """Forwards one request to moto and relays the answer (HTTP/1.0, closes).

    Closing after every response matters: with keep-alive a client's pooled
    connection would keep working through ``pause()``.
    """

    protocol_version = "HTTP/1.0"
    server: "_ProxyServer"

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self):
        body = self._read_body()
        service, action = aws_action(self.command, self.path, self.headers, body)
        self.server.owner.record(self.command, self.path, service, action)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.owner.moto_port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() not in ("content-length", "date", "server"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError as e:
            self.send_error(502, f"moto unreachable: {e}")
        finally:
            conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _forward


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, owner: "Moto"):
        self.owner = owner
        super().__init__(addr, _ProxyHandler)


class Moto:
    """A real moto_server plus a counting reverse proxy in front of it.

    Point the server under test at ``url`` (the proxy); every request that
    reaches it is recorded with its AWS service and action, so tests can count
    the STS/IAM calls that really reached the peer. ``pause()`` closes the
    proxy's listening socket (connection refused: "STS down"); ``resume()``
    listens again on the same port.

    Attributes: ``url``, ``moto_url``, ``port``, ``moto_port``, ``requests``
    (list of dicts: method, path, service, action), ``env`` (dummy AWS creds).
    Methods: ``start()`` (RuntimeError if moto does not come up), ``close()``,
    ``count(action=None, service=None)``, ``reset_counts()``, ``pause()``,
    ``resume()``, ``reset()`` (moto state + counts), ``client(service)``
    (boto3 client straight to moto, not counted), ``create_role(name, path="/") -> arn``.
    """

    env = dict(DUMMY_AWS_ENV)

    def __init__(self, log_path: Path, host: str = "127.0.0.1"):
        self.log_path = log_path
        self.host = host   # the proxy's address: another than loopback for clients inside containers
        self.moto_port = free_port()
        self.moto_url = f"http://127.0.0.1:{self.moto_port}"
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)

        def ready():
            try:
                return http_request(self.moto_url, path="/moto-api/", timeout=2)[0] < 500
            except OSError:
                return False

        if not wait_for(lambda: ready() or self._proc.poll() is not None, 30, 0.2) or not ready():
            self.close()
            raise RuntimeError(f"moto_server did not come up on {self.moto_url}:\n"
                               f"{self.log_path.read_text(errors='replace')[-3000:]}")
        self.resume()

    def close(self) -> None:
        self.pause()
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def pause(self) -> None:
        """Stop listening: new connections to ``url`` are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = self._thread = None

    def resume(self) -> None:
        """Listen again on the same port."""
        if self._server is not None:
            return
        deadline = time.monotonic() + 5
        while True:
            try:
                self._server = _ProxyServer((self.host, self.port), self)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="moto-proxy", daemon=True)
        self._thread.start()

    @property
    def paused(self) -> bool:
        return self._server is None

    # -- counting --------------------------------------------------------------
    def record(self, method: str, path: str, service: str | None, action: str | None) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path,
                                  "service": service, "action": action})

    def count(self, action: str | None = None, service: str | None = None) -> int:
        """Requests that reached the proxy, optionally only one action/service."""
        with self._lock:
            return sum(1 for r in self.requests
                       if (action is None or r["action"] == action)
                       and (service is None or r["service"] == service))

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- moto helpers ----------------------------------------------------------
    def reset(self) -> None:
        """Forget all moto state (roles, ...) and the request counts."""
        http_request(self.moto_url, "POST", "/moto-api/reset")
        self.reset_counts()

    def client(self, service: str):
        """A boto3 client talking straight to moto (bypasses the counting proxy)."""
        import boto3  # imported lazily: only moto-backed tests need it
        return boto3.client(service, endpoint_url=self.moto_url,
                            region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def create_role(self, name: str, path: str = "/") -> str:
        """Create (or reuse) an IAM role that ECS tasks may assume; returns its ARN."""
        iam = self.client("iam")
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ecs-tasks.amazonaws.com"},
            "Action": "sts:AssumeRole"}]}
        try:
            return iam.create_role(RoleName=name, Path=path,
                                   AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        except iam.exceptions.EntityAlreadyExistsException:
            return iam.get_role(RoleName=name)["Role"]["Arn"]


# =============================================================================
# Secrets that must never be logged
# =============================================================================

class SecretRegistry(set):
    """A set of secret values, each with a kind used in failure messages.

    ``secrets.add(value, kind="secret access key")``; the kind is what a leak
    report names - the value itself is never printed.
    """

    def __init__(self):
        super().__init__()
        self.kinds: dict[str, str] = {}

    def add(self, value, kind: str = "secret") -> None:
        if not value or not isinstance(value, str):
            return
        if len(value) < 8:
            raise ValueError(f"refusing to register a {len(value)}-char {kind}: "
                             "too short to search logs for without false positives")
        super().add(value)
        self.kinds.setdefault(value, kind)

    def kind(self, value: str) -> str:
        return self.kinds.get(value, "secret")

    def redact(self, text: str) -> str:
        for value in sorted(self, key=len, reverse=True):
            text = text.replace(value, f"<redacted {self.kind(value)}>")
        return text

    def leaks(self, text: str) -> list[str]:
        """Kinds of the registered secrets that occur in ``text``."""
        return sorted({self.kind(v) for v in self if v in text})


# Environment variables passed to the server whose values are secrets.
SECRET_ENV_VARS = {"AWS_SECRET_ACCESS_KEY": "secret access key",
                   "AWS_SESSION_TOKEN": "session token"}


# =============================================================================
# The server under test
# =============================================================================

def aws_env(moto: Moto, **extra) -> dict:
    """Server environment: moto's dummy identity, STS/IAM at the counting proxy, no Docker."""
    return {**moto.env, "STS_ENDPOINT": moto.url, "IAM_ENDPOINT": moto.url,
            "DOCKER_HOST": "unix:///nonexistent.sock", **extra}


class Server:
    """One running server process (``local_endpoints.py`` or a benchmark's baseline).

    Attributes: ``url``, ``port``, ``proc``, ``log_path``.
    Methods: ``launch(...)`` (classmethod), ``log()``, ``get(path, headers=None)``,
    ``request(method, path, headers=None, body=None)``, ``wait_ready(timeout)``,
    ``stop(sig)``.
    """

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    @classmethod
    def launch(cls, port: int, log_path: Path, env: dict, args=(), log_level: str = "DEBUG",
               cmd: list[str] | None = None) -> "Server":
        """Start ``local_endpoints.py --port P --bind 127.0.0.1 --log-level L *args`` (or
        ``cmd``) from the repository root, output to ``log_path``; does not wait."""
        cmd = cmd or [sys.executable, str(SERVER_SCRIPT), "--port", str(port), "--bind", "127.0.0.1",
                      "--log-level", log_level, *map(str, args)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        return cls(proc, port, log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, headers=None, body: bytes | None = None,
                timeout: float = 10.0):
        """``(status, headers, body_bytes)`` of one request to the server."""
        return http_request(self.url, method, path, headers, body, timeout)

    def get(self, path: str, headers=None, timeout: float = 10.0):
        """``(status, headers, body_bytes)`` of ``GET path``."""
        return self.request("GET", path, headers, timeout=timeout)

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        """Wait until ``GET /health`` answers (any status); fail if the process exits."""
        def answered():
            if self.proc.poll() is not None:
                return True
            try:
                self.get("/health", timeout=2)
                return True
            except OSError:
                return False

        ok = wait_for(answered, timeout, 0.05)
        if self.proc.poll() is not None:
            pytest.fail(f"{self.proc.args[1]} exited with code {self.proc.returncode} before "
                        f"answering /health; log:\n{self.log()}", pytrace=False)
        if not ok:
            pytest.fail(f"{self.proc.args[1]} did not answer /health within {timeout:.0f}s; "
                        f"log:\n{self.log()}", pytrace=False)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = SERVER_STOP_TIMEOUT):
        """Send ``sig`` and wait for exit: ``(returncode, seconds_taken)``."""
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.proc.args[1]} ignored signal {sig} for {timeout:.0f}s; killed",
                        pytrace=False)
        return rc, time.monotonic() - t0


def server_env(home: Path, env: dict | None) -> dict:
    """The controlled environment of a server under test.

    Nothing of the machine's AWS/ECS/Docker configuration leaks in: fresh HOME
    (no ~/.aws), no inherited AWS_*/ECS_*/DOCKER_* variables, and IMDS disabled
    so the credential chain never tries 169.254.169.254. A value of ``None`` in
    ``env`` removes that variable (e.g. to re-enable IMDS for one test).
    """
    base = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "AWS_EC2_METADATA_DISABLED": "true"}
    for key in ("PYENV_ROOT", "PYENV_VERSION", "VIRTUAL_ENV", "TMPDIR"):
        if key in os.environ:
            base[key] = os.environ[key]
    for key, value in (env or {}).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = str(value)
    return base


# =============================================================================
# Requests from a given place, and the image tests' base image (shared by test files)
# =============================================================================

def get(port: int, path: str, headers=None, source: str | None = None, host: str = "127.0.0.1",
        timeout: float = 10.0):
    """``(status, headers, body)`` of one GET, optionally from a given source address."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def creds_from_namespace(pid: int, host: str, port: int) -> str:
    """GET /creds from inside the network namespace of process pid (a container's): its body."""
    client = ("import http.client, sys; c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10); "
              "c.request('GET', '/creds'); r = c.getresponse(); print(r.status); print(r.read().decode())")
    result = subprocess.run([*nsenter_net(pid), sys.executable, "-c", client, host, str(port)],
                            capture_output=True, text=True, timeout=30)
    status, body = result.stdout.split("\n", 1)
    assert status == "200", (result.stdout, result.stderr)
    return body


# Bump the suffix when the recipe in build_base_image() changes.
BASE_IMAGE = "local-endpoints-test/python-base:bookworm-1"


def run(cmd, check=True, timeout=600, **kw):
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            "command failed (%d): %s\nstdout:\n%s\nstderr:\n%s"
            % (proc.returncode, " ".join(map(str, cmd)), proc.stdout[-4000:], proc.stderr[-4000:])
        )
    return proc


def image_exists(docker, tag):
    return run([docker, "image", "inspect", tag], check=False).returncode == 0


def python_slim_like(rootfs):
    """Like the official image: pip may install into the system python, ``python`` exists.

    (debootstrap_image already gives it the host's CA bundle and pip's cert
    setting; no index URL is copied: the host's extra indexes are local file://
    directories, absent in the image.)"""
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    python = rootfs / "usr/bin/python"
    if not python.exists():
        python.symlink_to("python3")


def build_base_image(engine, workdir: Path) -> str:
    """BASE_IMAGE, a local stand-in for python:*-slim made with debootstrap + docker import,
    unless the engine has it already (test_examples.py builds its stand-ins on it too)."""
    if not image_exists(engine.docker_cli, BASE_IMAGE):
        t0 = time.monotonic()
        debootstrap_image(engine, BASE_IMAGE, ["python3", "python3-pip", "ca-certificates"], workdir,
                          python_slim_like)
        print("\nbase image %s built in %.1fs" % (BASE_IMAGE, time.monotonic() - t0))
    return BASE_IMAGE


def wait_http(url, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def moto_server_at(host: str):
    """moto_server on the host bound to ``host`` (a gateway address containers reach): its URL."""
    try:
        import flask  # noqa: F401  (moto_server needs it)
        import moto.server  # noqa: F401
    except ImportError as e:
        unavailable("moto[server] is not installed (%s): .venv/bin/pip install -r requirements-dev.txt" % e)
    port = free_port(host)
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **DUMMY_AWS_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = "http://%s:%d" % (host, port)
    try:
        wait_http(url + "/moto-api/", timeout=30)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# =============================================================================
# A fault no real component gives on demand
# =============================================================================

class IdentityWithoutCallerIdentity:
    """An AwsIdentity whose GetSessionToken works and GetCallerIdentity fails (a fake: moto cannot
    fail one call and not the other on demand).  The failure is a real botocore exception; the
    base identity's method is botocore's name for a credentials file, which no record may take
    for an identity."""

    profile = None
    mfa = None

    def __init__(self):
        self.asked = 0

    def check_mfa_session(self) -> None:
        pass

    def base(self):
        import botocore.credentials
        return botocore.credentials.ReadOnlyCredentials("AKIAEXAMPLELONGTERM", "long-term-secret-example", None), \
            None, "shared-credentials-file"

    def get_session_token(self, duration: int) -> dict:
        from datetime import datetime, timedelta, timezone
        return {"AccessKeyId": "ASIAEXAMPLESESSION", "SecretAccessKey": "session-secret-example",
                "SessionToken": "session-token-example", "Expiration": datetime.now(timezone.utc) + timedelta(hours=1)}

    def get_caller_identity(self) -> dict:
        import botocore.exceptions
        self.asked += 1
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/")


# =============================================================================
# `run TASKDEF` as a user runs it, and clients inside its task
# =============================================================================

RUN_TIMEOUT = 120


class TaskProcess:
    """One `local_endpoints.py run` process: its stdout and stderr kept apart, as a user sees them."""

    def __init__(self, proc: subprocess.Popen, out: Path, err: Path, family: str, engine):
        self.proc, self.out_path, self.err_path = proc, out, err
        self.family = family
        self.engine = engine

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Until the runner's progress (stderr) says text; fails if it exits first."""
        if not wait_for(lambda: text in self.stderr or self.proc.poll() is not None, timeout, 0.1) \
                or text not in self.stderr:
            pytest.fail(f"`run` did not say {text!r} (exit {self.proc.poll()}):\n{self.stderr}\n{self.stdout}",
                        pytrace=False)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"`run` did not end within {timeout} s:\n{self.stderr}", pytrace=False)

    def container(self, name: str) -> dict:
        """docker inspect of the task's container of that task-definition name."""
        ids = self.engine.cli("ps", "-aq", "--filter", f"label=com.amazonaws.ecs.task-definition-family={self.family}",
                              "--filter", f"label=com.amazonaws.ecs.container-name={name}").stdout.split()
        assert len(ids) == 1, (name, ids)
        return self.engine.inspect(ids[0])

    def left_behind(self) -> dict[str, list[str]]:
        """What the task's labels still find on the engine: containers and volumes."""
        label = f"label=com.amazonaws.ecs.task-definition-family={self.family}"
        found = {"containers": self.engine.cli("ps", "-aq", "--filter", label).stdout.split()}
        task_arns = set(re.findall(r"arn:aws:ecs:[^ ]*:task/[^ \n]*", self.stderr))
        found["volumes"] = [v for arn in task_arns for v in self.engine.cli(
            "volume", "ls", "-q", "--filter", f"label=com.amazonaws.ecs.task-arn={arn}").stdout.split()]
        return {kind: items for kind, items in found.items() if items}


def in_task(task: TaskProcess, container: str, code: str, *args: str, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Python code run in the network namespace of one of the task's containers, with that
    container's environment (its ECS variables): a client inside the task."""
    inspect = task.container(container)
    environment = dict(e.split("=", 1) for e in inspect["Config"]["Env"])
    environment = {k: v for k, v in environment.items() if k.startswith(("AWS_", "ECS_"))}
    environment.update(PATH=os.environ["PATH"], HOME=str(Path.home()), AWS_EC2_METADATA_DISABLED="true",
                       **{k: os.environ[k] for k in ("PYENV_ROOT", "PYENV_VERSION") if k in os.environ},
                       **(env or {}))
    return subprocess.run([*nsenter_net(inspect["State"]["Pid"]), sys.executable, "-c", code, *args],
                          env=environment, capture_output=True, text=True, timeout=60)


GET_JSON = ("import http.client, json, sys; c = http.client.HTTPConnection('169.254.170.2', 80, timeout=10); "
            "c.request('GET', sys.argv[1]); r = c.getresponse(); print(json.dumps([r.status, json.loads(r.read())]))")


def get_in_task(task: TaskProcess, container: str, path: str) -> tuple[int, object]:
    result = in_task(task, container, GET_JSON, path)
    assert result.returncode == 0, result.stderr
    status, body = json.loads(result.stdout)
    return status, body


def app_waits_for(path: str, then: str) -> list[str]:
    """A command that waits until `docker exec touch path` tells it to go on, then runs then."""
    return ["sh", "-c", f"while [ ! -f {path} ]; do sleep 0.1; done; {then}"]


class _RefusingAwsHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
        target = self.headers.get("X-Amz-Target", "")   # the JSON protocol's action (SSM, Secrets Manager)
        action = target.rpartition(".")[2] or dict(urllib.parse.parse_qsl(body)).get("Action", "")
        self.server.actions.append(action)
        if action == "GetCallerIdentity":
            status, text = 200, ("<GetCallerIdentityResponse><GetCallerIdentityResult>"
                                 f"<Arn>{RefusingAws.CALLER}</Arn><UserId>AIDA</UserId>"
                                 "<Account>123456789012</Account></GetCallerIdentityResult></GetCallerIdentityResponse>")
            content_type = "text/xml"
        else:
            message = f"User: {RefusingAws.CALLER} is not authorized to perform: {RefusingAws.SERVICES.get(action, 'sts')}:{action} on resource: {RefusingAws.resource(action, body)}"
            if target:
                status, content_type = 400, "application/x-amz-json-1.1"
                text = json.dumps({"__type": "AccessDeniedException", "message": message})
            else:
                status, content_type = 403, "text/xml"
                text = (f"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{message}"
                        "</Message></Error></ErrorResponse>")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *args):
        pass


class RefusingAws(ThreadingHTTPServer):
    """An AWS endpoint (STS's query protocol, SSM's and Secrets Manager's JSON protocol) that
    answers every action with AccessDenied, as AWS does where IAM denies it, but
    GetCallerIdentity, which names a fixed user.  A fake, because moto evaluates no IAM policy:
    it lets every caller assume every role and read every parameter.

    ``with RefusingAws() as peer:`` serves on loopback; ``peer.url``; ``peer.actions`` lists
    the actions asked for.
    """

    CALLER = "arn:aws:iam::123456789012:user/dev"
    SERVICES = {"AssumeRole": "sts", "GetParameters": "ssm", "GetSecretValue": "secretsmanager"}

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _RefusingAwsHandler)
        self.actions: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_port}"

    @staticmethod
    def resource(action: str, body: str) -> str:
        if action == "AssumeRole":
            return dict(urllib.parse.parse_qsl(body)).get("RoleArn", "")
        with contextlib.suppress(ValueError):
            request = json.loads(body)
            return ",".join(request.get("Names") or [request.get("SecretId", "")])
        return ""

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

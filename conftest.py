"""Shared pytest fixtures for the Local Container Endpoints test-suite.

The tests exercise ``local_endpoints.py`` against real peers rather than
mocks: a real Docker Engine (Debian's ``docker.io``), real containers built
from a locally imported busybox image (no image registry is reachable), and a
real ``moto_server`` standing in for STS/IAM behind a small counting proxy.

Overview of the fixtures (see each docstring for the details):

``docker_engine``  (session)  the shared dockerd at ``/run/le-docker``.
``busybox_image``  (session)  tag of a tiny image imported from busybox-static.
``containers``     (function) runs labelled containers/networks, removed after.
``moto``           (session)  moto_server + counting reverse proxy.
``start_server``   (function) launches local_endpoints.py subprocesses.
``secrets``        (session)  values that must never appear in server logs.

Docker-backed tests are skipped with an explicit reason when no engine can be
had, except under CI (env ``CI`` set) where that is a hard failure: a Docker
test silently skipped in CI is a defect, not a pass.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import io
import json
import os
import re
import secrets as _secrets_module
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent
SERVER_SCRIPT = REPO_ROOT / "local_endpoints.py"

# --- the one shared Docker Engine -------------------------------------------
# Only one dockerd can run on a machine at a time (they fight over docker0 and
# iptables), so every test run - and every developer - uses this one, at a
# path of its own so it never collides with a system docker.service.
DOCKER_RUN_DIR = Path("/run/le-docker")
DOCKER_SOCKET = DOCKER_RUN_DIR / "docker.sock"
DOCKER_HOST = f"unix://{DOCKER_SOCKET}"
DOCKER_PIDFILE = DOCKER_RUN_DIR / "dockerd.pid"
DOCKER_LOG = DOCKER_RUN_DIR / "dockerd.log"
DOCKER_EXEC_ROOT = DOCKER_RUN_DIR / "exec"
DOCKER_DATA_ROOT = Path("/var/lib/le-docker")
DOCKER_LOCK = Path("/run/le-docker.lock")
DOCKERD_START_TIMEOUT = 30.0
DOCKERD_STOP_TIMEOUT = 60.0

TEST_LABEL = "local-endpoints-test"
TEST_LABEL_FILTER = f"label={TEST_LABEL}=1"
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


def in_ci() -> bool:
    """True when running under CI, where skipping infrastructure is an error."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str):
    """Skip (developer machine) or fail (CI) because infrastructure is missing."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: refusing to skip Docker-backed tests)", pytrace=False)
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    There is an unavoidable race between closing the probe socket and the
    caller binding the port, but on loopback it is negligible in practice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it returns truthy or ``timeout`` elapses."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


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


# =============================================================================
# Markers
# =============================================================================

DOCKER_FIXTURES = {"docker_engine", "busybox_image", "containers"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "docker: the test needs the shared Docker Engine (added automatically to "
        "tests using docker_engine/busybox_image/containers; deselect with -m 'not docker')",
    )


def pytest_collection_modifyitems(config, items):
    """Mark Docker-backed tests so ``-m 'not docker'`` gives a quick run."""
    for item in items:
        if DOCKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


# =============================================================================
# Docker Engine
# =============================================================================

class DockerError(subprocess.CalledProcessError):
    """A failed docker CLI call whose message includes the CLI's stderr."""

    def __str__(self):
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket, to ping dockerd without the CLI."""

    def __init__(self, path: str, timeout: float = 2.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _running_dockerds() -> list[tuple[int, str]]:
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
                and _pid_alive(int(entry.name)):
            found.append((int(entry.name), b" ".join(argv).decode(errors="replace").strip()))
    return found


_apt_updated = False


def apt_install(*packages: str) -> None:
    """Install Debian packages (root only), running ``apt-get update`` once.

    CI starts from a fresh Debian machine, so the suite provisions what it
    needs itself. A policy-rc.d denying service starts is put in place for the
    duration: the docker.io package would otherwise start a *second* dockerd
    (docker.service) which would fight ours over docker0 and iptables.
    """
    global _apt_updated
    if os.geteuid() != 0:
        raise RuntimeError(f"need root to apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    placed_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# written by conftest.py during apt-get install\nexit 101\n")
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


class DockerEngine:
    """Handle on the shared dockerd at ``/run/le-docker``.

    Attributes: ``host`` (DOCKER_HOST value), ``socket`` (socket path).
    Methods: ``cli(*args, check=True)``, ``inspect(name_or_id)``, ``ping()``,
    ``stop()``, ``start()``, ``ensure_running()``, ``remove_test_objects()``.
    """

    host = DOCKER_HOST
    socket = str(DOCKER_SOCKET)

    def __init__(self):
        self.docker_cli = shutil.which("docker") or "/usr/bin/docker"
        self._proc: subprocess.Popen | None = None  # set when we spawned dockerd
        self.was_running = False  # state found at session start, restored at the end
        self.closed = False  # set at session end; no more automatic restarts

    # -- talking to it ---------------------------------------------------------
    def ping(self, timeout: float = 2.0) -> bool:
        """True if the socket answers ``GET /_ping`` with 200 OK."""
        conn = _UnixHTTPConnection(self.socket, timeout=timeout)
        try:
            conn.request("GET", "/_ping")
            resp = conn.getresponse()
            return resp.status == 200 and resp.read().strip() == b"OK"
        except OSError:
            return False
        finally:
            conn.close()

    def env(self) -> dict:
        """Environment for docker CLI calls (our socket, no user config)."""
        return dict(os.environ, DOCKER_HOST=self.host)

    def cli(self, *args: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run the docker CLI against our engine; text output, captured."""
        cmd = [self.docker_cli, *map(str, args)]
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise DockerError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def inspect(self, name_or_id: str) -> dict:
        """``docker inspect`` of one object, as a dict."""
        return json.loads(self.cli("inspect", name_or_id).stdout)[0]

    # -- lifecycle -------------------------------------------------------------
    def _pidfile_pid(self) -> int | None:
        try:
            return int(DOCKER_PIDFILE.read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self, timeout: float = DOCKERD_START_TIMEOUT) -> None:
        """Start dockerd at the standard paths (if not answering) and wait for _ping."""
        if self.ping():
            return
        pid = self._pidfile_pid()
        if pid and _pid_alive(pid):
            # Probably still starting up (or shutting down): give it a chance.
            if wait_for(self.ping, timeout):
                return
            raise RuntimeError(f"dockerd pid {pid} (from {DOCKER_PIDFILE}) is alive but "
                               f"{self.socket} does not answer; see {DOCKER_LOG}")
        others = _running_dockerds()
        if others:
            listing = "; ".join(f"pid {p}: {c}" for p, c in others)
            raise RuntimeError("another dockerd is running and only one can run per machine "
                               f"(they fight over docker0/iptables); stop it first: {listing}")
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        DOCKER_RUN_DIR.mkdir(parents=True, exist_ok=True)
        DOCKER_DATA_ROOT.mkdir(parents=True, exist_ok=True)
        log = open(DOCKER_LOG, "ab")
        try:
            # A session of its own: when the daemon was already running before the
            # session we restore it, and it must outlive pytest (and its ^C).
            self._proc = subprocess.Popen(
                [dockerd, "--data-root", str(DOCKER_DATA_ROOT),
                 "--exec-root", str(DOCKER_EXEC_ROOT), "-H", self.host,
                 "--pidfile", str(DOCKER_PIDFILE)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
            )
        finally:
            log.close()
        if not wait_for(lambda: self.ping() or self._proc.poll() is not None, timeout, 0.2) \
                or not self.ping():
            tail = DOCKER_LOG.read_text(errors="replace")[-3000:] if DOCKER_LOG.exists() else ""
            raise RuntimeError(f"dockerd did not answer on {self.socket} within {timeout:.0f}s "
                               f"(exit code {self._proc.poll()}); log tail:\n{tail}")

    def stop(self, timeout: float = DOCKERD_STOP_TIMEOUT) -> None:
        """SIGTERM dockerd (pid from its pidfile) and wait until it has exited."""
        pid = self._proc.pid if self._proc and self._proc.poll() is None else self._pidfile_pid()
        if not pid or not _pid_alive(pid):
            return
        os.kill(pid, signal.SIGTERM)

        def gone():
            if self._proc is not None and self._proc.pid == pid:
                return self._proc.poll() is not None  # reap our own child
            return not _pid_alive(pid)

        if not wait_for(gone, timeout, 0.2):
            os.kill(pid, signal.SIGKILL)
            wait_for(gone, 10, 0.1)
            raise RuntimeError(f"dockerd pid {pid} ignored SIGTERM for {timeout:.0f}s; killed")
        # The socket file may linger briefly; make sure nobody answers any more.
        wait_for(lambda: not self.ping(timeout=0.5), 5)

    def ensure_running(self) -> None:
        """Restart the engine if a test stopped it and did not start it again."""
        if not self.ping():
            self.start()

    def remove_test_objects(self) -> None:
        """Remove every container and network carrying the test label.

        Safe because the session holds the machine-wide lock: no other test run
        can own labelled objects right now, so these are leftovers of a crash.
        """
        ids = self.cli("ps", "-aq", "--filter", TEST_LABEL_FILTER).stdout.split()
        if ids:
            self.cli("rm", "-f", "-v", *ids, check=False)
        nets = self.cli("network", "ls", "-q", "--filter", TEST_LABEL_FILTER).stdout.split()
        if nets:
            self.cli("network", "rm", *nets, check=False)


def _acquire_machine_lock():
    """Exclusive flock on /run/le-docker.lock, held for the rest of the session.

    Several developers may run pytest on one machine; they share one dockerd,
    and tests stop/restart it and delete labelled leftovers. Serializing whole
    sessions is the only safe option, so a second run waits here.
    """
    fd = os.open(DOCKER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        sys.stderr.write(f"\n[conftest] {DOCKER_LOCK} is held by another test run; waiting...\n")
        sys.stderr.flush()
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@pytest.fixture(scope="session")
def docker_engine():
    """The shared Docker Engine at unix:///run/le-docker/docker.sock.

    Installs Debian's docker.io if ``dockerd`` is missing (root only), takes the
    machine-wide session lock, then uses the running daemon or starts one. At
    session end the engine is left as it was found: stopped if we started it,
    running if it was running (even if a test restarted it meanwhile).
    """
    try:
        if not shutil.which("dockerd") or not shutil.which("docker"):
            apt_install("docker.io", "busybox-static")
        lock_fd = _acquire_machine_lock()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        unavailable(f"Docker Engine unavailable: {e}")
    engine = DockerEngine()
    try:
        engine.was_running = engine.ping()
        engine.start()
        engine.remove_test_objects()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        os.close(lock_fd)
        unavailable(f"Docker Engine unavailable at {DOCKER_HOST}: {e}")
    try:
        yield engine
    finally:
        engine.closed = True
        try:
            if engine.ping():
                engine.remove_test_objects()
            if engine.was_running:
                engine.ensure_running()
            else:
                engine.stop()
        finally:
            os.close(lock_fd)  # releases the flock


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    """Bring the engine back if a test stopped it and failed before restarting it.

    Runs before fixture teardown, so the ``containers`` cleanup and the
    session-end restore both find a live engine.
    """
    engine = getattr(item, "funcargs", {}).get("docker_engine")
    if isinstance(engine, DockerEngine) and not engine.closed:
        engine.ensure_running()


# =============================================================================
# busybox image
# =============================================================================

def _is_static_elf(path: str) -> bool:
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


@pytest.fixture(scope="session")
def busybox_image(docker_engine, tmp_path_factory) -> str:
    """Tag of a tiny image built from Debian's busybox-static.

    No image registry is reachable, so the image is made with ``docker import``
    from a rootfs tarball. It has sh, sleep, cat, wget, nc, top, ... and
    ``CMD ["sh"]``. Reused if it already exists in the engine.
    """
    if docker_engine.cli("image", "inspect", BUSYBOX_TAG, check=False).returncode == 0:
        return BUSYBOX_TAG
    if not _is_static_elf("/bin/busybox"):
        try:
            apt_install("busybox-static")
        except RuntimeError as e:
            unavailable(f"busybox image cannot be built: {e}")
    tar_path = build_busybox_tar(tmp_path_factory.mktemp("busybox"))
    docker_engine.cli("import", "--change", 'CMD ["sh"]', "--change",
                      f"LABEL {TEST_LABEL}-image=1", str(tar_path), BUSYBOX_TAG)
    return BUSYBOX_TAG


# =============================================================================
# Test containers and networks
# =============================================================================

class Containers:
    """Creates labelled containers/networks and removes them at teardown.

    ``run(*docker_run_args) -> id`` runs ``docker run -d --label
    local-endpoints-test=1 ARGS`` (pass the image and command in ARGS).
    ``network(name, subnet=None) -> name`` creates a labelled bridge network.
    ``name(prefix)`` returns a unique name for either.
    """

    def __init__(self, engine: DockerEngine):
        self.engine = engine
        self.ids: list[str] = []
        self.networks: list[str] = []

    @staticmethod
    def name(prefix: str = "le-test") -> str:
        return f"{prefix}-{_secrets_module.token_hex(4)}"

    def run(self, *docker_run_args: str) -> str:
        proc = self.engine.cli("run", "-d", "--label", f"{TEST_LABEL}=1", *docker_run_args)
        cid = proc.stdout.strip().splitlines()[-1]
        self.ids.append(cid)
        return cid

    def network(self, name: str, subnet: str | None = None, *extra_args: str) -> str:
        args = ["network", "create", "--label", f"{TEST_LABEL}=1"]
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


@pytest.fixture
def containers(docker_engine):
    """Factory for test containers/networks that are always removed afterwards."""
    c = Containers(docker_engine)
    try:
        yield c
    finally:
        c.cleanup()


# =============================================================================
# moto_server behind a counting proxy
# =============================================================================

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
               "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate"}
_SCOPE_RE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([^/]+)/aws4_request")


def _aws_action(method: str, path: str, headers, body: bytes) -> tuple[str | None, str | None]:
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
        service, action = _aws_action(self.command, self.path, self.headers, body)
        self.server.owner._record(self.command, self.path, service, action)
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

    def __init__(self, addr, owner):
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
    Methods: ``count(action=None, service=None)``, ``reset_counts()``,
    ``pause()``, ``resume()``, ``reset()`` (moto state + counts),
    ``client(service)`` (boto3 client straight to moto, not counted),
    ``create_role(name, path="/") -> arn``.
    """

    env = dict(DUMMY_AWS_ENV)

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.moto_port = free_port()
        self.moto_url = f"http://127.0.0.1:{self.moto_port}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.env)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        finally:
            log.close()

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
                self._server = _ProxyServer(("127.0.0.1", self.port), self)
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
    def _record(self, method, path, service, action) -> None:
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


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A real moto_server (STS, IAM, ...) behind a counting proxy; see ``Moto``."""
    m = Moto(tmp_path_factory.mktemp("moto") / "moto_server.log")
    try:
        m.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield m
    finally:
        m.close()


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


@pytest.fixture(scope="session")
def secrets() -> SecretRegistry:
    """Register secret values here; ``start_server`` checks its logs for them."""
    return SecretRegistry()


# =============================================================================
# The server under test
# =============================================================================

# Environment variables passed to the server whose values are secrets.
SECRET_ENV_VARS = {"AWS_SECRET_ACCESS_KEY": "secret access key",
                   "AWS_SESSION_TOKEN": "session token"}


class Server:
    """One running ``local_endpoints.py`` subprocess.

    Attributes: ``url``, ``port``, ``proc``, ``log_path``.
    Methods: ``log()``, ``get(path, headers=None)``, ``request(method, path,
    headers=None, body=None)``, ``wait_ready(timeout)``, ``stop(sig)``.
    """

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

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
            pytest.fail(f"local_endpoints.py exited with code {self.proc.returncode} before "
                        f"answering /health; log:\n{self.log()}", pytrace=False)
        if not ok:
            pytest.fail(f"local_endpoints.py did not answer /health within {timeout:.0f}s; "
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
            pytest.fail(f"local_endpoints.py ignored signal {sig} for {timeout:.0f}s; killed",
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


@pytest.fixture
def start_server(tmp_path, secrets, request):
    """Factory: ``start_server(env=None, args=(), wait=True) -> Server``.

    Runs ``python3 local_endpoints.py --port P --bind 127.0.0.1 --log-level
    DEBUG *args`` from the repo root (stdout+stderr to a log file), waits for
    ``GET /health`` unless ``wait=False``. At teardown every server is stopped
    and its log is checked for registered secrets (values of
    AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN passed in ``env`` are registered
    automatically). The logs, redacted, are attached to the test report.
    """
    started: list[Server] = []
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)

    def start(env: dict | None = None, args=(), wait: bool = True) -> Server:
        for var, kind in SECRET_ENV_VARS.items():
            if env and env.get(var):
                secrets.add(env[var], kind)
        port = free_port()
        log_path = tmp_path / f"server-{len(started)}-{port}.log"
        cmd = [sys.executable, str(SERVER_SCRIPT), "--port", str(port), "--bind", "127.0.0.1",
               "--log-level", "DEBUG", *map(str, args)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=server_env(home, env),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        server = Server(proc, port, log_path)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start

    for server in started:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
    leaked = []
    for i, server in enumerate(started):
        text = server.log()
        request.node.add_report_section("teardown", f"server {i} log (port {server.port})",
                                        secrets.redact(text))
        for kind in secrets.leaks(text):
            leaked.append(f"{kind} in log of server {i} (port {server.port})")
    if leaked:
        pytest.fail("registered secret(s) leaked into server logs: " + "; ".join(leaked),
                    pytrace=False)

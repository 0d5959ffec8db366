"""Metadata and stats against podman: Debian's podman serving the Docker API.

A podman of the tests' own (``podman system service`` on a socket in a temporary
directory, its own storage, run directory and network configuration, rootful)
runs real containers from the busybox rootfs tarball. ``local_endpoints.py`` is
pointed at its socket with ``DOCKER_HOST`` and answers for those containers; the
answers are checked against ``podman inspect`` of the same containers.

Podman runs containers here only with a ``containers.conf`` that sets
``default_ulimits = []``, ``cgroup_manager = "cgroupfs"`` and ``runtime = "runc"``
(crun refuses the hybrid cgroup layout of these machines), and the events log in
a file (there is no journald). The fixture writes it and points ``CONTAINERS_CONF``
at it. It installs podman and runc with apt when they are missing; under CI a
podman that cannot be had fails the tests instead of skipping them.

Only one podman of the tests may run on a machine at a time (its default network
is the ``podman0`` bridge), so the fixture holds ``/run/le-podman.lock``.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from testlib import (SERVER_SCRIPT, Server, apt_install, build_busybox_tar, free_port, is_static_elf, server_env,
                      unavailable, wait_for)

PODMAN_LOCK = Path("/run/le-podman.lock")
IMAGE = "localhost/le-busybox:latest"
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
"""
SLEEP = ("sleep", "3600")
BUSY = ("sh", "-c", "while :; do :; done")
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
# Base credentials that are already temporary: /creds passes them on without an STS call.
TEMPORARY_KEYS = {"AWS_ACCESS_KEY_ID": "ASIAIOSFODNN7EXAMPLE",
                  "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPODMANKEY",
                  "AWS_SESSION_TOKEN": "le-podman-session-token-" + "x" * 40,
                  "AWS_DEFAULT_REGION": "us-east-1"}

# Not the shared Docker Engine, but a container engine all the same: -m 'not docker' leaves these out.
pytestmark = pytest.mark.docker


class Podman:
    """A rootful podman with storage, run directory and networks of its own under ``root``.

    ``cli(*args)`` runs the podman command line on the same storage; ``socket`` is
    where ``podman system service`` serves the Docker API.
    """

    def __init__(self, root: Path):
        self.root = root
        self.socket = root / "podman.sock"
        self.host = f"unix://{self.socket}"
        self.conf = root / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.env = dict(os.environ, CONTAINERS_CONF=str(self.conf))
        self.flags = ["--root", str(root / "storage"), "--runroot", str(root / "run"),
                      "--network-config-dir", str(root / "networks"), "--tmpdir", str(root / "tmp")]
        self.service: subprocess.Popen | None = None
        self.created: list[str] = []

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *self.flags, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        return proc

    def api(self, path: str) -> object:
        """GET a JSON document from the service's Docker API."""
        conn = http.client.HTTPConnection("podman")
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.settimeout(10)
        conn.sock.connect(str(self.socket))
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return json.loads(response.read())
        finally:
            conn.close()

    def start(self) -> None:
        log = open(self.root / "service.log", "wb")
        self.service = subprocess.Popen(["podman", *self.flags, "system", "service", "--time", "0", self.host],
                                        env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def answers() -> bool:
            if self.service.poll() is not None:
                return True
            try:
                self.api("/version")
                return True
            except (OSError, ValueError, http.client.HTTPException):
                return False
        wait_for(answers, 30, 0.1)
        if self.service.poll() is not None or not self.socket.exists():
            raise RuntimeError(f"podman system service did not start: "
                               f"{(self.root / 'service.log').read_text(errors='replace')[-2000:]}")

    def run(self, *args: str) -> str:
        """``podman run -d ARGS``: the new container's full ID (removed at teardown)."""
        container_id = self.cli("run", "-d", *args).stdout.strip().splitlines()[-1]
        self.created.append(container_id)
        return container_id

    def inspect(self, name: str) -> dict:
        return json.loads(self.cli("inspect", name).stdout)[0]

    def docker_inspect(self, name: str) -> dict:
        """The Docker-compatible inspect document the server reads."""
        return self.api(f"/v1.41/containers/{name}/json")

    def stop(self) -> None:
        """Remove every container and network, stop the service, and drop the storage."""
        self.cli("rm", "--all", "--force", "--time", "0", check=False, timeout=120)
        if self.service and self.service.poll() is None:
            os.killpg(self.service.pid, signal.SIGTERM)
            try:
                self.service.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.service.pid, signal.SIGKILL)
                self.service.wait()
        self.cli("system", "reset", "--force", check=False, timeout=120)


def provision() -> None:
    """podman and runc from apt when missing (root only), and busybox-static for the image."""
    missing = [package for package, command in (("podman", "podman"), ("runc", "runc"))
               if not shutil.which(command)]
    if not is_static_elf("/bin/busybox"):
        missing.append("busybox-static")
    if missing:
        apt_install(*missing)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """The tests' own podman, serving the Docker API, with the busybox image imported."""
    if os.geteuid() != 0:
        unavailable("podman tests need root (rootful podman, nsenter)")
    try:
        provision()
    except RuntimeError as exc:
        unavailable(f"podman unavailable: {exc}")
    lock = os.open(PODMAN_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(lock, fcntl.LOCK_EX)
    root = tmp_path_factory.mktemp("podman")
    engine = Podman(root)
    try:
        try:
            engine.start()
            engine.cli("import", "--change", 'CMD ["sh"]', str(build_busybox_tar(root)), IMAGE)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            unavailable(f"podman unavailable: {exc}")
        yield engine
    finally:
        engine.stop()
        os.close(lock)


# ---------------------------------------------------------------------------
# The containers and the server
# ---------------------------------------------------------------------------

class Fleet:
    """The module's podman containers: a two-container compose project and one outside compose."""

    def __init__(self, engine: Podman):
        self.engine = engine
        self.token = secrets.token_hex(3)
        self.project = f"le-pod-{self.token}"
        self.ids: dict[str, str] = {}
        self.names: dict[str, str] = {}

    def run(self, role: str, *args: str, command: tuple[str, ...] = SLEEP, project: bool = True) -> None:
        name = f"le-pod-{self.token}-{role}"
        labels = ["--label", f"{COMPOSE_PROJECT}={self.project}",
                  "--label", f"{COMPOSE_SERVICE}={role}-{self.token}"] if project else []
        self.ids[role] = self.engine.run("--name", name, *labels, *args, IMAGE, *command)
        self.names[role] = name


@pytest.fixture(scope="module")
def fleet(podman):
    fleet = Fleet(podman)
    fleet.run("web", "--label", "tier=frontend", "-p", "127.0.0.1::80", "--cpus", "0.5", "-m", "64m")
    fleet.run("worker", "--cpus", "0.25", command=BUSY)
    fleet.run("lone", project=False)
    return fleet


@pytest.fixture(scope="module")
def server(podman, fleet, tmp_path_factory):
    """local_endpoints.py on 0.0.0.0 with DOCKER_HOST at the podman socket, and
    base credentials that are already temporary (so /creds makes no STS call)."""
    workdir = tmp_path_factory.mktemp("podman-server")
    (workdir / "home").mkdir()
    port = free_port()
    log_path = workdir / "server.log"
    env = server_env(workdir / "home", {"DOCKER_HOST": podman.host, **TEMPORARY_KEYS})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "--port", str(port), "--bind", "0.0.0.0",
                                 "--log-level", "DEBUG"], cwd=SERVER_SCRIPT.parent, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    running = Server(proc, port, log_path)
    try:
        running.wait_ready()
        assert wait_for(lambda: get_json(running, "/health")["docker"]["reachable"], 15, 0.1), running.log()
        yield running
    finally:
        running.stop()
        for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert TEMPORARY_KEYS[secret] not in running.log(), f"{secret} in the server log"


def get_json(server, path: str, expect: int = 200):
    status, headers, body = server.get(path)
    assert status == expect, f"GET {path}: {status} {body[:500]!r}"
    assert headers.get("Content-Type") == "application/json", headers
    return json.loads(body)


def fetch_inside(pid: int, url: str) -> tuple[int, object]:
    """GET url from inside a container's network namespace (the host's python3 there)."""
    script = ("import json, sys, urllib.error, urllib.request\n"
              "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
              "try:\n"
              "    reply = opener.open(sys.argv[1], timeout=10)\n"
              "    print(json.dumps([reply.status, json.loads(reply.read())]))\n"
              "except urllib.error.HTTPError as error:\n"
              "    print(json.dumps([error.code, json.loads(error.read())]))\n")
    proc = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", script, url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return tuple(json.loads(proc.stdout))


def parse_time(text: str) -> datetime:
    """An RFC 3339 UTC time with a Z (Python 3.11 reads nanoseconds, truncating them)."""
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


def cpu_total(stats: dict) -> int:
    return stats["cpu_usage"]["total_usage"]


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------

def test_engine_version_and_startup_line(server, podman):
    health = get_json(server, "/health")
    assert health["docker"] == {"reachable": True, "socket": podman.host, "apiVersion": "1.41"}
    line = next(line for line in server.log().splitlines() if "podman" in line.lower() and "4.3" in line)
    assert "stats" in line, line   # what differs from Docker is said at start-up


@pytest.mark.parametrize("version", [3, 4])
def test_container_metadata_matches_podman_inspect(fleet, server, podman, version):
    name, cid = fleet.names["web"], fleet.ids["web"]
    doc = get_json(server, f"/v{version}/{name}")
    inspect = podman.docker_inspect(cid)
    assert doc["DockerId"] == cid and doc["DockerName"] == name
    assert doc["Name"] == f"web-{fleet.token}"
    assert doc["Image"] == inspect["Config"]["Image"] and doc["ImageID"] == inspect["Image"]
    own = {k: v for k, v in doc["Labels"].items() if not k.startswith("com.amazonaws.ecs.")}
    assert own == inspect["Config"]["Labels"] and doc["Labels"]["tier"] == "frontend"
    task = get_json(server, f"/v{version}/{name}/task")
    assert doc["Labels"]["com.amazonaws.ecs.task-arn"] == task["TaskARN"]   # the labels ECS adds
    assert doc["Labels"]["com.amazonaws.ecs.container-name"] == doc["Name"]
    assert (doc["KnownStatus"], doc["DesiredStatus"], doc["Type"]) == ("RUNNING", "RUNNING", "NORMAL")
    assert doc["Limits"] == {"CPU": 512, "Memory": 64}
    assert doc["CreatedAt"] == inspect["Created"] and doc["StartedAt"] == inspect["State"]["StartedAt"]
    assert "Health" not in doc, doc   # podman reports an empty health state without a health check
    binding = inspect["NetworkSettings"]["Ports"]["80/tcp"][0]
    port = {"ContainerPort": 80, "Protocol": "tcp", "HostPort": int(binding["HostPort"])}
    if version >= 4:
        port["HostIp"] = "127.0.0.1"
    assert doc["Ports"] == [port]
    (network, endpoint), = inspect["NetworkSettings"]["Networks"].items()
    entry, = doc["Networks"]
    # podman's default network is ECS's bridge mode, as Docker's default bridge: no awsvpc fields.
    assert entry == {"NetworkMode": network, "IPv4Addresses": [endpoint["IPAddress"]]}
    if version >= 4:
        assert doc["ContainerARN"].startswith("arn:aws:ecs:")
        assert "RestartCount" not in doc   # no restart policy


def test_task_is_the_compose_project(fleet, server):
    task = get_json(server, f"/v4/{fleet.names['worker']}/task")
    assert task["Family"] == fleet.project
    assert {c["DockerId"] for c in task["Containers"]} == {fleet.ids["web"], fleet.ids["worker"]}
    assert task["Limits"] == {"CPU": 0.75, "Memory": 64}
    assert get_json(server, f"/v4/{fleet.names['web']}/task")["TaskARN"] == task["TaskARN"]
    outside = get_json(server, f"/v4/{fleet.names['lone']}/task")
    assert fleet.ids["lone"] in {c["DockerId"] for c in outside["Containers"]}


def test_caller_found_by_its_address(fleet, server, podman):
    """From inside a podman container, /v4 with no name is that container."""
    pid = podman.inspect(fleet.ids["web"])["State"]["Pid"]
    gateway = podman.docker_inspect(fleet.ids["web"])["NetworkSettings"]["Networks"]["podman"]["Gateway"]
    status, doc = fetch_inside(pid, f"http://{gateway}:{server.port}/v4")
    assert status == 200 and doc["DockerId"] == fleet.ids["web"], doc
    status, task = fetch_inside(pid, f"http://{gateway}:{server.port}/v4/task")
    assert status == 200 and task["Family"] == fleet.project


def test_view_follows_podman_events(fleet, server, podman):
    """New, connected, disconnected and removed containers, and a new network's callers."""
    name = f"le-pod-{fleet.token}-evented"
    started = time.monotonic()
    cid = podman.run("--name", name, IMAGE, *SLEEP)
    assert wait_for(lambda: server.get(f"/v4/{name}")[0] == 200, 5, 0.02)
    print(f"new podman container answered {1000 * (time.monotonic() - started):.0f} ms after podman run began")

    network = f"le-pod-net-{fleet.token}"
    podman.cli("network", "create", "--subnet", "10.89.77.0/24", network)
    podman.cli("network", "connect", network, cid)
    assert wait_for(lambda: len(get_json(server, f"/v4/{name}")["Networks"]) == 2, 5, 0.1)
    podman.cli("network", "disconnect", network, cid)
    assert wait_for(lambda: len(get_json(server, f"/v4/{name}")["Networks"]) == 1, 5, 0.1)

    # A container on a network created after the server started: allowed to fetch credentials.
    newcomer = podman.run("--name", f"le-pod-{fleet.token}-newcomer", "--network", network, IMAGE, *SLEEP)
    pid = podman.inspect(newcomer)["State"]["Pid"]
    status, creds = fetch_inside(pid, f"http://10.89.77.1:{server.port}/creds")
    assert status == 200, creds
    assert creds["AccessKeyId"] == TEMPORARY_KEYS["AWS_ACCESS_KEY_ID"]

    podman.cli("rm", "--force", "--time", "0", cid)
    assert wait_for(lambda: server.get(f"/v4/{name}")[0] == 404, 5, 0.1)


# ---------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------

def test_stats_of_a_busy_container(fleet, server):
    """Samples about a second apart (podman's own stream sends one every 5 s), CPU growing,
    Docker's keys: ``id``, ``name`` with a slash, ``networks`` by interface."""
    name, cid = fleet.names["worker"], fleet.ids["worker"]
    first = get_json(server, f"/v4/{name}/stats")
    read, preread = parse_time(first["read"]), parse_time(first["preread"])
    assert 0.5 <= (read - preread).total_seconds() <= 1.6, (first["read"], first["preread"])
    assert cpu_total(first["cpu_stats"]) > cpu_total(first["precpu_stats"]) > 0
    assert first["cpu_stats"]["system_cpu_usage"] > first["precpu_stats"]["system_cpu_usage"] > 0
    assert first["id"] == cid and first["name"] == f"/{name}" and "Id" not in first
    assert list(first["networks"]) == ["eth0"]
    assert set(first["network_rate_stats"]) == {"rx_bytes_per_sec", "tx_bytes_per_sec"}

    time.sleep(2)
    started = time.monotonic()
    second = get_json(server, f"/v4/{name}/stats")
    assert time.monotonic() - started < 0.5, "a warm stats request waits for podman"
    assert (parse_time(second["read"]) - read).total_seconds() >= 0.9
    assert cpu_total(second["cpu_stats"]) > cpu_total(first["cpu_stats"])
    assert cpu_total(second["precpu_stats"]) >= cpu_total(first["cpu_stats"])


def test_task_stats(fleet, server):
    v4 = get_json(server, f"/v4/{fleet.names['web']}/task/stats")
    v3 = get_json(server, f"/v3/{fleet.names['web']}/task/stats")
    assert set(v4) == set(v3) == {fleet.ids["web"], fleet.ids["worker"]}
    for cid in v4:
        assert v4[cid]["id"] == v3[cid]["id"] == cid
        assert "network_rate_stats" in v4[cid] and "network_rate_stats" not in v3[cid]


def test_stats_end_when_the_container_stops(fleet, server, podman):
    name = f"le-pod-{fleet.token}-brief"
    cid = podman.run("--name", name, IMAGE, *SLEEP)
    assert get_json(server, f"/v4/{name}/stats")["id"] == cid
    collectors = get_json(server, "/health")["statsCollectors"]
    podman.cli("stop", "--time", "0", cid)
    assert wait_for(lambda: get_json(server, "/health")["statsCollectors"] == collectors - 1, 5, 0.1)
    assert get_json(server, f"/v4/{name}/stats", expect=503)["code"] == "StatsUnavailable"
    assert "Traceback" not in server.log()


# botocore's default chain, IMDS its only source, run in a podman container's network namespace.
IMDS_CLIENT = """
import json, botocore.session
credentials = botocore.session.Session().get_credentials()
print(json.dumps({"method": credentials and credentials.method,
                  "access_key": credentials and credentials.get_frozen_credentials().access_key}))
"""


def test_imds_credentials_through_host_containers_internal(fleet, server, podman, tmp_path):
    """Podman writes host.containers.internal into every container's /etc/hosts: at that
    address (the host, as seen from the container) botocore gets credentials from IMDS."""
    hosts = podman.cli("exec", fleet.ids["lone"], "cat", "/etc/hosts").stdout
    host = next(line.split()[0] for line in hosts.splitlines() if "host.containers.internal" in line.split()[1:])
    pid = podman.inspect(fleet.ids["lone"])["State"]["Pid"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{host}:{server.port}/"}
    proc = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", IMDS_CLIENT], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"method": "iam-role", "access_key": TEMPORARY_KEYS["AWS_ACCESS_KEY_ID"]}
    print(f"host.containers.internal is {host}")

"""Task metadata v2/v3/v4 and stats against the real Docker Engine.

Every Docker-backed test talks to a real ``local_endpoints.py`` subprocess
(``start_server``) pointed at the shared dockerd, about real containers made
from the busybox image: two "compose projects" (the compose labels are set
with ``--label``, as ``docker compose`` would set them), and containers outside
compose. Each field of a response is checked against ``docker inspect`` of the
same container, never against a copy of the server's own logic.

The containers are shared by the whole module (``fleet``) because starting them,
waiting for a health check and for a restart policy to give up costs seconds;
tests that stop or add containers make their own with ``containers``. The
Docker restart test stops the shared engine, so it is the last test of the file.

A request "from inside a container" is made by the host's python3 running in
that container's network namespace (``nsenter --net``): the server then sees
the container's own address, as it would on a Docker network.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

import local_endpoints
from testlib import Containers, apt_install, ensure_tool, nsenter_net, unavailable, wait_for

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
DEFAULT_TASK_ARN = ("arn:aws:ecs:us-west-2:111111111111:task/ecs-local-cluster/"
                    "37e873f6-37b4-42a7-af47-eac7275c6152")
TASK_ARN_RE = re.compile(r"arn:aws:ecs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                         r"task/(?P<cluster>[^/]+)/(?P<task>[^/]+)")
CONTAINER_ARN_RE = re.compile(r"arn:aws:ecs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
                              r"container/(?P<cluster>[^/]+)/(?P<task>[^/]+)/(?P<container>[0-9a-f-]{36})")
V4_ONLY_CONTAINER_KEYS = {"ContainerARN", "LogDriver", "LogOptions", "RestartCount", "Snapshotter"}
V4_ONLY_NETWORK_KEYS = {"AttachmentIndex", "IPv4SubnetCIDRBlock", "IPv6SubnetCIDRBlock", "MACAddress",
                        "SubnetGatewayIpv4Address", "SubnetGatewayIpv6Address", "DomainNameServers",
                        "DomainNameSearchList", "PrivateDNSName"}
SLEEP = ("sleep", "3600")
BUSY = ("sh", "-c", "while :; do :; done")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def get_json(server, path: str, expect: int = 200):
    """GET path; assert the status and a JSON content type; return the decoded body."""
    status, headers, body = server.get(path)
    assert status == expect, f"GET {path}: {status} {body[:500]!r}"
    assert headers.get("Content-Type") == "application/json", headers
    return json.loads(body)


def assert_error(server, path: str, status: int, code: str) -> str:
    """The project's JSON error object; returns its message."""
    body = get_json(server, path, expect=status)
    assert body == {"code": code, "message": body["message"], "HTTPErrorCode": status}, body
    assert isinstance(body["message"], str) and body["message"]
    return body["message"]


def parse_time(text: str) -> datetime:
    """An RFC 3339 UTC time with a Z (Python 3.11 reads nanoseconds, truncating them)."""
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


def inspect_many(engine, ids) -> dict[str, dict]:
    """``docker inspect`` of several objects at once, by full ID."""
    return {doc["Id"]: doc for doc in json.loads(engine.cli("inspect", *ids).stdout)}


def listed(engine, *filters: str) -> set[str]:
    """Full IDs of the containers ``docker ps -a`` lists with these filters."""
    args = [arg for f in filters for arg in ("--filter", f)]
    return set(engine.cli("ps", "-aq", "--no-trunc", *args).stdout.split())


def arn_parts(arn: str, pattern: re.Pattern) -> dict:
    match = pattern.fullmatch(arn)
    assert match, f"{arn!r} is not shaped like {pattern.pattern}"
    return match.groupdict()


def ecs_labels(doc: dict, task: dict) -> dict[str, str]:
    """The labels the ECS agent puts on a container, from the task document's own values;
    a bare cluster name becomes an ARN in the task ARN's region and account."""
    cluster = task["Cluster"]
    if not cluster.startswith("arn:"):
        parts = arn_parts(task["TaskARN"], TASK_ARN_RE)
        cluster = f"arn:aws:ecs:{parts['region']}:{parts['account']}:cluster/{cluster}"
    return {"com.amazonaws.ecs.cluster": cluster, "com.amazonaws.ecs.task-arn": task["TaskARN"],
            "com.amazonaws.ecs.container-name": doc["Name"],
            "com.amazonaws.ecs.task-definition-family": task["Family"],
            "com.amazonaws.ecs.task-definition-version": task["Revision"]}


def ecs_network_mode(network: str, launch_type: str) -> str:
    """Docker's host, none and default bridge networks keep their names (the agent's modes);
    a network of one's own stands for the task's ENI (awsvpc), and Fargate is awsvpc only."""
    if network in ("host", "none") or (network == "bridge" and launch_type != "FARGATE"):
        return network
    return "awsvpc"


def check_container(doc: dict, inspect: dict, version: int, networks: dict[str, dict], task: dict) -> None:
    """Assert every field of one container document against ``docker inspect`` of it.

    ``networks`` maps network names to ``docker network inspect`` output: the
    subnet and gateway are checked against the network itself. ``task`` is the task
    document the container belongs to (its labels carry the task's values).
    """
    config, state, host = inspect["Config"], inspect["State"], inspect["HostConfig"]
    labels = config["Labels"] or {}
    name = inspect["Name"].lstrip("/")
    launch_type = task.get("LaunchType", "EC2")
    assert doc["DockerId"] == inspect["Id"]
    assert doc["DockerName"] == name
    assert doc["Name"] == labels.get(COMPOSE_SERVICE, name)
    assert doc["Image"] == config["Image"]
    assert doc["ImageID"] == inspect["Image"] and doc["ImageID"].startswith("sha256:")
    assert doc["Labels"] == {**ecs_labels(doc, task), **labels}   # a real label wins
    assert doc["Type"] == "NORMAL"
    status = "RUNNING" if state["Running"] else "STOPPED"
    assert (doc["KnownStatus"], doc["DesiredStatus"]) == (status, status)

    # Docker already writes UTC with a Z: the server must pass the real values on.
    assert inspect["Created"].endswith("Z") and state["StartedAt"].endswith("Z")
    assert doc["CreatedAt"] == inspect["Created"]
    assert doc["StartedAt"] == state["StartedAt"]
    if state["Running"]:
        assert "FinishedAt" not in doc and "ExitCode" not in doc
    else:
        assert doc["FinishedAt"] == state["FinishedAt"]
        assert doc["ExitCode"] == state["ExitCode"]

    cpu = host["NanoCpus"] * 1024 // 10**9 if host["NanoCpus"] else host["CpuShares"]
    assert doc["Limits"] == {"CPU": max(cpu, 2), "Memory": host["Memory"] // 2**20}   # the agent's minimum 2

    expected_ports = []
    for spec, bindings in (inspect["NetworkSettings"]["Ports"] or {}).items():
        number, protocol = spec.split("/")
        for binding in bindings or []:
            port = {"ContainerPort": int(number), "Protocol": protocol, "HostPort": int(binding["HostPort"])}
            if version >= 4 and binding["HostIp"]:
                port["HostIp"] = binding["HostIp"]
            expected_ports.append(port)
    assert sorted(doc.get("Ports", []), key=json.dumps) == sorted(expected_ports, key=json.dumps)

    expected_volumes = [{k: v for k, v in (("DockerName", m.get("Name")), ("Source", m["Source"]),
                                           ("Destination", m["Destination"])) if v}
                        for m in inspect["Mounts"]]
    assert doc.get("Volumes", []) == expected_volumes

    check_health(doc.get("Health"), state)
    check_networks(doc.get("Networks", []), inspect, version, networks, launch_type)

    if version >= 4:
        log_config = host["LogConfig"]
        assert doc.get("LogDriver") == (log_config["Type"] or None)
        assert doc.get("LogOptions") == (log_config["Config"] or None)
        if host["RestartPolicy"]["Name"] in ("", "no"):
            assert "RestartCount" not in doc   # the agent: only with a restart policy
        else:
            assert doc["RestartCount"] == inspect["RestartCount"]
        if launch_type == "FARGATE":
            assert doc["Snapshotter"] == inspect["GraphDriver"]["Name"]
        else:
            assert "Snapshotter" not in doc
        container = arn_parts(doc["ContainerARN"], CONTAINER_ARN_RE)
        task_parts = arn_parts(task["TaskARN"], TASK_ARN_RE)
        assert {k: container[k] for k in task_parts} == task_parts, (doc["ContainerARN"], task["TaskARN"])
    else:
        assert not V4_ONLY_CONTAINER_KEYS & set(doc), sorted(doc)


def check_health(health: dict | None, state: dict) -> None:
    """Health from the container's check, with the agent's omissions: no status while it is
    unknown (starting), no exitCode when 0, no output when empty. The check runs every
    second, so the inspect taken after the response may hold later checks: statusSince must
    lie between the start and the latest check, exitCode/output are those of `true`."""
    if not state.get("Health"):
        assert health is None
        return
    status = {"healthy": "HEALTHY", "unhealthy": "UNHEALTHY"}.get(state["Health"]["Status"])
    assert health.get("status") == status
    checks = state["Health"]["Log"]
    if checks:
        assert parse_time(state["StartedAt"]) <= parse_time(health["statusSince"]) \
            <= datetime.fromisoformat(checks[-1]["End"])   # Docker writes the daemon's zone here
        assert health.get("exitCode") == (checks[-1]["ExitCode"] or None)
        assert health.get("output") == (checks[-1]["Output"] or None)


def check_networks(entries: list[dict], inspect: dict, version: int, networks: dict[str, dict],
                   launch_type: str) -> None:
    """One entry per Docker network, in the order of their names; ENI fields on awsvpc only."""
    endpoints = inspect["NetworkSettings"]["Networks"]
    assert len(entries) == len(endpoints)
    for index, (name, entry) in enumerate(zip(sorted(endpoints), entries)):
        endpoint = endpoints[name]
        mode = ecs_network_mode(name, launch_type)
        assert entry["NetworkMode"] == mode
        if not endpoint["IPAddress"]:   # a stopped container keeps no address
            assert "IPv4Addresses" not in entry
            continue
        assert entry["IPv4Addresses"] == [endpoint["IPAddress"]]
        if version < 4 or mode != "awsvpc":
            assert not V4_ONLY_NETWORK_KEYS & set(entry), entry
            continue
        ipam = next(c for c in networks[name]["IPAM"]["Config"]
                    if ipaddress.ip_network(c["Subnet"]).version == 4)
        subnet = ipaddress.ip_network(ipam["Subnet"])
        assert ipaddress.ip_address(endpoint["IPAddress"]) in subnet
        assert entry["IPv4SubnetCIDRBlock"] == str(subnet)
        assert entry["SubnetGatewayIpv4Address"] == f"{ipam['Gateway']}/{subnet.prefixlen}"
        assert entry["MACAddress"] == endpoint["MacAddress"]
        assert entry["PrivateDNSName"] == inspect["Config"]["Hostname"]
        assert entry["AttachmentIndex"] == index
        if name != "bridge":
            assert entry["DomainNameServers"] == ["127.0.0.11"]   # Docker's embedded DNS


# A client run inside a container's network namespace: urllib without proxies.
FETCH_SCRIPT = """
import json, sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
results = []
for url in sys.argv[1:]:
    try:
        with opener.open(url, timeout=10) as reply:
            results.append([reply.status, json.loads(reply.read())])
    except urllib.error.HTTPError as error:
        results.append([error.code, json.loads(error.read())])
print(json.dumps(results))
"""


def fetch_from(engine, container_id: str, base: str, *paths: str) -> list[tuple[int, object]]:
    """GET each path of base from inside the container's network namespace."""
    pid = engine.inspect(container_id)["State"]["Pid"]
    assert pid, f"{container_id[:12]} is not running"
    proc = subprocess.run([*nsenter_net(pid), sys.executable, "-c", FETCH_SCRIPT,
                           *(base + p for p in paths)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [tuple(result) for result in json.loads(proc.stdout)]


# ---------------------------------------------------------------------------
# The shared containers
# ---------------------------------------------------------------------------

class Fleet:
    """The module's containers: ``ids``/``names`` by role, projects, networks.

    Project A (on network ``net_a``): ``a-web`` (ports, CPU and memory limits,
    json-file log options, health check, a volume), ``a-worker`` (a busy loop),
    ``a-migrate`` (exits 3 after two restarts). Project B (on ``net_b``):
    ``b-web`` (same service name as a-web, log driver none, CPU shares),
    ``b-db`` and ``b-db-replica`` (names where one is a prefix of the other).
    Outside compose: ``lone`` (idle, default bridge), named ``...-lone-worker-<token>``.
    """

    def __init__(self, engine, token: str):
        self.engine = engine
        self.token = token
        self.ids: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.project_a = f"le-a-{token}"
        self.project_b = f"le-b-{token}"
        self.net_a = f"le-meta-a-{token}"
        self.net_b = f"le-meta-b-{token}"

    def service(self, role: str) -> str:
        return f"{role.split('-', 1)[1]}-{self.token}"

    def inspect(self, role: str) -> dict:
        return self.engine.inspect(self.ids[role])

    def networks(self) -> dict[str, dict]:
        """``docker network inspect`` of every network the fleet uses."""
        return {name: self.engine.inspect(name) for name in ("bridge", self.net_a, self.net_b)}

    def gateway(self, network: str) -> str:
        return self.engine.inspect(network)["IPAM"]["Config"][0]["Gateway"]

    def members(self, project: str) -> set[str]:
        return listed(self.engine, f"label={COMPOSE_PROJECT}={project}")


@pytest.fixture(scope="module")
def fleet(docker_engine, busybox_image):
    token = secrets.token_hex(3)
    made = Containers(docker_engine)   # conftest's helper, module-scoped here
    fleet = Fleet(docker_engine, token)
    try:
        made.network(fleet.net_a)
        made.network(fleet.net_b)

        def run(role, project, *args, command=SLEEP, name=None):
            name = name or f"le-{token}-{role}"
            labels = ["--label", f"{COMPOSE_PROJECT}={project}",
                      "--label", f"{COMPOSE_SERVICE}={fleet.service(role)}"] if project else []
            fleet.ids[role] = made.run("--name", name, *labels, *args, busybox_image, *command)
            fleet.names[role] = name

        # --init: the processes then die on SIGTERM, so stopping dockerd is quick.
        run("a-web", fleet.project_a, "--network", fleet.net_a, "--label", "tier=frontend",
            "-p", "127.0.0.1::80", "-p", "81/udp", "--cpus", "0.5", "-m", "64m",
            "--log-driver", "json-file", "--log-opt", "max-size=1m", "--log-opt", "max-file=2",
            "--health-cmd", "true", "--health-interval", "1s", "-v", "/data",
            "--restart", "always", "--init")
        run("a-worker", fleet.project_a, "--network", fleet.net_a, "--cpus", "0.25", "-m", "32m",
            "--restart", "always", "--init", command=BUSY)
        run("a-migrate", fleet.project_a, "--network", fleet.net_a, "--restart", "on-failure:2",
            command=("sh", "-c", "exit 3"))
        run("b-web", fleet.project_b, "--network", fleet.net_b, "--cpu-shares", "256", "-m", "32m",
            "--log-driver", "none", "--init")
        run("b-db", fleet.project_b, "--network", fleet.net_b, "--init")
        run("b-db-replica", fleet.project_b, "--network", fleet.net_b, "--init")
        # Its name contains a-worker's service name, so that service must win over substring.
        run("lone", None, "--init", name=f"le-{token}-lone-worker-{token}")

        def settled():
            web, migrate = fleet.inspect("a-web"), fleet.inspect("a-migrate")
            return (web["State"]["Health"]["Status"] == "healthy"
                    and migrate["State"]["Status"] == "exited" and migrate["RestartCount"] == 2)
        assert wait_for(settled, 30, 0.2), "a-web never healthy or a-migrate still restarting"
        yield fleet
    finally:
        made.cleanup()


# ---------------------------------------------------------------------------
# Pure functions (no Docker)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("engine, expected", [
    ({"ApiVersion": "1.41", "MinAPIVersion": "1.12"}, "1.41"),        # Debian 12's engine: its own
    ({"ApiVersion": "1.24"}, "1.24"),                                 # old engine, no minimum given
    ({"ApiVersion": "1.52", "MinAPIVersion": "1.44"}, "1.51"),        # Docker 29: capped, >= 1.44
    ({"ApiVersion": "1.60", "MinAPIVersion": "1.55"}, "1.55"),        # future: never below its minimum
    ({"ApiVersion": "1.9"}, "1.9"),                                   # compared as numbers, not text
])
def test_choose_api_version(engine, expected):
    """Negotiation never pins an old version: the engine's own, capped at the newest known."""
    assert local_endpoints.choose_api_version(engine) == expected


def handwritten_inspect() -> dict:
    """A docker inspect document written by hand: IPv6, an offset time, CPU shares."""
    return {
        "Id": "f" * 64, "Name": "/hand", "Image": "sha256:" + "a" * 64, "Created": "2024-01-02T03:04:05.5+02:00",
        "RestartCount": 4, "Mounts": [],
        "Config": {"Image": "app:1", "Hostname": "hand", "Labels": {COMPOSE_PROJECT: "p", COMPOSE_SERVICE: "svc"}},
        "State": {"Status": "running", "Running": True, "StartedAt": "2024-01-02T01:04:06Z",
                  "FinishedAt": "0001-01-01T00:00:00Z", "ExitCode": 0},
        "HostConfig": {"NanoCpus": 0, "CpuShares": 512, "Memory": 256 * 2**20, "Dns": ["10.0.0.2"],
                       "LogConfig": {"Type": "awslogs", "Config": {"awslogs-group": "g"}}},
        "NetworkSettings": {
            "Ports": {"8080/tcp": [{"HostIp": "::", "HostPort": "49153"}], "9090/tcp": None},
            "Networks": {"backend": {"NetworkID": "n1", "IPAddress": "10.0.2.5", "IPPrefixLen": 24,
                                     "Gateway": "10.0.2.1", "MacAddress": "02:42:0a:00:02:05",
                                     "GlobalIPv6Address": "fd00:1::5", "GlobalIPv6PrefixLen": 64}}},
    }


def test_container_metadata_builder_v3_v4():
    """The builder alone: offset times become Z, CpuShares without NanoCpus, IPv6, DNS option,
    the ECS labels, and a user-defined network reported as awsvpc with the ENI fields (v4)."""
    config = local_endpoints.load_config(local_endpoints.parse_args([]), {})
    task = local_endpoints.task_identity(config, "p", "svc")
    container = handwritten_inspect()
    v3 = local_endpoints.container_metadata(container, 3, task)
    v4 = local_endpoints.container_metadata(container, 4, task)
    assert v3["CreatedAt"] == v4["CreatedAt"] == "2024-01-02T01:04:05.500000Z"
    assert v3["Limits"] == {"CPU": 512, "Memory": 256}
    assert v3["Name"] == "svc" and v3["DockerName"] == "hand"
    assert v3["Labels"] == v4["Labels"] == {
        COMPOSE_PROJECT: "p", COMPOSE_SERVICE: "svc",
        "com.amazonaws.ecs.cluster": "arn:aws:ecs:us-west-2:111111111111:cluster/ecs-local-cluster",
        "com.amazonaws.ecs.container-name": "svc", "com.amazonaws.ecs.task-arn": task.arn,
        "com.amazonaws.ecs.task-definition-family": "p", "com.amazonaws.ecs.task-definition-version": "1"}
    assert v3["Ports"] == [{"ContainerPort": 8080, "Protocol": "tcp", "HostPort": 49153}]
    assert v4["Ports"] == [{"ContainerPort": 8080, "Protocol": "tcp", "HostPort": 49153, "HostIp": "::"}]
    assert v3["Networks"] == [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.2.5"],
                               "IPv6Addresses": ["fd00:1::5"]}]
    assert v4["Networks"] == [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.2.5"],
                               "IPv6Addresses": ["fd00:1::5"], "AttachmentIndex": 0,
                               "MACAddress": "02:42:0a:00:02:05", "IPv4SubnetCIDRBlock": "10.0.2.0/24",
                               "SubnetGatewayIpv4Address": "10.0.2.1/24", "IPv6SubnetCIDRBlock": "fd00:1::/64",
                               "DomainNameServers": ["10.0.0.2"], "PrivateDNSName": "hand"}]
    assert not V4_ONLY_CONTAINER_KEYS & set(v3)
    assert (v4["LogDriver"], v4["LogOptions"]) == ("awslogs", {"awslogs-group": "g"})
    assert "RestartCount" not in v4   # no restart policy
    assert arn_parts(v4["ContainerARN"], CONTAINER_ARN_RE)["task"] == task.task_id


def test_builder_applies_the_agents_omission_rules():
    """What the agent leaves out: Health.status while starting, exitCode 0 and empty output,
    an empty LogDriver/LogOptions, HostIp ""; RestartCount only with a restart policy; the
    ENI fields only on awsvpc; Snapshotter only on Fargate. A real ECS label wins."""
    config = local_endpoints.load_config(local_endpoints.parse_args([]), {})
    task = local_endpoints.task_identity(config, None, None)
    container = handwritten_inspect()
    container["Config"]["Labels"] = {"com.amazonaws.ecs.cluster": "arn:aws:ecs:eu-west-1:1:cluster/real"}
    container["State"]["Health"] = {"Status": "starting", "Log": [{"ExitCode": 0, "Output": ""}]}
    container["HostConfig"].update(LogConfig={"Type": "", "Config": {}}, RestartPolicy={"Name": "on-failure"},
                                   CpuShares=0)
    container["GraphDriver"] = {"Name": "overlay2"}
    container["NetworkSettings"]["Ports"] = {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}
    container["NetworkSettings"]["Networks"]["bridge"] = dict(container["NetworkSettings"]["Networks"]["backend"],
                                                              IPAddress="172.17.0.9")
    doc = local_endpoints.container_metadata(container, 4, task)
    assert doc["Labels"]["com.amazonaws.ecs.cluster"] == "arn:aws:ecs:eu-west-1:1:cluster/real"
    assert doc["Labels"]["com.amazonaws.ecs.task-arn"] == DEFAULT_TASK_ARN
    assert doc["Health"] == {}
    assert "LogDriver" not in doc and "LogOptions" not in doc and "Snapshotter" not in doc
    assert doc["RestartCount"] == 4
    assert doc["Limits"]["CPU"] == 2   # the agent's minimum
    assert doc["Ports"] == [{"ContainerPort": 80, "Protocol": "tcp", "HostPort": 8080}]
    [awsvpc, bridge] = doc["Networks"]
    assert awsvpc["NetworkMode"] == "awsvpc" and awsvpc["AttachmentIndex"] == 0
    assert bridge == {"NetworkMode": "bridge", "IPv4Addresses": ["172.17.0.9"], "IPv6Addresses": ["fd00:1::5"]}

    fargate = local_endpoints.task_identity(local_endpoints.load_config(
        local_endpoints.parse_args([]), {"LAUNCH_TYPE": "FARGATE"}), None, None)
    container["State"]["Health"] = {"Status": "unhealthy", "Log": [{"ExitCode": 1, "Output": "down\n"}]}
    doc = local_endpoints.container_metadata(container, 4, fargate, "2024-01-02T01:05:00Z")
    assert doc["Health"] == {"status": "UNHEALTHY", "statusSince": "2024-01-02T01:05:00Z", "exitCode": 1,
                             "output": "down\n"}
    assert doc["Snapshotter"] == "overlay2"
    assert [n["NetworkMode"] for n in doc["Networks"]] == ["awsvpc", "awsvpc"]   # Fargate: awsvpc only
    assert doc["Networks"][1]["AttachmentIndex"] == 1

    # The IPv6 gateway only for an IPv6-only endpoint, as the agent gives it for IPv6-only ENIs.
    container["NetworkSettings"]["Networks"] = {"v6": {
        "GlobalIPv6Address": "fd00:2::7", "GlobalIPv6PrefixLen": 64, "IPv6Gateway": "fd00:2::1"}}
    [v6] = local_endpoints.container_metadata(container, 4, fargate)["Networks"]
    assert v6["SubnetGatewayIpv6Address"] == "fd00:2::1/64" and "SubnetGatewayIpv4Address" not in v6
    assert v6["IPv6SubnetCIDRBlock"] == "fd00:2::/64" and "IPv4Addresses" not in v6


def test_task_metadata_builder_limits():
    """Task Limits are the sums in vCPU and MiB, and omitted when no container sets one."""
    config = local_endpoints.load_config(local_endpoints.parse_args([]), {})
    task = local_endpoints.task_identity(config, "p", None)
    limited = handwritten_inspect()
    unlimited = dict(handwritten_inspect(), HostConfig={"NanoCpus": 1_500_000_000, "Memory": 0})
    doc = local_endpoints.task_metadata([limited, unlimited], 4, task, config, False, [])
    assert doc["Limits"] == {"CPU": 2.0, "Memory": 256}
    bare = dict(handwritten_inspect(), HostConfig={})
    assert "Limits" not in local_endpoints.task_metadata([bare], 4, task, config, False, [])


def test_task_metadata_builder_v4_fields():
    """FaultInjectionEnabled always (v4); VPCID (EC2 only) and AvailabilityZoneID when set;
    ClockDrift and EphemeralStorageMetrics on Fargate; ExecutionStoppedAt once all stopped;
    empty tags left out, as the agent's JSON does."""
    config = local_endpoints.load_config(local_endpoints.parse_args([]), {})
    task = local_endpoints.task_identity(config, "p", None)
    running = handwritten_inspect()
    v4 = local_endpoints.task_metadata([running], 4, task, config, True, [])
    assert v4["FaultInjectionEnabled"] is False
    assert not {"VPCID", "AvailabilityZoneID", "ClockDrift", "EphemeralStorageMetrics", "TaskTags",
                "ContainerInstanceTags", "ExecutionStoppedAt", "Containers"} & set(v4), sorted(v4)
    v3 = local_endpoints.task_metadata([running], 3, task, config, False, [])
    assert not {"FaultInjectionEnabled", "LaunchType"} & set(v3)

    environ = {"VPC_ID": "vpc-0123456789abcdef0", "AVAILABILITY_ZONE_ID": "usw2-az1"}
    config = local_endpoints.load_config(local_endpoints.parse_args([]), environ)
    doc = local_endpoints.task_metadata([running], 4, task, config, False, [])
    assert (doc["VPCID"], doc["AvailabilityZoneID"]) == ("vpc-0123456789abcdef0", "usw2-az1")

    config = local_endpoints.load_config(local_endpoints.parse_args([]), {**environ, "LAUNCH_TYPE": "FARGATE"})
    fargate = local_endpoints.task_identity(config, "p", None)
    stopped = handwritten_inspect()
    stopped["State"] = {"Status": "exited", "Running": False, "StartedAt": "2024-01-02T01:04:06Z",
                        "FinishedAt": "2024-01-02T02:00:00.25Z", "ExitCode": 0}
    now = datetime(2024, 1, 2, 3, 0, 0, tzinfo=timezone.utc)
    doc = local_endpoints.task_metadata([stopped], 4, fargate, config, False, [], now)
    assert "VPCID" not in doc and doc["AvailabilityZoneID"] == "usw2-az1"   # VPCID: EC2 only
    v3 = local_endpoints.task_metadata([stopped], 3, fargate, config, False, [], now)
    assert not {"ClockDrift", "EphemeralStorageMetrics", "AvailabilityZoneID", "FaultInjectionEnabled"} & set(v3)
    assert doc["ExecutionStoppedAt"] == "2024-01-02T02:00:00.25Z"
    assert doc["EphemeralStorageMetrics"] == {"Utilized": 0, "Reserved": 20496}
    drift = doc["ClockDrift"]
    assert drift["ReferenceTimestamp"] == "2024-01-02T03:00:00Z"
    # The host kernel's own account (busybox's adjtimex applet reads the same adjtimex(2)).
    busybox = ensure_tool("busybox", "busybox-static")   # one line how to get it, when it cannot be installed
    kernel = subprocess.run([busybox, "adjtimex"], capture_output=True, text=True, check=True).stdout
    maxerror = int(re.search(r"maxerror:\s+(\d+)", kernel).group(1))
    unsynchronized = "return value: 5" in kernel
    assert drift["ClockSynchronizationStatus"] == ("NOT_SYNCHRONIZED" if unsynchronized else "SYNCHRONIZED")
    assert abs(drift["ClockErrorBound"] - maxerror / 1000) < 1000   # ms; grows 0.5 ms/s while unsynchronized


def test_task_arn_follows_cluster_arn_region_and_account():
    """A cluster given as an ARN puts its region and account in the generated task ARNs.

    Otherwise the task would sit in us-west-2/111111111111 while its cluster is
    elsewhere, and the OpenTelemetry detector (which keeps an ARN-shaped
    Cluster as it is) would report a cluster and task in different accounts.
    """
    environ = {"CLUSTER_ARN": "arn:aws:ecs:eu-west-1:222222222222:cluster/dev"}
    config = local_endpoints.load_config(local_endpoints.parse_args([]), environ)
    task = local_endpoints.task_identity(config, "shop", None)
    parts = arn_parts(task.arn, TASK_ARN_RE)
    assert (parts["region"], parts["account"], parts["cluster"]) == ("eu-west-1", "222222222222", "dev")


@pytest.mark.parametrize("variable", ["CONTAINER_METADATA_PATH", "TASK_METADATA_PATH"])
def test_invalid_override_file_stops_startup(start_server, tmp_path, variable):
    """An invalid JSON file: non-zero exit at start with one line naming the path and position."""
    path = tmp_path / "override.json"
    path.write_text('{\n  "Labels": {,\n}\n')
    server = start_server(env={variable: path}, wait=False)
    assert server.proc.wait(20) != 0
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "line 2" in lines[0] and "column 14" in lines[0], lines[0]

    missing = tmp_path / "missing.json"
    server = start_server(env={variable: missing}, wait=False)
    assert server.proc.wait(20) != 0
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0], lines


# ---------------------------------------------------------------------------
# Container metadata against docker inspect
# ---------------------------------------------------------------------------

@pytest.fixture
def server(start_server, docker_engine):
    return start_server(env={"DOCKER_HOST": docker_engine.host})


def test_health_reports_negotiated_api_version(server, docker_engine):
    """The engine here speaks API 1.41: that, not a pinned version, is what the server uses."""
    assert wait_for(lambda: get_json(server, "/health")["docker"]["reachable"], 5)
    assert get_json(server, "/health")["docker"] == {"reachable": True, "socket": docker_engine.host,
                                                     "apiVersion": "1.41"}


@pytest.mark.parametrize("role", ["a-web", "a-worker", "a-migrate", "b-web", "lone"])
def test_container_v4_matches_inspect(fleet, server, role):
    name = fleet.names[role]
    doc = get_json(server, f"/v4/{name}")
    task = get_json(server, f"/v4/{name}/task")
    check_container(doc, fleet.inspect(role), 4, fleet.networks(), task)


def test_container_v4_web_details(fleet, server):
    """The configured values themselves, so a wrong mapping cannot hide behind inspect."""
    doc = get_json(server, f"/v4/{fleet.names['a-web']}")
    assert doc["Name"] == f"web-{fleet.token}"
    assert doc["Image"] == "local-endpoints-test/busybox:latest"
    assert doc["Labels"]["tier"] == "frontend"
    assert doc["Limits"] == {"CPU": 512, "Memory": 64}
    assert doc["LogDriver"] == "json-file"
    assert doc["LogOptions"] == {"max-size": "1m", "max-file": "2"}
    # Healthy, `true` exits 0 and prints nothing: the agent leaves exitCode and output out.
    assert doc["Health"]["status"] == "HEALTHY" and "exitCode" not in doc["Health"] and "output" not in doc["Health"]
    assert doc["RestartCount"] == 0   # --restart always
    assert doc["Networks"][0]["NetworkMode"] == "awsvpc"   # the project's own network: the task's "ENI"
    tcp = next(p for p in doc["Ports"] if p["Protocol"] == "tcp")
    assert tcp["ContainerPort"] == 80 and tcp["HostIp"] == "127.0.0.1" and tcp["HostPort"] > 0
    assert {p["HostIp"] for p in doc["Ports"] if p["Protocol"] == "udp"} >= {"0.0.0.0"}
    [network] = doc["Networks"]
    assert network["SubnetGatewayIpv4Address"] == \
        f"{fleet.gateway(fleet.net_a)}/{network['IPv4SubnetCIDRBlock'].split('/')[1]}"
    assert [v["Destination"] for v in doc["Volumes"]] == ["/data"]

    migrate = get_json(server, f"/v4/{fleet.names['a-migrate']}")
    assert (migrate["KnownStatus"], migrate["ExitCode"], migrate["RestartCount"]) == ("STOPPED", 3, 2)
    b_web = get_json(server, f"/v4/{fleet.names['b-web']}")
    assert b_web["LogDriver"] == "none" and "LogOptions" not in b_web
    assert b_web["Limits"] == {"CPU": 256, "Memory": 32}
    assert "RestartCount" not in b_web   # no restart policy
    lone = get_json(server, f"/v4/{fleet.names['lone']}")
    assert lone["Limits"]["CPU"] == 2    # nothing set: the agent's minimum
    [bridge] = lone["Networks"]
    assert bridge["NetworkMode"] == "bridge" and not V4_ONLY_NETWORK_KEYS & set(bridge)


@pytest.mark.parametrize("path", ["/v3/{name}", "/v3/containers/{name}", "/v2/metadata/{name}"])
def test_container_v2_v3_match_inspect(fleet, server, path):
    """v2/v3: the same fields without HostIp and the v4 additions."""
    doc = get_json(server, path.format(name=fleet.names["a-web"]))
    check_container(doc, fleet.inspect("a-web"), 3, fleet.networks(),
                    get_json(server, f"/v3/{fleet.names['a-web']}/task"))


# ---------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------

def test_task_is_the_compose_project(fleet, server):
    """Members: the project's containers, the exited one included; each checked against inspect."""
    task = get_json(server, f"/v4/{fleet.names['a-web']}/task")
    members = fleet.members(fleet.project_a)
    assert members == {fleet.ids[r] for r in ("a-web", "a-worker", "a-migrate")}
    assert {c["DockerId"] for c in task["Containers"]} == members
    inspects = inspect_many(fleet.engine, members)
    networks = fleet.networks()
    for container in task["Containers"]:
        check_container(container, inspects[container["DockerId"]], 4, networks, task)
    stopped = next(c for c in task["Containers"] if c["DockerId"] == fleet.ids["a-migrate"])
    assert stopped["KnownStatus"] == "STOPPED" and stopped["ExitCode"] == 3

    parts = arn_parts(task["TaskARN"], TASK_ARN_RE)
    assert (parts["region"], parts["account"], parts["cluster"]) == ("us-west-2", "111111111111",
                                                                     "ecs-local-cluster")
    assert task["Cluster"] == "ecs-local-cluster"
    assert task["Family"] == fleet.project_a
    assert task["Revision"] == "1"
    assert task["KnownStatus"] == task["DesiredStatus"] == "RUNNING"
    assert task["LaunchType"] == "EC2"
    assert task["AvailabilityZone"] == "us-west-2a"
    assert task["ServiceName"] == f"web-{fleet.token}"
    assert task["Limits"] == {"CPU": 0.75, "Memory": 96}   # (512 + 256) / 1024 vCPU, 64 + 32 MiB
    assert "TaskTags" not in task and "ContainerInstanceTags" not in task
    assert task["FaultInjectionEnabled"] is False
    # Not known here, or Fargate only: left out as the agent leaves them out.
    assert not {"VPCID", "AvailabilityZoneID", "ClockDrift", "EphemeralStorageMetrics", "PullStartedAt",
                "PullStoppedAt", "ExecutionStoppedAt", "Errors"} & set(task), sorted(task)

    v3 = get_json(server, f"/v3/{fleet.names['a-web']}/task")
    assert {c["DockerId"] for c in v3["Containers"]} == members
    assert not {"LaunchType", "ServiceName", "FaultInjectionEnabled"} & set(v3)
    for container in v3["Containers"]:
        check_container(container, inspects[container["DockerId"]], 3, networks, v3)


def test_two_projects_are_two_stable_tasks(fleet, server, start_server, docker_engine):
    a = get_json(server, f"/v4/{fleet.names['a-worker']}/task")
    b = get_json(server, f"/v4/{fleet.names['b-db']}/task")
    assert a["TaskARN"] != b["TaskARN"]
    assert arn_parts(a["TaskARN"], TASK_ARN_RE)["task"] != arn_parts(b["TaskARN"], TASK_ARN_RE)["task"]
    assert b["Family"] == fleet.project_b
    assert {c["DockerId"] for c in b["Containers"]} == fleet.members(fleet.project_b)
    assert b["Limits"] == {"CPU": 0.25, "Memory": 32}
    assert a["ServiceName"] == f"worker-{fleet.token}"
    # Every container of one task reports the same task.
    assert get_json(server, f"/v4/{fleet.names['a-migrate']}/task")["TaskARN"] == a["TaskARN"]
    # Stable: another server process gives the project the same task.
    other = start_server(env={"DOCKER_HOST": docker_engine.host})
    assert get_json(other, f"/v4/{fleet.names['a-worker']}/task")["TaskARN"] == a["TaskARN"]


def test_task_outside_compose(fleet, server):
    """Outside compose: every running container, as one default task (the original's
    documented rule), compose projects' running containers included, exited ones not."""
    task = get_json(server, f"/v4/{fleet.names['lone']}/task")
    running = listed(fleet.engine, "status=running")
    assert {c["DockerId"] for c in task["Containers"]} == running
    assert {fleet.ids[r] for r in ("lone", "a-web", "b-db")} <= running
    assert fleet.ids["a-migrate"] not in running
    assert task["TaskARN"] == DEFAULT_TASK_ARN
    assert task["Family"] == "ecs-local-task-definition"
    assert "ServiceName" not in task
    lone = next(c for c in task["Containers"] if c["DockerId"] == fleet.ids["lone"])
    check_container(lone, fleet.inspect("lone"), 4, fleet.networks(), task)


def test_mocked_values_from_environment(fleet, start_server, docker_engine):
    """TASK_ARN and friends apply to every task; tags only on the WithTags routes."""
    arn = "arn:aws:ecs:eu-central-1:123456789012:task/dev-cluster/0123456789abcdef0123456789abcdef"
    server = start_server(env={
        "DOCKER_HOST": docker_engine.host, "TASK_ARN": arn,
        "CLUSTER_ARN": "arn:aws:ecs:eu-central-1:123456789012:cluster/dev-cluster",
        "TASK_DEFINITION_FAMILY": "shop", "TASK_DEFINITION_REVISION": "7", "LAUNCH_TYPE": "FARGATE",
        "TASK_TAGS": "team=core, env=dev", "CONTAINER_INSTANCE_TAGS": "rack=r1"})
    for role in ("a-web", "b-db", "lone"):
        name = fleet.names[role]
        task = get_json(server, f"/v4/{name}/task")
        assert task["TaskARN"] == arn
        assert task["Cluster"] == "arn:aws:ecs:eu-central-1:123456789012:cluster/dev-cluster"
        assert (task["Family"], task["Revision"], task["LaunchType"]) == ("shop", "7", "FARGATE")
        assert task["AvailabilityZone"] == "eu-central-1a"
        assert "TaskTags" not in task and "ContainerInstanceTags" not in task
        assert task["EphemeralStorageMetrics"] == {"Utilized": 0, "Reserved": 20496}
        assert task["ClockDrift"]["ClockSynchronizationStatus"] in ("SYNCHRONIZED", "NOT_SYNCHRONIZED")
        assert parse_time(task["ClockDrift"]["ReferenceTimestamp"])
        container = get_json(server, f"/v4/{name}")
        assert container["Snapshotter"] == fleet.inspect(role)["GraphDriver"]["Name"]
        assert {n["NetworkMode"] for n in container["Networks"]} == {"awsvpc"}   # Fargate: awsvpc only
        assert arn_parts(container["ContainerARN"], CONTAINER_ARN_RE)["task"] == "0123456789abcdef0123456789abcdef"
        check_container(container, fleet.inspect(role), 4, fleet.networks(), task)
        for path in (f"/v4/{name}/taskWithTags", f"/v3/{name}/taskWithTags",
                     f"/v4/containers/{name}/taskWithTags"):
            tagged = get_json(server, path)
            assert tagged["TaskTags"] == {"team": "core", "env": "dev"}
            assert tagged["ContainerInstanceTags"] == {"rack": "r1"}
            assert tagged["TaskARN"] == arn


def test_real_ecs_label_wins(fleet, start_server, docker_engine, containers, busybox_image):
    """A container that really carries an ECS label keeps it; the other four are generated.
    With VPC_ID and AVAILABILITY_ZONE_ID set, an EC2 task shows both (v4 only)."""
    real_arn = "arn:aws:ecs:eu-west-1:444455556666:task/prod/0123456789abcdef0123456789abcdef"
    name = f"le-{fleet.token}-labelled"
    cid = containers.run("--name", name, "--label", f"com.amazonaws.ecs.task-arn={real_arn}", "--init",
                         busybox_image, *SLEEP)
    server = start_server(env={"DOCKER_HOST": docker_engine.host, "VPC_ID": "vpc-0a1b2c3d",
                               "AVAILABILITY_ZONE_ID": "usw2-az2"})
    task = get_json(server, f"/v4/{name}/task")
    doc = get_json(server, f"/v4/{name}")
    assert doc["Labels"]["com.amazonaws.ecs.task-arn"] == real_arn
    assert doc["Labels"]["com.amazonaws.ecs.container-name"] == name
    assert doc["Labels"]["com.amazonaws.ecs.cluster"] == \
        "arn:aws:ecs:us-west-2:111111111111:cluster/ecs-local-cluster"
    check_container(doc, docker_engine.inspect(cid), 4, fleet.networks(), task)
    assert (task["VPCID"], task["AvailabilityZoneID"]) == ("vpc-0a1b2c3d", "usw2-az2")
    assert not {"VPCID", "AvailabilityZoneID"} & set(get_json(server, f"/v3/{name}/task"))
    # Nothing is written to Docker.
    assert [k for k in docker_engine.inspect(cid)["Config"]["Labels"] if k.startswith("com.amazonaws.ecs.")] \
        == ["com.amazonaws.ecs.task-arn"]


def test_health_status_left_out_while_starting(fleet, server, containers, busybox_image):
    """Docker's "starting" is the agent's unknown health: Health is there, its status is not."""
    name = f"le-{fleet.token}-starting"
    cid = containers.run("--name", name, "--init", "--health-cmd", "true", "--health-interval", "1h",
                         "--health-start-period", "1h", busybox_image, *SLEEP)
    doc = get_json(server, f"/v4/{name}")
    inspect = fleet.engine.inspect(cid)
    assert inspect["State"]["Health"]["Status"] == "starting" and not inspect["State"]["Health"]["Log"]
    assert doc["Health"] == {}
    check_container(doc, inspect, 4, fleet.networks(), get_json(server, f"/v4/{name}/task"))


def test_own_container_is_never_in_a_task(fleet, start_server, docker_engine, containers, busybox_image):
    """With ECS_LOCAL_CONTAINER_ID naming the lone container, the outside-compose task leaves it out."""
    solo = containers.run("--name", f"le-{fleet.token}-solo", "--init", busybox_image, *SLEEP)
    server = start_server(env={"DOCKER_HOST": docker_engine.host, "ECS_LOCAL_CONTAINER_ID": fleet.names["lone"]})
    task = get_json(server, f"/v4/le-{fleet.token}-solo/task")
    expected = listed(fleet.engine, "status=running")
    assert {c["DockerId"] for c in task["Containers"]} == expected - {fleet.ids["lone"]}
    assert solo in expected
    stats = get_json(server, f"/v4/le-{fleet.token}-solo/task/stats")
    assert set(stats) == expected - {fleet.ids["lone"]}


def test_view_follows_docker_events(fleet, server, containers, busybox_image):
    """Network connect and rename reach a warm server through Docker's events;
    a refresh does not move Health.statusSince while the status stays the same."""
    name = f"le-{fleet.token}-evented"
    cid = containers.run("--name", name, "--init", "--health-cmd", "true", "--health-interval", "1s",
                         busybox_image, *SLEEP)
    assert wait_for(lambda: get_json(server, f"/v4/{name}").get("Health", {}).get("status") == "HEALTHY", 15)
    since = get_json(server, f"/v4/{name}")["Health"]["statusSince"]

    time.sleep(1.5)   # at least one more (equally healthy) check runs
    extra = containers.network(f"le-meta-x-{fleet.token}")
    fleet.engine.cli("network", "connect", extra, cid)
    assert wait_for(lambda: len(get_json(server, f"/v4/{name}")["Networks"]) == 2, 5)
    networks = {**fleet.networks(), extra: fleet.engine.inspect(extra)}
    check_container(get_json(server, f"/v4/{name}"), fleet.engine.inspect(cid), 4, networks,
                    get_json(server, f"/v4/{name}/task"))

    renamed = f"le-{fleet.token}-relocated"
    fleet.engine.cli("rename", name, renamed)
    assert wait_for(lambda: server.get(f"/v4/{renamed}")[0] == 200, 5)
    assert get_json(server, f"/v4/{renamed}")["DockerName"] == renamed
    assert_error(server, f"/v4/{name}", 404, "ContainerNotFound")

    # As the ECS agent's: the time the status last changed, not the time of the latest check.
    assert get_json(server, f"/v4/{renamed}")["Health"]["statusSince"] == since


# ---------------------------------------------------------------------------
# Routes and identifiers
# ---------------------------------------------------------------------------

def test_route_shapes(fleet, server):
    """Every route form names the same container and task."""
    name, cid = fleet.names["a-web"], fleet.ids["a-web"]
    for path in (f"/v4/{name}", f"/v4/containers/{name}", f"/v3/{name}", f"/v3/containers/{name}",
                 f"/v2/metadata/{name}", f"/v4/{name}/", f"/v4/{name}?x=1"):
        assert get_json(server, path)["DockerId"] == cid, path
    arn = get_json(server, f"/v4/{name}/task")["TaskARN"]
    for path in (f"/v4/containers/{name}/task", f"/v3/{name}/task", f"/v3/containers/{name}/task",
                 f"/v4/{name}/taskWithTags", f"/v3/containers/{name}/taskWithTags"):
        assert get_json(server, path)["TaskARN"] == arn, path
    for path in (f"/v4/{name}/stats", f"/v4/containers/{name}/stats", f"/v3/{name}/stats",
                 f"/v3/containers/{name}/stats", f"/v2/stats/{name}"):
        assert get_json(server, path)["id"] == cid, path
    members = fleet.members(fleet.project_a)
    for path in (f"/v4/{name}/task/stats", f"/v4/containers/{name}/task/stats", f"/v3/{name}/task/stats"):
        assert set(get_json(server, path)) == members, path


def test_reserved_words_are_not_identifiers(fleet, server, containers, busybox_image):
    """Containers literally named task and stats: /v4/task is still the caller's task, by IP."""
    task_id = containers.run("--name", "task", "--init", busybox_image, *SLEEP)
    containers.run("--name", "stats", "--init", busybox_image, *SLEEP)
    for path in ("/v4/task", "/v4/stats", "/v4/task/stats", "/v3/task", "/v3/stats", "/v4/taskWithTags"):
        message = assert_error(server, path, 404, "ContainerNotFound")
        assert "127.0.0.1" in message, (path, message)   # looked up by the caller's address
    # Such a container is still reachable by its ID.
    assert get_json(server, f"/v4/{task_id[:12]}")["DockerName"] == "task"


def test_identifier_levels(fleet, server):
    t, ids, names = fleet.token, fleet.ids, fleet.names
    # Exact name beats substring: le-...-b-db is also a substring of le-...-b-db-replica.
    assert get_json(server, f"/v4/{names['b-db']}")["DockerId"] == ids["b-db"]
    # Full Docker ID, then prefixes of it.
    assert get_json(server, f"/v4/{ids['b-db']}")["DockerId"] == ids["b-db"]
    assert get_json(server, f"/v4/{ids['b-db'][:12]}")["DockerId"] == ids["b-db"]
    assert get_json(server, f"/v4/{ids['b-db'][:8]}")["DockerId"] == ids["b-db"]
    # Compose service beats substring: worker-<t> is also part of lone's name.
    assert get_json(server, f"/v4/worker-{t}")["DockerId"] == ids["a-worker"]
    assert get_json(server, f"/v4/db-{t}")["DockerId"] == ids["b-db"]
    # A unique substring of a name (the original's rule).
    assert get_json(server, f"/v4/{t}-b-db-rep")["DockerId"] == ids["b-db-replica"]
    assert get_json(server, f"/v4/{t}-lon")["DockerId"] == ids["lone"]
    # Exact names reach exited containers too.
    assert get_json(server, f"/v4/{names['a-migrate']}")["KnownStatus"] == "STOPPED"

    for version_path in ("/v4/{}", "/v3/{}", "/v3/containers/{}", "/v2/metadata/{}", "/v4/{}/task"):
        # Ambiguous substring: both db containers.
        message = assert_error(server, version_path.format(f"{t}-b-d"), 404, "AmbiguousContainer")
        assert "2 containers" in message and "/v4/" in message, message
        # Ambiguous compose service: web-<t> in both projects.
        message = assert_error(server, version_path.format(f"web-{t}"), 404, "AmbiguousContainer")
        assert "2 containers" in message, message
        message = assert_error(server, version_path.format(f"nothing-{t}"), 404, "ContainerNotFound")
        assert f"nothing-{t}" in message, message


# ---------------------------------------------------------------------------
# The caller found by its address
# ---------------------------------------------------------------------------

def test_caller_by_ip_from_inside_containers(fleet, start_server, docker_engine):
    """Requests from a container's network namespace, without an identifier."""
    server = start_server(env={"DOCKER_HOST": docker_engine.host, "TASK_TAGS": "team=core"},
                          args=("--bind", "0.0.0.0"))
    base_a = f"http://{fleet.gateway(fleet.net_a)}:{server.port}"
    # Every collector with two samples first: on an engine that already runs 100 containers the
    # server starts one for each, and Docker may take longer than a request waits (503 then).
    assert wait_for(lambda: (lambda h: h["statsReady"] == h["statsCollectors"] > 0)(
        json.loads(server.get("/health")[2])), 90), server.get("/health")
    results = fetch_from(docker_engine, fleet.ids["a-web"], base_a,
                         "/v4", "/v3", "/v4/task", "/v3/task", "/v4/taskWithTags", "/v2/metadata",
                         "/v2/metadataWithTags", "/v4/stats", "/v2/stats", "/v3/task/stats", "/v4/task/stats")
    (s_v4, v4), (s_v3, v3), (s_t4, t4), (s_t3, t3), (s_tt, tt), (s_m2, m2), (s_mt2, mt2), \
        (s_st, st), (s_s2, s2), (s_ts3, ts3), (s_ts4, ts4) = results
    assert [r[0] for r in results] == [200] * len(results), results
    web = fleet.inspect("a-web")
    networks = fleet.networks()
    check_container(v4, web, 4, networks, t4)
    check_container(v3, web, 3, networks, t3)
    members = fleet.members(fleet.project_a)
    for task in (t4, t3, tt, m2, mt2):
        assert {c["DockerId"] for c in task["Containers"]} == members
        assert task["Family"] == fleet.project_a
    assert "TaskTags" not in t4 and "TaskTags" not in m2
    assert tt["TaskTags"] == mt2["TaskTags"] == {"team": "core"}
    assert st["id"] == web["Id"]
    for stats in (s2, ts3, ts4):
        assert set(stats) == members
    assert s2[fleet.ids["a-migrate"]] is None and ts3[fleet.ids["a-migrate"]] is None
    assert ts4[fleet.ids["a-migrate"]] == {}

    # A container of the other project, on the other network, is told its own task.
    base_b = f"http://{fleet.gateway(fleet.net_b)}:{server.port}"
    [(status, doc), (_, task)] = fetch_from(docker_engine, fleet.ids["b-db-replica"], base_b, "/v4", "/v4/task")
    assert status == 200 and doc["DockerId"] == fleet.ids["b-db-replica"]
    assert {c["DockerId"] for c in task["Containers"]} == fleet.members(fleet.project_b)

    # The host itself is no container.
    message = assert_error(server, "/v4", 404, "ContainerNotFound")
    assert "/v4/" in message


# ---------------------------------------------------------------------------
# Override files
# ---------------------------------------------------------------------------

def test_override_files_deep_merge_and_reload(fleet, start_server, docker_engine, tmp_path):
    container_file, task_file = tmp_path / "container.json", tmp_path / "task.json"
    container_file.write_text(json.dumps({"Labels": {"override": "yes"}, "Limits": {"CPU": 4096},
                                          "DockerName": "from-file"}))
    task_file.write_text(json.dumps({"Family": "from-file", "Limits": {"Memory": 2048}}))
    server = start_server(env={"DOCKER_HOST": docker_engine.host,
                               "CONTAINER_METADATA_PATH": container_file, "TASK_METADATA_PATH": task_file})
    name = fleet.names["a-web"]
    labels = fleet.inspect("a-web")["Config"]["Labels"]
    for path in (f"/v4/{name}", f"/v3/{name}", f"/v2/metadata/{name}"):
        doc = get_json(server, path)
        own = {k: v for k, v in doc["Labels"].items() if not k.startswith("com.amazonaws.ecs.")}
        assert own == {**labels, "override": "yes"}, path      # merged, file wins
        assert len(doc["Labels"]) - len(own) == 5, path        # beside the five ECS labels
        assert doc["Limits"] == {"CPU": 4096, "Memory": 64}, path
        assert doc["DockerName"] == "from-file" and doc["DockerId"] == fleet.ids["a-web"], path
    for path in (f"/v4/{name}/task", f"/v3/{name}/task"):
        task = get_json(server, path)
        assert task["Family"] == "from-file" and task["Limits"] == {"CPU": 0.75, "Memory": 2048}
        assert task["Cluster"] == "ecs-local-cluster"
        assert {c["Labels"]["override"] for c in task["Containers"]} == {"yes"}

    # Edited files are picked up by the running server.
    container_file.write_text(json.dumps({"Labels": {"override": "changed"}}))
    task_file.write_text(json.dumps({"Revision": "9"}))
    doc = get_json(server, f"/v4/{name}")
    assert doc["Labels"]["override"] == "changed" and doc["Limits"] == {"CPU": 512, "Memory": 64}
    assert doc["DockerName"] == name
    task = get_json(server, f"/v4/{name}/task")
    assert (task["Family"], task["Revision"]) == (fleet.project_a, "9")

    # A broken edit keeps the last good version, with a warning naming the file.
    container_file.write_text('{"Labels": ')
    assert get_json(server, f"/v4/{name}")["Labels"]["override"] == "changed"
    assert wait_for(lambda: str(container_file) in server.log() and "WARNING" in server.log(), 5)
    assert server.proc.poll() is None


# ---------------------------------------------------------------------------
# OpenTelemetry
# ---------------------------------------------------------------------------

def otel_resource(monkeypatch, url: str) -> dict:
    """Attributes from the real OpenTelemetry ECS detector pointed at url.

    The detector reads /proc/self/cgroup for a container ID but needs nothing
    else from a container: only its environment variable is set here (and
    proxy variables removed, since it uses urllib).
    """
    from opentelemetry.sdk.extension.aws.resource.ecs import AwsEcsResourceDetector
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "ECS_CONTAINER_METADATA_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", url)
    return dict(AwsEcsResourceDetector(raise_on_error=True).detect().attributes)


def test_opentelemetry_ecs_detector(fleet, server, start_server, docker_engine, monkeypatch, tmp_path):
    name = fleet.names["a-web"]
    task = get_json(server, f"/v4/{name}/task")
    container = get_json(server, f"/v4/{name}")
    attributes = otel_resource(monkeypatch, f"{server.url}/v4/{name}")
    region_account = task["TaskARN"].rsplit(":", 1)[0]
    assert attributes["cloud.provider"] == "aws" and attributes["cloud.platform"] == "aws_ecs"
    assert attributes["aws.ecs.task.arn"] == task["TaskARN"]
    assert attributes["aws.ecs.cluster.arn"] == f"{region_account}:cluster/ecs-local-cluster"
    assert attributes["aws.ecs.task.family"] == fleet.project_a
    assert attributes["aws.ecs.task.revision"] == "1"
    assert attributes["aws.ecs.launchtype"] == "ec2"
    assert attributes["aws.ecs.container.arn"] == container["ContainerARN"]
    assert "aws.log.group.names" not in attributes   # json-file, not awslogs

    # awslogs cannot run here (no CloudWatch): its LogOptions come from the override file.
    override = tmp_path / "container.json"
    override.write_text(json.dumps({"LogDriver": "awslogs", "LogOptions": {
        "awslogs-group": "/ecs/shop", "awslogs-stream": "web/1", "awslogs-region": "us-west-2"}}))
    with_logs = start_server(env={"DOCKER_HOST": docker_engine.host, "CONTAINER_METADATA_PATH": override})
    attributes = otel_resource(monkeypatch, f"{with_logs.url}/v4/{name}")
    assert attributes["aws.ecs.task.arn"] == task["TaskARN"]
    assert list(attributes["aws.log.group.names"]) == ["/ecs/shop"]
    assert list(attributes["aws.log.group.arns"]) == ["arn:aws:logs:us-west-2:111111111111:log-group:/ecs/shop"]
    assert list(attributes["aws.log.stream.names"]) == ["web/1"]


# ---------------------------------------------------------------------------
# A consumer of the ECS labels: aws-embedded-metrics (npm)
# ---------------------------------------------------------------------------

# CloudWatch's Embedded Metric Format client for Node. Its ECS environment fetches
# $ECS_CONTAINER_METADATA_URI and takes the cluster and the task ARN from the ECS labels.
# (The PyPI package of the same name has no ECS environment.) Its pin is in requirements-dev.txt.
EMF_PACKAGE = "aws-embedded-metrics@" + re.search(
    r"aws-embedded-metrics==(\S+)", (Path(__file__).parent / "requirements-dev.txt").read_text()).group(1)

EMF_SCRIPT = """
const { metricScope } = require('aws-embedded-metrics');
const job = metricScope(metrics => async () => { metrics.putMetric('JobsDone', 1, 'Count'); });
job().then(() => process.exit(0), error => { console.error(error); process.exit(1); });
"""


@pytest.fixture(scope="module")
def emf_library(tmp_path_factory):
    """A directory with the library installed from the npm registry (node and npm from Debian if missing)."""
    if not shutil.which("npm"):
        apt_install("nodejs", "npm")
    directory = tmp_path_factory.mktemp("emf")
    proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save", EMF_PACKAGE],
                          cwd=directory, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        unavailable(f"npm install {EMF_PACKAGE} failed: {proc.stderr[-500:]}")
    (directory / "job.js").write_text(EMF_SCRIPT)
    return directory


def emf_properties(directory, metadata_url: str) -> dict:
    """The EMF document the library sends to its agent (a TCP listener here) from a run with
    ECS_CONTAINER_METADATA_URI=metadata_url: its properties are what it learned from the metadata."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(ECS_CONTAINER_METADATA_URI=metadata_url,
                   AWS_EMF_AGENT_ENDPOINT=f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        proc = subprocess.Popen(["node", "job.js"], cwd=directory, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            connection, _ = listener.accept()
            with connection, connection.makefile("rb") as stream:
                line = stream.readline()
            assert proc.wait(30) == 0, proc.stdout.read()
        finally:
            proc.kill()
            proc.wait()
    return json.loads(line)


def test_embedded_metrics_reads_the_ecs_labels(fleet, server, emf_library):
    """The library's ECS environment gets the cluster and the task ARN from /v3/{name} and
    /v4/{name}: the values the task document shows, the cluster as an ARN."""
    name = fleet.names["a-web"]
    task = get_json(server, f"/v4/{name}/task")
    region_account = task["TaskARN"].rsplit(":", 1)[0]
    for path in (f"/v3/{name}", f"/v4/{name}"):
        document = emf_properties(emf_library, server.url + path)
        assert document["cluster"] == f"{region_account}:cluster/ecs-local-cluster", path
        assert document["taskArn"] == task["TaskARN"], path
        assert document["image"] == "local-endpoints-test/busybox:latest", path
        assert document["JobsDone"] == 1
        assert document["_aws"]["CloudWatchMetrics"][0]["Metrics"] == [{"Name": "JobsDone", "Unit": "Count"}]


# ---------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------

def sample_times(doc: dict) -> tuple[datetime, datetime]:
    return parse_time(doc["read"]), parse_time(doc["preread"])


def cpu_total(stats: dict) -> int:
    return stats["cpu_usage"]["total_usage"]


def test_stats_of_a_busy_container(fleet, server):
    """Two real samples about a second apart; CPU grows; Docker's keys kept."""
    name, cid = fleet.names["a-worker"], fleet.ids["a-worker"]
    first = get_json(server, f"/v4/{name}/stats")
    read, preread = sample_times(first)
    assert 0.5 <= (read - preread).total_seconds() <= 1.6, (first["read"], first["preread"])
    assert cpu_total(first["cpu_stats"]) > cpu_total(first["precpu_stats"]) > 0
    assert first["cpu_stats"]["system_cpu_usage"] > first["precpu_stats"]["system_cpu_usage"] > 0
    assert first["id"] == cid and first["name"] == f"/{name}"
    assert "eth0" in first["networks"]
    assert {"memory_stats", "blkio_stats", "pids_stats", "num_procs"} <= set(first)
    assert set(first["network_rate_stats"]) == {"rx_bytes_per_sec", "tx_bytes_per_sec"}
    assert all(isinstance(v, float) and v >= 0 for v in first["network_rate_stats"].values())

    time.sleep(2)
    started = time.monotonic()
    second = get_json(server, f"/v4/{name}/stats")
    assert time.monotonic() - started < 0.5, "a warm stats request waits for Docker"
    # Docker streams a sample a second: the latest may be up to a second old.
    assert (sample_times(second)[0] - read).total_seconds() >= 0.9
    assert cpu_total(second["cpu_stats"]) > cpu_total(first["cpu_stats"])
    # precpu_stats is the sample before: never older than the first answer's latest.
    assert cpu_total(second["precpu_stats"]) >= cpu_total(first["cpu_stats"])
    assert sample_times(second)[1] >= read


def test_stats_versions_of_an_idle_container(fleet, server):
    """network_rate_stats is a v4 addition; v2/v3 carry Docker's document as it is."""
    name, cid = fleet.names["lone"], fleet.ids["lone"]
    v4 = get_json(server, f"/v4/{name}/stats")
    v3 = get_json(server, f"/v3/{name}/stats")
    v2 = get_json(server, f"/v2/stats/{name}")
    for doc in (v4, v3, v2):
        read, preread = sample_times(doc)
        assert 0.5 <= (read - preread).total_seconds() <= 1.6
        assert doc["id"] == cid and doc["name"] == f"/{name}" and "eth0" in doc["networks"]
        assert cpu_total(doc["cpu_stats"]) >= cpu_total(doc["precpu_stats"])
    assert "network_rate_stats" in v4
    assert "network_rate_stats" not in v3 and "network_rate_stats" not in v2


def test_task_stats_cover_exactly_the_task(fleet, server):
    members = fleet.members(fleet.project_a)
    migrate = fleet.ids["a-migrate"]
    v4 = get_json(server, f"/v4/{fleet.names['a-web']}/task/stats")
    v3 = get_json(server, f"/v3/{fleet.names['a-web']}/task/stats")
    assert set(v4) == set(v3) == members
    assert v4[migrate] == {} and v3[migrate] is None
    for cid in members - {migrate}:
        assert v4[cid]["id"] == v3[cid]["id"] == cid
        assert "network_rate_stats" in v4[cid] and "network_rate_stats" not in v3[cid]
    outside = get_json(server, f"/v4/{fleet.names['lone']}/task/stats")
    assert set(outside) == listed(fleet.engine, "status=running")   # outside compose: every running container


def test_container_stopped_mid_run(fleet, start_server, docker_engine, containers, busybox_image):
    """A member stopping while task stats are gathered does not fail the task response;
    afterwards it maps to {} / null, and its own stats route answers 503 JSON."""
    project = f"le-c-{fleet.token}"
    names = [f"le-{fleet.token}-c-{n}" for n in ("keep", "stop")]
    keep, stop = (containers.run("--name", n, "--label", f"{COMPOSE_PROJECT}={project}", "--init",
                                 busybox_image, *SLEEP) for n in names)
    # on-demand: no collector yet, so the request waits while the container stops
    server = start_server(env={"DOCKER_HOST": docker_engine.host, "ECS_LOCAL_STATS": "on-demand"})
    replies = {}
    request = threading.Thread(target=lambda: replies.update(v4=server.get(f"/v4/{names[0]}/task/stats")))
    request.start()
    # Mid-run: the request has started both collectors and waits for their first samples.
    assert wait_for(lambda: get_json(server, "/health")["statsCollectors"] == 2, 10), "collectors never started"
    assert request.is_alive(), "the task stats request ended before the member stopped: nothing raced"
    docker_engine.cli("kill", stop)
    request.join(15)
    status, _, body = replies["v4"]
    assert status == 200, body
    stats = json.loads(body)
    assert set(stats) == {keep, stop}
    assert stats[keep]["id"] == keep

    assert wait_for(lambda: get_json(server, f"/v4/{names[0]}/task/stats")[stop] == {}, 5)
    # The stopped container's collector ended and is gone; the running one's stays.
    assert wait_for(lambda: get_json(server, "/health")["statsCollectors"] == 1, 10)
    v3 = get_json(server, f"/v3/{names[0]}/task/stats")
    assert set(v3) == {keep, stop} and v3[stop] is None and v3[keep]["id"] == keep
    for path in (f"/v4/{names[1]}/stats", f"/v3/{names[1]}/stats", f"/v2/stats/{names[1]}"):
        assert_error(server, path, 503, "StatsUnavailable")
    task = get_json(server, f"/v4/{names[1]}/task")
    stopped = next(c for c in task["Containers"] if c["DockerId"] == stop)
    assert stopped["KnownStatus"] == "STOPPED" and stopped["ExitCode"] == 137


# ---------------------------------------------------------------------------
# Docker stopped and started again (stops the shared engine: keep it last)
# ---------------------------------------------------------------------------

@pytest.mark.usefixtures("private_engine")   # stops and starts the engine
def test_docker_restart_while_serving(fleet, start_server, docker_engine, containers, busybox_image):
    """503 DockerUnavailable during the outage, right answers after it, no server restart;
    a server started while Docker is down recovers as well."""
    name = f"le-{fleet.token}-phoenix"
    cid = containers.run("--name", name, "--restart", "always", "--init", busybox_image, *SLEEP)
    server = start_server(env={"DOCKER_HOST": docker_engine.host})
    assert get_json(server, f"/v4/{name}")["DockerId"] == cid
    assert get_json(server, f"/v4/{name}/stats")["id"] == cid

    docker_engine.stop()
    paths = (f"/v4/{name}", f"/v4/{name}/task", f"/v3/{name}", f"/v2/metadata/{name}", f"/v4/{name}/stats",
             f"/v4/{name}/task/stats")
    assert wait_for(lambda: server.get(paths[0])[0] == 503, 5), "still answering from the old view"
    for path in paths:
        message = assert_error(server, path, 503, "DockerUnavailable")
        assert docker_engine.host in message, message
    assert get_json(server, "/health")["docker"]["reachable"] is False
    started_down = start_server(env={"DOCKER_HOST": docker_engine.host})
    assert_error(started_down, f"/v4/{name}", 503, "DockerUnavailable")

    docker_engine.start()
    assert wait_for(lambda: docker_engine.inspect(cid)["State"]["Running"], 20)
    inspect = docker_engine.inspect(cid)

    def recovered(s):
        status, _, body = s.get(f"/v4/{name}")
        return status == 200 and json.loads(body)["StartedAt"] == inspect["State"]["StartedAt"]

    for s in (server, started_down):
        assert wait_for(lambda: recovered(s), 15, 0.2), s.log()[-3000:]
        doc = get_json(s, f"/v4/{name}")
        check_container(doc, docker_engine.inspect(cid), 4, {"bridge": docker_engine.inspect("bridge")},
                        get_json(s, f"/v4/{name}/task"))
        assert wait_for(lambda: s.get(f"/v4/{name}/stats")[0] == 200, 10)
        stats = get_json(s, f"/v4/{name}/stats")
        assert stats["id"] == cid and parse_time(stats["read"]) > parse_time(inspect["State"]["StartedAt"])
        assert get_json(s, "/health")["docker"]["reachable"] is True
    assert server.proc.poll() is None and started_down.proc.poll() is None

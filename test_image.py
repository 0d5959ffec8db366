"""Tests of the container image (Dockerfile); test_examples.py runs the compose examples.

The image is built from the repository's Dockerfile on top of a local base
image that behaves like the official ``python:*-slim`` image (no image
registry is reachable here): Debian bookworm made with ``debootstrap``,
``python``/``pip`` on PATH, pip allowed to install, and this machine's CA
bundle and pip ``cert`` setting inside so pip reaches the package index the
way the host does.  The base image is cached under ``BASE_IMAGE``; delete that
tag to rebuild it.

The endpoints container then runs as in the original tutorial: on a bridge
network 169.254.170.0/24 at 169.254.170.2 with the Docker socket mounted, STS
and IAM served by a ``moto_server`` on the host bound to the network's
gateway.  A busybox "app" container joins the network, and the host's python
(with botocore) runs inside that container's network namespace through
``nsenter``, so it is a real SDK client seen by the server from the app's IP.

The special network is often there already (the original's setup, on the
contributor's own engine): then the tests join it, at free addresses. Another
engine's bridge or NAT rule for that subnet on this host would NAT the
caller's address, so the tests then stop with one line saying what is in the
way.

Needs: a Docker engine and the busybox image (conftest.py's ``docker_engine``
and ``busybox_image`` fixtures), root (debootstrap, nsenter), moto[server] and
botocore in the host's python, and debootstrap, which is apt-get installed
when missing. With CI set, anything missing is a failure,
never a skip.

Timings on the 2-core machine: base image ~55 s (once on the tests' own
engine, where it is kept; every run on yours, where it is removed), project
image ~6 s (pip install inside ``docker build`` on the default bridge network,
no ``--network host`` needed), the rest ~15 s.
"""

import ipaddress
import json
import os
import re
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from testlib import (build_base_image, moto_server_at, pause_image, run,
                     unavailable, wait_http)

REPO = Path(__file__).resolve().parent

SUBNET = ipaddress.ip_network("169.254.170.0/24")
ENDPOINTS_IP = "169.254.170.2"   # where SDKs look for AWS_CONTAINER_CREDENTIALS_RELATIVE_URI
RUN_ID = uuid.uuid4().hex[:8]

# ----------------------------------------------------------------- fixtures
# docker_engine (the contributor's engine or the tests' own, machine-wide lock)
# and busybox_image come from conftest.py.


@pytest.fixture(scope="module")
def docker(docker_engine):
    """Path of the docker CLI; DOCKER_HOST is set to the shared engine."""
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = docker_engine.host
    yield docker_engine.docker_cli
    if old is None:
        os.environ.pop("DOCKER_HOST", None)
    else:
        os.environ["DOCKER_HOST"] = old


@pytest.fixture(scope="module")
def root():
    if os.geteuid() != 0:
        unavailable("needs root (debootstrap, nsenter): run the tests as root")


@pytest.fixture(scope="module")
def created(docker):
    """Ids of what the tests create; removed at teardown (not the cached base)."""
    things = {"containers": [], "networks": [], "images": []}
    yield things
    for cid in reversed(things["containers"]):
        run([docker, "rm", "-f", "-v", cid], check=False)
    for net in things["networks"]:
        run([docker, "network", "rm", net], check=False)
    for img in things["images"]:
        run([docker, "rmi", "-f", img], check=False)


@pytest.fixture(scope="module")
def base_image(docker_engine, docker, root, tmp_path_factory):
    return build_base_image(docker_engine, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def endpoints_image(docker_engine, docker, base_image, created):
    if not (REPO / "local_endpoints.py").is_file():
        unavailable("local_endpoints.py not written yet")
    tag = "local-endpoints-test/endpoints:" + RUN_ID
    t0 = time.monotonic()
    # The build container reaches the package index through the default
    # bridge network like the host does; no --network host is needed.
    run([docker, "build", "--build-arg", "PYTHON_IMAGE=" + base_image,
         "--label", docker_engine.label, "-t", tag, str(REPO)], timeout=900)
    created["images"].append(tag)
    print("\nimage %s built in %.1fs" % (tag, time.monotonic() - t0))
    return tag


@dataclass
class SpecialNetwork:
    """The 169.254.170.0/24 network the tests use: their own, or one that was there."""
    name: str
    gateway: str
    bridge: str              # the host interface of the network
    taken: set[str]          # addresses in use (containers, gateway)

    @classmethod
    def of(cls, doc):
        config = next(c for c in doc["IPAM"]["Config"] if c.get("Subnet") == str(SUBNET))
        gateway = config.get("Gateway") or str(next(SUBNET.hosts()))
        bridge = doc.get("Options", {}).get("com.docker.network.bridge.name") or "br-" + doc["Id"][:12]
        taken = {gateway} | {c["IPv4Address"].split("/")[0] for c in (doc.get("Containers") or {}).values()}
        return cls(doc["Name"], gateway, bridge, taken)

    def free_address(self):
        address = next(str(a) for a in SUBNET.hosts() if str(a) not in self.taken | {ENDPOINTS_IP})
        self.taken.add(address)
        return address


def special_networks(docker):
    """``docker network inspect`` of the engine's networks with the special subnet."""
    ids = run([docker, "network", "ls", "-q"]).stdout.split()
    docs = json.loads(run([docker, "network", "inspect", *ids]).stdout) if ids else []
    return [d for d in docs
            if any(c.get("Subnet") == str(SUBNET) for c in (d.get("IPAM") or {}).get("Config") or [])]


def host_interfaces_in_subnet():
    """``{interface: address}`` of host interfaces with an address in the special subnet."""
    out = run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 3 and ipaddress.ip_interface(fields[3]).ip in SUBNET:
            found[fields[1]] = fields[3]
    return found


def foreign_nat_rules(bridge):
    """NAT rules for the special subnet that name a bridge other than ``bridge``
    (left by another engine: they would NAT the callers' addresses)."""
    out = run(["iptables", "-t", "nat", "-S"], check=False).stdout
    return [rule for rule in out.splitlines()
            if str(SUBNET) in rule and re.search(r"\bbr-[0-9a-f]{12}\b|docker\d+", rule)
            and bridge not in rule]


def in_the_way(special):
    """One line saying what would break the tests on this network, or None."""
    if ENDPOINTS_IP in special.taken:
        return ("%s on the existing network %s is taken (your own endpoints container?): "
                "stop that container to run the image tests" % (ENDPOINTS_IP, special.name))
    for iface, address in host_interfaces_in_subnet().items():
        if iface != special.bridge:
            return ("host interface %s has %s, inside %s but not the network %s of this engine "
                    "(another engine's bridge?): remove it with `ip link delete %s`"
                    % (iface, address, SUBNET, special.name, iface))
    rules = foreign_nat_rules(special.bridge)
    if rules:
        return ("a NAT rule for %s of another engine's bridge would NAT the callers' addresses: "
                "remove it with `iptables -t nat %s`" % (SUBNET, rules[0].replace("-A ", "-D ", 1)))
    return None


@pytest.fixture(scope="module")
def special_network(docker_engine, docker, root, created):
    """The special network: an existing one of the engine (joined at free addresses), else
    one of the tests' own; unavailable, in one line, when something is in the way."""
    existing = special_networks(docker)
    if existing:
        special = SpecialNetwork.of(existing[0])
    else:
        for iface, address in host_interfaces_in_subnet().items():
            unavailable("host interface %s has %s, inside %s, but this engine has no such network "
                        "(another engine's bridge?): remove it with `ip link delete %s`"
                        % (iface, address, SUBNET, iface))
        name = "le-test-" + RUN_ID
        proc = run([docker, "network", "create", "--driver", "bridge", "--subnet", str(SUBNET),
                    "--label", docker_engine.label, name], check=False)
        if proc.returncode != 0:
            unavailable("cannot create network %s (%s): %s" % (name, SUBNET, proc.stderr.strip()))
        created["networks"].append(name)
        special = SpecialNetwork.of(docker_engine.inspect(name))
    problem = in_the_way(special)
    if problem:
        unavailable(problem)
    return special


@pytest.fixture(scope="module")
def network(special_network):
    return special_network.name


@pytest.fixture(scope="module")
def gateway_moto(special_network):
    """moto_server on the host, bound to the test network's gateway address."""
    with moto_server_at(special_network.gateway) as url:
        yield url


DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def inspect(docker, cid):
    return json.loads(run([docker, "inspect", cid]).stdout)[0]


@pytest.fixture(scope="module")
def endpoints(docker_engine, docker, endpoints_image, network, gateway_moto, created):
    if docker_engine.socket is None:
        unavailable("the endpoints container needs the engine's unix socket, not %s: "
                    "set DOCKER_HOST=unix://PATH" % docker_engine.host)
    env = dict(DUMMY_ENV, STS_ENDPOINT=gateway_moto, IAM_ENDPOINT=gateway_moto)
    cmd = [docker, "run", "-d", "--name", "le-test-endpoints-" + RUN_ID, "--label", docker_engine.label,
           "--network", network, "--ip", ENDPOINTS_IP,
           "-v", "%s:/var/run/docker.sock" % docker_engine.socket,
           "--health-interval", "1s", "--health-start-period", "1s"]
    for k, v in env.items():
        cmd += ["-e", "%s=%s" % (k, v)]
    cid = run(cmd + [endpoints_image]).stdout.strip()
    created["containers"].append(cid)
    try:
        wait_http("http://%s/health" % ENDPOINTS_IP, timeout=30)
    except Exception:
        logs = run([docker, "logs", cid], check=False)
        pytest.fail("endpoints container not answering /health:\n%s%s"
                    % (logs.stdout[-3000:], logs.stderr[-3000:]), pytrace=False)
    return cid


@pytest.fixture(scope="module")
def client(docker_engine, docker, busybox_image, special_network, endpoints, created):
    cid = run([docker, "run", "-d", "--name", "le-test-app-" + RUN_ID, "--label", docker_engine.label,
               "--network", special_network.name, "--ip", special_network.free_address(), busybox_image,
               "/bin/sleep", "3600"]).stdout.strip()
    created["containers"].append(cid)
    pid = inspect(docker, cid)["State"]["Pid"]
    assert pid > 0
    return {"id": cid, "pid": pid}


def in_app_netns(client, code, env):
    """Run the host's python inside the app container's network namespace."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("AWS_", "ECS_"))}
    clean.update({
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    clean.update(env)
    proc = run(["nsenter", "--net=/proc/%d/ns/net" % client["pid"], sys.executable, "-c",
                textwrap.dedent(code)], env=clean, check=False, timeout=120)
    assert proc.returncode == 0, "client failed:\n%s\n%s" % (proc.stdout, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


STS_CLIENT = """
    import json, os, urllib.request
    import botocore.session
    session = botocore.session.get_session()
    creds = session.get_credentials()
    frozen = creds.get_frozen_credentials()
    sts = session.create_client("sts", endpoint_url=os.environ["MOTO_URL"])
    ident = sts.get_caller_identity()
    uri = "http://169.254.170.2" + os.environ["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
    vended = json.load(urllib.request.urlopen(uri, timeout=10))
    print(json.dumps({"method": creds.method, "access_key": frozen.access_key,
                      "token": frozen.token, "vended": vended,
                      "arn": ident["Arn"], "account": ident["Account"]}))
"""


# -------------------------------------------------------------------- tests


def test_base_image_is_python_slim_like(docker, base_image):
    out = run([docker, "run", "--rm", base_image, "sh", "-c",
               "python --version && pip --version && "
               "test ! -e /usr/lib/python3*/EXTERNALLY-MANAGED && "
               "test -s /etc/ssl/certs/ca-certificates.crt && echo ok"]).stdout
    assert "Python 3" in out and "pip" in out and out.strip().endswith("ok")


def test_image_is_small_and_has_no_build_tools(docker, endpoints_image):
    info = inspect(docker, endpoints_image)
    cfg = info["Config"]
    assert cfg["Entrypoint"] == ["python", "local_endpoints.py"] or cfg["Cmd"] == [
        "python", "local_endpoints.py"]
    assert "HOME=/home" in cfg["Env"]
    assert "80/tcp" in (cfg.get("ExposedPorts") or {})
    assert cfg["Healthcheck"]["Test"][0] in ("CMD", "CMD-SHELL")
    files = run([docker, "run", "--rm", "--entrypoint", "sh", endpoints_image, "-c",
                 "ls /app; for t in gcc cc make; do command -v $t || true; done; "
                 "python -c 'import boto3, requests_unixsocket; print(boto3.__version__)'"]
                ).stdout.split()
    assert sorted(files[:2]) == ["local_endpoints.py", "requirements.txt"]
    assert files[-1] == "1.43.11"
    assert not any(f.endswith(("/gcc", "/cc", "/make")) for f in files)


def test_creds_with_botocore_container_provider(client, gateway_moto):
    got = in_app_netns(client, STS_CLIENT, {
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/creds", "MOTO_URL": gateway_moto})
    assert got["method"] == "container-role"
    assert got["access_key"] == got["vended"]["AccessKeyId"]
    # Temporary credentials (moto's GetSessionToken), not the server's own keys.
    assert got["token"] and got["token"] == got["vended"]["Token"]
    assert got["vended"]["Expiration"]
    assert got["account"]


def test_role_credentials_from_moto(client, gateway_moto):
    # Create the role in moto (IAM), as a user of the moto example would.
    import boto3
    iam = boto3.client("iam", endpoint_url=gateway_moto, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    role = iam.create_role(
        RoleName="le-test-role",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ecs-tasks.amazonaws.com"},
            "Action": "sts:AssumeRole"}]}),
    )["Role"]
    got = in_app_netns(client, STS_CLIENT, {
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/role/le-test-role", "MOTO_URL": gateway_moto})
    assert got["method"] == "container-role"
    assert got["access_key"] == got["vended"]["AccessKeyId"]
    assert got["vended"].get("RoleArn") in (role["Arn"], None)
    assert ":assumed-role/le-test-role/" in got["arn"]


def test_task_metadata_v4_identifies_caller_by_ip(client):
    got = in_app_netns(client, """
        import json, os, urllib.request
        base = os.environ["ECS_CONTAINER_METADATA_URI_V4"]
        print(json.dumps(json.load(urllib.request.urlopen(base, timeout=10))))
    """, {"ECS_CONTAINER_METADATA_URI_V4": "http://169.254.170.2/v4"})
    assert got["DockerId"] == client["id"]


def test_task_metadata_at_container_start(docker_engine, docker, busybox_image, network, endpoints, created):
    """An app that reads its metadata first thing at start (as on ECS) finds itself."""
    cid = run([docker, "run", "-d", "--label", docker_engine.label, "--network", network,
               busybox_image, "sh", "-c",
               "wget -qO- http://169.254.170.2/v4 || echo FAILED"]).stdout.strip()
    created["containers"].append(cid)
    run([docker, "wait", cid], timeout=60)
    logs = run([docker, "logs", cid])
    out = logs.stdout + logs.stderr
    assert "FAILED" not in out, out
    assert json.loads(logs.stdout)["DockerId"] == cid


def test_healthcheck_reports_healthy(docker, endpoints):
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        status = inspect(docker, endpoints)["State"]["Health"]["Status"]
        if status == "healthy":
            break
        time.sleep(0.5)
    assert status == "healthy", inspect(docker, endpoints)["State"]["Health"]


def test_healthcheck_follows_port_env_and_docker_stop_is_fast(docker_engine, docker, endpoints_image,
                                                               network, created):
    """Another port via ECS_LOCAL_METADATA_PORT; SIGTERM reaches PID 1."""
    cid = run([docker, "run", "-d", "--label", docker_engine.label, "--network", network,
               "-e", "ECS_LOCAL_METADATA_PORT=8080", "-e", "AWS_EC2_METADATA_DISABLED=true",
               "--health-interval", "1s", "--health-start-period", "1s",
               endpoints_image]).stdout.strip()
    created["containers"].append(cid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = inspect(docker, cid)["State"]
        if state["Health"]["Status"] == "healthy" or not state["Running"]:
            break
        time.sleep(0.5)
    assert state["Health"]["Status"] == "healthy", (
        state, run([docker, "logs", cid], check=False).stderr[-3000:])

    t0 = time.monotonic()
    run([docker, "stop", "-t", "10", cid])
    elapsed = time.monotonic() - t0
    state = inspect(docker, cid)["State"]
    assert elapsed < 2.0, "docker stop took %.2fs" % elapsed
    assert not state["Running"]
    assert state["ExitCode"] != 137, "killed with SIGKILL"


# -------------------------------------------------------------------- run TASKDEF

def metadata_task(family: str, busybox: str) -> dict:
    """An awsvpc task whose one container prints its task's TaskARN and Family from the endpoints."""
    return {"family": family, "networkMode": "awsvpc", "memory": "256", "containerDefinitions": [
        {"name": "app", "image": busybox,
         "command": ["sh", "-c", "wget -q -O- $ECS_CONTAINER_METADATA_URI_V4/task | grep -o '\"Family\": *\"[^\"]*\"'"]}]}


def test_run_inside_the_image_with_the_socket_mounted(docker_engine, docker, endpoints_image, busybox_image,
                                                      tmp_path):
    """The Docker Desktop way: `run` in the image, with the socket, the host's PIDs and the
    capabilities to enter the task's network namespace and add the endpoints' address there."""
    pause = pause_image(docker_engine)
    family = "le-image-run-" + RUN_ID
    (tmp_path / "task.json").write_text(json.dumps(metadata_task(family, busybox_image)))
    proc = run([docker, "run", "--rm", "--label", docker_engine.label, "--cap-add", "SYS_ADMIN",
                "--cap-add", "NET_ADMIN", "--pid", "host",
                "-v", "%s:/var/run/docker.sock" % docker_engine.socket, "-v", "%s:/task" % tmp_path,
                "-e", "AWS_EC2_METADATA_DISABLED=true", endpoints_image, "run", "/task/task.json",
                "--pause-image", pause], check=False, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert 'app | "Family": "%s"' % family in proc.stdout, proc.stdout
    assert "task STOPPED: Essential container in task exited" in proc.stderr
    left = run([docker, "ps", "-aq", "--filter", "label=com.amazonaws.ecs.task-definition-family=" + family]).stdout
    assert not left.split()


def test_run_beside_the_endpoints_container_on_its_special_network(docker_engine, docker, busybox_image, client,
                                                                   endpoints, tmp_path):
    """A task `run` starts and the compose setup's containers each see their own endpoints at
    169.254.170.2: the task's in its own namespace, the compose app's on the special network."""
    family = "le-beside-" + RUN_ID
    (tmp_path / "task.json").write_text(json.dumps(metadata_task(family, busybox_image)))
    env = dict({k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DOCKER_"))}, **DUMMY_ENV,
               DOCKER_HOST=docker_engine.host)
    proc = run([sys.executable, str(REPO / "local_endpoints.py"), "run", str(tmp_path / "task.json"),
                "--pause-image", pause_image(docker_engine)], check=False, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert 'app | "Family": "%s"' % family in proc.stdout, proc.stdout
    compose_view = in_app_netns(client, """
        import json, urllib.request
        print(json.dumps(json.load(urllib.request.urlopen("http://169.254.170.2/v4/task", timeout=10))))
    """, {})
    assert compose_view["Family"] != family

"""The compose files in examples/, run for real the way a new user runs them.

Each example goes through ``up -d`` / wait for the app / check its output /
``down -v`` five times in a row, each time as a compose project of its own
(``le-ex-<run id>-...``), so that a race between services (a container taking
169.254.170.2 from Docker's dynamic pool before the endpoints container does)
fails here instead of for a user. A static test checks every example file
(and the ``docker network create`` lines of the docs) for the addressing rule:
on the special network 169.254.170.0/24 every fixed address lies outside the
``ip_range`` Docker hands out dynamic addresses from.

No image registry is reachable, so the images the examples name are local
stand-ins, built once and kept (like test_image.py's base image) under
``local-endpoints-test/...`` tags, then tagged with the public names for the
session only (a name that already exists on the engine, such as a real
``amazon/aws-cli`` a contributor pulled, is used as it is and left alone):

- ``python:3.12-slim`` (the Dockerfile's default base, and the examples'
  metadata and worker services): test_image.py's debootstrapped base;
- ``motoserver/moto``: that base with moto[server], ``moto_server`` on
  0.0.0.0:5000;
- ``amazon/aws-cli``: that base with awscli (v1, the pinned version of
  requirements-dev.txt), ``aws`` as entrypoint.

The project's image is built by compose from the example's own ``build:``
section (``..``, the Dockerfile's default base), once per session. An override
file the test writes changes only what a test must: it gives that image a test
tag instead of ``local-endpoints:latest`` (a contributor's own image of that
name is not replaced), probes the image's health check every second instead
of every 5 s (each run's app starts ~4 s sooner), labels every service with
``local-endpoints-test=1``, and, for the standard and host-side examples,
points STS at moto.

Compose: the v2 plugin (``docker compose``) when the docker CLI has it, else
Debian's ``docker-compose`` (v1, 1.29), apt-get installed when missing (Debian
12 packages only v1, so v1 is what CI runs). The tests use only commands and
options both have, and find containers by their compose labels.

Imports: conftest.py's fixtures, and testlib's base image recipe and command
helpers (shared with test_image.py, not copied).

Timings on the 2-core machine (fresh engine): base image ~55 s (shared with
test_image.py), the moto/aws-cli stand-ins 45-60 s, the project's image
6-11 s, then per run: moto 5-9 s, standard 4-10 s, host 1.5-7 s, IMDS ~2 s,
task protection ~3.5 s.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pytest
import yaml  # PyYAML comes with moto[server] (requirements-dev.txt)

from testlib import (BASE_IMAGE, DUMMY_AWS_ENV, SESSION_ID, TEST_LABEL, build_base_image, ensure_tool, image_exists,
                     moto_server_at, run, unavailable, wait_for, wait_http)

REPO = Path(__file__).resolve().parent
EXAMPLES = REPO / "examples"
RUN_ID = uuid.uuid4().hex[:8]
PROJECT_PREFIX = "le-ex-" + RUN_ID
RUNS = 5
APP_TIMEOUT = 180  # seconds for one service of one run to finish

SPECIAL_SUBNET = ipaddress.ip_network("169.254.170.0/24")
ENDPOINTS_IP = ipaddress.ip_address("169.254.170.2")
MOTO_ACCOUNT = "123456789012"

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"

PYTHON_SLIM = "python:3.12-slim"  # the image of the examples' python services
# Bump the suffixes when the recipes in stand_in_images() change.
TOOLS_IMAGE = "local-endpoints-test/aws-tools:1"
STAND_INS = {  # public name: (cached tag, entrypoint, more Dockerfile)
    "motoserver/moto": ("local-endpoints-test/moto:1", '["moto_server", "-H", "0.0.0.0", "-p", "5000"]',
                        "EXPOSE 5000"),
    "amazon/aws-cli": ("local-endpoints-test/aws-cli:1", '["aws"]', ""),
}


def example_files() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.yml"))


def pinned(package: str) -> str:
    """``package==version`` as pinned in requirements-dev.txt (one source of versions)."""
    name = package.split("[", 1)[0]
    for line in (REPO / "requirements-dev.txt").read_text().splitlines():
        if re.match(re.escape(name) + r"(\[[^]]*\])?==", line.strip()):
            return package + "==" + line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in requirements-dev.txt")


def dockerfile_base() -> str:
    """The Dockerfile's default PYTHON_IMAGE: what ``build: ..`` starts from."""
    found = re.search(r"^ARG PYTHON_IMAGE=(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    assert found, "Dockerfile has no ARG PYTHON_IMAGE default"
    return found.group(1)


# ------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    """The docker CLI's compose v2 plugin when it has one, else Debian's v1 docker-compose."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [ensure_tool("docker-compose", "docker-compose")]


def compose_config(cli: list[str], name: str, home: Path) -> dict:
    """The example as compose resolves it (``config``), with no variables set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "COMPOSE_", "DOCKER_", "LOCAL_ENDPOINTS_"))}
    env["HOME"] = str(home)  # ~/.aws need not exist
    proc = run([*cli, "-f", str(EXAMPLES / name), "config"], check=False, env=env, cwd=EXAMPLES)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def special_networks(config: dict) -> dict[str, dict]:
    """Networks of the example whose subnet holds 169.254.170.2, with their ipam config."""
    found = {}
    for name, net in (config.get("networks") or {}).items():
        for pool in ((net or {}).get("ipam") or {}).get("config") or []:
            if ENDPOINTS_IP in ipaddress.ip_network(pool["subnet"]):
                found[name] = pool
    return found


@pytest.fixture(scope="module")
def configs(compose_cli, tmp_path_factory) -> dict[str, dict]:
    """Every example as compose resolves it, once per session."""
    home = tmp_path_factory.mktemp("home")
    return {name: compose_config(compose_cli, name, home) for name in example_files()}


@pytest.mark.parametrize("name", example_files())
def test_compose_file_parses(name, configs):
    assert configs[name].get("services")


@pytest.mark.parametrize("name", example_files())
def test_fixed_addresses_are_outside_the_dynamic_range(name, configs):
    """On the special network, Docker never hands out 169.254.170.2 or another fixed address."""
    config = configs[name]
    for net_name, pool in special_networks(config).items():
        subnet = ipaddress.ip_network(pool["subnet"])
        assert "ip_range" in pool, f"{net_name}: no ip_range, so Docker may give 169.254.170.2 away"
        dynamic = ipaddress.ip_network(pool["ip_range"])
        fixed = {ENDPOINTS_IP: "the endpoints", ipaddress.ip_address(pool["gateway"]): "gateway"}
        for service, spec in config["services"].items():
            attached = spec.get("networks") or {}
            if isinstance(attached, list):
                attached = dict.fromkeys(attached)
            address = (attached.get(net_name) or {}).get("ipv4_address")
            if address:
                fixed[ipaddress.ip_address(address)] = service
        for address, owner in fixed.items():
            assert address in subnet and address not in dynamic, (
                f"{net_name}: {address} ({owner}) is inside the dynamic range {dynamic}")


@pytest.mark.parametrize("name", example_files())
def test_app_containers_get_the_agent_uri(name, configs):
    """ECS gives every container ECS_AGENT_URI next to the metadata URI: so do the examples."""
    config = configs[name]
    with_metadata = {service: spec.get("environment") or {}
                     for service, spec in config["services"].items()
                     if "ECS_CONTAINER_METADATA_URI_V4" in (spec.get("environment") or {})}
    assert with_metadata, "no service reads task metadata"
    for service, env in with_metadata.items():
        assert "/api/" in env.get("ECS_AGENT_URI", ""), f"{service} has no ECS_AGENT_URI"


DOC_PAGES = ["README.md", "examples/README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
PAGES_WITH_THE_NETWORK = {"docs/setups.md", "examples/README.md"}


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_network_create_keeps_fixed_addresses_out_of_the_pool(page):
    """Every ``docker network create`` line for the special network in the README and docs/."""
    text = (REPO / page).read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines()
             if "docker network create" in line and "169.254.170." in line]
    if page in PAGES_WITH_THE_NETWORK:
        assert lines, f"{page} shows no docker network create for 169.254.170.0/24"
    for line in lines:
        assert "--ip-range 169.254.170.128/25" in line, line


# ------------------------------------------------------------------ images


@pytest.fixture(scope="module")
def docker(docker_engine):
    """``docker(*args)``: the docker CLI against the test engine.

    DOCKER_HOST is set for the module, as test_image.py does, because its
    helpers (build_base_image, image_exists) call the CLI with the process's
    environment.
    """
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = docker_engine.host

    def docker(*args, check=True, timeout=600):
        return run([docker_engine.docker_cli, *map(str, args)], check=check, timeout=timeout)
    yield docker
    if old is None:
        os.environ.pop("DOCKER_HOST", None)
    else:
        os.environ["DOCKER_HOST"] = old


def build_image(docker, tag: str, dockerfile: str, workdir: Path) -> None:
    """``docker build`` of a Dockerfile with an empty context."""
    context = workdir / re.sub(r"[/:]", "_", tag)
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    docker("build", "--label", f"{TEST_LABEL}-image=1", "-t", tag, context, timeout=1200)


@pytest.fixture(scope="module")
def stand_in_images(docker_engine, docker, tmp_path_factory):
    """Tags the public image names the examples use, for this session only."""
    if os.geteuid() != 0:
        unavailable("needs root (debootstrap for the base image)")
    cli = docker_engine.docker_cli
    workdir = tmp_path_factory.mktemp("stand-ins")
    t0 = time.monotonic()
    build_base_image(docker_engine, workdir)
    sources = {dockerfile_base(): BASE_IMAGE, PYTHON_SLIM: BASE_IMAGE}
    for name, (cached, entrypoint, extra) in STAND_INS.items():
        sources[name] = cached
        if image_exists(cli, cached):
            continue
        if not image_exists(cli, TOOLS_IMAGE):
            build_image(docker, TOOLS_IMAGE, f"FROM {BASE_IMAGE}\nRUN pip install --no-cache-dir "
                        f"'{pinned('moto[server]')}' '{pinned('awscli')}'\n", workdir)
            docker_engine.created_image(TOOLS_IMAGE)
        build_image(docker, cached, f"FROM {TOOLS_IMAGE}\nENTRYPOINT {entrypoint}\nCMD []\n{extra}\n",
                    workdir)
        docker_engine.created_image(cached)
    tagged = []
    for name, source in sources.items():
        if not image_exists(cli, name):
            docker("tag", source, name)
            tagged.append(name)
    print(f"\nstand-in images ready in {time.monotonic() - t0:.1f}s (tagged {tagged})")
    yield sources
    for name in tagged:
        docker("rmi", name, check=False)  # the tag only: the cached image keeps its own


def test_every_image_an_example_names_has_a_stand_in(configs):
    named = {spec["image"] for config in configs.values() for spec in config["services"].values()
             if "build" not in spec}
    assert named <= {PYTHON_SLIM, *STAND_INS}


@pytest.fixture(scope="module")
def endpoints_image(compose_cli, docker_engine, docker, stand_in_images, tmp_path_factory):
    """The project's image, built by compose from the examples' own ``build: ..``."""
    tag = f"local-endpoints-test/endpoints:examples-{RUN_ID}"
    workdir = tmp_path_factory.mktemp("build")
    override = workdir / "override.json"
    override.write_text(json.dumps({"version": "2.4", "services": {
        "ecs-local-endpoints": {"image": tag}}}))
    t0 = time.monotonic()
    run([*compose_cli, "-p", PROJECT_PREFIX + "-build", "-f", str(EXAMPLES / "docker-compose.moto.yml"),
         "-f", str(override), "build", "ecs-local-endpoints"],
        env=compose_env(docker_engine, workdir), cwd=EXAMPLES, timeout=1200)
    print(f"\nproject image {tag} built by compose in {time.monotonic() - t0:.1f}s")
    yield tag
    docker("rmi", "-f", tag, check=False)


# ------------------------------------------------------------------ running


def compose_env(engine, home: Path, **extra: str) -> dict:
    """A user's shell with nothing of this machine's AWS, compose or docker settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "COMPOSE_", "DOCKER_", "LOCAL_ENDPOINTS_"))}
    env.update(HOME=str(home), DOCKER_HOST=engine.host, DOCKER_SOCKET=engine.socket, **extra)
    return env


@dataclass
class Finished:
    """One service's container after it exited."""
    id: str
    exit_code: int
    stdout: str
    stderr: str

    def json_line(self) -> dict:
        """The JSON object the service printed: all of stdout, else its last line that is one."""
        for text in (self.stdout, *reversed(self.stdout.splitlines())):
            try:
                found = json.loads(text)
            except ValueError:
                continue
            if isinstance(found, dict):
                return found
        raise AssertionError(f"no JSON object in the output of {self.id[:12]}:\n{self.stdout}")


@dataclass
class Example:
    """One example file, run as compose projects of its own with a test override."""
    file: str
    cli: list[str]
    env: dict
    override: dict
    workdir: Path
    docker: Callable
    timings: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.override_path = self.workdir / f"override-{self.file}.json"
        self.override_path.write_text(json.dumps(self.override, indent=2))

    def compose(self, project: str, *args: str, check: bool = True, timeout: float = 300):
        return run([*self.cli, "-p", project, "-f", str(EXAMPLES / self.file),
                    "-f", str(self.override_path), *args],
                   check=check, env=self.env, cwd=EXAMPLES, timeout=timeout)

    def objects(self, project: str) -> tuple[list[str], list[str]]:
        """Ids of the containers and networks of a project."""
        flt = f"label={COMPOSE_PROJECT}={project}"
        return (self.docker("ps", "-aq", "--filter", flt).stdout.split(),
                self.docker("network", "ls", "-q", "--filter", flt).stdout.split())

    def container(self, project: str, service: str) -> str:
        ids = self.docker("ps", "-aq", "--filter", f"label={COMPOSE_PROJECT}={project}",
                          "--filter", f"label={COMPOSE_SERVICE}={service}").stdout.split()
        assert len(ids) == 1, f"{service}: {len(ids)} containers"
        return ids[0]

    def wait(self, project: str, service: str) -> Finished:
        cid = self.container(project, service)
        try:
            code = int(self.docker("wait", cid, timeout=APP_TIMEOUT).stdout.strip())
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{service} still running after {APP_TIMEOUT}s") from None
        logs = self.docker("logs", cid)
        return Finished(cid, code, logs.stdout, logs.stderr)

    def once(self, project: str, check: Callable[["Example", str], None]) -> None:
        up = self.compose(project, "up", "-d", "--no-build", check=False)
        if up.returncode != 0:
            raise AssertionError(f"up failed ({up.returncode}):\n{up.stderr[-3000:]}")
        check(self, project)

    def run_repeatedly(self, check: Callable[["Example", str], None], runs: int = RUNS) -> None:
        """``runs`` times: up, check, down -v; then fail with every run's failure."""
        failures = []
        for i in range(1, runs + 1):
            project = f"{PROJECT_PREFIX}-{Path(self.file).stem.replace('.', '-')}-{i}"
            t0 = time.monotonic()
            try:
                self.once(project, check)
            except AssertionError as e:
                logs = self.compose(project, "logs", "--no-color", check=False)
                failures.append(f"run {i} ({project}): {e}\n--- compose logs:\n{logs.stdout[-4000:]}")
            finally:
                self.compose(project, "down", "-v", "--remove-orphans", "-t", "1", check=False)
                self.timings.append(time.monotonic() - t0)
            left = self.objects(project)
            if any(left):
                failures.append(f"run {i} ({project}): down left containers/networks {left}")
        print(f"\n{self.file}: {runs} runs, {len(failures)} failed, "
              f"{sum(self.timings):.1f}s ({', '.join(f'{t:.1f}' for t in self.timings)})")
        assert not failures, "\n\n".join(failures)


@pytest.fixture(scope="module")
def leftovers(docker):
    """Whatever an interrupted run left of this session's projects goes at the end."""
    yield

    def ours(*listing: str) -> list[str]:
        out = docker(*listing, "--filter", f"label={COMPOSE_PROJECT}",
                     "--format", '{{.ID}} {{.Label "%s"}}' % COMPOSE_PROJECT).stdout
        return [ident for ident, _, project in (line.partition(" ") for line in out.splitlines())
                if project.startswith(PROJECT_PREFIX)]

    containers = ours("ps", "-a")
    if containers:
        docker("rm", "-f", "-v", *containers, check=False)
    networks = ours("network", "ls")
    if networks:
        docker("network", "rm", *networks, check=False)


@pytest.fixture(scope="module")
def special_network_free(docker):
    """169.254.170.0/24 can exist once per engine: say what is in the way, if anything."""
    for net in docker("network", "ls", "-q").stdout.split():
        info = json.loads(docker("network", "inspect", net).stdout)[0]
        for pool in (info.get("IPAM") or {}).get("Config") or []:
            if pool.get("Subnet") and ipaddress.ip_network(pool["Subnet"]).overlaps(SPECIAL_SUBNET):
                unavailable(f"Docker network {info['Name']} already uses {pool['Subnet']}: the "
                            "examples create their own 169.254.170.0/24 network and cannot run beside it")


# The image's own check (the Dockerfile's HEALTHCHECK command), probed every
# second instead of every 5 s: each run's app starts ~4 s sooner.
FAST_HEALTHCHECK = {"interval": "1s"}


@pytest.fixture
def example(compose_cli, configs, docker_engine, docker, endpoints_image, leftovers, tmp_path):
    """Factory: ``example(file, override=None, home=None, **env) -> Example``.

    ``override`` is the test's own part of the override file; ``home`` the
    user's HOME (~/.aws); ``env`` more variables for compose to substitute.
    """
    def make(file: str, override: dict | None = None, home: Path | None = None, **env: str) -> Example:
        override = dict(override or {}, version="2.4")
        services = override.setdefault("services", {})
        for service, spec in configs[file]["services"].items():
            if "build" in spec:
                services.setdefault(service, {}).update(image=endpoints_image,
                                                        healthcheck=FAST_HEALTHCHECK)
        for service in {*configs[file]["services"], *services}:
            services.setdefault(service, {}).setdefault("labels", {})[TEST_LABEL] = SESSION_ID
        home = home or tmp_path / "home"
        home.mkdir(exist_ok=True)
        return Example(file, compose_cli, compose_env(docker_engine, home, **env),
                       override, tmp_path, docker)
    return make


def identity(finished: Finished) -> dict:
    """The output of ``aws sts get-caller-identity``."""
    assert finished.exit_code == 0, f"exit {finished.exit_code}:\n{finished.stdout}\n{finished.stderr}"
    got = finished.json_line()
    assert got["Account"] == MOTO_ACCOUNT, got
    return got


def metadata_line(example: Example, project: str) -> None:
    """The metadata service found itself: it prints its own container id and a task ARN."""
    done = example.wait(project, "metadata")
    assert done.exit_code == 0, f"metadata exit {done.exit_code}:\n{done.stdout}\n{done.stderr}"
    assert f"I am {done.id[:12]} in task arn:aws:ecs:" in done.stdout, done.stdout


# ------------------------------------------------------------------ the examples


def test_moto_example(example, special_network_free):
    """No AWS account: the app's get-caller-identity shows the role it was given."""
    def check(ex: Example, project: str) -> None:
        assert ex.wait(project, "setup").exit_code == 0
        got = identity(ex.wait(project, "app"))
        assert ":assumed-role/app-role/" in got["Arn"], got

    example("docker-compose.moto.yml").run_repeatedly(check)


# The audit line of a /creds answer (it stands in for the access line).
CREDS_SERVED = {"route=/creds", "outcome=served"}


MOTO_HEALTHCHECK = {
    "test": ["CMD", "python3", "-c",
             "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/moto-api/')"],
    "interval": "1s", "timeout": "5s", "retries": 60,
}


def test_standard_example_with_a_profile(example, special_network_free, tmp_path):
    """``docker-compose.yml`` as far as no AWS account allows: a profile in a
    temporary ~/.aws whose STS is moto, set through an override file."""
    home = tmp_path / "user"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws/credentials").write_text(
        "[example]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
        % (DUMMY_AWS_ENV["AWS_ACCESS_KEY_ID"], DUMMY_AWS_ENV["AWS_SECRET_ACCESS_KEY"]))
    (home / ".aws/config").write_text("[profile example]\nregion = us-east-1\n")
    moto = "http://169.254.170.10:5000"
    override = {"services": {
        "moto": {"image": "motoserver/moto", "healthcheck": MOTO_HEALTHCHECK,
                 "networks": {"credentials_network": {"ipv4_address": "169.254.170.10"}}},
        "ecs-local-endpoints": {"environment": {"STS_ENDPOINT": moto, "IAM_ENDPOINT": moto,
                                                "AWS_EC2_METADATA_DISABLED": "true"}},
        "app": {"environment": {"AWS_ENDPOINT_URL": moto},
                "depends_on": {"moto": {"condition": "service_healthy"}}},
    }}

    def check(ex: Example, project: str) -> None:
        identity(ex.wait(project, "app"))
        metadata_line(ex, project)
        endpoints = ex.container(project, "ecs-local-endpoints")
        health = json.loads(ex.docker("inspect", endpoints).stdout)[0]["State"]["Health"]
        assert health["Status"] == "healthy", health
        log = ex.docker("logs", endpoints).stderr
        assert "credentials: shared-credentials-file" in log, log  # the profile in ~/.aws
        assert any(CREDS_SERVED <= set(line.split()) for line in log.splitlines()), log

    example("docker-compose.yml", override, home=home, AWS_PROFILE="example").run_repeatedly(check)


@pytest.fixture(scope="module")
def host_gateway(docker_engine, busybox_image) -> str:
    """The address ``host-gateway`` stands for on this engine (docker0's, usually)."""
    hosts = docker_engine.cli("run", "--rm", "--label", f"{TEST_LABEL}={SESSION_ID}", "--add-host",
                              "probe:host-gateway", busybox_image, "cat", "/etc/hosts").stdout
    return next(line.split()[0] for line in hosts.splitlines() if line.endswith("\tprobe"))


@pytest.fixture(scope="module")
def host_moto(host_gateway):
    """moto_server on the host at the host-gateway address: reachable from the host,
    from containers on any bridge network and from host-network containers."""
    with moto_server_at(host_gateway) as url:
        yield url


def host_server(start_server, docker_engine, host_moto, bind: str | None = None):
    """local_endpoints.py on the host, as the host and IMDS examples start it."""
    env = dict(DUMMY_AWS_ENV, DOCKER_HOST=docker_engine.host, STS_ENDPOINT=host_moto,
               IAM_ENDPOINT=host_moto)
    server = start_server(env=env, args=("--bind", bind) if bind else (), wait=bind is None)
    if bind:
        wait_http(f"http://{bind}:{server.port}/health", timeout=20)
    return server


def served(server, words: set[str], times: int) -> bool:
    """The server's log has at least ``times`` lines with these words (a line follows its answer)."""
    return wait_for(lambda: sum(words <= set(line.split()) for line in server.log().splitlines())
                    >= times, 5)


def test_host_example(example, start_server, docker_engine, host_moto):
    """The server on the host at 127.0.0.1, the app in the host's network namespace."""
    server = host_server(start_server, docker_engine, host_moto)
    override = {"services": {"app": {"environment": {"AWS_ENDPOINT_URL": host_moto}}}}

    runs = []

    def check(ex: Example, project: str) -> None:
        identity(ex.wait(project, "app"))
        runs.append(project)
        assert served(server, CREDS_SERVED, len(runs)), "the app did not use /creds"

    example("docker-compose.host.yml", override,
            LOCAL_ENDPOINTS_PORT=str(server.port)).run_repeatedly(check)


def test_imds_example(example, start_server, docker_engine, host_moto, host_gateway):
    """The server on the host, the app on an ordinary network, credentials through IMDSv2."""
    server = host_server(start_server, docker_engine, host_moto, bind=host_gateway)
    moto_port = host_moto.rsplit(":", 1)[1]
    override = {"services": {"app": {"environment": {
        "AWS_ENDPOINT_URL": f"http://host.docker.internal:{moto_port}"}}}}

    runs = []

    def check(ex: Example, project: str) -> None:
        identity(ex.wait(project, "app"))
        runs.append(project)
        assert served(server, {"PUT", "/latest/api/token", "200"}, len(runs)), "the app did not use IMDSv2"
        metadata_line(ex, project)

    example("docker-compose.imds.yml", override,
            LOCAL_ENDPOINTS_PORT=str(server.port)).run_repeatedly(check)


def test_task_protection_example(example, special_network_free):
    """The worker protects its task for 60 minutes, reads the state back, lifts it."""
    def check(ex: Example, project: str) -> None:
        done = ex.wait(project, "worker")
        assert done.exit_code == 0, f"worker exit {done.exit_code}:\n{done.stdout}\n{done.stderr}"
        got = done.json_line()
        on, state, off = got["on"], got["state"], got["off"]
        assert set(on) == {"ExpirationDate", "ProtectionEnabled", "TaskArn"}, on
        assert on["ProtectionEnabled"] is True and on["TaskArn"] == got["task"], got
        expires = datetime.fromisoformat(on["ExpirationDate"].replace("Z", "+00:00"))
        soon = datetime.now(timezone.utc) + timedelta(minutes=60)
        assert abs(expires - soon) < timedelta(minutes=5), on
        assert state == on, got
        assert off["ProtectionEnabled"] is False and off["TaskArn"] == got["task"], got

    example("docker-compose.protection.yml").run_repeatedly(check)

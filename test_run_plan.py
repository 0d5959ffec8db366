"""`run TASKDEF` without Docker or AWS: the pure functions from a task definition's JSON to
Docker's create bodies, the runner's state (TaskRun, dependency verdicts) over hand-written
inspect documents, and the metadata built from them.

Expected values are those of the ECS agent (see the agent files named in the comments:
agent/api/task/task.go, agent/api/container/container.go, agent/engine/docker_task_engine.go,
agent/engine/dependencygraph/graph.go) and of the ECS API's documentation.  Nothing here
needs root, Docker or AWS: run with ``-m 'not docker'``.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import os
import re
import socket
import struct
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import local_endpoints as le

REPO = Path(__file__).resolve().parent
OPTIONS = le.RunOptions(cluster="default", region="eu-west-1")
PAUSE_IMAGE = "local/pause:1"


def counters():
    """Deterministic random_hex and new_id: 20 hex digits and UUIDs numbered 1, 2, ..."""
    hexes = (f"{i:020x}" for i in itertools.count(1))
    ids = (f"00000000-0000-4000-8000-{i:012d}" for i in itertools.count(1))
    return {"random_hex": lambda: next(hexes), "new_id": lambda: next(ids)}


def uuid_n(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def hex_n(n: int) -> str:
    return f"{n:020x}"


def plan(definition: dict, tags: dict | None = None, options: le.RunOptions = OPTIONS) -> le.TaskPlan:
    return le.plan_task(copy.deepcopy(definition), tags or {}, options, **counters())


def container(name: str, **fields) -> dict:
    return {"name": name, "image": "busybox", **fields}


def task(*containers: dict, **fields) -> dict:
    """A task definition ECS accepts: an EC2 one needs memory, here the task's."""
    return {"family": "web", "memory": "512", "containerDefinitions": list(containers), **fields}


def refusal(definition: dict) -> str:
    with pytest.raises(le.TaskDefinitionError) as caught:
        le.validate_task_definition(definition)
    return str(caught.value)


def env_of(body: dict) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in body["Env"])


# The three-container awsvpc task of the README: an init container that must succeed, a server
# with a health check, an app that waits for it to be healthy.
AWSVPC = {
    "family": "webapp",
    "revision": 7,
    "networkMode": "awsvpc",
    "requiresCompatibilities": ["EC2"],
    "taskRoleArn": "arn:aws:iam::123456789012:role/app",
    "cpu": "512", "memory": "1 GB",
    "containerDefinitions": [
        container("init", essential=False, command=["true"]),
        container("web", portMappings=[{"containerPort": 8080}, {"containerPort": 53, "hostPort": 53,
                                                                  "protocol": "udp"}],
                  healthCheck={"command": ["CMD-SHELL", "wget -q -O- localhost:8080"]},
                  systemControls=[{"namespace": "net.core.somaxconn", "value": "1024"},
                                  {"namespace": "kernel.msgmax", "value": "65536"}],
                  dependsOn=[{"containerName": "init", "condition": "SUCCESS"}]),
        container("app", dependsOn=[{"containerName": "web", "condition": "HEALTHY"}]),
    ],
}


# ---------------------------------------------------------------------------
# Reading a task definition
# ---------------------------------------------------------------------------

class TestReadTaskDefinition:
    DEFINITION = {"family": "web", "containerDefinitions": [container("app")]}
    TAGS = [{"key": "team", "value": "blue"}, {"key": "cost", "value": "7"}]

    def test_register_input_with_tags(self):
        document = {**self.DEFINITION, "tags": self.TAGS}
        definition, tags = le.read_task_definition(document)
        assert definition["family"] == "web"
        assert definition["containerDefinitions"] == [container("app")]
        assert tags == {"team": "blue", "cost": "7"}

    def test_describe_output_with_wrapper_and_tags(self):
        described = {**self.DEFINITION, "revision": 3, "status": "ACTIVE",
                     "taskDefinitionArn": "arn:aws:ecs:eu-west-1:123456789012:task-definition/web:3"}
        definition, tags = le.read_task_definition({"taskDefinition": described, "tags": self.TAGS})
        assert definition == described
        assert tags == {"team": "blue", "cost": "7"}

    def test_describe_output_without_wrapper(self):
        described = {**self.DEFINITION, "revision": 3, "status": "ACTIVE"}
        assert le.read_task_definition(described) == (described, {})

    def test_no_tags_at_all(self):
        assert le.read_task_definition({"taskDefinition": self.DEFINITION}) == (self.DEFINITION, {})

    def test_tag_without_value_is_empty(self):
        assert le.read_task_definition({**self.DEFINITION, "tags": [{"key": "k"}]})[1] == {"k": ""}

    @pytest.mark.parametrize("document, field", [
        ([], "task definition"),
        ({"taskDefinition": []}, "taskDefinition"),
        ({**DEFINITION, "tags": {"team": "blue"}}, "tags"),
        ({**DEFINITION, "tags": [{"Key": "team"}]}, "tags"),
    ])
    def test_refused_shapes_name_the_field(self, document, field):
        with pytest.raises(le.TaskDefinitionError, match=f"^{field}: "):
            le.read_task_definition(document)


class TestParseEnvFile:
    """The agent's rules (envfile.go readEnvVarsFromFile): # at the start of a line is a comment,
    lines without = are skipped, the value is all after the first =, empty names or values skip."""

    def test_comments_blank_lines_and_equals_in_values(self):
        text = "# a comment\n\nA=1\n   \nB=x=y==\nD= spaced \nE=#not a comment\n  #X=indented, so not a comment\n"
        assert le.parse_env_file(text) == {"A": "1", "B": "x=y==", "D": " spaced ", "E": "#not a comment",
                                           "  #X": "indented, so not a comment"}

    def test_later_line_wins(self):
        assert le.parse_env_file("A=1\nA=2") == {"A": "2"}

    @pytest.mark.parametrize("text", ["not a variable", "=value", "EMPTY=", "# A=1"])
    def test_lines_the_agent_skips(self, text):
        assert le.parse_env_file(f"{text}\nKEPT=1") == {"KEPT": "1"}


class TestTaskSizes:
    @pytest.mark.parametrize("value, vcpu", [("256", 0.25), ("1024", 1.0), (512, 0.5), ("1 vCPU", 1.0),
                                             ("0.5 vCPU", 0.5), ("2 vcpu", 2.0), (None, None), ("", None)])
    def test_cpu(self, value, vcpu):
        assert le.task_cpu_vcpu(value) == vcpu

    @pytest.mark.parametrize("value, mib", [("512", 512), (2048, 2048), ("1 GB", 1024), ("2GB", 2048),
                                            ("0.5 GB", 512), (None, None), ("", None)])
    def test_memory(self, value, mib):
        assert le.task_memory_mib(value) == mib


# ---------------------------------------------------------------------------
# Names and order
# ---------------------------------------------------------------------------

class TestNames:
    def test_agent_name_keeps_letters_digits_and_hyphens(self):
        assert le.agent_name("~internal~ecs~pause") == "internalecspause"
        assert le.agent_name("my_app.v2 -x") == "myappv2-x"

    def test_docker_name(self):
        assert le.docker_name("web", "7", "my_app.1", "0123456789abcdef0123") == \
            "ecs-web-7-myapp1-0123456789abcdef0123"

    def test_docker_name_keeps_the_family_as_registered(self):
        # docker_task_engine.go: "ecs-" + task.Family + "-" + task.Version + "-" + name + "-" + RandHex();
        # only the container's name is stripped (families may hold underscores, which Docker accepts).
        assert le.docker_name("my_family", "2", "app", "0" * 20) == f"ecs-my_family-2-app-{'0' * 20}"

    def test_planned_names_have_twenty_hex_digits(self):
        import re
        made = le.plan_task(task(container("my_app")), {}, OPTIONS)
        assert re.fullmatch(r"ecs-web-1-myapp-[0-9a-f]{20}", made.containers[0].docker_name)


class TestDependencyOrder:
    def test_definition_order_when_nothing_depends(self):
        assert le.dependency_order([container("a"), container("b"), container("c")]) == ["a", "b", "c"]

    def test_dependencies_first(self):
        containers = [container("app", dependsOn=[{"containerName": "db", "condition": "HEALTHY"}],
                                links=["cache:redis"]),
                      container("cache", volumesFrom=[{"sourceContainer": "data"}]),
                      container("db"),
                      container("data")]
        assert le.dependency_order(containers) == ["data", "cache", "db", "app"]

    def test_dependencies_of_implicit_and_explicit(self):
        c = container("app", links=["db:database", "cache"], volumesFrom=[{"sourceContainer": "data"}],
                      dependsOn=[{"containerName": "db", "condition": "HEALTHY"}])
        # dependsOn's condition replaces the implicit START of the link.
        assert le.dependencies_of(c) == {"db": "HEALTHY", "cache": "START", "data": "START"}

    def test_cycle(self):
        with pytest.raises(le.TaskDefinitionError, match="dependencies form a cycle: a -> b -> a"):
            le.dependency_order([container("a", dependsOn=[{"containerName": "b", "condition": "START"}]),
                                 container("b", dependsOn=[{"containerName": "a", "condition": "START"}])])


# ---------------------------------------------------------------------------
# Validation: what ECS refuses, each refusal naming its field
# ---------------------------------------------------------------------------

def dep(name: str, condition: str = "START") -> list[dict]:
    return [{"containerName": name, "condition": condition}]


class TestValidation:
    def test_valid(self):
        le.validate_task_definition(copy.deepcopy(AWSVPC))

    @pytest.mark.parametrize("definition, field, words", [
        ({"family": "web"}, "containerDefinitions", "at least one container"),
        ({"family": "web", "containerDefinitions": []}, "containerDefinitions", "at least one container"),
        ({"containerDefinitions": [container("a")]}, "family", "needs a family"),
        (task(container("a"), family="my app"), "family", "up to 255 letters, digits, _ and -"),
        (task(container("a"), family="x" * 256), "family", "up to 255 letters, digits, _ and -"),
        (task(container("a", essential=False), container("b", essential=False)), "containerDefinitions",
         "at least one container must be essential"),
        (task(container("a"), container("a")), "containerDefinitions[1].name", "'a' is used twice"),
        (task({"image": "busybox"}), "containerDefinitions[0].name", "needs a name"),
        (task(container("a"), {"name": "b"}), "containerDefinitions[1].image", "'b' needs an image"),
        (task(container("a"), networkMode="nat"), "networkMode", "'nat' is not one of"),
        (task(container("a", portMappings=[{"containerPort": 80, "hostPort": 8080}]), networkMode="awsvpc"),
         "containerDefinitions[0].portMappings[0].hostPort", "must equal containerPort (80), not 8080"),
        (task(container("a", portMappings=[{"containerPort": 80}, {"containerPort": 81, "hostPort": 82}]),
              networkMode="host"),
         "containerDefinitions[0].portMappings[1].hostPort", "in host network mode"),
        (task(container("a"), container("b", portMappings=[{"containerPort": 80}]), networkMode="none"),
         "containerDefinitions[1].portMappings", "cannot be specified in none network mode"),
        (task(container("a", dependsOn=dep("nobody"))), "containerDefinitions[0].dependsOn[0].containerName",
         "no container named 'nobody'"),
        (task(container("a", dependsOn=dep("a"))), "containerDefinitions[0].dependsOn[0].containerName",
         "'a' cannot depend on itself"),
        (task(container("a", dependsOn=dep("b")), container("b", dependsOn=dep("a"))),
         "containerDefinitions.dependsOn", "cycle: a -> b -> a"),
        (task(container("a", links=["b"]), container("b", dependsOn=dep("a"))),
         "containerDefinitions.dependsOn", "cycle: a -> b -> a"),
        (task(container("a", volumesFrom=[{"sourceContainer": "b"}]),
              container("b", volumesFrom=[{"sourceContainer": "c"}]), container("c", dependsOn=dep("a"))),
         "containerDefinitions.dependsOn", "cycle: a -> b -> c -> a"),
        (task(container("a", dependsOn=dep("b", "RUNNING")), container("b")),
         "containerDefinitions[0].dependsOn[0].condition", "'RUNNING' is not one of START, COMPLETE, SUCCESS, HEALTHY"),
        (task(container("a", dependsOn=dep("b", "COMPLETE")), container("b")),
         "containerDefinitions[0].dependsOn[0].condition", "COMPLETE cannot be used on essential container 'b'"),
        (task(container("a", dependsOn=dep("b", "SUCCESS")), container("b", essential=True)),
         "containerDefinitions[0].dependsOn[0].condition", "SUCCESS cannot be used on essential container 'b'"),
        (task(container("a", dependsOn=dep("b", "HEALTHY")), container("b")),
         "containerDefinitions[0].dependsOn[0].condition", "HEALTHY needs a healthCheck on container 'b'"),
        (task(container("a", links=["b"]), container("b"), networkMode="awsvpc"),
         "containerDefinitions[0].links", "bridge network mode only, not awsvpc"),
        (task(container("a", links=["b"]), container("b"), networkMode="host"),
         "containerDefinitions[0].links", "not host"),
        (task(container("a", links=["nobody:x"])), "containerDefinitions[0].links", "no container named 'nobody'"),
        (task(container("a", volumesFrom=[{"sourceContainer": "nobody"}])), "containerDefinitions[0].volumesFrom",
         "no container named 'nobody'"),
        (task(container("a", hostname="h"), networkMode="awsvpc"), "containerDefinitions[0].hostname",
         "not supported in awsvpc network mode"),
        (task(container("a", extraHosts=[{"hostname": "h", "ipAddress": "10.0.0.1"}]), networkMode="awsvpc"),
         "containerDefinitions[0].extraHosts", "not supported in awsvpc network mode"),
        (task(container("a", memory=128, memoryReservation=256)), "containerDefinitions[0].memoryReservation",
         "256 MiB is more than the container's memory (128 MiB)"),
        (task(container("a"), cpu="2 vCPUs"), "cpu", "'2 vCPUs' is not CPU units or vCPU"),
        (task(container("a"), memory="lots"), "memory", "'lots' is not MiB or GB"),
        (task(container("a", memory=2048), memory="1 GB"), "containerDefinitions[0].memory",
         "2048 MiB is more than the task's memory (1024 MiB)"),
        (task(container("a", mountPoints=[{"sourceVolume": "data", "containerPath": "/d"}]),
              volumes=[{"name": "other"}]),
         "containerDefinitions[0].mountPoints[0].sourceVolume", "no volume named 'data' in volumes"),
    ])
    def test_refusal_names_the_field(self, definition, field, words):
        message = refusal(definition)
        assert message.startswith(f"{field}: "), message
        assert words in message

    @pytest.mark.parametrize("mode", ["awsvpc", "host"])
    @pytest.mark.parametrize("host_port", [None, 0, 80])
    def test_host_port_equal_to_container_port_or_unset(self, mode, host_port):
        mapping = {"containerPort": 80} if host_port is None else {"containerPort": 80, "hostPort": host_port}
        le.validate_task_definition(task(container("a", portMappings=[mapping]), networkMode=mode))

    def test_bridge_any_host_port_and_links(self):
        le.validate_task_definition(task(container("a", portMappings=[{"containerPort": 80, "hostPort": 8080}],
                                                   links=["b:db"], hostname="a"), container("b")))

    def test_complete_and_success_on_non_essential(self):
        le.validate_task_definition(task(container("a", dependsOn=dep("b", "COMPLETE") + dep("c", "SUCCESS")),
                                         container("b", essential=False), container("c", essential=False)))

    def test_memory_reservation_alone_and_equal(self):
        le.validate_task_definition(task(container("a", memoryReservation=512),
                                         container("b", memory=256, memoryReservation=256), memory="512"))

    def test_plan_task_validates_first(self):
        with pytest.raises(le.TaskDefinitionError, match="^family: "):
            le.plan_task({"containerDefinitions": [container("a")]}, {}, OPTIONS)


# ---------------------------------------------------------------------------
# The plan: identity, holders, containers per network mode
# ---------------------------------------------------------------------------

class TestPlanIdentity:
    def test_identity_from_options_and_definition(self):
        made = plan(AWSVPC)
        identity = made.identity
        task_id = uuid_n(1).replace("-", "")
        assert identity == le.TaskIdentity(
            cluster="arn:aws:ecs:eu-west-1:123456789012:cluster/default",
            arn=f"arn:aws:ecs:eu-west-1:123456789012:task/default/{task_id}",
            family="webapp", revision="7", region="eu-west-1", account="123456789012", task_id=task_id,
            launch_type="EC2", availability_zone="eu-west-1a", service_name=None, network_mode="awsvpc")
        assert made.network_mode == "awsvpc"
        assert made.credentials_id == uuid_n(2)

    def test_defaults(self):
        made = plan(task(container("a")))
        assert made.identity.revision == "1"
        assert made.identity.account == "111111111111"
        assert made.identity.network_mode == "bridge" and made.network_mode == "bridge"
        assert made.identity.launch_type == "EC2"
        assert made.credentials_id is None

    def test_cluster_arn_as_given(self):
        arn = "arn:aws:ecs:us-east-2:210987654321:cluster/dev"
        made = plan(task(container("a")), options=le.RunOptions(cluster=arn, region="eu-west-1"))
        assert made.identity.cluster == arn
        assert made.identity.account == "210987654321"
        assert made.identity.arn.startswith("arn:aws:ecs:eu-west-1:210987654321:task/dev/")

    def test_fargate(self):
        assert plan(task(container("a"), requiresCompatibilities=["FARGATE"])).identity.launch_type == "FARGATE"

    def test_tags_merged_command_line_wins(self):
        made = plan(task(container("a")), {"team": "blue", "cost": "1"},
                    le.RunOptions(cluster="c", region="eu-west-1", tags={"cost": "2"}))
        assert made.tags == {"team": "blue", "cost": "2"}

    def test_images_once_each_holders_too(self):
        made = plan(task(container("a"), container("b", image="nginx"), container("c")),
                    options=le.RunOptions(cluster="c", region="r", pause_image=PAUSE_IMAGE))
        assert made.images() == [PAUSE_IMAGE, "busybox", "nginx"]


class TestAwsvpcPlan:
    @pytest.fixture(scope="class")
    def made(self):
        return le.plan_task(copy.deepcopy(AWSVPC), {}, le.RunOptions(
            cluster="default", region="eu-west-1", publish_address="0.0.0.0", pause_image=PAUSE_IMAGE),
            **counters())

    def test_one_pause_holder(self, made):
        assert len(made.holders) == 1
        pause = made.holders[0]
        # random_hex: init, web, app, then the pause container.
        assert pause.name == "~internal~ecs~pause"
        assert pause.docker_name == f"ecs-webapp-7-internalecspause-{hex_n(4)}"
        assert pause.is_holder and pause.essential
        assert pause.endpoint_id == ""

    def test_pause_publishes_the_ports_on_the_publish_address(self, made):
        body = made.holders[0].body
        assert body["Image"] == PAUSE_IMAGE
        assert body["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
        assert body["HostConfig"]["PortBindings"] == {
            "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}],
            "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "53"}]}
        assert body["HostConfig"]["NetworkMode"] == "bridge"

    def test_pause_holds_the_network_sysctls(self, made):
        assert made.holders[0].body["HostConfig"]["Sysctls"] == {"net.core.somaxconn": "1024"}
        assert made.container("web").body["HostConfig"]["Sysctls"] == {"kernel.msgmax": "65536"}

    def test_pause_labels(self, made):
        assert made.holders[0].body["Labels"] == {
            **le.ecs_labels(made.identity, "~internal~ecs~pause"), le.NETNS_LABEL: "~internal~ecs~pause"}
        assert made.holders[0].body["HostConfig"]["LogConfig"] == {"Type": "none"}

    def test_containers_in_dependency_order_join_the_pause(self, made):
        pause = made.holders[0].docker_name
        assert [c.name for c in made.containers] == ["init", "web", "app"]
        for n, planned in enumerate(made.containers, 1):
            assert planned.docker_name == f"ecs-webapp-7-{planned.name}-{hex_n(n)}"
            assert planned.holder == pause
            assert planned.body["HostConfig"]["NetworkMode"] == f"container:{pause}"
            for key in ("ExposedPorts", "Hostname"):
                assert key not in planned.body
            for key in ("PortBindings", "Dns", "DnsSearch", "ExtraHosts", "Links"):
                assert key not in planned.body["HostConfig"]

    def test_endpoint_ids_and_dependencies(self, made):
        # new_id: the task ID, the credentials ID, then one endpoint ID per container.
        assert [c.endpoint_id for c in made.containers] == [uuid_n(3), uuid_n(4), uuid_n(5)]
        assert [c.depends_on for c in made.containers] == [{}, {"init": "SUCCESS"}, {"web": "HEALTHY"}]
        assert [c.essential for c in made.containers] == [False, True, True]
        assert made.container("web").definition == AWSVPC["containerDefinitions"][1]


class TestBridgePlan:
    DEFINITION = task(
        container("db", portMappings=[{"containerPort": 5432}, {"containerPort": 9000, "hostPort": 0}],
                  hostname="database", dnsServers=["10.0.0.2"], dnsSearchDomains=["corp"],
                  extraHosts=[{"hostname": "gw", "ipAddress": "10.0.0.1"}],
                  systemControls=[{"namespace": "net.ipv4.ip_forward", "value": "1"}]),
        container("app", portMappings=[{"containerPort": 80, "hostPort": 8080}], links=["db:database", "db"]),
        networkMode="bridge")

    @pytest.fixture(scope="class")
    def made(self):
        return plan(self.DEFINITION)

    def test_one_holder_per_container(self, made):
        assert [(h.name, h.docker_name) for h in made.holders] == [
            ("db netns", f"ecs-web-1-db-{hex_n(1)}-netns"), ("app netns", f"ecs-web-1-app-{hex_n(2)}-netns")]
        assert [c.holder for c in made.containers] == [h.docker_name for h in made.holders]
        for planned in made.containers:
            assert planned.body["HostConfig"]["NetworkMode"] == f"container:{planned.holder}"

    def test_ephemeral_host_ports(self, made):
        assert made.holders[0].body["HostConfig"]["PortBindings"] == {
            "5432/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}],
            "9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
        assert made.holders[1].body["HostConfig"]["PortBindings"] == {
            "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}

    def test_network_settings_on_the_holder(self, made):
        holder = made.holders[0].body
        assert holder["Hostname"] == "database"
        assert holder["HostConfig"]["Dns"] == ["10.0.0.2"]
        assert holder["HostConfig"]["DnsSearch"] == ["corp"]
        assert holder["HostConfig"]["ExtraHosts"] == ["gw:10.0.0.1"]
        assert holder["HostConfig"]["Sysctls"] == {"net.ipv4.ip_forward": "1"}
        assert holder["HostConfig"]["NetworkMode"] == "bridge"
        db = made.container("db").body
        assert "Hostname" not in db and "Dns" not in db["HostConfig"]
        assert db["HostConfig"]["Sysctls"] == {}

    def test_links_recorded_on_the_holder(self, made):
        assert made.holders[0].links == {}
        assert made.holders[1].links == {"database": "db", "db": "db"}
        assert le.links_of(container("x", links=["a:b", "c"])) == {"b": "a", "c": "c"}
        assert made.container("app").depends_on == {"db": "START"}


class TestHostPlan:
    def test_no_holder_network_settings_on_the_container(self):
        made = plan(task(container("a", hostname="box", dnsServers=["1.1.1.1"], dnsSearchDomains=["corp"],
                                   extraHosts=[{"hostname": "gw", "ipAddress": "10.0.0.1"}],
                                   portMappings=[{"containerPort": 80}],
                                   systemControls=[{"namespace": "net.core.somaxconn", "value": "511"}]),
                         networkMode="host"))
        assert made.holders == ()
        planned = made.containers[0]
        assert planned.holder is None
        body = planned.body
        assert body["HostConfig"]["NetworkMode"] == "host"
        assert body["Hostname"] == "box"
        assert body["HostConfig"]["Dns"] == ["1.1.1.1"]
        assert body["HostConfig"]["DnsSearch"] == ["corp"]
        assert body["HostConfig"]["ExtraHosts"] == ["gw:10.0.0.1"]
        assert body["HostConfig"]["Sysctls"] == {"net.core.somaxconn": "511"}
        assert "PortBindings" not in body["HostConfig"]


class TestNonePlan:
    def test_holder_without_network(self):
        made = plan(task(container("a"), container("b"), networkMode="none"))
        assert [h.body["HostConfig"]["NetworkMode"] for h in made.holders] == ["none", "none"]
        assert [c.body["HostConfig"]["NetworkMode"] for c in made.containers] == [
            f"container:{h.docker_name}" for h in made.holders]


# ---------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------

class TestEnvironment:
    def test_agent_variables_in_order(self):
        made = plan(AWSVPC)
        web = made.container("web")
        assert web.body["Env"] == [
            f"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{uuid_n(2)}",
            f"ECS_CONTAINER_METADATA_URI=http://169.254.170.2/v3/{uuid_n(4)}",
            f"ECS_CONTAINER_METADATA_URI_V4=http://169.254.170.2/v4/{uuid_n(4)}",
            f"ECS_AGENT_URI=http://169.254.170.2/api/{uuid_n(4)}",
            "AWS_EXECUTION_ENV=AWS_ECS_EC2",
            "AWS_DEFAULT_REGION=eu-west-1",
            "AWS_REGION=eu-west-1",
        ]
        assert web.agent_region

    def test_holders_get_none_of_them(self):
        made = plan(AWSVPC)
        assert "Env" not in made.holders[0].body

    def test_no_credentials_uri_without_a_task_role(self):
        made = plan(task(container("a")))
        assert "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" not in env_of(made.containers[0].body)

    def test_fargate_execution_env(self):
        made = plan(task(container("a"), requiresCompatibilities=["FARGATE"], networkMode="awsvpc"))
        assert env_of(made.containers[0].body)["AWS_EXECUTION_ENV"] == "AWS_ECS_FARGATE"

    def test_agent_environment(self):
        identity = plan(task(container("a"))).identity
        assert le.agent_environment(identity, "E", "C") == {
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/C",
            "ECS_CONTAINER_METADATA_URI": "http://169.254.170.2/v3/E",
            "ECS_CONTAINER_METADATA_URI_V4": "http://169.254.170.2/v4/E",
            "ECS_AGENT_URI": "http://169.254.170.2/api/E",
            "AWS_EXECUTION_ENV": "AWS_ECS_EC2"}

    def test_env_file_then_environment_which_wins(self):
        options = le.RunOptions(cluster="c", region="eu-west-1", env_file={"A": "file", "B": "file"})
        made = plan(task(container("a", environment=[{"name": "B", "value": "def"}, {"name": "N", "value": 3}])),
                    options=options)
        env = made.containers[0].body["Env"]
        assert env[-3:] == ["A=file", "B=def", "N=3"]
        assert le.given_environment(made.containers[0].definition, options) == {"A": "file", "B": "def", "N": "3"}

    @pytest.mark.parametrize("where", ["environment", "env_file"])
    @pytest.mark.parametrize("variable", ["AWS_REGION", "AWS_DEFAULT_REGION"])
    def test_region_variables_left_out_when_either_is_given(self, where, variable):
        given = {variable: "us-west-1"}
        definition = task(container("a", environment=[{"name": variable, "value": "us-west-1"}]
                                    if where == "environment" else []))
        options = le.RunOptions(cluster="c", region="eu-west-1", env_file=given if where == "env_file" else {})
        planned = plan(definition, options=options).containers[0]
        env = env_of(planned.body)
        assert env[variable] == "us-west-1"
        other = ({"AWS_REGION", "AWS_DEFAULT_REGION"} - {variable}).pop()
        assert other not in env
        assert not planned.agent_region

    # task.go initializeCredentialsEndpoint and container.go Inject{V3,V4}MetadataEndpoint /
    # InjectV1AgentAPIEndpoint set these on the container's environment, over any value the task
    # definition gives; environment files only fill what is unset (MergeEnvironmentVariablesFromEnvfiles).
    @pytest.mark.parametrize("variable", ["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "ECS_CONTAINER_METADATA_URI",
                                          "ECS_CONTAINER_METADATA_URI_V4", "ECS_AGENT_URI"])
    @pytest.mark.parametrize("where", ["environment", "env_file"])
    def test_agent_variables_win_over_given_ones(self, variable, where):
        definition = copy.deepcopy(AWSVPC)
        if where == "environment":
            definition["containerDefinitions"][2]["environment"] = [{"name": variable, "value": "http://mine"}]
        options = le.RunOptions(cluster="default", region="eu-west-1",
                                env_file={variable: "http://mine"} if where == "env_file" else {})
        env = env_of(plan(definition, options=options).container("app").body)
        expected = {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": f"/v2/credentials/{uuid_n(2)}",
                    "ECS_CONTAINER_METADATA_URI": f"http://169.254.170.2/v3/{uuid_n(5)}",
                    "ECS_CONTAINER_METADATA_URI_V4": f"http://169.254.170.2/v4/{uuid_n(5)}",
                    "ECS_AGENT_URI": f"http://169.254.170.2/api/{uuid_n(5)}"}
        assert env[variable] == expected[variable]


# ---------------------------------------------------------------------------
# The container's create body
# ---------------------------------------------------------------------------

def body_of(definition_container: dict, mode: str = "awsvpc", **task_fields) -> dict:
    return plan(task(definition_container, networkMode=mode, **task_fields)).containers[0].body


class TestContainerBody:
    def test_labels_agent_labels_win(self):
        made = plan(task(container("a", dockerLabels={"team": "blue", "com.amazonaws.ecs.cluster": "mine",
                                                      "com.amazonaws.ecs.container-name": "other"})))
        identity = made.identity
        assert made.containers[0].body["Labels"] == {
            "team": "blue",
            "com.amazonaws.ecs.cluster": identity.cluster,
            "com.amazonaws.ecs.container-name": "a",
            "com.amazonaws.ecs.task-arn": identity.arn,
            "com.amazonaws.ecs.task-definition-family": "web",
            "com.amazonaws.ecs.task-definition-version": "1"}

    @pytest.mark.parametrize("cpu, shares", [(None, 2), (0, 2), (1, 2), (2, 2), (256, 256), (262144, 262144),
                                             (300000, 262144)])
    def test_cpu_shares(self, cpu, shares):
        fields = {} if cpu is None else {"cpu": cpu}
        assert body_of(container("a", **fields))["HostConfig"]["CpuShares"] == shares

    @pytest.mark.parametrize("memory, limit", [(1, 4), (3, 4), (4, 4), (512, 512)])
    def test_memory_floor(self, memory, limit):
        assert body_of(container("a", memory=memory))["HostConfig"]["Memory"] == limit * 1024 * 1024

    def test_no_memory(self):
        host_config = body_of(container("a"))["HostConfig"]
        for key in ("Memory", "MemorySwap", "MemorySwappiness", "MemoryReservation"):
            assert key not in host_config

    def test_memory_reservation(self):
        assert body_of(container("a", memoryReservation=64))["HostConfig"]["MemoryReservation"] == 64 << 20

    def test_swap(self):
        host_config = body_of(container("a", memory=256, linuxParameters={"maxSwap": 512, "swappiness": 10}))[
            "HostConfig"]
        assert host_config["MemorySwap"] == (256 + 512) << 20
        assert host_config["MemorySwappiness"] == 10
        host_config = body_of(container("a", memory=256, linuxParameters={"maxSwap": 0}))["HostConfig"]
        assert host_config["MemorySwap"] == 256 << 20
        assert host_config["MemorySwappiness"] == 60

    def test_swappiness_ignored_without_max_swap(self):
        host_config = body_of(container("a", memory=256, linuxParameters={"swappiness": 10}))["HostConfig"]
        assert "MemorySwap" not in host_config and "MemorySwappiness" not in host_config

    def test_ulimits_privileged_readonly(self):
        host_config = body_of(container("a", ulimits=[{"name": "nofile", "softLimit": 1024, "hardLimit": 4096}],
                                        privileged=True, readonlyRootFilesystem=True))["HostConfig"]
        assert host_config["Ulimits"] == [{"Name": "nofile", "Soft": 1024, "Hard": 4096}]
        assert host_config["Privileged"] is True
        assert host_config["ReadonlyRootfs"] is True
        plain = body_of(container("a"))["HostConfig"]
        assert plain["Privileged"] is False and plain["ReadonlyRootfs"] is False and plain["Ulimits"] == []

    def test_linux_parameters(self):
        linux = {"capabilities": {"add": ["NET_ADMIN", "SYS_TIME"], "drop": ["MKNOD"]},
                 "devices": [{"hostPath": "/dev/fuse"},
                             {"hostPath": "/dev/sda", "containerPath": "/dev/xvda", "permissions": ["read"]}],
                 "initProcessEnabled": True, "sharedMemorySize": 128,
                 "tmpfs": [{"containerPath": "/run", "size": 64},
                           {"containerPath": "/tmp", "size": 32, "mountOptions": ["noexec", "nosuid"]}]}
        host_config = body_of(container("a", linuxParameters=linux))["HostConfig"]
        assert host_config["CapAdd"] == ["NET_ADMIN", "SYS_TIME"]
        assert host_config["CapDrop"] == ["MKNOD"]
        assert host_config["Devices"] == [
            {"PathOnHost": "/dev/fuse", "PathInContainer": "/dev/fuse", "CgroupPermissions": "rwm"},
            {"PathOnHost": "/dev/sda", "PathInContainer": "/dev/xvda", "CgroupPermissions": "r"}]
        assert host_config["Init"] is True
        assert host_config["ShmSize"] == 128 << 20
        assert host_config["Tmpfs"] == {"/run": "size=64m", "/tmp": "size=32m,noexec,nosuid"}

    def test_no_init_no_shm_by_default(self):
        host_config = body_of(container("a"))["HostConfig"]
        assert "Init" not in host_config and "ShmSize" not in host_config

    def test_health_check_defaults_in_nanoseconds(self):
        body = body_of(container("a", healthCheck={"command": ["CMD", "true"]}))
        assert body["Healthcheck"] == {"Test": ["CMD", "true"], "Interval": 30_000_000_000,
                                       "Timeout": 5_000_000_000, "Retries": 3, "StartPeriod": 0}
        assert le.health_check_body({"command": ["CMD-SHELL", "x"], "interval": 5, "timeout": 2, "retries": 1,
                                     "startPeriod": 10}) == {
            "Test": ["CMD-SHELL", "x"], "Interval": 5_000_000_000, "Timeout": 2_000_000_000, "Retries": 1,
            "StartPeriod": 10_000_000_000}
        assert "Healthcheck" not in body_of(container("a"))

    @pytest.mark.parametrize("given, timeout", [(None, 30), (0, 30), (2, 2), (120, 120)])
    def test_stop_timeout(self, given, timeout):
        fields = {} if given is None else {"stopTimeout": given}
        made = plan(task(container("a", **fields)))
        assert made.containers[0].body["StopTimeout"] == timeout
        assert made.containers[0].stop_timeout == timeout

    def test_start_timeout(self):
        assert plan(task(container("a", startTimeout=9))).containers[0].start_timeout == 9
        assert plan(task(container("a"))).containers[0].start_timeout is None

    def test_command_entrypoint_user_workdir_tty(self):
        body = body_of(container("a", entryPoint=["/bin/sh", "-c"], command=["echo hi"], user="1000:1000",
                                 workingDirectory="/srv", interactive=True, pseudoTerminal=True))
        assert (body["Entrypoint"], body["Cmd"], body["User"], body["WorkingDir"], body["OpenStdin"],
                body["Tty"]) == (["/bin/sh", "-c"], ["echo hi"], "1000:1000", "/srv", True, True)
        plain = body_of(container("a"))
        for key in ("Entrypoint", "Cmd", "User", "WorkingDir", "OpenStdin", "Tty"):
            assert key not in plain
        assert plain["Image"] == "busybox"


class TestVolumes:
    DEFINITION = task(
        container("a", mountPoints=[{"sourceVolume": "host", "containerPath": "/h", "readOnly": True},
                                    {"sourceVolume": "scratch", "containerPath": "/s"},
                                    {"sourceVolume": "cache", "containerPath": "/c"},
                                    {"sourceVolume": "shared", "containerPath": "/sh"},
                                    {"sourceVolume": "efs", "containerPath": "/e"}]),
        container("b", volumesFrom=[{"sourceContainer": "a", "readOnly": True}]),
        container("c", volumesFrom=[{"sourceContainer": "a"}]),
        volumes=[{"name": "host", "host": {"sourcePath": "/srv/data"}},
                 {"name": "scratch"},
                 {"name": "cache", "dockerVolumeConfiguration": {
                     "scope": "task", "driver": "local", "driverOpts": {"type": "tmpfs", "device": "tmpfs"},
                     "labels": {"purpose": "cache"}}},
                 {"name": "shared", "dockerVolumeConfiguration": {"scope": "shared", "autoprovision": True}},
                 {"name": "efs", "efsVolumeConfiguration": {"fileSystemId": "fs-1"}}],
        networkMode="awsvpc")

    @pytest.fixture(scope="class")
    def made(self):
        return plan(self.DEFINITION)

    def test_task_scoped_volumes_named_like_containers(self, made):
        arn = made.identity.arn
        assert made.volumes == (
            (f"ecs-web-1-scratch-{hex_n(1)}", {"Name": f"ecs-web-1-scratch-{hex_n(1)}", "Driver": "local",
                                               "DriverOpts": {}, "Labels": {"com.amazonaws.ecs.task-arn": arn}}),
            (f"ecs-web-1-cache-{hex_n(2)}", {"Name": f"ecs-web-1-cache-{hex_n(2)}", "Driver": "local",
                                             "DriverOpts": {"type": "tmpfs", "device": "tmpfs"},
                                             "Labels": {"purpose": "cache", "com.amazonaws.ecs.task-arn": arn}}),
            (f"ecs-web-1-efs-{hex_n(3)}", {"Name": f"ecs-web-1-efs-{hex_n(3)}", "Driver": "local",
                                           "DriverOpts": {}, "Labels": {"com.amazonaws.ecs.task-arn": arn}}),
        )

    def test_binds(self, made):
        assert made.container("a").body["HostConfig"]["Binds"] == [
            "/srv/data:/h:ro", f"ecs-web-1-scratch-{hex_n(1)}:/s", f"ecs-web-1-cache-{hex_n(2)}:/c",
            "shared:/sh", f"ecs-web-1-efs-{hex_n(3)}:/e"]

    def test_efs_warning(self, made):
        assert made.warnings == ("volume efs: efsVolumeConfiguration cannot be mounted here; a local volume "
                                 "stands in for it",)

    def test_volumes_from(self, made):
        a = made.container("a").docker_name
        assert made.container("b").body["HostConfig"]["VolumesFrom"] == [f"{a}:ro"]
        assert made.container("c").body["HostConfig"]["VolumesFrom"] == [a]
        assert made.container("b").depends_on == {"a": "START"}


class TestLogConfiguration:
    @pytest.mark.parametrize("driver", ["json-file", "local", "none"])
    def test_local_drivers_kept(self, driver):
        made = plan(task(container("a", logConfiguration={"logDriver": driver, "options": {"max-size": "1m"}})))
        assert made.containers[0].body["HostConfig"]["LogConfig"] == {"Type": driver, "Config": {"max-size": "1m"}}
        assert made.warnings == ()

    def test_awslogs_becomes_json_file_with_one_warning(self):
        made = plan(task(container("a", logConfiguration={"logDriver": "awslogs", "options": {
            "awslogs-group": "/ecs/web", "awslogs-region": "eu-west-1"}})))
        assert made.containers[0].body["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {}}
        assert made.warnings == ("container a: log driver awslogs sends logs off this machine; they are kept "
                                 "locally (json-file) and shown here instead",)

    def test_default(self):
        assert body_of(container("a"))["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {}}


# ---------------------------------------------------------------------------
# The runner's state: verdicts, statuses, what the endpoints list
# ---------------------------------------------------------------------------

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def run_of(known: str = "NONE", exit_code: int | None = None, health: str | None = None,
           started: datetime | None = None, start_timeout: int | None = None, reason: str = "") -> le.ContainerRun:
    state: dict = {"Status": {"STOPPED": "exited", "RUNNING": "running", "CREATED": "created"}.get(known, "")}
    if exit_code is not None:
        state["ExitCode"] = exit_code
    if health:
        state["Health"] = {"Status": health, "Log": []}
    if started:
        state["StartedAt"] = stamp(started)
    planned = le.PlannedContainer(name="dep", docker_name="ecs-web-1-dep-" + "0" * 20, body={},
                                  start_timeout=start_timeout, definition={"name": "dep"})
    inspect = {"Id": "d" * 64, "State": state} if known != "NONE" and not reason else None
    return le.ContainerRun(planned, inspect=inspect, known=known, reason=reason)


class TestDependencyVerdict:
    @pytest.mark.parametrize("condition, run, verdict", [
        ("START", run_of("PULLED"), "wait"),
        ("START", run_of("CREATED"), "wait"),
        ("START", run_of("RUNNING"), "met"),
        ("START", run_of("STOPPED", 1), "met"),
        ("COMPLETE", run_of("RUNNING"), "wait"),
        ("COMPLETE", run_of("STOPPED", 0), "met"),
        ("COMPLETE", run_of("STOPPED", 2), "met"),
        ("SUCCESS", run_of("RUNNING"), "wait"),
        ("SUCCESS", run_of("STOPPED", 0), "met"),
        ("HEALTHY", run_of("RUNNING", health="starting"), "wait"),
        ("HEALTHY", run_of("RUNNING", health="unhealthy"), "wait"),
        ("HEALTHY", run_of("RUNNING", health="healthy"), "met"),
        ("HEALTHY", run_of("CREATED"), "wait"),
    ])
    def test_verdict(self, condition, run, verdict):
        assert le.dependency_verdict(condition, run, NOW) == (verdict, "")

    def test_success_failed(self):
        assert le.dependency_verdict("SUCCESS", run_of("STOPPED", 3), NOW) == (
            "failed", "dependency graph: container dep exited with code 3, not 0")

    def test_healthy_stopped_before_healthy(self):
        assert le.dependency_verdict("HEALTHY", run_of("STOPPED", 0, health="starting"), NOW) == (
            "failed", "dependency graph: container dep stopped before it was healthy")

    @pytest.mark.parametrize("condition", ["START", "COMPLETE", "SUCCESS", "HEALTHY"])
    def test_dependency_that_never_started(self, condition):
        run = run_of("STOPPED", reason="CannotStartContainerError: no such image")
        assert run.exit_code == le.DEPENDENCY_EXIT_CODE == 143
        assert le.dependency_verdict(condition, run, NOW) == (
            "failed", "dependency graph: container dep did not start: CannotStartContainerError: no such image")

    @pytest.mark.parametrize("condition", ["COMPLETE", "SUCCESS", "HEALTHY"])
    def test_start_timeout_from_the_dependency_start(self, condition):
        health = "starting" if condition == "HEALTHY" else None
        late = run_of("RUNNING", health=health, started=NOW - timedelta(seconds=11), start_timeout=10)
        assert le.dependency_verdict(condition, late, NOW) == (
            "failed", f"dependency graph: container dep did not reach {condition} within its startTimeout of 10 s")
        in_time = run_of("RUNNING", health=health, started=NOW - timedelta(seconds=9), start_timeout=10)
        assert le.dependency_verdict(condition, in_time, NOW) == ("wait", "")

    def test_start_has_no_timeout_and_unset_waits_forever(self):
        assert le.dependency_verdict("START", run_of("CREATED", started=NOW - timedelta(hours=1),
                                                     start_timeout=1), NOW) == ("wait", "")
        assert le.dependency_verdict("SUCCESS", run_of("RUNNING", started=NOW - timedelta(days=1)), NOW) == (
            "wait", "")

    def test_not_started_yet_never_times_out(self):
        assert le.dependency_verdict("HEALTHY", run_of("PULLED", start_timeout=1), NOW) == ("wait", "")


def inspect_of(planned: le.PlannedContainer, status: str = "running", exit_code: int = 0, health: str | None = None,
               networks: dict | None = None, pid: int = 4242) -> dict:
    """docker inspect of a planned container, as the engine would give it."""
    docker_id = (planned.docker_name.encode().hex() * 4)[:64]
    state = {"Status": status, "Running": status == "running", "ExitCode": exit_code, "Pid": pid,
             "StartedAt": "2026-01-02T03:04:05.123456789Z",
             "FinishedAt": "2026-01-02T03:05:00Z" if status == "exited" else "0001-01-01T00:00:00Z"}
    if health:
        state["Health"] = {"Status": health, "Log": [{"Start": "2026-01-02T03:04:06Z", "End": "2026-01-02T03:04:07Z",
                                                      "ExitCode": 0, "Output": ""}]}
    body = planned.body
    return {
        "Id": docker_id, "Name": f"/{planned.docker_name}", "Created": "2026-01-02T03:04:04.5Z",
        "Image": "sha256:" + "1" * 64, "State": state,
        "Config": {"Image": body["Image"], "Labels": body.get("Labels") or {}, "Env": body.get("Env") or [],
                   "Hostname": "abc"},
        "HostConfig": {**body["HostConfig"], "RestartPolicy": {"Name": "no"}},
        "NetworkSettings": {"Networks": networks if networks is not None else {}, "Ports": {}},
        "Mounts": [],
    }


BRIDGE_NETWORK = {"bridge": {"IPAddress": "172.17.0.5", "IPPrefixLen": 16, "Gateway": "172.17.0.1",
                             "MacAddress": "02:42:ac:11:00:05"}}


def started_task(definition: dict, statuses: dict[str, str] | None = None) -> le.TaskRun:
    """A TaskRun whose containers and holders all have an inspect (running unless told)."""
    made = plan(definition)
    run = le.TaskRun(made)
    for holder in made.holders:
        run.update(holder.docker_name, inspect_of(holder, networks=BRIDGE_NETWORK))
    for planned in made.containers:
        status = (statuses or {}).get(planned.name, "running")
        health = "healthy" if planned.definition.get("healthCheck") else None
        run.update(planned.docker_name, inspect_of(planned, status, health=health))
    return run


class TestTaskRun:
    def test_known_status_is_the_least_advanced(self):
        made = plan(AWSVPC)
        run = le.TaskRun(made)
        assert run.known_status() == "NONE"
        for c in run.containers.values():
            run.update(c.planned.docker_name, known="PULLED")
        assert run.known_status() == "PULLED"
        run.update(made.holders[0].docker_name, inspect_of(made.holders[0]))
        run.update(made.container("init").docker_name, inspect_of(made.container("init"), "exited"))
        assert run.known_status() == "PULLED"
        run.update(made.container("web").docker_name, inspect_of(made.container("web"), "created"))
        run.update(made.container("app").docker_name, inspect_of(made.container("app"), "created"))
        assert run.known_status() == "CREATED"
        run.update(made.container("web").docker_name, inspect_of(made.container("web")))
        run.update(made.container("app").docker_name, inspect_of(made.container("app")))
        assert run.known_status() == "RUNNING"
        for name in ("web", "app"):
            run.update(made.container(name).docker_name, inspect_of(made.container(name), "exited"))
        assert run.known_status() == "RUNNING"   # the pause container still runs
        run.update(made.holders[0].docker_name, inspect_of(made.holders[0], "exited"))
        assert run.known_status() == "STOPPED"

    def test_update_keeps_the_reason(self):
        made = plan(AWSVPC)
        run = le.TaskRun(made)
        name = made.container("app").docker_name
        run.update(name, known="STOPPED", reason="why")
        run.update(name, known="STOPPED")
        assert run.containers[name].reason == "why"
        assert run.containers[name].exit_code == 143

    def test_stop(self):
        run = le.TaskRun(plan(AWSVPC))
        assert (run.desired, run.stopped_reason) == ("RUNNING", "")
        run.stop("Essential container in task exited")
        run.stop("Task stopped by user")
        assert (run.desired, run.stopped_reason) == ("STOPPED", "Essential container in task exited")

    def test_pause_listed_for_ec2(self):
        run = started_task(AWSVPC)
        assert [c.planned.name for c in run.visible()] == ["~internal~ecs~pause", "init", "web", "app"]

    def test_pause_hidden_for_fargate(self):
        run = started_task({**AWSVPC, "requiresCompatibilities": ["FARGATE"]})
        assert [c.planned.name for c in run.visible()] == ["init", "web", "app"]

    def test_bridge_holders_never_listed(self):
        run = started_task(TestBridgePlan.DEFINITION)
        assert [c.planned.name for c in run.visible()] == ["db", "app"]

    def test_not_yet_created_not_listed(self):
        made = plan(AWSVPC)
        run = le.TaskRun(made)
        run.update(made.holders[0].docker_name, inspect_of(made.holders[0]))
        assert [c.planned.name for c in run.visible()] == ["~internal~ecs~pause"]

    def test_containers_seen_with_their_holders_network(self):
        run = started_task(AWSVPC)
        web = run.by_name("web")
        seen = run.snapshot.containers[web.docker_id]
        assert seen["NetworkSettings"] == run.by_name("~internal~ecs~pause").inspect["NetworkSettings"]
        assert web.inspect["NetworkSettings"]["Networks"] == {}

    def test_locate_by_endpoint_id(self):
        run = started_task(AWSVPC)
        app = run.by_name("app")
        snapshot, found = run.locate(app.planned.endpoint_id, frozenset())
        assert snapshot is run.snapshot
        assert found["Id"] == app.docker_id
        assert run.planned_for(found) is app.planned

    def test_locate_by_name(self):
        run = started_task(AWSVPC)
        web = run.by_name("web")
        assert run.locate(web.planned.docker_name, frozenset())[1]["Id"] == web.docker_id

    def test_locate_by_namespace(self):
        run = started_task(TestBridgePlan.DEFINITION)
        assert run.locate(None, frozenset({"db"}))[1]["Id"] == run.by_name("db").docker_id
        with pytest.raises(le.ApiError) as caught:
            started_task(AWSVPC).locate(None, frozenset({"init", "web", "app"}))
        assert (caught.value.status, caught.value.code) == (404, "AmbiguousContainer")

    def test_locate_unknown(self):
        with pytest.raises(le.ApiError) as caught:
            started_task(AWSVPC).locate(uuid_n(99), frozenset())
        assert (caught.value.status, caught.value.code) == (404, "ContainerNotFound")

    def test_locate_endpoint_id_before_create(self):
        made = plan(AWSVPC)
        run = le.TaskRun(made)
        with pytest.raises(le.ApiError):
            run.locate(made.container("app").endpoint_id, frozenset())


# ---------------------------------------------------------------------------
# Metadata of a `run` task
# ---------------------------------------------------------------------------

class TestRunContainerMetadata:
    def test_name_desired_type(self):
        run = started_task(AWSVPC)
        app = run.by_name("app")
        doc = le.run_container_metadata(app.inspect, app.planned, "RUNNING", 4, run.plan.identity, None)
        assert doc["Name"] == "app"
        assert doc["DockerName"] == app.planned.docker_name
        assert doc["DesiredStatus"] == "RUNNING"
        assert doc["KnownStatus"] == "RUNNING"
        assert doc["Type"] == "NORMAL"
        assert doc["Labels"]["com.amazonaws.ecs.container-name"] == "app"
        assert doc["LogDriver"] == "json-file"

    def test_desired_status_is_the_tasks(self):
        run = started_task(AWSVPC, {"init": "exited"})
        init = run.by_name("init")
        doc = le.run_container_metadata(init.inspect, init.planned, "RUNNING", 3, run.plan.identity, None)
        assert (doc["DesiredStatus"], doc["KnownStatus"], doc["ExitCode"]) == ("RUNNING", "STOPPED", 0)
        doc = le.run_container_metadata(init.inspect, init.planned, "STOPPED", 3, run.plan.identity, None)
        assert doc["DesiredStatus"] == "STOPPED"

    def test_pause_is_cni_pause(self):
        run = started_task(AWSVPC)
        pause = run.by_name("~internal~ecs~pause")
        doc = le.run_container_metadata(pause.inspect, pause.planned, "RUNNING", 4, run.plan.identity, None)
        assert doc["Name"] == "~internal~ecs~pause"
        assert doc["Type"] == "CNI_PAUSE"
        # The agent's pause container, as ECS's documentation shows it (task metadata v3 examples).
        assert (doc["DesiredStatus"], doc["KnownStatus"]) == ("RESOURCES_PROVISIONED", "RESOURCES_PROVISIONED")
        assert doc["Limits"] == {"CPU": 0, "Memory": 0}

    def test_pause_when_the_task_stops(self):
        run = started_task(AWSVPC)
        pause = run.by_name("~internal~ecs~pause")
        doc = le.run_container_metadata(pause.inspect, pause.planned, "STOPPED", 4, run.plan.identity, None)
        assert (doc["DesiredStatus"], doc["KnownStatus"]) == ("STOPPED", "RESOURCES_PROVISIONED")
        stopped = inspect_of(pause.planned, "exited")
        doc = le.run_container_metadata(stopped, pause.planned, "STOPPED", 4, run.plan.identity, None)
        assert (doc["DesiredStatus"], doc["KnownStatus"]) == ("STOPPED", "STOPPED")

    def test_log_driver_from_the_task_definition_at_v4_only(self):
        definition = copy.deepcopy(AWSVPC)
        options = {"awslogs-group": "/ecs/webapp", "awslogs-region": "eu-west-1"}
        definition["containerDefinitions"][2]["logConfiguration"] = {"logDriver": "awslogs", "options": options}
        run = started_task(definition)
        app = run.by_name("app")
        assert app.inspect["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {}}
        v4 = le.run_container_metadata(app.inspect, app.planned, "RUNNING", 4, run.plan.identity, None)
        assert (v4["LogDriver"], v4["LogOptions"]) == ("awslogs", options)
        v3 = le.run_container_metadata(app.inspect, app.planned, "RUNNING", 3, run.plan.identity, None)
        assert "LogDriver" not in v3 and "LogOptions" not in v3

    def test_log_driver_without_options_drops_the_local_ones(self):
        definition = copy.deepcopy(AWSVPC)
        definition["containerDefinitions"][2]["logConfiguration"] = {"logDriver": "json-file"}
        run = started_task(definition)
        app = run.by_name("app")
        app.inspect["HostConfig"]["LogConfig"] = {"Type": "json-file", "Config": {"max-size": "10m"}}
        doc = le.run_container_metadata(app.inspect, app.planned, "RUNNING", 4, run.plan.identity, None)
        assert doc["LogDriver"] == "json-file" and "LogOptions" not in doc

    def test_networks_in_the_tasks_mode(self):
        run = started_task(AWSVPC)
        web = run.by_name("web")
        seen = run.snapshot.containers[web.docker_id]
        doc = le.run_container_metadata(seen, web.planned, "RUNNING", 4, run.plan.identity, None)
        assert doc["Networks"][0]["NetworkMode"] == "awsvpc"
        assert doc["Networks"][0]["IPv4Addresses"] == ["172.17.0.5"]


class TestRunTaskMetadata:
    BASE = {"Cluster": "c", "TaskARN": "a", "Family": "webapp", "Revision": "7", "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING", "Limits": {"CPU": 0.5, "Memory": 100}, "AvailabilityZone": "eu-west-1a",
            "TaskTags": {"from": "config"}, "ContainerInstanceTags": {"x": "y"}, "LaunchType": "EC2",
            "FaultInjectionEnabled": False}

    def test_statuses_and_limits_from_the_task(self):
        run = started_task(AWSVPC)
        run.stop("Task stopped by user")
        doc = le.run_task_metadata(dict(self.BASE), run, 4, False)
        assert doc["DesiredStatus"] == "STOPPED"
        assert doc["KnownStatus"] == "RUNNING"
        assert doc["Limits"] == {"CPU": 0.5, "Memory": 1024}
        assert "TaskTags" not in doc and "ContainerInstanceTags" not in doc
        assert doc["FaultInjectionEnabled"] is False

    @pytest.mark.parametrize("cpu, memory, limits", [("1 vCPU", "2048", {"CPU": 1.0, "Memory": 2048}),
                                                     ("256", None, {"CPU": 0.25})])
    def test_limits_forms(self, cpu, memory, limits):
        definition = {**AWSVPC, "cpu": cpu}
        if memory is None:   # planned as Fargate, the one kind the EC2 memory rule leaves alone
            definition.pop("memory")
            definition["requiresCompatibilities"] = ["FARGATE"]
        else:
            definition["memory"] = memory
        doc = le.run_task_metadata(dict(self.BASE), started_task(definition), 4, False)
        assert doc["Limits"] == limits

    def test_task_tags_only_with_tags(self):
        made = plan(AWSVPC, {"team": "blue"})
        run = le.TaskRun(made)
        assert le.run_task_metadata(dict(self.BASE), run, 4, True)["TaskTags"] == {"team": "blue"}
        assert "TaskTags" not in le.run_task_metadata(dict(self.BASE), run, 4, False)
        untagged = le.TaskRun(plan(AWSVPC))
        assert "TaskTags" not in le.run_task_metadata(dict(self.BASE), untagged, 4, True)

    def test_pull_times(self):
        run = le.TaskRun(plan(AWSVPC))
        doc = le.run_task_metadata(dict(self.BASE), run, 4, False)
        assert "PullStartedAt" not in doc and "PullStoppedAt" not in doc
        run.pull_started, run.pull_stopped = "2026-01-02T03:04:05Z", "2026-01-02T03:04:06Z"
        doc = le.run_task_metadata(dict(self.BASE), run, 4, False)
        assert (doc["PullStartedAt"], doc["PullStoppedAt"]) == ("2026-01-02T03:04:05Z", "2026-01-02T03:04:06Z")

    def test_fault_injection_at_v4(self):
        run = le.TaskRun(plan({**AWSVPC, "enableFaultInjection": True}))
        assert le.run_task_metadata(dict(self.BASE), run, 4, False)["FaultInjectionEnabled"] is True
        base = {k: v for k, v in self.BASE.items() if k != "FaultInjectionEnabled"}
        assert "FaultInjectionEnabled" not in le.run_task_metadata(base, run, 3, False)

    def test_base_not_changed(self):
        base = copy.deepcopy(self.BASE)
        le.run_task_metadata(base, started_task(AWSVPC), 4, True)
        assert base == self.BASE


# ---------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------

class TestInterfaceRequest:
    def test_address(self):
        request = le.interface_request(b"lo:ecs", "169.254.170.2")
        assert len(request) == 40
        assert request[:16] == b"lo:ecs" + bytes(10)
        assert struct.unpack("H", request[16:18]) == (socket.AF_INET,)
        assert request[18:20] == bytes(2)                # port
        assert request[20:24] == bytes([169, 254, 170, 2])
        assert request[24:] == bytes(16)

    def test_netmask(self):
        assert le.interface_request(b"lo:ecs", "255.255.255.255")[20:24] == b"\xff" * 4

    def test_flags(self):
        request = le.interface_request(b"lo:ecs", flags=0x49)
        assert len(request) == 40
        assert request[:16] == b"lo:ecs" + bytes(10)
        assert struct.unpack("H", request[16:18]) == (0x49,)
        assert request[18:] == bytes(22)


class TestTrustPolicyAdvice:
    def test_statement_names_the_caller(self):
        advice = le.trust_policy_advice("arn:aws:iam::1:role/app", "arn:aws:iam::1:user/dev")
        assert "let your identity assume arn:aws:iam::1:role/app" in advice
        statement = json.loads(advice[advice.index("{"):])
        assert statement == {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:user/dev"},
                             "Action": "sts:AssumeRole"}

    def test_unknown_caller(self):
        advice = le.trust_policy_advice("arn:aws:iam::1:role/app", None)
        assert json.loads(advice[advice.index("{"):])["Principal"] == {"AWS": "arn:aws:iam::ACCOUNT:user/YOU"}


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

class TestRunArguments:
    def test_defaults(self):
        args = le.parse_run_args(["td.json"])
        assert vars(args) == {"taskdef": "td.json", "cluster": None, "tag": [], "env_file": [],
                              "publish_address": "127.0.0.1", "pause_image": le.DEFAULT_PAUSE_IMAGE,
                              "pull": "missing", "own_identity": False, "dry_run": False}

    def test_everything(self):
        args = le.parse_run_args(["web:3", "--cluster", "dev", "--tag", "a=1", "--tag", "b=2", "--env-file", "x.env",
                                  "--env-file", "y.env", "--publish-address", "0.0.0.0", "--pause-image", "p:1",
                                  "--pull", "never", "--own-identity", "--dry-run"])
        assert vars(args) == {"taskdef": "web:3", "cluster": "dev", "tag": ["a=1", "b=2"],
                              "env_file": ["x.env", "y.env"], "publish_address": "0.0.0.0", "pause_image": "p:1",
                              "pull": "never", "own_identity": True, "dry_run": True}

    def test_taskdef_required(self, capsys):
        with pytest.raises(SystemExit) as caught:
            le.parse_run_args([])
        assert caught.value.code == 2
        assert "taskdef" in capsys.readouterr().err

    @pytest.mark.parametrize("name", ["web", "web:3", "my_app-2",
                                      "arn:aws:ecs:eu-west-1:123456789012:task-definition/web:3"])
    def test_task_definition_names(self, name):
        assert le.TASK_DEFINITION_NAME.fullmatch(name)

    @pytest.mark.parametrize("name", ["web:latest", "./td.json", "a b", "arn:aws:ecs:eu-west-1:1:task-definition/x"])
    def test_not_task_definition_names(self, name):
        assert not le.TASK_DEFINITION_NAME.fullmatch(name)


def run_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python local_endpoints.py run ...` with nothing of this machine's AWS or Docker setup."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
           "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_DEFAULT_REGION": "eu-west-1",
           "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    return subprocess.run([sys.executable, str(REPO / "local_endpoints.py"), "run", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


class TestRunCommandRefuses:
    @pytest.mark.parametrize("definition, field", [
        (task(container("a", dependsOn=dep("b", "HEALTHY")), container("b")),
         "containerDefinitions[0].dependsOn[0].condition"),
        ({"taskDefinition": task(container("a", hostname="h"), networkMode="awsvpc")},
         "containerDefinitions[0].hostname"),
        (task(container("a", essential=False)), "containerDefinitions"),
        (task(container("a", memory=10), memory="lots"), "memory"),
    ])
    def test_invalid_task_definition_exits_2_naming_the_field(self, tmp_path, definition, field):
        path = tmp_path / "td.json"
        path.write_text(json.dumps(definition))
        done = run_command(tmp_path, str(path))
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"local-endpoints run: {field}: "), done.stderr
        assert done.stdout == ""

    def test_not_json(self, tmp_path):
        (tmp_path / "td.json").write_text("{nope")
        done = run_command(tmp_path, "td.json")
        assert done.returncode == 2
        assert done.stderr.startswith("local-endpoints run: td.json: not JSON: ")

    def test_missing_env_file(self, tmp_path):
        (tmp_path / "td.json").write_text(json.dumps(task(container("a"))))
        done = run_command(tmp_path, "td.json", "--env-file", "missing.env")
        assert done.returncode == 2
        assert done.stderr.strip() == "local-endpoints run: missing.env: No such file or directory"

    def test_neither_file_nor_name(self, tmp_path):
        done = run_command(tmp_path, "./missing.json")
        assert done.returncode == 2
        assert "./missing.json: no such file, and not a family[:revision] or task definition ARN" in done.stderr


# =============================================================================
# What the task definition references outside itself
# =============================================================================

SECRET = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbCdEf"


class TestSecretReference:
    @pytest.mark.parametrize("value_from, service, region, identifier, key, stage, version", [
        ("db_password", "ssm", "us-east-1", "db_password", "", "", ""),
        ("/prod/db/password", "ssm", "us-east-1", "/prod/db/password", "", "", ""),
        ("arn:aws:ssm:eu-west-1:123456789012:parameter/db_password", "ssm", "eu-west-1", "db_password", "", "", ""),
        ("arn:aws:ssm:eu-west-1:123456789012:parameter/prod/db", "ssm", "eu-west-1", "/prod/db", "", "", ""),
        (SECRET, "secretsmanager", "eu-west-1", SECRET, "", "", ""),
        (f"{SECRET}:password::", "secretsmanager", "eu-west-1", SECRET, "password", "", ""),
        (f"{SECRET}::AWSPREVIOUS:", "secretsmanager", "eu-west-1", SECRET, "", "AWSPREVIOUS", ""),
        (f"{SECRET}:::v-1", "secretsmanager", "eu-west-1", SECRET, "", "", "v-1"),
        (f"{SECRET}:user:AWSCURRENT:v-2", "secretsmanager", "eu-west-1", SECRET, "user", "AWSCURRENT", "v-2"),
    ])
    def test_forms_ecs_accepts(self, value_from, service, region, identifier, key, stage, version):
        reference = le.secret_reference(value_from, "us-east-1")
        assert (reference.service, reference.region, reference.identifier, reference.json_key,
                reference.version_stage, reference.version_id) == (service, region, identifier, key, stage, version)

    def test_action_and_resource_name_what_iam_checks(self):
        assert (le.secret_reference("/a/b", "r").action, le.secret_reference("/a/b", "r").resource) == \
            ("ssm:GetParameters", "/a/b")
        assert (le.secret_reference(f"{SECRET}:k::", "r").action, le.secret_reference(f"{SECRET}:k::", "r").resource) \
            == ("secretsmanager:GetSecretValue", SECRET)

    @pytest.mark.parametrize("value_from", ["", "arn:aws:s3:::bucket/key", "arn:aws:kms:eu-west-1:1:key/x"])
    def test_other_arns_are_refused(self, value_from):
        with pytest.raises(ValueError, match="neither an SSM parameter"):
            le.secret_reference(value_from, "r")

    def test_validation_names_the_secret_field(self):
        definition = task(container("a", secrets=[{"name": "X", "valueFrom": "arn:aws:s3:::b/k"}]))
        assert refusal(definition).startswith("containerDefinitions[0].secrets[0].valueFrom: ")
        definition = task(container("a", logConfiguration={"logDriver": "awslogs", "secretOptions": [
            {"name": "k", "valueFrom": ""}]}))
        assert refusal(definition).startswith("containerDefinitions[0].logConfiguration.secretOptions[0].valueFrom")
        definition = task(container("a", repositoryCredentials={"credentialsParameter": "/ssm/param"}))
        assert refusal(definition).startswith("containerDefinitions[0].repositoryCredentials.credentialsParameter")


class TestSecretValue:
    REFERENCE = le.secret_reference(f"{SECRET}:password::", "r")

    def test_whole_string_and_a_json_key(self):
        assert le.secret_value({"SecretString": "s3cret"}, le.secret_reference(SECRET, "r"), "w") == "s3cret"
        assert le.secret_value({"SecretString": '{"password": "p", "port": 5432}'}, self.REFERENCE, "w") == "p"
        port = le.secret_reference(f"{SECRET}:port::", "r")
        assert le.secret_value({"SecretString": '{"port": 5432}'}, port, "w") == "5432"

    @pytest.mark.parametrize("secret, message", [
        ({"SecretString": "text"}, "is not JSON, so it has no key 'password'"),
        ({"SecretString": '{"user": "u"}'}, "has no JSON key 'password'"),
        ({"SecretString": "[1, 2]"}, "has no JSON key 'password'"),
        ({"SecretBinary": b"x"}, "is binary; ECS injects only SecretString"),
    ])
    def test_what_cannot_be_met_names_where(self, secret, message):
        with pytest.raises(ValueError, match=f"^container app, secret P: secret {re.escape(SECRET)} {message}"):
            le.secret_value(secret, self.REFERENCE, "container app, secret P")


class TestEnvironmentFiles:
    def test_sources(self):
        assert le.environment_file_source({"value": "arn:aws:s3:::bucket/dir/a.env", "type": "s3"}) == \
            ("s3", "bucket", "dir/a.env")
        assert le.environment_file_source({"value": "./local.env", "type": "s3"}) == ("file", "./local.env", "")

    @pytest.mark.parametrize("file", [{"value": "arn:aws:s3:::bucket", "type": "s3"}, {"value": "", "type": "s3"},
                                      {"value": "a.env", "type": "ftp"}])
    def test_refused(self, file):
        assert refusal(task(container("a", environmentFiles=[file]))).startswith(
            "containerDefinitions[0].environmentFiles[0]: ")

    def test_precedence_as_the_agent_merges(self):
        body = {"Env": ["ECS_AGENT_URI=http://169.254.170.2/api/x", "FROM_ENVIRONMENT=env", "AWS_REGION=r",
                        "AWS_DEFAULT_REGION=r"]}
        files = [{"A": "first", "FROM_ENVIRONMENT": "file"}, {"A": "second", "B": "second"}]
        secrets = {"FROM_ENVIRONMENT": "secret", "ECS_AGENT_URI": "mine"}
        env = dict(e.split("=", 1) for e in le.complete_environment(body, True, files, secrets, [])["Env"])
        assert env == {"ECS_AGENT_URI": "http://169.254.170.2/api/x", "FROM_ENVIRONMENT": "secret",
                       "AWS_REGION": "r", "AWS_DEFAULT_REGION": "r", "A": "first", "B": "second"}

    def test_a_region_from_a_file_replaces_the_agents(self):
        body = {"Env": ["AWS_REGION=us-east-1", "AWS_DEFAULT_REGION=us-east-1"]}
        env = dict(e.split("=", 1) for e in le.complete_environment(body, True, [{"AWS_REGION": "eu-west-1"}],
                                                                    {}, [])["Env"])
        assert env == {"AWS_REGION": "eu-west-1"}

    @pytest.mark.parametrize("image_env", [["AWS_REGION=us-east-1"], ["PATH=/bin", "AWS_DEFAULT_REGION=x"]])
    def test_an_image_that_sets_a_region_keeps_it(self, image_env):
        body = {"Image": "i", "Env": ["A=1", "AWS_DEFAULT_REGION=eu-west-1", "AWS_REGION=eu-west-1", "B=2"]}
        before = copy.deepcopy(body)
        assert le.complete_environment(body, True, [], {}, image_env) == {"Image": "i", "Env": ["A=1", "B=2"]}
        assert body == before

    def test_the_region_stays_for_an_image_without_one_and_where_the_task_set_it(self):
        body = {"Image": "i", "Env": ["AWS_DEFAULT_REGION=eu-west-1", "AWS_REGION=eu-west-1"]}
        assert le.complete_environment(body, True, [], {}, ["PATH=/bin", "AWS_REGIONS=x"]) == body
        # agent_region False: the task definition set the variables itself; nothing overrides them
        assert le.complete_environment(body, False, [{"AWS_REGION": "x"}], {}, ["AWS_REGION=y"]) == body


class TestRegistries:
    @pytest.mark.parametrize("image, registry", [
        ("busybox", "docker.io"), ("library/busybox:1", "docker.io"), ("localhost/x", "localhost"),
        ("127.0.0.1:5000/le/busybox:1", "127.0.0.1:5000"),
        ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:1", "123456789012.dkr.ecr.eu-west-1.amazonaws.com")])
    def test_registry_of(self, image, registry):
        assert le.registry_of(image) == registry

    def test_registry_auth_is_docker_x_registry_auth(self):
        header = le.registry_auth("user", "pass/word+", "127.0.0.1:5000")
        assert json.loads(base64.urlsafe_b64decode(header)) == {
            "username": "user", "password": "pass/word+", "serveraddress": "127.0.0.1:5000"}

    def test_ecr_token(self):
        token = base64.b64encode(b"AWS:ecr-password").decode()
        header = le.ecr_registry_auth({"authorizationToken": token}, "1.dkr.ecr.r.amazonaws.com")
        assert json.loads(base64.urlsafe_b64decode(header))["password"] == "ecr-password"
        assert le.ECR_REGISTRY.fullmatch("123456789012.dkr.ecr.eu-west-1.amazonaws.com")[1] == "eu-west-1"


class TestDryRun:
    def test_calls_and_masked_bodies(self):
        definition = task(container("a", image="123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:1",
                                    secrets=[{"name": "P", "valueFrom": f"{SECRET}:password::"}],
                                    environmentFiles=[{"value": "arn:aws:s3:::b/x.env", "type": "s3"}]),
                          taskRoleArn="arn:aws:iam::123456789012:role/task",
                          executionRoleArn="arn:aws:iam::123456789012:role/exec")
        made = plan(definition)
        assert le.planned_aws_calls(made, own_identity=False) == [
            "sts:AssumeRole arn:aws:iam::123456789012:role/task (the task role)",
            "sts:AssumeRole arn:aws:iam::123456789012:role/exec (the execution role: the calls below use it)",
            "s3:GetObject b/x.env (container a)",
            f"secretsmanager:GetSecretValue {SECRET} in eu-west-1 (container a, P)",
            "ecr:GetAuthorizationToken in eu-west-1 (image 123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:1)"]
        assert "sts:AssumeRole arn:aws:iam::123456789012:role/exec" not in " ".join(
            le.planned_aws_calls(made, own_identity=True))
        printed = le.dry_run(made, own_identity=False)
        body = next(c for c in printed["containers"] if c["name"] == "a")["body"]
        assert f"P=<secret from {SECRET}:password::>" in body["Env"]

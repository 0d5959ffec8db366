"""`run TASKDEF` against a real Docker Engine and moto (STS, IAM, ECS), with real clients.

Each test runs ``local_endpoints.py run`` as a subprocess, as a user would, and looks at
the task from where its containers stand: botocore's container provider, the AWS CLI and
OpenTelemetry's ECS detector run in a task container's network namespace (nsenter), with
that container's own environment, so their requests reach the endpoints the runner
serves at 169.254.170.2 inside the task.  moto listens on the engine's bridge gateway so
that the AWS CLI there reaches it too.  Every test checks that nothing the task created
is left behind.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest

from testlib import SESSION_ID, RefusingAws, app_waits_for, console_script, get_in_task, in_task

ROLE_NAME = "le-run-task-role"


# =============================================================================
# The three-container awsvpc task, from start to nothing left
# =============================================================================

def three_container_task(role_arn: str) -> dict:
    """An init container that must succeed, a server with a health check, and an app that
    waits for it to be healthy and talks to it on localhost (one awsvpc namespace)."""
    return {
        "networkMode": "awsvpc",
        "taskRoleArn": role_arn,
        "requiresCompatibilities": ["EC2"],
        "cpu": "256", "memory": "512",
        "containerDefinitions": [
            {"name": "init", "image": "busybox", "essential": False,
             "command": ["sh", "-c", "echo preparing; echo hello from init > /shared/greeting"],
             "mountPoints": [{"sourceVolume": "shared", "containerPath": "/shared"}]},
            {"name": "web", "image": "busybox", "cpu": 128, "memory": 64,
             "command": ["sh", "-c", "mkdir -p /www && cp /shared/greeting /www/index.html && "
                                     "exec httpd -f -p 8080 -h /www"],
             "linuxParameters": {"initProcessEnabled": True},
             "mountPoints": [{"sourceVolume": "shared", "containerPath": "/shared", "readOnly": True}],
             "portMappings": [{"containerPort": 8080}],
             "healthCheck": {"command": ["CMD-SHELL", "wget -q -O- http://localhost:8080/ || exit 1"],
                             "interval": 1, "timeout": 2, "retries": 3},
             "dependsOn": [{"containerName": "init", "condition": "SUCCESS"}]},
            {"name": "app", "image": "busybox", "stopTimeout": 2,
             "linuxParameters": {"initProcessEnabled": True},
             "command": app_waits_for("/tmp/done", "wget -q -O- http://localhost:8080/; exit 7"),
             "environment": [{"name": "GREETING", "value": "from the task definition"}],
             "logConfiguration": {"logDriver": "awslogs", "options": {
                 "awslogs-group": "/ecs/le-run", "awslogs-region": "us-east-1", "awslogs-stream-prefix": "app"}},
             "dependsOn": [{"containerName": "web", "condition": "HEALTHY"}]},
        ],
        "volumes": [{"name": "shared"}],
    }


def test_three_container_awsvpc_task_runs_as_on_ecs(run_task, task_moto, docker_engine, tmp_path):
    role = task_moto.create_role(ROLE_NAME)
    audit = tmp_path / "audit.jsonl"
    task = run_task(three_container_task(role), "--tag", "team=payments", env={"ECS_LOCAL_AUDIT_LOG": audit})
    task.wait_for("task RUNNING")
    progress = task.stderr
    # Dependency order: init exits 0 before web is created; web is healthy before app is created.
    assert progress.index("init: exited with code 0") < progress.index("web: created")
    assert progress.index("web: healthy") < progress.index("app: created")
    assert "log driver awslogs sends logs off this machine" in progress

    app = task.container("app")
    env = dict(e.split("=", 1) for e in app["Config"]["Env"])
    endpoint = env["ECS_CONTAINER_METADATA_URI_V4"].rsplit("/", 1)[1]
    assert env["ECS_CONTAINER_METADATA_URI"] == f"http://169.254.170.2/v3/{endpoint}"
    assert env["ECS_AGENT_URI"] == f"http://169.254.170.2/api/{endpoint}"
    assert env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"].startswith("/v2/credentials/")
    assert env["AWS_EXECUTION_ENV"] == "AWS_ECS_EC2" and env["AWS_REGION"] == env["AWS_DEFAULT_REGION"]
    assert env["GREETING"] == "from the task definition"
    assert app["Name"].startswith(f"/ecs-{task.family}-1-app-") and len(app["Name"].rsplit("-", 1)[1]) == 20
    pause = task.container("~internal~ecs~pause")
    assert app["HostConfig"]["NetworkMode"] == f"container:{pause['Id']}"

    # The task role, as the agent's route gives it.
    status, document = get_in_task(task, "app", env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"])
    assert status == 200 and list(document)[:5] == ["RoleArn", "AccessKeyId", "SecretAccessKey", "Token",
                                                    "Expiration"]
    assert document["RoleArn"] == role
    status, refusal = get_in_task(task, "app", "/v2/credentials/not-the-id")
    assert (status, refusal["code"]) == (400, "InvalidIdInRequest")
    assert refusal["message"] == "CredentialsV2Request: Credentials not found"

    # botocore's container provider, and the AWS CLI, inside the task.
    provider = in_task(task, "app", "from botocore.credentials import ContainerProvider; "
                                    "c = ContainerProvider().load(); print(c.get_frozen_credentials().access_key)")
    assert provider.returncode == 0 and provider.stdout.strip() == document["AccessKeyId"], provider.stderr
    cli = in_task(task, "app", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
                  console_script("aws"), "sts", "get-caller-identity", "--endpoint-url", task_moto.url,
                  "--output", "json")
    assert cli.returncode == 0, cli.stderr
    assert f"assumed-role/{ROLE_NAME}/" in json.loads(cli.stdout)["Arn"]

    # The v4 metadata, as the agent's, and OpenTelemetry's ECS detector reading it.
    status, metadata = get_in_task(task, "app", f"/v4/{endpoint}/taskWithTags")
    assert status == 200
    assert metadata["Family"] == task.family and metadata["Revision"] == "1"
    assert re.fullmatch(r"arn:aws:ecs:us-east-1:\d{12}:task/ecs-local-cluster/[0-9a-f]{32}", metadata["TaskARN"])
    assert (metadata["DesiredStatus"], metadata["KnownStatus"], metadata["LaunchType"]) == ("RUNNING", "RUNNING",
                                                                                           "EC2")
    assert metadata["Limits"] == {"CPU": 0.25, "Memory": 512}
    assert metadata["TaskTags"] == {"team": "payments"}
    assert metadata["PullStartedAt"] <= metadata["PullStoppedAt"]
    assert metadata["FaultInjectionEnabled"] is False
    containers = {c["Name"]: c for c in metadata["Containers"]}
    assert set(containers) == {"init", "web", "app", "~internal~ecs~pause"}
    assert containers["~internal~ecs~pause"]["Type"] == "CNI_PAUSE"
    assert containers["init"]["KnownStatus"] == "STOPPED" and containers["init"]["ExitCode"] == 0
    assert containers["web"]["Health"]["status"] == "HEALTHY"
    assert containers["web"]["Limits"] == {"CPU": 128, "Memory": 64}
    assert containers["app"]["LogDriver"] == "awslogs"
    assert containers["app"]["Labels"]["com.amazonaws.ecs.task-arn"] == metadata["TaskARN"]
    network = containers["app"]["Networks"][0]
    assert network["NetworkMode"] == "awsvpc" and network["IPv4Addresses"]
    status, own = get_in_task(task, "app", f"/v4/{endpoint}")
    assert own["Name"] == "app" and own["DockerId"] == app["Id"]
    status, v3 = get_in_task(task, "app", f"/v3/{endpoint}/task")
    assert status == 200 and v3["TaskARN"] == metadata["TaskARN"] and "LaunchType" not in v3
    status, v2 = get_in_task(task, "app", "/v2/metadata")
    assert status == 200 and v2["TaskARN"] == metadata["TaskARN"]
    status, stats = get_in_task(task, "app", f"/v4/{endpoint}/task/stats")
    assert status == 200 and stats[app["Id"]]["cpu_stats"] and "network_rate_stats" in stats[app["Id"]]
    status, own_stats = get_in_task(task, "app", f"/v4/{endpoint}/stats")
    assert status == 200 and own_stats["id"] == app["Id"]

    detector = in_task(task, "app", "from opentelemetry.sdk.extension.aws.resource.ecs import AwsEcsResourceDetector; "
                                    "import json; a = AwsEcsResourceDetector(raise_on_error=True).detect().attributes; "
                                    "print(json.dumps({k: v if isinstance(v, str) else list(v) for k, v in a.items()}))",
                       env={"no_proxy": "*"})
    assert detector.returncode == 0, detector.stderr
    attributes = json.loads(detector.stdout)
    assert attributes["aws.ecs.task.arn"] == metadata["TaskARN"]
    assert attributes["aws.ecs.task.family"] == task.family and attributes["aws.ecs.launchtype"] == "ec2"
    assert attributes["aws.log.group.names"] == ["/ecs/le-run"]

    # The app exits with 7: the task stops, with its exit code, and nothing is left.
    docker_engine.cli("exec", app["Id"], "touch", "/tmp/done")
    assert task.finish() == 7, task.stderr
    assert "task STOPPED: Essential container in task exited" in task.stderr
    assert "app | hello from init" in task.stdout and "init | preparing" in task.stdout
    assert not task.left_behind()
    # The audit trail names the task; the credentials id, a capability, is in no log.
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["route"], r["outcome"], r["task"]) for r in records] == [
        ("/v2/credentials/{id}", "served", metadata["TaskARN"]),
        ("/v2/credentials/{id}", "InvalidIdInRequest", metadata["TaskARN"]),
        ("/v2/credentials/{id}", "served", metadata["TaskARN"]),
        ("/v2/credentials/{id}", "served", metadata["TaskARN"])]
    credentials_id = env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"].rsplit("/", 1)[1]
    assert credentials_id not in audit.read_text() + task.stderr + task.stdout


# =============================================================================
# Failures: a task that cannot start, a crash, Ctrl-C
# =============================================================================

def test_a_missing_image_stops_the_task_before_anything_is_created(run_task):
    task = run_task({"networkMode": "awsvpc", "containerDefinitions": [
        {"name": "app", "image": "le-run-test/no-such-image:1"}]})
    assert task.finish() == 1
    assert "CannotPullContainerError: le-run-test/no-such-image:1" in task.stderr
    assert "app: created" not in task.stderr
    assert not task.left_behind()


def test_a_refused_task_definition_exits_2_naming_the_field(run_task):
    task = run_task({"networkMode": "awsvpc", "containerDefinitions": [
        {"name": "app", "image": "busybox", "portMappings": [{"containerPort": 80, "hostPort": 8080}]}]})
    assert task.finish() == 2
    assert "containerDefinitions[0].portMappings[0].hostPort" in task.stderr
    assert not task.left_behind()


def test_an_essential_container_crashing_stops_the_task_with_its_code(run_task):
    task = run_task({"networkMode": "bridge", "containerDefinitions": [
        {"name": "server", "image": "busybox", "command": ["sleep", "600"], "stopTimeout": 1},
        {"name": "worker", "image": "busybox", "command": ["sh", "-c", "echo crashing; exit 5"],
         "dependsOn": [{"containerName": "server", "condition": "START"}]}]})
    assert task.finish() == 5, task.stderr
    assert "worker | crashing" in task.stdout
    progress = task.stderr
    assert "worker: exited with code 5" in progress
    assert "task STOPPED: Essential container in task exited" in progress
    assert "server: exited with code 137" in progress   # sleep ignores SIGTERM as PID 1: killed after 1 s
    assert not task.left_behind()


def test_ctrl_c_while_a_dependency_is_pending_removes_everything(run_task):
    task = run_task({"networkMode": "awsvpc", "containerDefinitions": [
        {"name": "slow", "image": "busybox", "command": ["sleep", "600"],
         "linuxParameters": {"initProcessEnabled": True},
         "healthCheck": {"command": ["CMD-SHELL", "exit 1"], "interval": 1, "retries": 10}},
        {"name": "app", "image": "busybox", "command": ["true"],
         "dependsOn": [{"containerName": "slow", "condition": "HEALTHY"}]}]})
    task.wait_for("slow: started")
    task.proc.send_signal(signal.SIGINT)
    assert task.finish(timeout=60) == 130
    assert "task STOPPED: Task stopped by user" in task.stderr
    assert "app: created" not in task.stderr
    assert not task.left_behind()


def test_a_failed_success_dependency_stops_an_essential_container_with_the_agents_reason(run_task):
    task = run_task({"networkMode": "none", "containerDefinitions": [
        {"name": "migrate", "image": "busybox", "essential": False, "command": ["sh", "-c", "exit 4"]},
        {"name": "app", "image": "busybox", "command": ["true"],
         "dependsOn": [{"containerName": "migrate", "condition": "SUCCESS"}]}]})
    assert task.finish() == 143
    assert "CannotStartContainerError: dependency graph: container migrate exited with code 4" in task.stderr
    assert not task.left_behind()


def test_a_role_the_developer_cannot_assume_stops_run_with_the_trust_policy_to_add(run_task):
    with RefusingAws() as sts:
        task = run_task({"networkMode": "awsvpc", "taskRoleArn": "arn:aws:iam::123456789012:role/prod-app",
                         "containerDefinitions": [{"name": "app", "image": "busybox", "command": ["true"]}]},
                        env={"AWS_ENDPOINT_URL_STS": sts.url})
        assert task.finish() == 1
    progress = task.stderr
    assert "cannot assume the task role: AssumeRole: AccessDenied: User: arn:aws:iam::123456789012:user/dev is not " \
        "authorized to perform: sts:AssumeRole on resource: arn:aws:iam::123456789012:role/prod-app" in progress
    assert '"AWS": "arn:aws:iam::123456789012:user/dev"' in progress and '"Action": "sts:AssumeRole"' in progress
    assert "pulling" not in progress and "created" not in progress
    assert not task.left_behind()


# =============================================================================
# Network modes, two tasks at once, a task definition read from ECS
# =============================================================================

def test_bridge_mode_links_ephemeral_ports_and_the_endpoints_in_each_container(run_task, docker_engine):
    task = run_task({"networkMode": "bridge", "containerDefinitions": [
        {"name": "db", "image": "busybox", "essential": False, "linuxParameters": {"initProcessEnabled": True},
         "command": ["sh", "-c", "mkdir /www && echo db here > /www/index.html && exec httpd -f -p 5432 -h /www"],
         "portMappings": [{"containerPort": 5432, "hostPort": 0}]},
        {"name": "app", "image": "busybox", "links": ["db:database"], "linuxParameters": {"initProcessEnabled": True},
         "command": app_waits_for("/tmp/done", "wget -q -O- http://database:5432/; "
                                               "wget -q -O- $ECS_CONTAINER_METADATA_URI_V4 | grep -o '\"Name\": *\"app\"'"),
         "dependsOn": [{"containerName": "db", "condition": "START"}]}]})
    task.wait_for("task RUNNING")
    holder = docker_engine.inspect(task.container("db")["HostConfig"]["NetworkMode"].split(":", 1)[1])
    binding = holder["NetworkSettings"]["Ports"]["5432/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1" and int(binding["HostPort"]) > 0
    with socket.create_connection(("127.0.0.1", int(binding["HostPort"])), timeout=5) as connection:
        connection.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: connection.recv(4096), b""))
    assert b"db here" in answer
    status, db = get_in_task(task, "db", "/v4")   # one container in this namespace: the caller
    assert status == 200 and db["Name"] == "db" and db["Networks"][0]["NetworkMode"] == "bridge"
    docker_engine.cli("exec", task.container("app")["Id"], "touch", "/tmp/done")
    assert task.finish() == 0, task.stderr
    assert "app | db here" in task.stdout
    assert re.search(r'app \| "Name": *"app"', task.stdout), task.stdout
    assert not task.left_behind()


def test_host_and_none_modes_reach_the_endpoints_too(run_task):
    for mode in ("none", "host"):
        task = run_task({"networkMode": mode, "containerDefinitions": [
            {"name": f"in-{mode}", "image": "busybox",
             "command": ["sh", "-c", "wget -q -O- $ECS_CONTAINER_METADATA_URI_V4/task | grep -o '\"TaskARN\": *\"[^\"]*\"'"]}]})
        assert task.finish() == 0, task.stderr
        assert f"in-{mode} | \"TaskARN\"" in task.stdout, task.stdout
        assert not task.left_behind()
    probe = socket.socket()
    with pytest.raises(OSError):   # host mode's address is gone from the host again
        probe.bind(("169.254.170.2", 0))
    probe.close()


def test_two_tasks_at_once_each_get_their_own_task_and_protection(run_task, docker_engine):
    definition = {"networkMode": "awsvpc", "containerDefinitions": [
        {"name": "app", "image": "busybox", "stopTimeout": 1, "linuxParameters": {"initProcessEnabled": True},
         "command": app_waits_for("/tmp/done", "true")}]}
    first, second = run_task(definition), run_task(definition)
    first.wait_for("task RUNNING")
    second.wait_for("task RUNNING")
    endpoint = {t: dict(e.split("=", 1) for e in t.container("app")["Config"]["Env"])["ECS_AGENT_URI"]
                for t in (first, second)}
    arns = {t: get_in_task(t, "app", "/v4/task")[1]["TaskARN"] for t in (first, second)}
    assert arns[first] != arns[second]
    update = in_task(first, "app", "import http.client, sys; c = http.client.HTTPConnection('169.254.170.2', 80); "
                                   "c.request('PUT', sys.argv[1], body=b'{\"ProtectionEnabled\": true}'); "
                                   "print(c.getresponse().read().decode())",
                     endpoint[first].replace("http://169.254.170.2", "") + "/task-protection/v1/state")
    assert json.loads(update.stdout)["protection"]["ProtectionEnabled"] is True, update.stdout + update.stderr
    for task, enabled in ((first, True), (second, False)):
        status, state = get_in_task(task, "app", endpoint[task].replace("http://169.254.170.2", "")
                                    + "/task-protection/v1/state")
        assert status == 200 and state["protection"]["ProtectionEnabled"] is enabled
        assert state["protection"]["TaskArn"] == arns[task]
    for task in (first, second):
        docker_engine.cli("exec", task.container("app")["Id"], "touch", "/tmp/done")
        assert task.finish() == 0, task.stderr
        assert not task.left_behind()


def test_a_task_definition_read_from_ecs_with_its_tags(run_task, task_moto, busybox_image):
    ecs = task_moto.client("ecs")
    family = f"le-run-registered-{SESSION_ID}"
    registered = ecs.register_task_definition(
        family=family, networkMode="awsvpc", memory="512", tags=[{"key": "owner", "value": "team-a"}],
        containerDefinitions=[{"name": "app", "image": busybox_image,
                               "command": ["sh", "-c", "wget -q -O- $ECS_CONTAINER_METADATA_URI_V4/taskWithTags"]}])
    revision = registered["taskDefinition"]["revision"]
    task = run_task(f"{family}:{revision}", "--tag", "env=local")
    assert task.finish() == 0, task.stderr
    assert "app | " in task.stdout, task.stderr
    document = json.loads(task.stdout.split("app | ", 1)[1].splitlines()[0])
    assert document["Family"] == family and document["Revision"] == str(revision)
    assert document["TaskTags"] == {"owner": "team-a", "env": "local"}
    assert not task.left_behind()



def test_the_example_task_definition_runs(run_task):
    """examples/taskdef.json, which the README runs, with the test image for busybox:1.36."""
    definition = json.loads((Path(__file__).parent / "examples" / "taskdef.json").read_text())
    for container in definition["containerDefinitions"]:
        assert container["image"] == "busybox:1.36"
        container["image"] = "busybox"
    task = run_task(definition)
    assert task.finish() == 0, task.stderr
    assert "app | hello from the init container" in task.stdout
    assert '"Family": "le-run-' in task.stdout.split("app | ", 2)[2]
    assert not task.left_behind()

"""`run TASKDEF`: secrets, environment files and private images, fetched with the execution role.

Against moto (STS, IAM, SSM, Secrets Manager, S3) and a real Docker Engine; a private image
through Debian's docker-registry on loopback with htpasswd.  Secret values are checked where
they must be (the container's environment, read with docker inspect) and searched for where
they must not be: the runner's stdout and stderr, the audit file, every Docker label of the
task, the task's v4 metadata.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
import pytest

from testlib import SESSION_ID, RefusingAws, app_waits_for, ensure_tool, free_port, get_in_task, wait_for

EXECUTION_ROLE = "le-run-execution-role"


def env_of(inspect: dict) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in inspect["Config"]["Env"])


@pytest.fixture
def references(task_moto):
    """Secrets in SSM and Secrets Manager and environment files in S3, in every form ECS takes:
    ({variable: (valueFrom, value)}, [environment file ARNs], the execution role ARN)."""
    suffix = SESSION_ID + os.urandom(3).hex()
    ssm = task_moto.client("ssm")
    ssm.put_parameter(Name=f"db_user_{suffix}", Value=f"ssm-plain-{suffix}", Type="String")
    ssm.put_parameter(Name=f"/prod/{suffix}/db/password", Value=f"ssm-secure-{suffix}", Type="SecureString")
    boto3.client("ssm", endpoint_url=task_moto.moto_url, region_name="us-west-2",
                 aws_access_key_id="x", aws_secret_access_key="y").put_parameter(
        Name=f"west_{suffix}", Value=f"ssm-west-{suffix}", Type="String")
    secrets = task_moto.client("secretsmanager")
    plain = secrets.create_secret(Name=f"le-plain-{suffix}", SecretString=f"sm-plain-{suffix}")["ARN"]
    document = secrets.create_secret(Name=f"le-db-{suffix}", SecretString=json.dumps(
        {"password": f"sm-json-{suffix}", "port": 5432}))["ARN"]
    versioned = secrets.create_secret(Name=f"le-versioned-{suffix}", SecretString=f"sm-first-{suffix}")["ARN"]
    first_version = secrets.describe_secret(SecretId=versioned)["VersionIdsToStages"]
    first_version = next(iter(first_version))
    secrets.put_secret_value(SecretId=versioned, SecretString=f"sm-current-{suffix}")
    s3 = task_moto.client("s3")
    bucket = f"le-run-{suffix}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="first.env", Body=(
        "# the first file\nFROM_FIRST=one\nSHARED=first\nOVERRIDDEN=from a file\nWITH_EQUALS=a=b=c\n").encode())
    s3.put_object(Bucket=bucket, Key="team/second.env", Body=b"SHARED=second\nFROM_SECOND=two\nnot a variable\n")
    role = task_moto.create_role(EXECUTION_ROLE)
    values = {
        "DB_USER": (f"db_user_{suffix}", f"ssm-plain-{suffix}"),
        "DB_PASSWORD": (f"/prod/{suffix}/db/password", f"ssm-secure-{suffix}"),
        "WEST": (f"arn:aws:ssm:us-west-2:123456789012:parameter/west_{suffix}", f"ssm-west-{suffix}"),
        "PLAIN": (plain, f"sm-plain-{suffix}"),
        "JSON_PASSWORD": (f"{document}:password::", f"sm-json-{suffix}"),
        "PREVIOUS": (f"{versioned}::AWSPREVIOUS:", f"sm-first-{suffix}"),
        "BY_VERSION_ID": (f"{versioned}:::{first_version}", f"sm-first-{suffix}"),
        "CURRENT": (versioned, f"sm-current-{suffix}"),
    }
    files = [f"arn:aws:s3:::{bucket}/first.env", f"arn:aws:s3:::{bucket}/team/second.env"]
    return values, files, role


def secret_task(values: dict, files: list[str], role: str, local_file: Path) -> dict:
    return {
        "networkMode": "awsvpc",
        "executionRoleArn": role,
        "containerDefinitions": [{
            "name": "my-app", "image": "busybox", "stopTimeout": 1, "linuxParameters": {"initProcessEnabled": True},
            "command": app_waits_for("/tmp/done", "echo done"),
            "environment": [{"name": "OVERRIDDEN", "value": "from environment"}],
            "environmentFiles": [{"value": files[0], "type": "s3"}, {"value": files[1], "type": "s3"},
                                 {"value": str(local_file), "type": "s3"}],
            "secrets": [{"name": name, "valueFrom": value_from} for name, (value_from, _) in values.items()],
            "logConfiguration": {"logDriver": "awslogs", "options": {"awslogs-group": "/ecs/secrets"},
                                 "secretOptions": [{"name": "api-key", "valueFrom": values["PLAIN"][0]}]},
        }],
    }


def test_every_value_from_form_reaches_the_container_and_nothing_else(run_task, task_moto, references,
                                                                      docker_engine, tmp_path):
    values, files, role = references
    local_file = tmp_path / "local.env"
    local_file.write_text("FROM_LOCAL=three\nSHARED=local\n")
    audit = tmp_path / "audit.jsonl"
    task_moto.reset_counts()
    task = run_task(secret_task(values, files, role, local_file), env={"ECS_LOCAL_AUDIT_LOG": audit})
    task.wait_for("task RUNNING")
    assert "my-app: 3 environment files and 8 secrets fetched" in task.stderr
    assert f"execution role {role}" in task.stderr
    # Every fetch was made with the execution role's credentials: AssumeRole came first.
    assert task_moto.count("AssumeRole") == 1

    app = task.container("my-app")
    env = env_of(app)
    for name, (_, value) in values.items():
        assert env[name] == value, name
    # Files in order, the first that sets a variable winning; environment over every file.
    assert (env["FROM_FIRST"], env["FROM_SECOND"], env["FROM_LOCAL"]) == ("one", "two", "three")
    assert env["SHARED"] == "first" and env["OVERRIDDEN"] == "from environment"
    assert env["WITH_EQUALS"] == "a=b=c"

    # Nowhere else: labels of every container of the task, the metadata, the output, the audit.
    secret_values = [value for _, value in values.values()]
    labels = json.dumps([docker_engine.inspect(c)["Config"]["Labels"] for c in docker_engine.cli(
        "ps", "-aq", "--filter", f"label=com.amazonaws.ecs.task-definition-family={task.family}").stdout.split()])
    endpoint = env["ECS_CONTAINER_METADATA_URI_V4"].rsplit("/", 1)[1]
    metadata = json.dumps([get_in_task(task, "my-app", f"/v4/{endpoint}{path}")
                           for path in ("", "/task", "/taskWithTags")])
    assert json.loads(metadata)[0][1]["LogOptions"] == {"awslogs-group": "/ecs/secrets"}
    docker_engine.cli("exec", app["Id"], "touch", "/tmp/done")
    assert task.finish() == 0, task.stderr
    written = {"stdout": task.stdout, "stderr": task.stderr, "labels": labels, "metadata": metadata,
               "audit": audit.read_text() if audit.exists() else ""}
    for where, text in written.items():
        for value in secret_values:
            assert value not in text, f"a secret value is in the {where}"


def test_dry_run_prints_bodies_with_secrets_masked_and_the_calls_without_making_them(run_task, task_moto, references,
                                                                                      tmp_path):
    values, files, role = references
    local_file = tmp_path / "local.env"
    local_file.write_text("FROM_LOCAL=three\n")
    task_moto.reset_counts()
    task = run_task(secret_task(values, files, role, local_file), "--dry-run")
    assert task.finish() == 0, task.stderr
    assert task_moto.count() == 0 and not task.left_behind()
    plan = json.loads(task.stdout)
    app = next(c for c in plan["containers"] if c["name"] == "my-app")
    env = dict(entry.split("=", 1) for entry in app["body"]["Env"])
    assert env["DB_PASSWORD"] == f"<secret from {values['DB_PASSWORD'][0]}>"
    assert app["environmentFiles"] == [*files, str(local_file)]
    calls = plan["awsCalls"]
    assert calls[0] == f"sts:AssumeRole {role} (the execution role: the calls below use it)"
    assert f"s3:GetObject {files[0][len('arn:aws:s3:::'):]} (container my-app)" in calls
    assert any(c.startswith("ssm:GetParameters arn:aws:ssm:us-west-2:") and " in us-west-2 " in c for c in calls)
    assert sum(c.startswith("secretsmanager:GetSecretValue") for c in calls) == 6   # 5 secrets, 1 log option
    for _, value in values.values():
        assert value not in task.stdout


def test_an_execution_role_denied_a_parameter_stops_run_before_any_container(run_task, task_moto):
    """moto enforces no IAM policy, so the refusal comes from a peer that answers SSM with
    AccessDenied as AWS does (testlib.RefusingAws); STS is moto's."""
    role = task_moto.create_role(EXECUTION_ROLE)
    with RefusingAws() as ssm:
        task = run_task({"networkMode": "awsvpc", "executionRoleArn": role, "containerDefinitions": [
            {"name": "web-app", "image": "busybox", "command": ["true"],
             "secrets": [{"name": "DB_PASSWORD", "valueFrom": "/prod/db/password"}]}]},
            env={"AWS_ENDPOINT_URL_SSM": ssm.url})
        assert task.finish() == 1
    assert ssm.actions == ["GetParameters"]
    progress = task.stderr
    assert (f"container web-app, secret DB_PASSWORD: the execution role {role} could not ssm:GetParameters on "
            "/prod/db/password: GetParameters: AccessDenied") in progress
    assert "created" not in progress and "pulled" not in progress
    assert not task.left_behind()


@pytest.mark.parametrize("suffix, reason", [
    (":no-such-key::", "has no JSON key 'no-such-key'"),
    (":::00000000-0000-0000-0000-000000000000", "GetSecretValue: ResourceNotFoundException"),
])
def test_a_secret_reference_that_cannot_be_met_names_the_container_and_secret(run_task, task_moto, suffix, reason):
    secret = task_moto.client("secretsmanager").create_secret(
        Name=f"le-missing-{SESSION_ID}-{os.urandom(3).hex()}", SecretString=json.dumps({"user": "u"}))["ARN"]
    task = run_task({"networkMode": "awsvpc", "containerDefinitions": [
        {"name": "app", "image": "busybox", "command": ["true"],
         "secrets": [{"name": "PASSWORD", "valueFrom": secret + suffix}]}]})
    assert task.finish() == 1
    assert "container app, secret PASSWORD: " in task.stderr and reason in task.stderr, task.stderr
    assert not task.left_behind()


def test_a_json_key_of_a_secret_that_is_not_json_is_refused(run_task, task_moto):
    secret = task_moto.client("secretsmanager").create_secret(
        Name=f"le-text-{SESSION_ID}-{os.urandom(3).hex()}", SecretString="just text")["ARN"]
    task = run_task({"networkMode": "awsvpc", "containerDefinitions": [
        {"name": "app", "image": "busybox", "command": ["true"],
         "secrets": [{"name": "PASSWORD", "valueFrom": f"{secret}:password::"}]}]})
    assert task.finish() == 1
    assert f"container app, secret PASSWORD: secret {secret} is not JSON, so it has no key 'password'" in task.stderr
    assert not task.left_behind()


# =============================================================================
# A private registry with authentication
# =============================================================================

@pytest.fixture(scope="module")
def private_registry(docker_engine, busybox_image, tmp_path_factory):
    """Debian's docker-registry on loopback with htpasswd, holding the busybox image (pushed
    with a login of its own, then removed from the engine): (image reference, user, password)."""
    registry = ensure_tool("docker-registry", "docker-registry")
    htpasswd = ensure_tool("htpasswd", "apache2-utils")
    work = tmp_path_factory.mktemp("registry")
    user, password = "le-user", "le-registry-password-" + os.urandom(4).hex()
    subprocess.run([htpasswd, "-Bbc", str(work / "htpasswd"), user, password], check=True, capture_output=True)
    port = free_port()
    (work / "config.yml").write_text(json.dumps({
        "version": 0.1, "storage": {"filesystem": {"rootdirectory": str(work / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
        "auth": {"htpasswd": {"realm": "local-endpoints tests", "path": str(work / "htpasswd")}}}))
    proc = subprocess.Popen([registry, "serve", str(work / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _answers(port), 30), "docker-registry did not start"
        image = f"127.0.0.1:{port}/le/busybox:{SESSION_ID}"
        with tempfile.TemporaryDirectory() as config:   # the login goes in a config of its own
            cli = ["docker", "--config", config]
            env = docker_engine.env()
            subprocess.run([*cli, "tag", busybox_image, image], check=True, env=env, capture_output=True)
            subprocess.run([*cli, "login", "-u", user, "--password-stdin", f"127.0.0.1:{port}"], input=password,
                           text=True, check=True, env=env, capture_output=True)
            subprocess.run([*cli, "push", image], check=True, env=env, capture_output=True)
            subprocess.run([*cli, "rmi", image], check=True, env=env, capture_output=True)
        yield image, user, password
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(port: int) -> bool:
    import http.client
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        connection.request("GET", "/v2/")
        return connection.getresponse().status in (200, 401)
    except OSError:
        return False


def test_a_private_image_is_pulled_with_repository_credentials(run_task, task_moto, private_registry,
                                                              docker_engine):
    image, user, password = private_registry
    credentials = task_moto.client("secretsmanager").create_secret(
        Name=f"le-registry-{SESSION_ID}-{os.urandom(3).hex()}",
        SecretString=json.dumps({"username": user, "password": password}))["ARN"]
    definition = {"networkMode": "awsvpc", "containerDefinitions": [
        {"name": "app", "image": image, "command": ["echo", "pulled and ran"],
         "repositoryCredentials": {"credentialsParameter": credentials}}]}
    refused = run_task({**definition, "containerDefinitions": [
        {k: v for k, v in definition["containerDefinitions"][0].items() if k != "repositoryCredentials"}]})
    assert refused.finish() == 1
    assert f"CannotPullContainerError: {image}" in refused.stderr
    started = time.monotonic()
    task = run_task(definition)
    assert task.finish() == 0, task.stderr
    assert "app | pulled and ran" in task.stdout
    assert f"pulled {image} in " in task.stderr
    assert password not in task.stdout + task.stderr
    assert time.monotonic() - started < 120
    docker_engine.cli("rmi", image, check=False)
    never = run_task(definition, "--pull", "never")
    assert never.finish() == 1
    assert f"CannotPullContainerError: {image}: not on this engine, and --pull never" in never.stderr


def test_an_execution_role_the_developer_cannot_assume_stops_run_before_any_fetch(run_task):
    """RefusingAws stands for STS: moto lets every caller assume every role."""
    with RefusingAws() as sts:
        task = run_task({"networkMode": "awsvpc", "executionRoleArn": "arn:aws:iam::123456789012:role/exec",
                         "containerDefinitions": [{"name": "app", "image": "busybox", "command": ["true"],
                                                   "secrets": [{"name": "P", "valueFrom": "/p"}]}]},
                        env={"AWS_ENDPOINT_URL_STS": sts.url})
        assert task.finish() == 1
    assert sts.actions == ["AssumeRole", "GetCallerIdentity"]
    progress = task.stderr
    assert "cannot assume the execution role: AssumeRole: AccessDenied" in progress
    assert f'"AWS": "{RefusingAws.CALLER}"' in progress and "--own-identity" in progress
    assert "task STOPPED: CannotAssumeExecutionRole: " in progress
    assert not task.left_behind()

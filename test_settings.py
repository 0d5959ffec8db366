"""Settings: every default is worked out in its SETTINGS row; conflicting settings stop start-up."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import local_endpoints as le
from testlib import REPO_ROOT


def config(environ: dict[str, str]) -> le.Config:
    return le.load_config(le.parse_args([]), environ)


def test_token_and_token_file_together_are_a_startup_error(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    environ = {"ECS_LOCAL_AUTHORIZATION_TOKEN": "given", "ECS_LOCAL_AUTHORIZATION_TOKEN_FILE": str(token_file)}
    with pytest.raises(le.ConfigError, match="both set"):
        config(environ)
    result = subprocess.run([sys.executable, "local_endpoints.py", "--port", "0"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=20, env={"PATH": "/usr/bin:/bin", **environ})
    assert result.returncode == 2 and "both set" in result.stderr and "Traceback" not in result.stderr
    assert "given" not in result.stderr and "from-the-file" not in result.stderr


def test_docker_host_default_is_worked_out_from_the_environment_in_its_row(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    environ = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(runtime)}
    row = le.setting("DOCKER_HOST")
    assert config(environ).docker_host == row.default_of(environ) == le.default_docker_host(environ)
    (runtime / "docker.sock").touch()
    expected = le.default_docker_host(environ)
    assert config(environ).docker_host == expected
    assert expected == "unix:///var/run/docker.sock" or expected == f"unix://{runtime}/docker.sock"
    assert config({**environ, "DOCKER_HOST": "tcp://127.0.0.1:2375"}).docker_host == "tcp://127.0.0.1:2375"


def test_endpoints_read_no_environment_of_their_own():
    for built in (le.build_endpoints, le.CredentialRoutes, le.ImdsRoutes, le.MetadataRoutes, le.AgentApiRoutes,
                  le.Access):
        assert "environ" not in inspect.getsource(built), built


@pytest.mark.parametrize("project, expected_family", [(None, "ecs-local-task-definition"), ("shop", "shop")])
def test_task_defaults_are_worked_out_by_their_rows(project, expected_family):
    defaults = config({})
    task = le.task_identity(defaults, project, None)
    assert task.arn == le.setting("TASK_ARN").task_default(defaults.cluster_arn, project)
    assert task.family == expected_family == le.setting("TASK_DEFINITION_FAMILY").task_default(project)
    assert task.availability_zone == "us-west-2a" == le.setting("AVAILABILITY_ZONE").task_default("us-west-2")
    if project is None:
        assert task.arn == le.DEFAULT_TASK_ARN
    else:
        assert task.arn == ("arn:aws:ecs:us-west-2:111111111111:task/ecs-local-cluster/"
                            f"{le.uuid.uuid5(le.TASK_ID_NAMESPACE, project)}")
    given = le.task_identity(config({"TASK_ARN": "arn:aws:ecs:eu-west-1:222222222222:task/c/abc",
                                     "TASK_DEFINITION_FAMILY": "fam", "AVAILABILITY_ZONE": "eu-west-1c"}),
                             project, None)
    assert (given.arn, given.family, given.availability_zone, given.region) == (
        "arn:aws:ecs:eu-west-1:222222222222:task/c/abc", "fam", "eu-west-1c", "eu-west-1")

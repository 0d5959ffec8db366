"""Outbound calls: the calls column of ROUTES is complete and minimal, and it is enforced.

Every row of ROUTES is driven, for every method it answers (HEAD too where it answers GET),
through the one dispatch path of an in-process EndpointsServer, against the real Docker Engine
and moto_server, in the scenarios that make each declared call happen: a cold view of Docker and
cold AWS clients (a fresh Endpoints for each row), a role looked up by name, an MFA profile's
role, IMDS serving /creds' credentials and its own role, and the task of `run`.  A recorder put
around each method marked @outbound notes the declaration in force at every call.

Complete: no call was refused, and every call a request made is in its row's column.  Minimal:
over its scenarios, each row made every call its column names.  The stats collectors these
requests start are background jobs, and their calls are checked against their own declaration.

In-process, because a recorder at the edge sees each call with its declaration; the server is
the real one (EndpointsServer, RequestHandler.answer), with the real DockerClient and AwsIdentity.
"""

from __future__ import annotations

import ast
import http.client
import json
import logging
import re
import threading
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

import local_endpoints as le
from testlib import REPO_ROOT, http_request, in_process_server

ACCOUNT = "123456789012"
BLACKHOLE = b'{"Port": 1234, "Protocol": "tcp", "TrafficType": "ingress"}'


def filled(rule: str, values: dict[str, str]) -> str:
    """A path the rule matches with its optional parts in: each parameter values[name], else the
    first of its words."""
    def value(match: re.Match) -> str:
        name, _, kind = match.group(1).partition(":")
        return values.get(name) or kind.split("|")[0]
    return re.sub(r"\{([^}]*)\}", value, rule.replace("[", "").replace("]", ""))


def methods_of(route: le.Route) -> tuple[str, ...]:
    return (route.method, "HEAD") if route.method == "GET" else (route.method,)


def send(url: str, method: str, path: str) -> int:
    body = BLACKHOLE if "/fault/" in path else b'{"ProtectionEnabled":true}' if method == "PUT" and \
        "task-protection" in path else None
    headers = {le.IMDS_TTL_HEADER: "60"} if path == "/latest/api/token" else {}
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.fixture
def recorded(monkeypatch) -> list[tuple[le.Route | le.Job, str]]:
    """(the declaration in force, the call) of every call of a method marked @outbound, noted
    before the method's own check: a refused call is noted too."""
    calls: list[tuple[le.Route | le.Job, str]] = []
    for cls in (le.DockerClient, le.AwsIdentity):
        for name, method in list(vars(cls).items()):
            call = getattr(method, "outbound", None)
            if call is None:
                continue

            def recording(*args, _method=method, _call=call, **kwargs):
                calls.append((le.DECLARED_CALLS.get(), _call))
                return _method(*args, **kwargs)
            monkeypatch.setattr(cls, name, recording)
    return calls


@pytest.fixture
def aws_environment(monkeypatch, moto, tmp_path):
    """moto's dummy keys in the environment, and no AWS configuration of the machine."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def mfa_profile(monkeypatch, tmp_path, role_arn: str) -> None:
    """An MFA profile with a role_arn, instead of the keys in the environment."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    (tmp_path / "mfa-config").write_text(f"[profile base]\nregion = us-east-1\nmfa_serial = "
                                         f"arn:aws:iam::{ACCOUNT}:mfa/dev\n[profile team]\nrole_arn = {role_arn}\n"
                                         "source_profile = base\n")
    (tmp_path / "mfa-credentials").write_text("[base]\naws_access_key_id = AKIAEXAMPLEBASE\n"
                                              "aws_secret_access_key = base-secret-example\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "mfa-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "mfa-credentials"))
    monkeypatch.setenv("AWS_PROFILE", "team")


def with_mfa_session(config: le.Config) -> le.AwsIdentity:
    """The MFA profile's identity with its session open, as start-up leaves it after the code."""
    identity = le.AwsIdentity(config)
    assert identity.mfa is not None and identity.mfa.role_arn
    identity.mfa_session = le.Credentials("ASIAEXAMPLEMFA", "mfa-secret-example", "mfa-token-example",
                                          datetime.now(timezone.utc) + timedelta(hours=8))
    return identity


def test_every_route_declares_exactly_the_calls_its_answers_make(
        recorded, aws_environment, moto, docker_engine, busybox_image, containers, monkeypatch, tmp_path, caplog):
    name = containers.name("le-outbound")
    containers.run("--name", name, busybox_image, "sleep", "300")
    role_name = "le-outbound-role"
    role_arn = moto.create_role(role_name)
    compose = replace(le.default_config(), sts_endpoint=moto.url, iam_endpoint=moto.url,
                      docker_host=docker_engine.host, imds="ON", imds_v1=True, stats="ON-DEMAND")
    task = le.TaskRun(le.plan_task({"family": "le-outbound", "memory": "512", "taskRoleArn": role_arn,
                                    "containerDefinitions": [{"name": "app", "image": busybox_image}]},
                                   {}, le.RunOptions(cluster="default", region="us-east-1")))
    values = {"ident": name, "name": role_name, "arn": role_arn, "listed": le.IMDS_DEFAULT_ROLE,
              "id": task.plan.credentials_id, "rest": "ami-id"}
    imds_rows = [r for r in le.ROUTES if r.rule.startswith("/latest/")]
    driven: dict[str, dict[str, int]] = defaultdict(dict)   # Route.declaration -> {scenario, method: status}

    def drive(scenario: str, rows: list[le.Route], config: le.Config, make_identity=le.AwsIdentity,
              run: le.TaskRun | None = None) -> None:
        """Each row on a fresh Endpoints (Docker's view and the AWS clients cold), every method."""
        for route in rows:
            endpoints = le.build_endpoints(config, le.DockerClient(config.docker_host),
                                           make_identity(config), run)
            path = filled(route.rule, {**values, "listed": endpoints.family(le.ImdsRoutes).role_name})
            with in_process_server(endpoints) as url:
                for method in methods_of(route):
                    status = send(url, method, path)
                    driven[route.declaration][f"{scenario}, {method}"] = status
                    assert le.resolve(method, path)[0] is route, (method, path)

    drive("compose", list(le.ROUTES), compose)
    drive("run", list(le.ROUTES), compose, run=task)
    drive("IMDS role", imds_rows, replace(compose, imds_role=role_name))
    with monkeypatch.context() as patch:
        mfa_profile(patch, tmp_path, role_arn)
        drive("MFA profile role", [le.ROUTES[0], *imds_rows], compose, with_mfa_session)

    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("outbound call")]
    assert not refused, refused
    made: dict[str, set[str]] = defaultdict(set)   # by Route.declaration
    jobs = set()
    for declared, call in recorded:
        assert call in declared.calls, (declared.declaration, call)
        if isinstance(declared, le.Route):
            made[declared.declaration].add(call)
        else:
            jobs.add((declared.name, call))
    assert jobs == {("stats collector", "docker:stats")}   # the only job these requests start
    assert set(driven) == {route.declaration for route in le.ROUTES}
    assert not [answers for answers in driven.values() if 500 in answers.values()], driven
    unmade = {r.declaration: sorted(r.calls - made[r.declaration]) for r in le.ROUTES if r.calls - made[r.declaration]}
    assert not unmade, f"declared, but made in no scenario: {unmade}"
    assert {declarer: calls for declarer, calls in made.items() if calls} == \
        {route.declaration: route.calls for route in le.ROUTES if route.calls}


def test_an_undeclared_call_during_a_request_is_refused_with_a_500_and_one_log_line(caplog):
    """/health declares the credential chain only: a Docker call made while it is answered is
    refused before it is made (an engine that is not there would answer 503, not 500)."""
    config = replace(le.default_config(), docker_host="unix:///nonexistent.sock")
    endpoints = le.build_endpoints(config, le.DockerClient(config.docker_host), le.AwsIdentity(config))
    endpoints.stats.active = lambda: len(endpoints.docker.containers())   # a handler gone wrong
    with caplog.at_level(logging.DEBUG, logger="local_endpoints"), in_process_server(endpoints) as url:
        status, _, body = http_request(url, path="/health")
    assert status == 500 and json.loads(body)["code"] == "UndeclaredCall", body
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "outbound call docker:containers refused: the route GET /health declares boto3:credential-chain"]
    assert not any(r.exc_info for r in caplog.records), "a refusal is one line, no traceback"


def test_a_thread_calls_out_only_under_a_job_it_declared(caplog):
    """A new thread starts with no declaration: it may call nothing until it names its job."""
    docker = le.DockerClient("unix:///nonexistent.sock")
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            docker.containers()
        except BaseException as exc:   # UndeclaredCall is not an Exception
            outcome.append(exc)
    for target in (call, le.job("a test's job", "docker:containers").target(call)):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    refused, made = outcome
    assert isinstance(refused, le.UndeclaredCall)
    assert isinstance(made, le.ApiError) and made.code == "DockerUnavailable"   # it was made
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "outbound call docker:containers refused: this thread declared no route or job"]


def test_the_security_pages_table_of_jobs_is_the_jobs_in_the_code():
    """Each job(...) of local_endpoints.py, with its calls, is a row of the table in docs/security.md."""
    in_code = {}
    for node in ast.walk(ast.parse(open(le.__file__, encoding="utf-8").read())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "job" and node.args[0].value:
            in_code[node.args[0].value] = {arg.value for arg in node.args[1:]}
    page = (REPO_ROOT / "docs/security.md").read_text()
    section = page.split("## Outbound calls", 1)[1].split("\n## ", 1)[0]
    in_docs = {}
    for row in re.findall(r"^\| `([^`]+)` \|[^|]*\|([^|]*)\|$", section, re.M):
        in_docs[row[0]] = set(re.findall(r"`([^`]+)`", row[1]))
    assert in_docs == in_code


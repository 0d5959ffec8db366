"""Task scale-in protection at $ECS_AGENT_URI/task-protection/v1/state.

The wire format is the ECS agent's (ecs-agent/tmds/handlers/taskprotection/v1 in
aws/amazon-ecs-agent): the expected bodies below are the agent's own test strings,
byte for byte, with this server's task ARNs in place of theirs.

The state itself is unit-tested in process with an injected clock and an injected
set of live tasks, because protection lasts at least a minute and ending it by
waiting would make the suite minutes longer; everything else runs against a real
server and real containers (requests from inside a container go through its
network namespace with ``nsenter``, as in test_metadata.py).
"""

from __future__ import annotations

import json
import logging
import re
import secrets as token_source
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest

import local_endpoints
from testlib import Containers, http_request, in_process_server, nsenter_net, wait_for

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
SLEEP = ("sleep", "3600")
STATE = "/task-protection/v1/state"

# The agent's test strings (handlers_test.go), %s for the task ARN or the message.
DECODE_ERROR = '{"error":{"Code":"InvalidParameterException","Message":"UpdateTaskProtection: failed to decode request"}}'
MISSING_FIELD = ('{"error":{"Arn":"%s","Code":"InvalidParameterException",'
                 '"Message":"Invalid request: does not contain \'ProtectionEnabled\' field"}}')
ECS_REQUEST_ERROR = '{"requestID":"%s","error":{"Arn":"%s","Code":"%s","Message":"%s"}}'
PROTECTION = '{"protection":{"ExpirationDate":%s,"ProtectionEnabled":%s,"TaskArn":"%s"}}'
NOT_FOUND_PREFIX = '{"error":{"Code":"ResourceNotFoundException","Message":"Failed to find a task for the request'


# ---------------------------------------------------------------------------
# In process: decoding, the error shape, the state with an injected clock
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"", b"   ", b"{", b"[]", b'"yes"', b"true", b"1",
    b'{"ProtectionEnabled":"bad"}',                              # the agent's "invalid type" case
    b'{"ProtectionEnabled":true,"ExpiresInMinutes":5,"Unknown":2}',   # its "unknown field" case
    b'{"ProtectionEnabled":1}', b'{"ProtectionEnabled":true,"ExpiresInMinutes":5.0}',
    b'{"ProtectionEnabled":true,"ExpiresInMinutes":1e2}', b'{"ProtectionEnabled":true,"ExpiresInMinutes":"5"}',
    b'{"ProtectionEnabled":true,"ExpiresInMinutes":true}', b'{"ProtectionEnabled":true,"ExpiresInMinutes":NaN}',
    b'{"ProtectionEnabled":true,"ExpiresInMinutes":9223372036854775808}', b"\xff\xfe{}",
])
def test_bodies_the_agent_cannot_decode(body):
    with pytest.raises(local_endpoints.TaskProtectionError) as caught:
        local_endpoints.parse_protection_request(body)
    response = caught.value.response()
    assert (response.status, response.body, response.content_type) == (400, DECODE_ERROR.encode(),
                                                                        "application/json")


@pytest.mark.parametrize("body, expected", [
    (b'{"ProtectionEnabled":true}', (True, None)),
    (b'{"ProtectionEnabled":false,"ExpiresInMinutes":60}', (False, 60)),
    (b'{"protectionenabled":true,"EXPIRESINMINUTES":5}', (True, 5)),   # Go matches names case-insensitively
    (b' \n{"ProtectionEnabled":true} trailing', (True, None)),          # Go's Decoder reads one value
    (b'{"ProtectionEnabled":true,"ProtectionEnabled":false}', (False, None)),   # the last one wins
    (b'{"ProtectionEnabled":null,"ExpiresInMinutes":null}', (None, None)),
    (b"null", (None, None)), (b"{}", (None, None)),
    (b'{"ProtectionEnabled":true,"ExpiresInMinutes":0}', (True, 0)),   # ECS, not the decoder, checks the range
])
def test_bodies_the_agent_decodes(body, expected):
    assert local_endpoints.parse_protection_request(body) == expected


def test_error_bodies_are_the_agents_bytes():
    arn = "arn:aws:ecs:us-west-2:111111111111:task/c/0123"
    missing = local_endpoints.TaskProtectionError(
        400, "InvalidParameterException", "Invalid request: does not contain 'ProtectionEnabled' field", arn)
    assert missing.response().body == (MISSING_FIELD % arn).encode()
    from_ecs = local_endpoints.TaskProtectionError(400, "AccessDeniedException", "ecs error", arn, "req-1")
    assert from_ecs.response().body == (ECS_REQUEST_ERROR % ("req-1", arn, "AccessDeniedException",
                                                             "ecs error")).encode()


@pytest.mark.parametrize("epoch, text", [
    (1796026870.0, "2026-11-30T08:21:10Z"),          # Go's RFC3339Nano drops a zero fraction
    (1796026870.5, "2026-11-30T08:21:10.5Z"),
    (1796026870.837, "2026-11-30T08:21:10.837Z"),    # ECS keeps milliseconds
    (1796026870.1234, "2026-11-30T08:21:10.123Z"),
    (None, None),
])
def test_expiration_date_as_the_agent_writes_it(epoch, text):
    assert local_endpoints.expiration_date(epoch) == text


class FakeClock:
    def __init__(self):
        self.now = 1796026870.25

    def __call__(self) -> float:
        return self.now


def protection_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("task protection of")]


def test_protection_starts_extends_and_expires_by_itself(caplog):
    caplog.set_level(logging.INFO, logger="local_endpoints")
    clock, arn = FakeClock(), "arn:aws:ecs:us-west-2:111111111111:task/c/one"
    state = local_endpoints.TaskProtection(lambda: {arn}, clock)
    assert state.state(arn) == {"protection": {"ExpirationDate": None, "ProtectionEnabled": False, "TaskArn": arn}}

    start = clock.now
    on = state.update(arn, True, None)   # default 120 minutes
    assert on == {"protection": {"ExpirationDate": local_endpoints.expiration_date(start + 7200),
                                 "ProtectionEnabled": True, "TaskArn": arn}}
    clock.now += 3600
    assert state.state(arn) == on
    extended = state.update(arn, True, 5)   # ECS resets the expiry on every call
    assert extended["protection"]["ExpirationDate"] == local_endpoints.expiration_date(clock.now + 300)
    clock.now += 299.9
    assert state.state(arn)["protection"]["ProtectionEnabled"] is True
    clock.now += 0.1
    assert state.state(arn)["protection"] == {"ExpirationDate": None, "ProtectionEnabled": False, "TaskArn": arn}
    assert protection_lines(caplog) == [
        f"task protection of {arn} started until {local_endpoints.expiration_date(start + 7200)}",
        f"task protection of {arn} extended until {extended['protection']['ExpirationDate']}",
        f"task protection of {arn} ended: expired"]

    state.update(arn, True, 1)
    assert state.update(arn, False, 30)["protection"]["ProtectionEnabled"] is False
    assert protection_lines(caplog)[-1] == f"task protection of {arn} ended: turned off"


def test_tasks_whose_containers_are_gone_are_forgotten(caplog):
    caplog.set_level(logging.INFO, logger="local_endpoints")
    clock = FakeClock()
    live: set[str] | None = {"a", "b"}
    state = local_endpoints.TaskProtection(lambda: live, clock)
    state.update("a", True, 10)
    state.update("b", True, 10)
    live = None   # Docker unreachable: nothing is forgotten
    assert state.state("a")["protection"]["ProtectionEnabled"] is True
    live = {"b"}
    assert state.state("a")["protection"]["ProtectionEnabled"] is False
    assert state.state("b")["protection"]["ProtectionEnabled"] is True
    assert protection_lines(caplog)[-1] == "task protection of a ended: its containers are gone"


def test_the_watcher_logs_the_end_without_any_request(caplog):
    """Nobody asks after the expiry: the watcher thread still ends it and says so, then stops."""
    caplog.set_level(logging.INFO, logger="local_endpoints")
    clock = FakeClock()
    state = local_endpoints.TaskProtection(lambda: {"t"}, clock)
    state.CHECK_SECONDS = 0.02
    before = set(threading.enumerate())
    state.update("t", True, 1)
    [watcher] = [t for t in threading.enumerate() if t not in before and t.name == "task-protection"]
    clock.now += 61
    assert wait_for(lambda: "task protection of t ended: expired" in protection_lines(caplog), 5)
    watcher.join(5)
    assert not watcher.is_alive()


def test_docker_unreachable_is_the_agents_server_exception(tmp_path):
    """With no Docker Engine behind the socket, the task cannot be looked up: the agent's 500."""
    config = local_endpoints.load_config(local_endpoints.parse_args([]),
                                         {"DOCKER_HOST": f"unix://{tmp_path}/missing.sock"})
    endpoints = local_endpoints.build_endpoints(config, local_endpoints.DockerClient(config.docker_host),
                                                local_endpoints.AwsIdentity(config))
    with in_process_server(endpoints) as url:   # the routes' calls in force
        for method, body in (("GET", None), ("PUT", b'{"ProtectionEnabled":true}')):
            status, _, answer = http_request(url, method, "/api/web/task-protection/v1/state", body=body)
            assert status == 500
            assert answer.startswith(b'{"error":{"Code":"ServerException","Message":'
                                     b'"Failed to find a task for the request: ')


# ---------------------------------------------------------------------------
# Over HTTP, with real containers
# ---------------------------------------------------------------------------

class Task:
    """A compose-labelled task of two containers on its own network, and a lone container."""

    def __init__(self, token: str):
        self.token = token
        self.project = f"le-tp-{token}"
        self.network = f"le-tp-net-{token}"
        self.worker = f"le-tp-{token}-worker"
        self.sidecar = f"le-tp-{token}-sidecar"
        self.lone = f"le-tp-{token}-lone"
        self.ids: dict[str, str] = {}


@pytest.fixture(scope="module")
def task(docker_engine, busybox_image):
    made = Containers(docker_engine)
    task = Task(token_source.token_hex(3))
    try:
        made.network(task.network)
        for name, service in ((task.worker, "worker"), (task.sidecar, "sidecar")):
            task.ids[name] = made.run("--name", name, "--network", task.network, "--init",
                                      "--label", f"{COMPOSE_PROJECT}={task.project}",
                                      "--label", f"{COMPOSE_SERVICE}={service}", busybox_image, *SLEEP)
        task.ids[task.lone] = made.run("--name", task.lone, "--init", busybox_image, *SLEEP)
        yield task
    finally:
        made.cleanup()


@pytest.fixture
def server(start_server, docker_engine):
    return start_server(env={"DOCKER_HOST": docker_engine.host})


def call(server, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, bytes]:
    status, reply_headers, reply = server.request(method, path, headers=headers, body=body)
    assert reply_headers.get("Content-Type") == "application/json", reply_headers
    return status, reply


def task_arn(server, name: str) -> str:
    status, body = call(server, "GET", f"/v4/{name}/task")
    assert status == 200, body
    return json.loads(body)["TaskARN"]


def check_protected(body: bytes, arn: str, minutes: float, before: datetime) -> None:
    """The agent's protection body, byte for byte, with an expiry minutes after before."""
    text = body.decode()
    match = re.fullmatch(r'\{"protection":\{"ExpirationDate":"([^"]+)","ProtectionEnabled":true,'
                         r'"TaskArn":"([^"]+)"\}\}', text)
    assert match, text
    expires = datetime.fromisoformat(match.group(1))
    assert match.group(1).endswith("Z") and match.group(2) == arn
    # The date is given to the millisecond, rounded: it may lie half a millisecond either side.
    slack = timedelta(milliseconds=1)
    assert (before + timedelta(minutes=minutes) - slack <= expires
            <= datetime.now(timezone.utc) + timedelta(minutes=minutes) + slack)


def test_put_then_get_for_the_whole_task(task, server):
    """Protection belongs to the task: set through one container, seen through the other;
    another task is unprotected; off again; both URI forms (ECS's /api/{id} and bare /api)."""
    arn = task_arn(server, task.worker)
    assert task_arn(server, task.sidecar) == arn
    unprotected = (PROTECTION % ("null", "false", arn)).encode()
    assert call(server, "GET", f"/api/{task.worker}{STATE}") == (200, unprotected)

    before = datetime.now(timezone.utc)
    status, body = call(server, "PUT", f"/api/{task.worker}{STATE}", b'{"ProtectionEnabled":true,"ExpiresInMinutes":60}',
                        {"Content-Type": "application/json"})
    assert status == 200
    check_protected(body, arn, 60, before)
    assert call(server, "GET", f"/api/{task.sidecar}{STATE}") == (200, body)
    assert call(server, "GET", f"/api/{task.ids[task.worker][:12]}{STATE}") == (200, body)   # an ID prefix
    lone_arn = task_arn(server, task.lone)
    assert call(server, "GET", f"/api/{task.lone}{STATE}") == (200, (PROTECTION % ("null", "false", lone_arn)).encode())

    before = datetime.now(timezone.utc)
    status, body = call(server, "PUT", f"/api/{task.sidecar}{STATE}", b'{"ProtectionEnabled":true}')
    check_protected(body, arn, 120, before)   # the default

    assert call(server, "PUT", f"/api/{task.worker}{STATE}", b'{"ProtectionEnabled":false}') == (200, unprotected)
    assert call(server, "GET", f"/api/{task.worker}{STATE}") == (200, unprotected)
    log = server.log()
    assert f"task protection of {arn} started until" in log
    assert f"task protection of {arn} extended until" in log
    assert f"task protection of {arn} ended: turned off" in log


def test_every_error_case_has_the_agents_body(task, server):
    arn = task_arn(server, task.worker)
    path = f"/api/{task.worker}{STATE}"
    for body in (None, b"", b"{", b"[1]", b'{"ProtectionEnabled":"bad"}',
                 b'{"ProtectionEnabled":true,"ExpiresInMinutes":5,"Unknown":2}',
                 b'{"ProtectionEnabled":true,"ExpiresInMinutes":1.5}'):
        assert call(server, "PUT", path, body) == (400, DECODE_ERROR.encode()), body
    # Decoding comes first: a bad body for an unknown container is still the decode error.
    assert call(server, "PUT", f"/api/nothing-{task.token}{STATE}", b"{") == (400, DECODE_ERROR.encode())

    for body in (b"{}", b"null", b'{"ExpiresInMinutes":5}'):
        assert call(server, "PUT", path, body) == (400, (MISSING_FIELD % arn).encode()), body

    for minutes in (0, -1, 2881, 2**40):
        status, reply = call(server, "PUT", path, json.dumps({"ProtectionEnabled": True,
                                                              "ExpiresInMinutes": minutes}).encode())
        document = json.loads(reply)
        assert status == 400 and list(document) == ["requestID", "error"], reply
        uuid.UUID(document["requestID"])
        assert reply == (ECS_REQUEST_ERROR % (document["requestID"], arn, "InvalidParameterException",
                                              document["error"]["Message"])).encode()
        assert "2880" in document["error"]["Message"]
    for minutes in (1, 2880):   # the bounds themselves are fine
        assert call(server, "PUT", path, json.dumps({"ProtectionEnabled": True,
                                                     "ExpiresInMinutes": minutes}).encode())[0] == 200
    call(server, "PUT", path, b'{"ProtectionEnabled":false}')

    for method, body in (("GET", None), ("PUT", b'{"ProtectionEnabled":true}')):
        # No such container; two containers match (the project's two names share a part).
        for ident in (f"nothing-{task.token}", f"le-tp-{task.token}-"):
            status, reply = call(server, method, f"/api/{ident}{STATE}", body)
            assert status == 404 and reply.startswith(NOT_FOUND_PREFIX.encode()), reply
            assert list(json.loads(reply)["error"]) == ["Code", "Message"]
        # The host itself is no container.
        status, reply = call(server, method, f"/api{STATE}", body)
        assert status == 404 and reply.startswith(NOT_FOUND_PREFIX.encode()), reply

    status, _, reply = server.request("POST", path, body=b"{}")
    assert status == 405 and json.loads(reply)["code"] == "MethodNotAllowed"
    assert server.proc.poll() is None


def test_put_needs_the_token_get_does_not(task, start_server, docker_engine, secrets):
    token = token_source.token_urlsafe(24)
    secrets.add(token, "authorization token")
    server = start_server(env={"DOCKER_HOST": docker_engine.host, "ECS_LOCAL_AUTHORIZATION_TOKEN": token})
    path = f"/api/{task.worker}{STATE}"
    for headers in (None, {"Authorization": "wrong"}):
        status, reply = call(server, "PUT", path, b'{"ProtectionEnabled":true}', headers)
        assert status == 401 and json.loads(reply)["code"] == "Unauthorized"
    assert call(server, "GET", path)[0] == 200
    status, reply = call(server, "PUT", path, b'{"ProtectionEnabled":true}', {"Authorization": token})
    assert status == 200 and json.loads(reply)["protection"]["ProtectionEnabled"] is True


# A client inside a container's network namespace: urllib, no proxies; prints [status, body].
CLIENT = """
import json, sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3].encode() if len(sys.argv) > 3 else None
try:
    with opener.open(urllib.request.Request(url, data=body, method=method), timeout=10) as reply:
        print(json.dumps([reply.status, reply.read().decode()]))
except urllib.error.HTTPError as error:
    print(json.dumps([error.code, error.read().decode()]))
"""


def from_inside(engine, container_id: str, method: str, url: str, body: str | None = None) -> tuple[int, str]:
    pid = engine.inspect(container_id)["State"]["Pid"]
    args = [method, url] + ([body] if body is not None else [])
    proc = subprocess.run([*nsenter_net(pid), sys.executable, "-c", CLIENT, *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status, reply = json.loads(proc.stdout)
    return status, reply


def test_caller_found_by_its_address(task, start_server, docker_engine):
    """ECS_AGENT_URI=http://host/api with no ID: the caller's own task, by its source address.
    The default allowlist (bridge subnets) lets the container PUT; a narrower one does not."""
    server = start_server(env={"DOCKER_HOST": docker_engine.host}, args=("--bind", "0.0.0.0"))
    gateway = docker_engine.inspect(task.network)["IPAM"]["Config"][0]["Gateway"]
    agent_uri = f"http://{gateway}:{server.port}/api"
    arn = task_arn(server, task.worker)
    status, reply = from_inside(docker_engine, task.ids[task.worker], "PUT", agent_uri + STATE,
                                '{"ProtectionEnabled":true,"ExpiresInMinutes":30}')
    assert status == 200 and json.loads(reply)["protection"]["TaskArn"] == arn, reply
    status, seen = from_inside(docker_engine, task.ids[task.sidecar], "GET", agent_uri + STATE)
    assert (status, seen) == (200, reply)
    status, seen = from_inside(docker_engine, task.ids[task.sidecar], "GET", f"{agent_uri}/{task.sidecar}{STATE}")
    assert (status, seen) == (200, reply)

    narrow = start_server(env={"DOCKER_HOST": docker_engine.host, "ECS_LOCAL_ALLOWED_CALLERS": "10.255.0.0/16"},
                          args=("--bind", "0.0.0.0"))
    uri = f"http://{gateway}:{narrow.port}/api{STATE}"
    status, reply = from_inside(docker_engine, task.ids[task.worker], "PUT", uri, '{"ProtectionEnabled":true}')
    assert status == 403 and json.loads(reply)["code"] == "CallerNotAllowed", reply
    status, reply = from_inside(docker_engine, task.ids[task.worker], "GET", uri)
    assert status == 200 and json.loads(reply)["protection"]["TaskArn"] == arn


def test_a_task_whose_containers_are_gone_is_forgotten(task, server, docker_engine, busybox_image, containers):
    """Protection of a task ends when its last container is removed (the log says so), and a
    new container of the same compose project (the same task ARN) starts unprotected."""
    project = f"le-tp-gone-{task.token}"
    labels = ("--label", f"{COMPOSE_PROJECT}={project}", "--label", f"{COMPOSE_SERVICE}=job")
    first = containers.run("--name", f"{project}-1", *labels, "--init", busybox_image, *SLEEP)
    arn = task_arn(server, f"{project}-1")
    status, _ = call(server, "PUT", f"/api/{project}-1{STATE}", b'{"ProtectionEnabled":true}')
    assert status == 200
    docker_engine.cli("rm", "-f", first)
    assert wait_for(lambda: f"task protection of {arn} ended: its containers are gone" in server.log(), 15), \
        server.log()[-2000:]
    containers.run("--name", f"{project}-2", *labels, "--init", busybox_image, *SLEEP)
    assert task_arn(server, f"{project}-2") == arn
    assert call(server, "GET", f"/api/{project}-2{STATE}") == (200, (PROTECTION % ("null", "false", arn)).encode())

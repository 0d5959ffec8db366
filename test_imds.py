"""The IMDSv2-compatible credentials endpoint, with real clients.

The server runs on the host, bound to 0.0.0.0. The clients run "inside" a
busybox container on an ordinary user-defined bridge network (Docker picks the
subnet; not 169.254.170.0/24): the host's python3 with botocore and the AWS CLI,
started in the container's network namespace with ``nsenter --net``, so the
server sees the container's own address and the clients reach the server only
through the network's gateway address, with no special network, static IP or
iptables rule. Their only credential source is
``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (fresh HOME, no profiles, no AWS_* keys).

STS and IAM are a real moto_server listening on that gateway address, so the
server (for GetSessionToken/AssumeRole) and the clients in the container (for
GetCallerIdentity with the credentials they got) both reach it.

The wire cases (token TTL, bad, expired and missing tokens, X-Forwarded-For,
IMDSv1) are checked with plain http.client requests against what EC2 answers
and what botocore's IMDSFetcher and the JS SDK's credential-provider-imds react
to: 200 with a text token; 400 for a bad TTL; 403 for a PUT through a proxy;
401 for a GET without a valid token; text bodies, never the JSON error object.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import local_endpoints
from testlib import Containers, free_port, nsenter_net, wait_for

ROLE = "le-imds-app"
TOKEN_PATH = "/latest/api/token"
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
IMDS_KEYS = ["Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"]
DUMMY_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
              "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
              "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def request(port: int, method: str, path: str, headers: dict | None = None, host: str = "127.0.0.1"):
    """One request on a fresh connection: ``(status, headers, body)``."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def token(port: int, ttl: int | str = 21600, secrets=None) -> str:
    status, headers, body = request(port, "PUT", TOKEN_PATH, {TTL_HEADER: str(ttl)})
    assert status == 200, (status, body)
    assert headers["Content-Type"] == "text/plain", headers
    assert headers[TTL_HEADER] == str(ttl), headers
    if secrets is not None:
        secrets.add(body.decode(), "IMDS session token")
    return body.decode()


def text_error(response, status: int) -> str:
    """An IMDS error: the status, a short text body, never the JSON error object."""
    got, headers, body = response
    assert got == status, (got, body[:300])
    assert headers["Content-Type"] == "text/plain", headers
    assert not body.startswith(b"{"), body
    return body.decode()


def registered(secrets, document: dict) -> dict:
    secrets.add(document["SecretAccessKey"], "secret access key")
    secrets.add(document["Token"], "session token")
    return document


def imds_credentials(port: int, secrets, name: str | None = None) -> tuple[str, dict]:
    """(listed role name, credentials document) as an SDK fetches them, token first."""
    session = token(port, secrets=secrets)
    status, headers, body = request(port, "GET", CREDENTIALS_PATH, {TOKEN_HEADER: session})
    assert status == 200 and headers["Content-Type"] == "text/plain", (status, headers, body)
    listed = body.decode()
    status, headers, body = request(port, "GET", CREDENTIALS_PATH + (name or listed), {TOKEN_HEADER: session})
    assert status == 200, (status, body)
    return listed, registered(secrets, json.loads(body))


# ---------------------------------------------------------------------------
# The token store (no server)
# ---------------------------------------------------------------------------

def test_token_store_expires_and_stays_bounded():
    store = local_endpoints.ImdsTokens()
    short = store.issue(1)
    long = store.issue(21600)
    assert store.valid(short) and store.valid(long)
    assert not store.valid("not-a-token") and not store.valid("")
    time.sleep(1.1)
    assert not store.valid(short) and store.valid(long)
    issued = [store.issue(21600) for _ in range(store.CAPACITY + 50)]
    assert len(store) <= store.CAPACITY
    assert all(store.valid(t) for t in issued[-100:])
    assert not store.valid(issued[0])   # the oldest went first
    assert len(set(issued)) == len(issued)


# ---------------------------------------------------------------------------
# The wire, from the host (loopback is an allowed caller)
# ---------------------------------------------------------------------------

@pytest.fixture
def imds_server(start_server, moto):
    """A server with IMDS on (no authorization token), STS and IAM at moto."""
    def start(**extra):
        env = dict(moto.env, STS_ENDPOINT=moto.url, IAM_ENDPOINT=moto.url, DOCKER_HOST="unix:///nonexistent.sock")
        env.update(extra)
        return start_server(env=env)
    return start


def test_token_ttl_and_forwarded_put(imds_server, secrets):
    server = imds_server()
    port = server.port
    for ttl in (None, "", "0", "21601", "-5", "abc", "1.5"):
        headers = {} if ttl is None else {TTL_HEADER: ttl}
        text_error(request(port, "PUT", TOKEN_PATH, headers), 400)
    text_error(request(port, "PUT", TOKEN_PATH, {TTL_HEADER: "60", "X-Forwarded-For": "203.0.113.9"}), 403)
    first, second = token(port, 1, secrets), token(port, 21600, secrets)
    assert first != second and len(first) >= 32
    assert first not in server.log() and second not in server.log()


def test_missing_wrong_and_expired_tokens_get_401(imds_server, secrets):
    server = imds_server()
    port = server.port
    short = token(port, 1, secrets)
    assert request(port, "GET", CREDENTIALS_PATH, {TOKEN_HEADER: short})[0] == 200
    for headers in ({}, {TOKEN_HEADER: "wrong"}, {TOKEN_HEADER: ""}):
        for path in (CREDENTIALS_PATH, CREDENTIALS_PATH + "local-endpoints", "/latest/meta-data/placement/region"):
            text_error(request(port, "GET", path, headers), 401)
    time.sleep(1.2)
    text_error(request(port, "GET", CREDENTIALS_PATH, {TOKEN_HEADER: short}), 401)


def test_imdsv1_only_when_allowed(imds_server, secrets):
    server = imds_server(ECS_LOCAL_IMDS_V1="true")
    port = server.port
    status, _, body = request(port, "GET", CREDENTIALS_PATH)
    assert status == 200, body
    status, _, body = request(port, "GET", CREDENTIALS_PATH + body.decode())
    assert status == 200, body
    registered(secrets, json.loads(body))
    text_error(request(port, "GET", CREDENTIALS_PATH, {TOKEN_HEADER: "wrong"}), 401)   # as on EC2


def test_credentials_document_default_and_named_role(imds_server, moto, secrets):
    arn = moto.create_role(ROLE)
    server = imds_server()
    name, doc = imds_credentials(server.port, secrets)
    assert name == "local-endpoints"
    assert list(doc) == IMDS_KEYS
    assert doc["Code"] == "Success" and doc["Type"] == "AWS-HMAC"
    assert doc["LastUpdated"].endswith("Z") and doc["Expiration"].endswith("Z")
    status, _, body = server.get("/creds")
    assert status == 200
    creds = registered(secrets, json.loads(body))
    assert (doc["AccessKeyId"], doc["Expiration"]) == (creds["AccessKeyId"], creds["Expiration"])
    session = token(server.port, secrets=secrets)
    text_error(request(server.port, "GET", CREDENTIALS_PATH + "other-role", {TOKEN_HEADER: session}), 404)
    # Newer JS, Ruby, Java and PHP SDKs ask for this first and fall back on its 404.
    extended = "/latest/meta-data/iam/security-credentials-extended/"
    text_error(request(server.port, "GET", extended, {TOKEN_HEADER: session}), 404)
    text_error(request(server.port, "GET", extended), 401)

    for setting in (ROLE, arn):
        server = imds_server(ECS_LOCAL_IMDS_ROLE=setting)
        name, doc = imds_credentials(server.port, secrets)
        assert name == ROLE
        status, _, body = server.get("/role/" + ROLE)
        assert status == 200
        assert doc["AccessKeyId"] == registered(secrets, json.loads(body))["AccessKeyId"]
        assert "IMDS on" in server.log() and ROLE in server.log()


def test_region_answers(imds_server, secrets):
    server = imds_server(AWS_DEFAULT_REGION="eu-west-3")
    session = token(server.port, secrets=secrets)
    answers = {}
    for path in ("/latest/meta-data/placement/region", "/latest/meta-data/placement/availability-zone",
                 "/latest/dynamic/instance-identity/document"):
        status, headers, body = request(server.port, "GET", path, {TOKEN_HEADER: session})
        assert status == 200, (path, body)
        answers[path.rsplit("/", 1)[-1]] = (headers["Content-Type"], body.decode())
    assert answers["region"] == ("text/plain", "eu-west-3")
    assert answers["availability-zone"] == ("text/plain", "eu-west-3a")
    content_type, document = answers["document"]
    document = json.loads(document)
    assert (document["region"], document["availabilityZone"]) == ("eu-west-3", "eu-west-3a")
    assert document["accountId"] == "123456789012"   # moto's account, from GetCallerIdentity


def test_caller_allowlist_applies(imds_server, secrets):
    server = imds_server(ECS_LOCAL_ALLOWED_CALLERS="10.99.0.0/16")
    message = text_error(request(server.port, "PUT", TOKEN_PATH, {TTL_HEADER: "60"}), 403)
    assert "127.0.0.1" in message
    text_error(request(server.port, "GET", CREDENTIALS_PATH), 403)


def test_authorization_token_turns_imds_off_unless_asked(imds_server, secrets):
    secret = "le-imds-authorization-token-0123456789"
    secrets.add(secret, "authorization token")
    server = imds_server(ECS_LOCAL_AUTHORIZATION_TOKEN=secret)
    message = text_error(request(server.port, "PUT", TOKEN_PATH, {TTL_HEADER: "60"}), 404)
    assert "ECS_LOCAL_IMDS" in message
    assert "IMDS off" in server.log()
    server = imds_server(ECS_LOCAL_AUTHORIZATION_TOKEN=secret, ECS_LOCAL_IMDS="on")
    imds_credentials(server.port, secrets)   # no Authorization header: SDKs send none to IMDS
    assert "IMDS on" in server.log()
    assert request(server.port, "GET", "/creds")[0] == 401   # the ECS routes keep the token
    server = imds_server(ECS_LOCAL_IMDS="off")
    text_error(request(server.port, "PUT", TOKEN_PATH, {TTL_HEADER: "60"}), 404)
    assert "IMDS off (ECS_LOCAL_IMDS=OFF)" in server.log()


def test_bad_imds_settings_stop_startup(start_server):
    for env in ({"ECS_LOCAL_IMDS_ROLE": "not a role!"}, {"ECS_LOCAL_IMDS": "maybe"},
                {"ECS_LOCAL_IMDS_V1": "perhaps"}):
        server = start_server(env=env, wait=False)
        assert server.proc.wait(20) == 2, server.log()
        assert list(env)[0] in server.log()


# ---------------------------------------------------------------------------
# Real clients in a container on an ordinary bridge network
# ---------------------------------------------------------------------------

BOTOCORE_CLIENT = """
import json, sys
import botocore.session
from botocore.utils import InstanceMetadataRegionFetcher
session = botocore.session.Session()
credentials = session.get_credentials()
result = {"method": credentials and credentials.method}
if credentials:
    frozen = credentials.get_frozen_credentials()
    sts = session.create_client("sts", endpoint_url=sys.argv[1], region_name="us-east-1")
    result.update(access_key=frozen.access_key, arn=sts.get_caller_identity()["Arn"])
result["region"] = InstanceMetadataRegionFetcher(config={
    "ec2_metadata_service_endpoint": session.get_config_variable("ec2_metadata_service_endpoint")}).retrieve_region()
print(json.dumps(result))
"""


class Bridge:
    """A busybox container on an ordinary bridge network, moto on the network's gateway."""

    def __init__(self, engine, made: Containers, image: str, workdir: Path):
        self.engine = engine
        network = made.network(made.name("le-imds-net"))
        self.gateway = engine.inspect(network)["IPAM"]["Config"][0]["Gateway"]
        self.app = made.run("--network", network, "--init", image, "sleep", "3600")
        self.pid = engine.inspect(self.app)["State"]["Pid"]
        self.address = engine.inspect(self.app)["NetworkSettings"]["Networks"][network]["IPAddress"]
        self.home = workdir / "client-home"
        self.home.mkdir()
        port = free_port(self.gateway)
        self.moto_url = f"http://{self.gateway}:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(workdir / "moto.log", "wb") as log:
            self.moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", self.gateway, "-p", str(port)],
                                         env=dict(env, **DUMMY_KEYS), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

        def ready() -> bool:
            try:
                return request(port, "GET", "/moto-api/", host=self.gateway)[0] < 500
            except OSError:
                return False
        assert wait_for(ready, 30, 0.2), (workdir / "moto.log").read_text()

    def create_role(self, name: str) -> str:
        import boto3
        iam = boto3.client("iam", endpoint_url=self.moto_url, region_name="us-east-1",
                           aws_access_key_id=DUMMY_KEYS["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=DUMMY_KEYS["AWS_SECRET_ACCESS_KEY"])
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
        try:
            return iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        except iam.exceptions.EntityAlreadyExistsException:
            return iam.get_role(RoleName=name)["Role"]["Arn"]

    def server_env(self, **extra) -> dict:
        return dict(DUMMY_KEYS, STS_ENDPOINT=self.moto_url, IAM_ENDPOINT=self.moto_url,
                    DOCKER_HOST=self.engine.host, **extra)

    def run(self, server_port: int, *command: str) -> subprocess.CompletedProcess:
        """``command`` in the app container's network namespace, IMDS its only credential source."""
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home), "LANG": "C.UTF-8",
               "AWS_CONFIG_FILE": str(self.home / "no-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(self.home / "no-credentials"),
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{self.gateway}:{server_port}/",
               "AWS_DEFAULT_REGION": "us-east-1"}
        env.update({k: os.environ[k] for k in ("PYENV_ROOT", "PYENV_VERSION", "VIRTUAL_ENV") if k in os.environ})
        return subprocess.run([*nsenter_net(self.pid), *command], env=env,
                              capture_output=True, text=True, timeout=120)

    def botocore(self, server_port: int) -> dict:
        proc = self.run(server_port, sys.executable, "-c", BOTOCORE_CLIENT, self.moto_url)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    def aws_cli(self, server_port: int) -> dict:
        proc = self.run(server_port, sys.executable, "-m", "awscli", "sts", "get-caller-identity",
                        "--endpoint-url", self.moto_url, "--output", "json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    def close(self) -> None:
        self.moto.terminate()
        try:
            self.moto.wait(10)
        except subprocess.TimeoutExpired:
            self.moto.kill()
            self.moto.wait()


@pytest.fixture(scope="module")
def bridge(docker_engine, busybox_image, tmp_path_factory):
    made = Containers(docker_engine)   # conftest's helper, module-scoped here
    instance = None
    try:
        instance = Bridge(docker_engine, made, busybox_image, tmp_path_factory.mktemp("imds"))
        yield instance
    finally:
        if instance:
            instance.close()
        made.cleanup()


def imds_server_on_host(start_server, bridge, **extra):
    server = start_server(env=bridge.server_env(**extra), args=("--bind", "0.0.0.0"))
    assert wait_for(lambda: json.loads(server.get("/health")[2])["docker"]["reachable"], 15, 0.2)
    return server


def vended_key(server, path: str, secrets) -> str:
    status, _, body = server.get(path)
    assert status == 200, body
    return registered(secrets, json.loads(body))["AccessKeyId"]


def test_botocore_default_chain_in_a_container(start_server, bridge, secrets):
    server = imds_server_on_host(start_server, bridge)
    result = bridge.botocore(server.port)
    assert result["method"] == "iam-role", result
    assert result["access_key"] == vended_key(server, "/creds", secrets)
    assert result["arn"].startswith("arn:aws:sts::123456789012:"), result
    assert result["region"] == "us-east-1"
    log = server.log()
    assert "PUT /latest/api/token 200" in log and bridge.address in log, log[-2000:]
    # An audited route: its audit line stands for the access line.
    assert "route=/latest/meta-data/iam/security-credentials/local-endpoints caller=" in log
    assert "GET /latest/meta-data/iam/security-credentials/local-endpoints" not in log


def test_botocore_named_role_in_a_container(start_server, bridge, secrets):
    bridge.create_role(ROLE)
    server = imds_server_on_host(start_server, bridge, ECS_LOCAL_IMDS_ROLE=ROLE)
    result = bridge.botocore(server.port)
    assert result["method"] == "iam-role", result
    assert result["access_key"] == vended_key(server, "/role/" + ROLE, secrets)
    assert f":assumed-role/{ROLE}/" in result["arn"], result


@pytest.mark.parametrize("role", [None, "arn"])
def test_aws_cli_in_a_container(start_server, bridge, secrets, role):
    extra = {"ECS_LOCAL_IMDS_ROLE": bridge.create_role(ROLE)} if role else {}
    server = imds_server_on_host(start_server, bridge, **extra)
    identity = bridge.aws_cli(server.port)
    assert identity["Account"] == "123456789012"
    if role:
        assert f":assumed-role/{ROLE}/" in identity["Arn"], identity
    else:
        assert ":assumed-role/" not in identity["Arn"], identity
    assert "GET /latest/meta-data/iam/security-credentials/" in server.log()


def test_clients_get_nothing_when_refused(start_server, bridge, secrets):
    """Outside the allowlist, or with IMDS off, the SDK's chain ends without credentials."""
    secrets.add("le-imds-refused-0123456789abcdef", "authorization token")
    for extra in ({"ECS_LOCAL_ALLOWED_CALLERS": "127.0.0.1/32"},
                  {"ECS_LOCAL_AUTHORIZATION_TOKEN": "le-imds-refused-0123456789abcdef"}):
        server = imds_server_on_host(start_server, bridge, **extra)
        assert bridge.botocore(server.port)["method"] is None


# What docs/setups.md's "server on the host" recipe runs: the container resolves host.docker.internal
# itself (--add-host ...:host-gateway) and busybox's nc and wget do what an SDK does.
RECIPE_SCRIPT = r"""
set -e
base=http://host.docker.internal:$PORT
token=$(printf 'PUT /latest/api/token HTTP/1.0\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n' \
        | nc host.docker.internal $PORT | tail -n 1)
role=$(wget -q -O - --header "X-aws-ec2-metadata-token: $token" $base/latest/meta-data/iam/security-credentials/)
echo "role=$role"
wget -q -O - --header "X-aws-ec2-metadata-token: $token" $base/latest/meta-data/iam/security-credentials/$role
echo
wget -q -O - $base/v4
echo
wget -q -O - $base/v4/$NAME
"""


def test_docker_run_recipe_with_host_gateway(start_server, bridge, docker_engine, busybox_image, secrets):
    """docker run --add-host host.docker.internal:host-gateway: IMDS credentials, and metadata
    by the caller's own address (on Linux the host sees the container's address) and by name."""
    server = imds_server_on_host(start_server, bridge)
    network = docker_engine.inspect(bridge.app)["HostConfig"]["NetworkMode"]
    name = Containers.name("le-imds-recipe")
    proc = docker_engine.cli("run", "--rm", "--name", name, "--label", docker_engine.label, "--network", network,
                             "--add-host", "host.docker.internal:host-gateway",
                             "-e", f"PORT={server.port}", "-e", f"NAME={name}",
                             busybox_image, "sh", "-c", RECIPE_SCRIPT, check=False)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, server.log()[-2000:])
    role_line, document, by_address, by_name = proc.stdout.strip().split("\n")
    assert role_line == "role=local-endpoints"
    assert list(registered(secrets, json.loads(document))) == IMDS_KEYS
    assert json.loads(by_address)["DockerName"] == json.loads(by_name)["DockerName"] == name


WIRE_SCRIPT = """
import http.client, json, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def call(method, path, headers):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    return response.status, response.getheader("Content-Type"), response.read().decode()
put, creds = "/latest/api/token", "/latest/meta-data/iam/security-credentials/"
result = {"no ttl": call("PUT", put, {}), "ttl 0": call("PUT", put, {"X-aws-ec2-metadata-token-ttl-seconds": "0"}),
          "proxied": call("PUT", put, {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.1.2.3"}),
          "no token": call("GET", creds, {}), "wrong token": call("GET", creds, {"X-aws-ec2-metadata-token": "x"})}
token = call("PUT", put, {"X-aws-ec2-metadata-token-ttl-seconds": "1"})[2]
result["live token"] = call("GET", creds, {"X-aws-ec2-metadata-token": token})
time.sleep(1.3)
result["expired token"] = call("GET", creds, {"X-aws-ec2-metadata-token": token})
print(json.dumps(result))
"""


@pytest.mark.parametrize("v1", [False, True])
def test_wire_cases_from_the_container(start_server, bridge, v1):
    """What EC2 answers, seen from the app container through the gateway."""
    server = imds_server_on_host(start_server, bridge, **({"ECS_LOCAL_IMDS_V1": "true"} if v1 else {}))
    proc = bridge.run(server.port, sys.executable, "-c", WIRE_SCRIPT, bridge.gateway, str(server.port))
    assert proc.returncode == 0, proc.stderr
    result = {case: (status, content_type) for case, (status, content_type, _) in json.loads(proc.stdout).items()}
    assert result == {"no ttl": (400, "text/plain"), "ttl 0": (400, "text/plain"), "proxied": (403, "text/plain"),
                      "no token": (200, "text/plain") if v1 else (401, "text/plain"),
                      "wrong token": (401, "text/plain"), "live token": (200, "text/plain"),
                      "expired token": (401, "text/plain")}

"""Tests of the server and its credentials routes.

STS and IAM are a real moto_server behind a counting proxy (conftest.py); the
server under test is a real ``local_endpoints.py`` process reached over TCP;
the clients are botocore's container credential provider and the AWS CLI.
A small fake STS appears only for answers moto cannot give on demand
(AccessDenied, throttling, 5xx), and says so where it is used.

Pure functions (routing, durations, error mapping, the cache) are also tested
directly, without processes.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import botocore.credentials
import botocore.exceptions
import botocore.session
import pytest

import local_endpoints as le
from testlib import REPO_ROOT, console_script, free_port, http_request, require_ipv6_loopback, wait_for

EXPIRATION = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
CRED_KEYS = ["RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "Expiration", "AccountId"]


def body(response) -> dict:
    status, headers, raw = response
    return json.loads(raw)


def expires_in(credentials: dict) -> float:
    moment = datetime.strptime(credentials["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return (moment - datetime.now(timezone.utc)).total_seconds()


def assert_error(response, status: int, code: str) -> dict:
    got_status, headers, raw = response
    assert got_status == status, raw
    assert headers.get("Content-Type") == "application/json"
    doc = json.loads(raw)
    assert doc["code"] == code and doc["HTTPErrorCode"] == status and doc["message"], doc
    return doc


@pytest.fixture
def aws_server(start_server, moto, secrets):
    """A server whose base identity is long-term keys, with STS and IAM at moto."""
    def start(env=None, args=()):
        full = {**moto.env, "STS_ENDPOINT": moto.url, "IAM_ENDPOINT": moto.url, **(env or {})}
        return start_server(env=full, args=args)
    moto.reset_counts()
    return start


def vended(server, path, secrets) -> dict:
    response = server.get(path)
    assert response[0] == 200, response[2]
    credentials = body(response)
    secrets.add(credentials["SecretAccessKey"], "secret access key")
    secrets.add(credentials["Token"], "session token")
    return credentials


def sts_identity(moto, credentials: dict) -> dict:
    """A real STS call (to moto) made with vended credentials."""
    import boto3
    client = boto3.client("sts", region_name="us-east-1", endpoint_url=moto.moto_url,
                          aws_access_key_id=credentials["AccessKeyId"],
                          aws_secret_access_key=credentials["SecretAccessKey"],
                          aws_session_token=credentials["Token"])
    return client.get_caller_identity()


# ---------------------------------------------------------------------------
# The server: command line, routing, errors, shutdown
# ---------------------------------------------------------------------------

def run_cli(*args, env=None, timeout=20):
    return subprocess.run([sys.executable, "local_endpoints.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_help_documents_every_setting_and_version():
    result = run_cli("--help")
    assert result.returncode == 0
    for setting in le.SETTINGS:
        assert setting.name in result.stdout, setting.name
    for flag in ("--port", "--bind", "--log-level", "--generate-token", "--version"):
        assert flag in result.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and le.VERSION in version.stdout


def test_port_in_use_is_one_clear_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port), "--bind", "127.0.0.1", env={"AWS_EC2_METADATA_DISABLED": "true"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"port {port}" in lines[0] and "in use" in lines[0]


def test_health_check_command(start_server):
    """What the image's HEALTHCHECK runs: 0 while the server answers, 1 when nothing listens."""
    server = start_server()
    assert run_cli("--health-check", "--port", str(server.port), "--bind", "127.0.0.1").returncode == 0
    assert run_cli("--health-check", env={"ECS_LOCAL_METADATA_PORT": str(server.port)}).returncode == 0
    server.stop()
    failed = run_cli("--health-check", "--port", str(server.port))
    assert failed.returncode == 1 and "no answer" in failed.stderr and "Traceback" not in failed.stderr


def test_invalid_metadata_file_stops_startup_with_position(tmp_path):
    broken = tmp_path / "task.json"
    broken.write_text('{"Family": "x",\n  "Revision": }')
    result = run_cli("--port", "0", env={"TASK_METADATA_PATH": str(broken), "AWS_EC2_METADATA_DISABLED": "true"})
    assert result.returncode == 2
    assert str(broken) in result.stderr and "line 2 column" in result.stderr
    assert "Traceback" not in result.stderr


def test_routing_errors_are_json(start_server):
    server = start_server()
    assert_error(server.get("/nope"), 404, "NotFound")
    response = server.request("POST", "/creds")
    assert_error(response, 405, "MethodNotAllowed")
    assert response[1]["Allow"] == "GET, HEAD"
    assert_error(server.request("BREW", "/v4/x/task"), 405, "MethodNotAllowed")
    assert_error(server.request("BREW", "/nope"), 404, "NotFound")
    status, headers, raw = server.request("HEAD", "/health")
    assert status == 200 and raw == b"" and int(headers["Content-Length"]) > 0


def test_paths_are_decoded_once_and_slashes_tolerated(start_server):
    server = start_server()
    for path in ("/health/", "//health", "/heal%74h", "/health?x=1"):
        assert server.get(path)[0] == 200, path
    # Decoded once only: %2574 is "%74" after one decoding, which names no route.
    assert server.get("/heal%2574h")[0] == 404


def test_keep_alive_serves_many_requests_on_one_connection(start_server):
    import http.client
    server = start_server()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for _ in range(20):
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    assert connection.sock is not None   # still the same connection
    connection.close()


def test_access_log_line_per_request(start_server):
    server = start_server()
    server.get("/health")
    server.get("/missing")
    time.sleep(0.2)
    log = server.log()
    assert re.search(r"GET /health 200 \d+\.\dms 127\.0\.0\.1", log)
    assert re.search(r"GET /missing 404 \d+\.\dms 127\.0\.0\.1", log)


def test_startup_line_names_source_region_endpoints(aws_server, moto):
    server = aws_server(env={"AWS_DEFAULT_REGION": "eu-west-3"})
    line = next(l for l in server.log().splitlines() if "local-endpoints" in l and "credentials:" in l)
    assert "credentials: env" in line and "region eu-west-3" in line
    assert f"STS {moto.url}" in line and f"IAM {moto.url}" in line


def test_disconnect_mid_request_is_not_a_traceback(start_server):
    server = start_server()
    for payload in (b"GET /health HTTP/1.1\r\nHost: x\r\n", b"GET /heal", b""):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(payload)
    assert server.get("/health")[0] == 200
    time.sleep(0.3)
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_within_two_seconds(start_server, signum):
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port)):   # an idle keep-alive client
        returncode, seconds = server.stop(signum)
    assert returncode == 0 and seconds < 2.0, (returncode, seconds)
    assert "Traceback" not in server.log()


def test_dual_stack_bind_serves_ipv4_and_ipv6(start_server):
    require_ipv6_loopback()
    server = start_server(args=("--bind", "::"))
    assert server.get("/health")[0] == 200
    with socket.create_connection(("::1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    assert re.search(r"GET /health 200 \S+ 127\.0\.0\.1$", server.log(), re.M)   # mapped address as IPv4


# ---------------------------------------------------------------------------
# Credentials from moto, checked by real clients
# ---------------------------------------------------------------------------

def test_creds_long_term_keys_get_one_session_token(aws_server, moto, secrets):
    server = aws_server()
    first = vended(server, "/creds", secrets)
    assert list(first) == CRED_KEYS
    assert first["RoleArn"] == "" and EXPIRATION.fullmatch(first["Expiration"])
    assert first["Token"]   # moto's GetSessionToken answers canned keys, so only the token shows
    assert 3000 < expires_in(first) <= 3600
    for _ in range(5):
        assert vended(server, "/creds/", secrets) == first
    assert moto.count("GetSessionToken") == 1
    assert server.get("/creds")[1]["Content-Type"] == "application/json"


def test_role_by_name_caches_get_role_and_assume_role(aws_server, moto, secrets):
    arn = moto.create_role("app-role", path="/team/")
    server = aws_server()
    moto.reset_counts()
    credentials = vended(server, "/role/app-role", secrets)
    assert list(credentials) == CRED_KEYS and credentials["RoleArn"] == arn
    for _ in range(3):
        assert vended(server, "/role/app-role/", secrets) == credentials
    assert moto.count("GetRole") == 1 and moto.count("AssumeRole") == 1
    identity = sts_identity(moto, credentials)
    assert identity["Arn"].endswith("assumed-role/app-role/ecs-local-app-role")


@pytest.mark.parametrize("arn", [
    "arn:aws:iam::123456789012:role/team/app/deep-name",
    "arn:aws-cn:iam::123456789012:role/cn-role",
    "arn:aws:iam::123456789012:role/" + "r" * 64,
])
def test_role_arn_with_paths_partitions_and_long_names(aws_server, moto, secrets, arn):
    server = aws_server()
    credentials = vended(server, "/role-arn/" + arn, secrets)
    assert credentials["RoleArn"] == arn
    assert vended(server, "/role-arn/" + arn + "/", secrets) == credentials
    assert moto.count("AssumeRole") == 1
    if arn.startswith("arn:aws:"):
        session = sts_identity(moto, credentials)["Arn"].rsplit("/", 1)[-1]
        name = arn.rsplit("/", 1)[-1]
        assert session == f"ecs-local-{name}"[:64]


def test_concurrent_cold_requests_make_one_sts_call(aws_server, moto, secrets):
    server = aws_server()
    arn = "arn:aws:iam::123456789012:role/single-flight"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda path: server.get(path), ["/creds"] * 16 + ["/role-arn/" + arn] * 16))
    assert all(r[0] == 200 for r in results)
    assert len({r[2] for r in results}) == 2
    for r in results:
        doc = json.loads(r[2])
        secrets.add(doc["SecretAccessKey"], "secret access key")
        secrets.add(doc["Token"], "session token")
    assert moto.count("GetSessionToken") == 1 and moto.count("AssumeRole") == 1


def test_botocore_container_provider_and_real_sts_call(aws_server, moto, monkeypatch, secrets):
    """botocore's own container provider (FULL_URI to loopback) accepts every route's answer."""
    arn = moto.create_role("botocore-role")
    server = aws_server()
    for path in ("/creds", "/role/botocore-role", f"/role-arn/{arn}"):
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", server.url + path)
        provider = botocore.credentials.ContainerProvider()
        credentials = provider.load()
        assert credentials is not None and credentials.method == "container-role"
        frozen = credentials.get_frozen_credentials()
        secrets.add(frozen.secret_key, "secret access key")
        secrets.add(frozen.token, "session token")
        identity = sts_identity(moto, {"AccessKeyId": frozen.access_key, "SecretAccessKey": frozen.secret_key,
                                       "Token": frozen.token})
        assert identity["Account"]


def test_aws_cli_gets_caller_identity_through_the_server(aws_server, moto, tmp_path, secrets):
    arn = moto.create_role("cli-role")
    server = aws_server()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{server.url}/role/cli-role"}
    for key in ("PYENV_ROOT", "PYENV_VERSION"):
        if key in os.environ:
            env[key] = os.environ[key]
    result = subprocess.run([console_script("aws"), "sts", "get-caller-identity", "--endpoint-url", moto.moto_url, "--output",
                             "json"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "assumed-role/cli-role/ecs-local-cli-role" in json.loads(result.stdout)["Arn"]
    assert arn


# ---------------------------------------------------------------------------
# Base credentials that are already temporary, and the whole chain
# ---------------------------------------------------------------------------

def test_temporary_env_credentials_pass_through(aws_server, moto):
    token = "IQoJb3JpZ2luX2VjEXAMPLETOKEN" + "x" * 40
    server = aws_server(env={"AWS_SESSION_TOKEN": token, "SHARED_TOKEN_EXPIRATION": "15m"})
    credentials = body(server.get("/creds"))
    assert credentials["Token"] == token and credentials["AccessKeyId"] == moto.env["AWS_ACCESS_KEY_ID"]
    assert 890 < expires_in(credentials) <= 900
    assert moto.count("GetSessionToken") == 0


def test_bad_shared_token_expiration_warns_and_uses_750s(aws_server):
    token = "IQoJb3JpZ2luX2VjEXAMPLETOKEN" + "y" * 40
    server = aws_server(env={"AWS_SESSION_TOKEN": token, "SHARED_TOKEN_EXPIRATION": "soon"})
    assert 740 < expires_in(body(server.get("/creds"))) <= 750
    assert "SHARED_TOKEN_EXPIRATION" in server.log() and "WARNING" in server.log()


def write_aws_config(home: Path, config: str, credentials: str = "") -> None:
    (home / ".aws").mkdir(exist_ok=True)
    (home / ".aws" / "config").write_text(config)
    if credentials:
        (home / ".aws" / "credentials").write_text(credentials)


def test_credential_process_profile_keeps_its_real_expiry(start_server, tmp_path, moto):
    expiry = (datetime.now(timezone.utc) + timedelta(hours=2)).replace(microsecond=0)
    process = tmp_path / "creds.py"
    process.write_text("import json; print(json.dumps({'Version': 1, 'AccessKeyId': 'ASIAPROCESSEXAMPLE', "
                       "'SecretAccessKey': 'process-secret-key-example-value', "
                       "'SessionToken': 'process-session-token-example-value', "
                       f"'Expiration': '{expiry.isoformat().replace('+00:00', 'Z')}'}}))\n")
    write_aws_config(tmp_path / "home",
                     f"[profile dev]\ncredential_process = {sys.executable} {process}\nregion = eu-central-1\n")
    server = start_server(env={"AWS_PROFILE": "dev", "STS_ENDPOINT": moto.url})
    credentials = body(server.get("/creds"))
    assert credentials["AccessKeyId"] == "ASIAPROCESSEXAMPLE"
    assert credentials["Expiration"] == expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "credentials: custom-process" in server.log() and "region eu-central-1" in server.log()


def test_assume_role_profile_is_passed_through(start_server, tmp_path, moto, secrets):
    arn = moto.create_role("profile-role")
    write_aws_config(tmp_path / "home",
                     f"[profile base]\nregion = us-east-1\n[profile app]\nrole_arn = {arn}\nsource_profile = base\n",
                     f"[base]\naws_access_key_id = {moto.env['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {moto.env['AWS_SECRET_ACCESS_KEY']}\n")
    secrets.add(moto.env["AWS_SECRET_ACCESS_KEY"], "secret access key")
    server = start_server(env={"AWS_PROFILE": "app", "AWS_ENDPOINT_URL_STS": moto.url})
    credentials = vended(server, "/creds", secrets)
    assert credentials["AccessKeyId"].startswith("ASIA") and credentials["RoleArn"] == ""
    assert 3000 < expires_in(credentials) <= 3600
    assert moto.count("GetSessionToken") == 0
    assert "assumed-role/profile-role/" in sts_identity(moto, credentials)["Arn"]


def test_expired_sso_session_is_503_naming_the_login_command(start_server, tmp_path):
    write_aws_config(tmp_path / "home",
                     "[profile corp]\nsso_session = corp-sso\nsso_account_id = 123456789012\n"
                     "sso_role_name = Dev\nregion = us-east-1\n"
                     "[sso-session corp-sso]\nsso_start_url = https://example.awsapps.com/start\n"
                     "sso_region = us-east-1\n")
    server = start_server(env={"AWS_PROFILE": "corp"})
    doc = assert_error(server.get("/creds"), 503, "SSOSessionExpired")
    assert "aws sso login --profile corp" in doc["message"]
    assert server.get("/health")[0] == 200


def test_mfa_profile_without_terminal_is_503_not_a_hang(start_server, tmp_path, moto):
    write_aws_config(tmp_path / "home",
                     "[profile base]\nregion = us-east-1\n"
                     "[profile mfa]\nrole_arn = arn:aws:iam::123456789012:role/mfa-role\nsource_profile = base\n"
                     "mfa_serial = arn:aws:iam::123456789012:mfa/dev\n",
                     f"[base]\naws_access_key_id = {moto.env['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {moto.env['AWS_SECRET_ACCESS_KEY']}\n")
    server = start_server(env={"AWS_PROFILE": "mfa", "AWS_ENDPOINT_URL_STS": moto.url})
    started = time.monotonic()
    doc = assert_error(server.get("/creds", timeout=10), 503, "MfaRequired")
    assert time.monotonic() - started < 5
    assert "mfa" in doc["message"] and "terminal" in doc["message"]


def test_mfa_profile_asks_for_the_code_once_at_startup_on_a_terminal(tmp_path, moto, secrets):
    """With a terminal attached (a real pty), the code is asked at start-up, then never again."""
    home = tmp_path / "home"
    home.mkdir()
    write_aws_config(home,
                     "[profile base]\nregion = us-east-1\n"
                     "[profile mfa]\nrole_arn = arn:aws:iam::123456789012:role/mfa-role\nsource_profile = base\n"
                     "mfa_serial = arn:aws:iam::123456789012:mfa/dev\n",
                     f"[base]\naws_access_key_id = {moto.env['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {moto.env['AWS_SECRET_ACCESS_KEY']}\n")
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "AWS_PROFILE": "mfa", "AWS_ENDPOINT_URL_STS": moto.url,
           "AWS_EC2_METADATA_DISABLED": "true"}
    pid, terminal = pty.fork()
    if pid == 0:   # the child: the pty is its controlling terminal
        os.chdir(REPO_ROOT)
        os.execve(sys.executable, [sys.executable, "local_endpoints.py", "--port", str(port), "--bind",
                                   "127.0.0.1", "--log-level", "DEBUG"], env)
    output = b""
    try:
        moto.reset_counts()
        deadline = time.monotonic() + 20
        while b"MFA" not in output and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.5)[0]:
                output += os.read(terminal, 4096)
        assert b"MFA" in output, output
        os.write(terminal, b"123456\n")
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _answers(url), 20)
        for _ in range(3):
            status, _, raw = http_request(url, "GET", "/creds")
            assert status == 200, raw
            credentials = json.loads(raw)
            secrets.add(credentials["SecretAccessKey"], "secret access key")
            secrets.add(credentials["Token"], "session token")
        assert moto.count("AssumeRole") == 1
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        while select.select([terminal], [], [], 0.1)[0]:
            try:
                output += os.read(terminal, 4096)
            except OSError:
                break
        os.close(terminal)
    assert output.count(b"MFA") == 1
    assert not secrets.leaks(output.decode(errors="replace"))


def _answers(url: str) -> bool:
    try:
        return http_request(url, "GET", "/health")[0] == 200
    except OSError:
        return False


def test_no_credentials_is_503_and_the_server_keeps_serving(start_server):
    server = start_server()
    doc = assert_error(server.get("/creds"), 503, "NoCredentials")
    assert "~/.aws" in doc["message"] and "AWS_PROFILE" in doc["message"]
    health = body(server.get("/health"))
    assert health["status"] == "ok" and health["credentials"]["resolved"] is False
    assert_error(server.get("/role/anything"), 503, "NoCredentials")


def test_missing_profile_starts_and_says_so_per_request(start_server):
    """AWS_PROFILE set but ~/.aws not mounted: metadata keeps working, credentials say why not."""
    server = start_server(env={"AWS_PROFILE": "forgot-to-mount"})
    doc = assert_error(server.get("/creds"), 503, "NoCredentials")
    assert "forgot-to-mount" in doc["message"] and "~/.aws" in doc["message"]
    assert_error(server.get("/role/app"), 503, "NoCredentials")
    assert body(server.get("/health"))["credentials"]["resolved"] is False


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path,code", [
    ("/role/bad%20name", "InvalidRoleName"),
    ("/role/" + "n" * 65, "InvalidRoleName"),
    ("/role/a;b", "InvalidRoleName"),
    ("/role-arn/not-an-arn", "InvalidRoleArn"),
    ("/role-arn/arn:aws:iam::12345:role/x", "InvalidRoleArn"),
    ("/role-arn/arn:aws:s3:::bucket", "InvalidRoleArn"),
    ("/role-arn/arn:aws:iam::123456789012:user/someone", "InvalidRoleArn"),
])
def test_malformed_roles_never_reach_aws(aws_server, moto, path, code):
    server = aws_server()
    moto.reset_counts()
    assert_error(server.get(path), 400, code)
    assert moto.count() == 0
    assert server.get("/health")[0] == 200


def test_unknown_role_is_404(aws_server):
    assert_error(aws_server().get("/role/no-such-role"), 404, "NoSuchRole")


def test_unreachable_sts_is_a_quick_502(start_server, moto):
    dead = f"http://127.0.0.1:{free_port()}"
    server = start_server(env={**moto.env, "STS_ENDPOINT": dead, "IAM_ENDPOINT": dead})
    started = time.monotonic()
    doc = assert_error(server.get("/creds"), 502, "UpstreamUnavailable")
    assert time.monotonic() - started < 2.0, "must answer before an SDK's own 2 s timeout"
    assert "GetSessionToken" in doc["message"]
    assert_error(server.get("/role/x"), 502, "UpstreamUnavailable")


class FakeAws(BaseHTTPRequestHandler):
    """Fake STS/IAM answering one canned AWS error: moto cannot be made to deny,
    throttle or fail on demand. Records the User-Agent of each call."""

    answers: dict[str, tuple[int, str]] = {}
    user_agents: list[str] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        FakeAws.user_agents.append(self.headers.get("User-Agent", ""))
        status, code = FakeAws.answers["next"]
        payload = (f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
                   f"<Message>canned {code}</Message></Error><RequestId>1</RequestId></ErrorResponse>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_aws():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAws)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeAws.user_agents.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status,aws_code,expected_status,expected_code", [
    (403, "AccessDenied", 403, "AccessDenied"),
    (400, "Throttling", 429, "Throttled"),
    (500, "InternalFailure", 502, "UpstreamUnavailable"),
    (404, "NoSuchEntity", 404, "NoSuchRole"),
])
def test_aws_errors_map_to_statuses(start_server, fake_aws, moto, status, aws_code, expected_status,
                                    expected_code):
    FakeAws.answers["next"] = (status, aws_code)
    server = start_server(env={**moto.env, "STS_ENDPOINT": fake_aws, "IAM_ENDPOINT": fake_aws})
    for path in ("/creds", "/role/some-role"):
        doc = assert_error(server.get(path), expected_status, expected_code)
        assert aws_code in doc["message"]
    assert any(f"local-endpoints/{le.VERSION}" in agent for agent in FakeAws.user_agents)
    assert server.get("/health")[0] == 200


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("750s", 750), ("15m", 900), ("1h", 3600), ("1h30m", 5400),
                                          ("3600", 3600), ("500ms", 0.5)])
def test_parse_duration(text, seconds):
    assert le.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "15x", "-5s", "1h soon"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        le.parse_duration(text)


@pytest.mark.parametrize("path,handler,params", [
    ("/creds", le.CredentialRoutes.creds, {}),
    ("/role/x", le.CredentialRoutes.role, {"name": "x"}),
    ("/role-arn/arn:aws:iam::1:role/a/b", le.CredentialRoutes.role_arn, {"arn": "arn:aws:iam::1:role/a/b"}),
    ("/v4", le.MetadataRoutes.container, {"version": 4}),
    ("/v4/web", le.MetadataRoutes.container, {"version": 4, "ident": "web"}),
    ("/v3/containers/web", le.MetadataRoutes.container, {"version": 3, "ident": "web"}),
    ("/v4/task", le.MetadataRoutes.task, {"version": 4}),
    ("/v4/web/task", le.MetadataRoutes.task, {"version": 4, "ident": "web"}),
    ("/v4/containers/web/taskWithTags", le.MetadataRoutes.task_with_tags, {"version": 4, "ident": "web"}),
    ("/v4/stats", le.MetadataRoutes.container_stats, {"version": 4}),
    ("/v3/web/stats", le.MetadataRoutes.container_stats, {"version": 3, "ident": "web"}),
    ("/v4/task/stats", le.MetadataRoutes.task_stats, {"version": 4}),
    ("/v4/web/task/stats", le.MetadataRoutes.task_stats, {"version": 4, "ident": "web"}),
    ("/v2/metadata", le.MetadataRoutes.task, {"version": 2}),
    ("/v2/metadata/abc", le.MetadataRoutes.container, {"version": 2, "ident": "abc"}),
    ("/v2/metadataWithTags", le.MetadataRoutes.task_with_tags, {"version": 2}),
    ("/v2/stats", le.MetadataRoutes.task_stats, {"version": 2}),
    ("/v2/stats/abc", le.MetadataRoutes.container_stats, {"version": 2, "ident": "abc"}),
    ("/health", le.MetadataRoutes.health, {}),
])
def test_route_table(path, handler, params):
    route, found = le.resolve("GET", path)
    assert route.handler is handler and found == params
    assert (route.guard is le.Guard.TOKEN) == path.startswith(("/creds", "/role"))


@pytest.mark.parametrize("path", ["/v4/containers", "/v5/x", "/v4/a/b/c", "/role/", "/creds/x", "/v2/metadata/a/b"])
def test_route_table_unknown(path):
    with pytest.raises(le.ApiError) as error:
        le.resolve("GET", path)
    assert error.value.status == 404


@pytest.mark.parametrize("raw,path", [("/a//b/", "/a/b"), ("/%61", "/a"), ("/x?y=/z", "/x"), ("/", "/"),
                                      ("//", "/"), ("/a%2Fb", "/a/b"), ("/%ff", "/\ufffd")])
def test_normalize_path(raw, path):
    assert le.normalize_path(raw) == path


def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize("error,status,code", [
    (client_error(403, "AccessDenied"), 403, "AccessDenied"),
    (client_error(403, "InvalidClientTokenId"), 403, "AccessDenied"),
    (client_error(404, "NoSuchEntity"), 404, "NoSuchRole"),
    (client_error(400, "Throttling"), 429, "Throttled"),
    (client_error(503, "ServiceUnavailable"), 502, "UpstreamUnavailable"),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), 502, "UpstreamUnavailable"),
    (botocore.exceptions.NoCredentialsError(), 503, "NoCredentials"),
    (botocore.exceptions.ProfileNotFound(profile="p"), 503, "NoCredentials"),
    (botocore.exceptions.UnauthorizedSSOTokenError(), 503, "SSOSessionExpired"),
    (le.MfaCodeRequired("code?"), 503, "MfaRequired"),
])
def test_aws_error_mapping(error, status, code):
    mapped = le.aws_error(error, "Op", "dev")
    assert (mapped.status, mapped.code) == (status, code)


def make_credentials(minutes_left: float, key: str = "AKIDOLD") -> le.Credentials:
    return le.Credentials(key, "secret", "token", datetime.now(timezone.utc) + timedelta(minutes=minutes_left))


class FakeIdentity:
    profile = None


def test_credentials_response_format():
    secret, token = "secret-access-key-value", "session-token-value"
    credentials = le.Credentials("AKID", secret, token, datetime(2026, 11, 29, 8, 0, 0, 123, tzinfo=timezone.utc),
                                 role_arn="arn")
    assert credentials.response() == {"RoleArn": "arn", "AccessKeyId": "AKID", "SecretAccessKey": secret,
                                      "Token": token, "Expiration": "2026-11-29T08:00:00Z"}
    for text in (repr(credentials), str(credentials), f"{credentials}", repr([credentials])):
        assert "AKID" in text   # it is this object's text ...
        assert secret not in text and token not in text, text   # ... without its secrets


def test_cache_serves_a_valid_entry_when_sts_fails_and_warns(caplog):
    vendor = le.CredentialVendor(FakeIdentity(), le.default_config())
    vendor._cache["k"] = make_credentials(12)   # inside the refresh window, still valid

    def failing():
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://sts")
    with caplog.at_level("WARNING"):
        assert vendor._cached("k", failing)[0].access_key_id == "AKIDOLD"
    assert "serving cached credentials" in caplog.text
    vendor._cache["k"] = make_credentials(-1)   # expired: the failure shows
    with pytest.raises(le.ApiError) as error:
        vendor._cached("k", failing)
    assert error.value.status == 502


def test_cache_refreshes_ahead_in_the_background():
    vendor = le.CredentialVendor(FakeIdentity(), le.default_config())
    vendor._cache["k"] = make_credentials(25)   # fresh enough to serve, old enough to refresh
    calls = []
    refreshed = threading.Event()

    def fetch():
        calls.append(1)
        refreshed.set()
        return make_credentials(60, "AKIDNEW")
    assert vendor._cached("k", fetch)[0].access_key_id == "AKIDOLD"   # served at once
    assert refreshed.wait(5)
    assert wait_for(lambda: vendor._cache["k"].access_key_id == "AKIDNEW", 5), "the refresh was not stored"
    assert vendor._cached("k", fetch)[0].access_key_id == "AKIDNEW" and len(calls) == 1


def test_cache_reuses_entries_with_more_than_twenty_minutes_left():
    vendor = le.CredentialVendor(FakeIdentity(), le.default_config())
    vendor._cache["k"] = make_credentials(19)
    assert vendor._cached("k", lambda: make_credentials(60, "AKIDNEW"))[0].access_key_id == "AKIDNEW"
    assert vendor._cached("k", lambda: pytest.fail("must not refetch"))[0].access_key_id == "AKIDNEW"


# ---------------------------------------------------------------------------
# One definition per setting; route rules; lookups (in process, no Docker)
# ---------------------------------------------------------------------------

def test_docs_settings_table_is_made_from_the_definitions():
    page = (REPO_ROOT / "docs/settings.md").read_text()
    table = page.split("<!-- settings:begin -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert table == le.settings_table(), (
        "docs/settings.md's settings table differs from SETTINGS; regenerate it with "
        "python3 -c 'import local_endpoints as le; print(le.settings_table())'")


def test_every_config_field_has_exactly_one_setting():
    fields = [s.field for s in le.SETTINGS if s.field]
    assert sorted(fields) == sorted(le.Config.__dataclass_fields__) and len(set(fields)) == len(fields)
    defaults = le.default_config()
    assert defaults.shared_token_expiration == 750.0 and defaults.port == 80 and defaults.task_tags is None


def test_settings_come_from_flag_then_variable_then_alias_then_default():
    args = le.parse_args(["--port", "8080"])
    config = le.load_config(args, {"ECS_LOCAL_METADATA_PORT": "9090", "AWS_ENDPOINT_URL": "sts.local:1",
                                   "TASK_TAGS_VAR": "a=1"})
    assert config.port == 8080 and config.sts_endpoint == "https://sts.local:1" and config.task_tags == {"a": "1"}
    assert le.load_config(le.parse_args([]), {"ECS_LOCAL_METADATA_PORT": "9090"}).port == 9090
    with pytest.raises(le.ConfigError, match="ECS_LOCAL_MAX_CONNECTIONS"):
        le.load_config(le.parse_args([]), {"ECS_LOCAL_MAX_CONNECTIONS": "0"})
    with pytest.raises(le.ConfigError, match="--port"):
        le.load_config(le.parse_args(["--port", "70000"]), {})


@pytest.mark.parametrize("rule,path,params", [
    ("/a/{x}", "/a/b", {"x": "b"}),
    ("/a/{x}", "/a/b/c", None),
    ("/a/{x:path}", "/a/b/c", {"x": "b/c"}),
    ("/v{n:3|4}", "/v4", {"n": 4}),
    ("/v{n:3|4}", "/v5", None),
    ("/k/{w:on|off}", "/k/on", {"w": "on"}),
    ("/v{n:3}[/{id:container}]", "/v3", {"n": 3}),
    ("/v{n:3}[/{id:container}]", "/v3/web", {"n": 3, "id": "web"}),
    ("/v{n:3}[/{id:container}]", "/v3/task", None),
    ("/v{n:3}[/{id:container}]", "/v3/tasks", {"n": 3, "id": "tasks"}),
    ("/v{n:3}[[/containers]/{id:container}]/x", "/v3/containers/web/x", {"n": 3, "id": "web"}),
    ("/a.b", "/aXb", None),
])
def test_route_rules(rule, path, params):
    pattern, converters = le.compile_rule(rule)
    match = pattern.fullmatch(path)
    if params is None:
        assert match is None
    else:
        assert {k: converters[k](v) for k, v in match.groupdict().items() if v is not None} == params


def fake_container(name: str, address: str) -> dict:
    return {"Id": le.uuid.uuid5(le.TASK_ID_NAMESPACE, name).hex * 2, "Name": "/" + name, "Created": "",
            "State": {"Running": True, "Status": "running"}, "Config": {"Labels": {}},
            "NetworkSettings": {"Networks": {"bridge": {"NetworkID": "n1", "IPAddress": address}}}}


def test_lookup_by_identifier_is_not_confused_with_lookup_by_address():
    """/v4/10.0.0.5 names a container "10.0.0.5", which does not exist, even after the container
    at 10.0.0.5 asked /v4 (the two lookups once shared a memo key)."""
    config = le.default_config()
    endpoints = le.build_endpoints(config, le.DockerClient(config.docker_host), le.AwsIdentity(config))
    metadata = endpoints.family(le.MetadataRoutes)
    web = fake_container("web", "10.0.0.5")
    snapshot = le.Snapshot({web["Id"]: web}, {})
    endpoints.view._snapshot, endpoints.view._synced = snapshot, True
    endpoints.view.sync = lambda after=0.0: snapshot   # the resync after a miss finds the same

    def locate(params: dict) -> dict:
        request = le.Request(params, le.plain_ip("10.0.0.5"), le.email.message.Message(), time.monotonic())
        return metadata.locate(request)[1]

    assert locate({"version": 4})["Id"] == web["Id"]
    with pytest.raises(le.ApiError) as missing:
        locate({"version": 4, "ident": "10.0.0.5"})
    assert missing.value.status == 404 and missing.value.code == "ContainerNotFound"
    assert locate({"version": 4, "ident": "web"})["Id"] == web["Id"]

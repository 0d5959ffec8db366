"""Credentials a team and its auditors can live with.

MFA once per working day (an aws-vault style MFA session opened at start-up on a
real pty), ECS_LOCAL_ALLOWED_ROLES, the audit trail (log lines and
ECS_LOCAL_AUDIT_LOG), AccountId in credentials documents, and a rotated
ECS_LOCAL_AUTHORIZATION_TOKEN_FILE.

STS and IAM are a real moto_server behind conftest's counting proxy (moto accepts
any MFA code); the clients are botocore's container provider and the AWS CLI; the
audit test's caller is a real container on a Docker bridge network.  The parts
that only time can show (an MFA session that has ended) are tested in-process
with a session whose expiry lies in the past, as the server would hold it.
Fakes appear only for answers moto cannot give on demand (a refused MFA code; a
GetCallerIdentity that fails while GetSessionToken works), and say so.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from secrets import token_urlsafe

import botocore.credentials
import pytest

import local_endpoints as le
from testlib import (REPO_ROOT, IdentityWithoutCallerIdentity, console_script, creds_from_namespace, free_port, get,
                     http_request, wait_for)

ACCOUNT = "123456789012"
MFA_SERIAL = f"arn:aws:iam::{ACCOUNT}:mfa/dev"
AUDIT_KEYS = ["time", "route", "caller", "container", "role", "accessKeyId", "expiration", "source", "outcome"]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def aws_env(moto, **extra) -> dict:
    """Server environment: moto's dummy identity, STS/IAM at the counting proxy, no Docker."""
    return {**moto.env, "STS_ENDPOINT": moto.url, "IAM_ENDPOINT": moto.url,
            "DOCKER_HOST": "unix:///nonexistent.sock", **extra}


def vended(secrets, response) -> dict:
    """A 200 credentials document, its secret parts registered for the log checks."""
    status, _, body = response
    assert status == 200, body[:500]
    doc = json.loads(body)
    secrets.add(doc["SecretAccessKey"], "secret access key")
    secrets.add(doc["Token"], "session token")
    return doc


def error_of(response, status: int, code: str) -> dict:
    got, headers, body = response
    assert got == status, body[:500]
    doc = json.loads(body)
    assert doc["code"] == code and doc["HTTPErrorCode"] == status, doc
    return doc


def audit_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "local_endpoints.audit" in line]


def no_secrets_in(secrets, *texts: str) -> None:
    for text in texts:
        assert not secrets.leaks(text), secrets.leaks(text)


def write_aws_config(home: Path, config: str, credentials: str = "") -> None:
    (home / ".aws").mkdir(parents=True, exist_ok=True)
    (home / ".aws" / "config").write_text(config)
    if credentials:
        (home / ".aws" / "credentials").write_text(credentials)


def mfa_profiles(home: Path, moto, role_arn: str, extra: str = "") -> None:
    """base: long-term keys with mfa_serial; team: role_arn from base (the aws-vault layout)."""
    write_aws_config(home,
                     f"[profile base]\nregion = us-east-1\nmfa_serial = {MFA_SERIAL}\n"
                     f"[profile team]\nrole_arn = {role_arn}\nsource_profile = base\n{extra}",
                     f"[base]\naws_access_key_id = {moto.env['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {moto.env['AWS_SECRET_ACCESS_KEY']}\n")


class TerminalServer:
    """local_endpoints.py with a real pty as its controlling terminal, as `docker run -it` gives."""

    def __init__(self, home: Path, moto, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = b""
        full = {"PATH": os.environ["PATH"], "HOME": str(home), "AWS_PROFILE": "team",
                "STS_ENDPOINT": moto.url, "IAM_ENDPOINT": moto.url, "AWS_EC2_METADATA_DISABLED": "true",
                "DOCKER_HOST": "unix:///nonexistent.sock", **(env or {})}
        for key in ("PYENV_ROOT", "PYENV_VERSION"):
            if key in os.environ:
                full[key] = os.environ[key]
        self.pid, self.terminal = pty.fork()
        if self.pid == 0:   # the child: the pty is its controlling terminal
            os.chdir(REPO_ROOT)
            os.execve(sys.executable, [sys.executable, "local_endpoints.py", "--port", str(self.port), "--bind",
                                       "127.0.0.1", "--log-level", "DEBUG"], full)

    def read_until(self, marker: bytes, timeout: float = 20, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.output.count(marker) < count and time.monotonic() < deadline:
            if select.select([self.terminal], [], [], 0.2)[0]:
                self.output += os.read(self.terminal, 4096)
        assert self.output.count(marker) >= count, self.output

    def answer_prompt(self, code: str, prompt: int = 1) -> None:
        """Type code at the prompt-th prompt (getpass discards what is typed before it asks)."""
        self.read_until(b"Enter MFA code for " + MFA_SERIAL.encode(), count=prompt)
        os.write(self.terminal, code.encode() + b"\n")

    def type_code(self, code: str = "123456", prompt: int = 1) -> None:
        """Type code, then wait for the start-up line: the server serves from then on."""
        self.answer_prompt(code, prompt)
        self.read_until(b"local-endpoints " + le.VERSION.encode())

    def get(self, path: str):
        return http_request(self.url, "GET", path)

    def stop(self) -> str:
        os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)
        while True:
            try:
                if not select.select([self.terminal], [], [], 0.1)[0]:
                    break
                chunk = os.read(self.terminal, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        os.close(self.terminal)
        return self.output.decode(errors="replace")


@pytest.fixture
def terminal_server(tmp_path, moto, secrets):
    started = []

    def start(env: dict | None = None) -> TerminalServer:
        server = TerminalServer(tmp_path / "home", moto, env)
        started.append(server)
        return server
    yield start
    for server in started:
        if server.terminal >= 0:
            try:
                output = server.stop()
            except (ProcessLookupError, ChildProcessError):
                continue
            assert not secrets.leaks(output), secrets.leaks(output)


def parse_expiration(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------------------
# 1. MFA once per working day
# ---------------------------------------------------------------------------

def test_one_mfa_code_serves_role_refreshes_without_a_second_prompt(terminal_server, moto, secrets, tmp_path):
    """The code typed once opens a 12 h session; the profile's 15-minute role (duration_seconds=900,
    always under the cache's 20-minute reuse threshold) is assumed again on every /creds with the
    session's credentials: three refreshes, one GetSessionToken, one prompt."""
    arn = moto.create_role("le-team-mfa-role")
    mfa_profiles(tmp_path / "home", moto, arn, "duration_seconds = 900\nexternal_id = team-external-id\n"
                                              "role_session_name = alice\n")
    secrets.add(moto.env["AWS_SECRET_ACCESS_KEY"], "secret access key")
    session = moto.client("sts").get_session_token()["Credentials"]   # moto's (canned) MFA session
    secrets.add(session["SecretAccessKey"], "secret access key")
    secrets.add(session["SessionToken"], "session token")
    moto.reset_counts()
    server = terminal_server()
    server.type_code()
    assert moto.count("GetSessionToken") == 1
    keys = []
    for _ in range(3):
        credentials = vended(secrets, server.get("/creds"))
        assert credentials["RoleArn"] == "" and credentials["AccountId"] == ACCOUNT
        assert 800 < (parse_expiration(credentials["Expiration"]) - datetime.now(timezone.utc)).total_seconds() <= 900
        keys.append(credentials["AccessKeyId"])
    assert moto.count("AssumeRole") == 3 and len(set(keys)) == 3   # refreshed, not cached
    assert moto.count("GetSessionToken") == 1
    # The role credentials are real for STS, under the profile's role_session_name.
    import boto3
    identity = boto3.client("sts", region_name="us-east-1", endpoint_url=moto.moto_url,
                            aws_access_key_id=credentials["AccessKeyId"],
                            aws_secret_access_key=credentials["SecretAccessKey"],
                            aws_session_token=credentials["Token"]).get_caller_identity()
    assert identity["Arn"].endswith("assumed-role/le-team-mfa-role/alice")
    # Other roles are assumed with the same session: no prompt either.
    other = f"arn:aws:iam::{ACCOUNT}:role/le-team-other"
    assert vended(secrets, server.get("/role-arn/" + other))["RoleArn"] == other
    health = json.loads(server.get("/health")[2])["credentials"]
    ends = datetime.strptime(health["mfaSessionEnds"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert 11.9 * 3600 < (ends - datetime.now(timezone.utc)).total_seconds() <= 12 * 3600
    assert health["source"] == "mfa-session"
    output = server.stop()
    assert output.count("Enter MFA code") == 1
    assert "until " in output and "ends at" not in output   # 12 h left: no warning yet


def test_mfa_profile_without_role_answers_the_session_itself(terminal_server, moto, secrets, tmp_path):
    """mfa_serial on a profile with keys and no role: /creds answers the MFA session's credentials
    (with its own expiry), never a GetSessionToken of its own; a short session warns once."""
    write_aws_config(tmp_path / "home", f"[profile team]\nregion = us-east-1\nmfa_serial = {MFA_SERIAL}\n",
                     f"[team]\naws_access_key_id = {moto.env['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {moto.env['AWS_SECRET_ACCESS_KEY']}\n")
    secrets.add(moto.env["AWS_SECRET_ACCESS_KEY"], "secret access key")
    moto.reset_counts()
    server = terminal_server({"ECS_LOCAL_MFA_SESSION_DURATION": "20m"})
    server.type_code()
    first = vended(secrets, server.get("/creds"))
    assert vended(secrets, server.get("/creds")) == first
    left = (parse_expiration(first["Expiration"]) - datetime.now(timezone.utc)).total_seconds()
    assert 1100 < left <= 1200
    assert first["AccountId"] == ACCOUNT
    assert moto.count("GetSessionToken") == 1 and moto.count("GetCallerIdentity") == 1
    server.read_until(b"ends at")   # less than an hour left from the start: said once
    output = server.stop()
    assert output.count("ends at") == 1 and output.count("Enter MFA code") == 1


class CodeCheckingSts(BaseHTTPRequestHandler):
    """A fake STS that refuses the MFA code 000000 as AWS does (403 AccessDenied) and accepts any
    other: moto accepts every code, so a mistyped one cannot be shown with it."""

    codes: list[str] = []

    def do_POST(self):
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        CodeCheckingSts.codes.append(form["TokenCode"][0])
        if form["TokenCode"][0] == "000000":
            status, payload = 403, ("<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>"
                                    "MultiFactorAuthentication failed with invalid MFA one time pass code."
                                    "</Message></Error><RequestId>1</RequestId></ErrorResponse>")
        else:
            expiration = (datetime.now(timezone.utc) + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%SZ")
            status, payload = 200, (
                '<GetSessionTokenResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetSessionTokenResult>'
                "<Credentials><AccessKeyId>ASIAEXAMPLEFAKEMFA</AccessKeyId><SecretAccessKey>fake-mfa-secret-example"
                "</SecretAccessKey><SessionToken>fake-mfa-session-token-example</SessionToken>"
                f"<Expiration>{expiration}</Expiration></Credentials></GetSessionTokenResult>"
                "<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></GetSessionTokenResponse>")
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


def test_a_refused_mfa_code_may_be_typed_again(terminal_server, moto, secrets, tmp_path):
    sts = ThreadingHTTPServer(("127.0.0.1", 0), CodeCheckingSts)
    threading.Thread(target=sts.serve_forever, daemon=True).start()
    CodeCheckingSts.codes.clear()
    secrets.add("fake-mfa-secret-example", "secret access key")
    secrets.add("fake-mfa-session-token-example", "session token")
    try:
        write_aws_config(tmp_path / "home", f"[profile team]\nregion = us-east-1\nmfa_serial = {MFA_SERIAL}\n",
                         f"[team]\naws_access_key_id = {moto.env['AWS_ACCESS_KEY_ID']}\n"
                         f"aws_secret_access_key = {moto.env['AWS_SECRET_ACCESS_KEY']}\n")
        server = terminal_server({"STS_ENDPOINT": f"http://127.0.0.1:{sts.server_address[1]}"})
        server.answer_prompt("000000")
        server.type_code("123456", prompt=2)
        health = json.loads(server.get("/health")[2])["credentials"]
        assert health["source"] == "mfa-session" and health["mfaSessionEnds"]
        output = server.stop()
    finally:
        sts.shutdown()
        sts.server_close()
    assert CodeCheckingSts.codes == ["000000", "123456"]
    assert output.count("Enter MFA code") == 2 and "invalid MFA one time pass code" in output


def test_mfa_session_duration_setting_is_checked_at_startup(tmp_path):
    for value in ("10m", "37h", "soon"):
        result = subprocess.run([sys.executable, "local_endpoints.py", "--port", "0"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=20,
                                env={**os.environ, "ECS_LOCAL_MFA_SESSION_DURATION": value})
        assert result.returncode == 2 and "ECS_LOCAL_MFA_SESSION_DURATION" in result.stderr, result.stderr


def mfa_identity(monkeypatch, tmp_path, session: le.Credentials | None) -> le.AwsIdentity:
    """An AwsIdentity of an MFA profile, holding the given session (as start-up would have left it)."""
    home = tmp_path / "home"
    write_aws_config(home, f"[profile base]\nregion = us-east-1\nmfa_serial = {MFA_SERIAL}\n"
                           f"[profile team]\nrole_arn = arn:aws:iam::{ACCOUNT}:role/r\nsource_profile = base\n",
                     "[base]\naws_access_key_id = AKIAEXAMPLEBASE\naws_secret_access_key = base-secret-example\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / ".aws" / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "team")
    identity = le.AwsIdentity(replace(le.default_config(), sts_endpoint="http://127.0.0.1:9",
                                          iam_endpoint="http://127.0.0.1:9"))
    assert identity.mfa == le.MfaProfile("team", MFA_SERIAL, "base", f"arn:aws:iam::{ACCOUNT}:role/r")
    identity.mfa_session = session
    return identity


def test_ended_mfa_session_is_503_on_every_credentials_route_even_cached(monkeypatch, tmp_path):
    """In-process: the session's end cannot be waited for in a test.  Cached role credentials
    are not served past it, and nothing calls AWS (the endpoints are a closed port)."""
    ended = le.Credentials("ASIAEXAMPLEMFA", "mfa-secret-example", "mfa-token-example",
                           datetime.now(timezone.utc) - timedelta(seconds=1))
    vendor = le.CredentialVendor(mfa_identity(monkeypatch, tmp_path, ended), le.default_config())
    role = f"arn:aws:iam::{ACCOUNT}:role/cached"
    vendor._cache["role:" + role] = le.Credentials("ASIACACHED", "s", "t",
                                                   datetime.now(timezone.utc) + timedelta(hours=1), role)
    for call in (vendor.own, lambda: vendor.role_arn(role), lambda: vendor.role("cached")):
        with pytest.raises(le.ApiError) as error:
            call()
        assert error.value.status == 503 and error.value.code == "MfaSessionExpired"
        assert "restart" in error.value.message and "new code" in error.value.message


def test_mfa_profile_without_a_session_asks_for_a_terminal(monkeypatch, tmp_path):
    vendor = le.CredentialVendor(mfa_identity(monkeypatch, tmp_path, None), le.default_config())
    with pytest.raises(le.ApiError) as error:
        vendor.role_arn(f"arn:aws:iam::{ACCOUNT}:role/x")
    assert error.value.status == 503 and error.value.code == "MfaRequired"
    assert "terminal" in error.value.message


def test_mfa_session_end_is_logged_once_ahead_and_once_at_the_end(monkeypatch, tmp_path, caplog):
    identity = mfa_identity(monkeypatch, tmp_path, None)
    ends = datetime.now(timezone.utc) + timedelta(seconds=1)
    with caplog.at_level(logging.WARNING, logger="local_endpoints"):
        watcher = threading.Thread(target=identity._watch_mfa_session, args=(ends,))
        watcher.start()
        watcher.join(10)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "ends at" in m]) == 1
    assert len([m for m in messages if "has ended" in m and "restart" in m]) == 1


@pytest.mark.parametrize("config,expected", [
    ("[profile p]\nmfa_serial = S\n", ("p", "S", "p")),
    ("[profile s]\nmfa_serial = S\n[profile p]\nrole_arn = R\nsource_profile = s\nduration_seconds = 900\n",
     ("p", "S", "s", "R", None, None, 900)),
    ("[profile s]\n[profile p]\nrole_arn = R\nsource_profile = s\nmfa_serial = S2\nexternal_id = E\n"
     "role_session_name = N\n", ("p", "S2", "s", "R", "E", "N")),
    ("[profile p]\nrole_arn = R\ncredential_source = Environment\nmfa_serial = S\n", None),
    ("[profile s]\n[profile p]\nrole_arn = R\nsource_profile = s\n", None),
    ("[profile p]\nregion = us-east-1\n", None),
])
def test_which_profiles_use_an_mfa_session(tmp_path, monkeypatch, config, expected):
    import botocore.session
    path = tmp_path / "config"
    path.write_text(config)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(path))
    session = botocore.session.Session()
    found = le.MfaProfile.of(session.full_config["profiles"], "p")
    assert found == (le.MfaProfile(*expected) if expected else None)


def test_keys_in_the_environment_come_before_an_mfa_profile(monkeypatch, tmp_path):
    """As in botocore's chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY win over the profile."""
    config = tmp_path / "config"
    config.write_text(f"[default]\nmfa_serial = {MFA_SERIAL}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert le.AwsIdentity(le.default_config()).mfa == le.MfaProfile("default", MFA_SERIAL, "default")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-example")
    assert le.AwsIdentity(le.default_config()).mfa is None


# ---------------------------------------------------------------------------
# 2. ECS_LOCAL_ALLOWED_ROLES
# ---------------------------------------------------------------------------

TEAM_ROLES = f"le-team-app,arn:aws:iam::{ACCOUNT}:role/team/*"


def test_allowed_roles_refuse_before_any_aws_call(start_server, moto, secrets):
    app = moto.create_role("le-team-app")
    api = moto.create_role("le-team-api", path="/team/")
    moto.create_role("le-team-admin")
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_ROLES=TEAM_ROLES))
    moto.reset_counts()
    # Allowed by name, by ARN glob, and by name when GetRole's ARN matches the glob.
    assert vended(secrets, server.get("/role/le-team-app"))["RoleArn"] == app
    assert vended(secrets, server.get("/role-arn/" + api))["RoleArn"] == api
    assert vended(secrets, server.get("/role/le-team-api"))["RoleArn"] == api
    moto.reset_counts()
    # Refused without any call: a name no entry could allow, ARNs outside the globs, and a
    # listed name asked for by ARN (that could be another account's role of the same name).
    for path in (f"/role-arn/arn:aws:iam::{ACCOUNT}:role/le-team-admin",
                 "/role-arn/arn:aws:iam::999999999999:role/le-team-app",
                 f"/role-arn/arn:aws:iam::{ACCOUNT}:role/team-not-under-the-path"):
        doc = error_of(server.get(path), 403, "RoleNotAllowed")
        assert "ECS_LOCAL_ALLOWED_ROLES" in doc["message"]
    assert moto.count() == 0
    # A name that only the glob's ARN can rule on: IAM is read, STS is never called.
    doc = error_of(server.get("/role/le-team-admin"), 403, "RoleNotAllowed")
    assert "ECS_LOCAL_ALLOWED_ROLES" in doc["message"] and "role/le-team-admin" in doc["message"]
    assert moto.count(service="sts") == 0 and moto.count("GetRole") == 1
    health = json.loads(server.get("/health")[2])
    assert health["credentials"]["allowedRoles"] == TEAM_ROLES.split(",")
    assert f"roles: {TEAM_ROLES};" in server.log()


def aws_cli(moto, uri: str, home: Path) -> subprocess.CompletedProcess:
    """`aws sts get-caller-identity` with the container provider pointed at uri."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONTAINER_CREDENTIALS_FULL_URI": uri}
    for key in ("PYENV_ROOT", "PYENV_VERSION"):
        if key in os.environ:
            env[key] = os.environ[key]
    return subprocess.run([console_script("aws"), "sts", "get-caller-identity", "--endpoint-url", moto.moto_url, "--output",
                           "json"], env=env, capture_output=True, text=True, timeout=60)


def test_aws_cli_gets_an_allowed_role_and_not_another(start_server, moto, tmp_path):
    moto.create_role("le-team-app")
    moto.create_role("le-team-admin")
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_ROLES="le-team-app"))
    allowed = aws_cli(moto, server.url + "/role/le-team-app", tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert "assumed-role/le-team-app/" in json.loads(allowed.stdout)["Arn"]
    moto.reset_counts()
    refused = aws_cli(moto, server.url + "/role/le-team-admin", tmp_path)
    assert refused.returncode != 0 and "credentials" in refused.stderr.lower(), refused.stderr
    assert moto.count() == 0
    assert "outcome=RoleNotAllowed" in server.log()


def test_names_only_allowlist_never_calls_aws_for_another_name(start_server, moto):
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_ROLES="le-team-app, le-team-worker"))
    moto.reset_counts()
    error_of(server.get("/role/le-team-admin"), 403, "RoleNotAllowed")
    error_of(server.get(f"/role-arn/arn:aws:iam::{ACCOUNT}:role/le-team-app"), 403, "RoleNotAllowed")
    assert moto.count() == 0
    assert json.loads(server.get("/health")[2])["credentials"]["allowedRoles"] == ["le-team-app", "le-team-worker"]


def test_unset_allowlist_allows_any_role(start_server, moto, secrets):
    server = start_server(env=aws_env(moto))
    assert vended(secrets, server.get(f"/role-arn/arn:aws:iam::{ACCOUNT}:role/anything"))
    assert json.loads(server.get("/health")[2])["credentials"]["allowedRoles"] is None
    assert "roles: any;" in server.log()


@pytest.mark.parametrize("value", ["team-*", "bad name", "arn:aws:s3:::bucket", " , "])
def test_bad_allowlist_stops_startup(value):
    result = subprocess.run([sys.executable, "local_endpoints.py", "--port", "0"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=20,
                            env={**os.environ, "ECS_LOCAL_ALLOWED_ROLES": value})
    assert result.returncode == 2 and "ECS_LOCAL_ALLOWED_ROLES" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("entries,name,expected", [
    ("app", "app", True),
    ("app", "other", False),
    ("arn:aws:iam::1:role/team-*", "team-api", None),
    ("arn:aws:iam::1:role/team-*", "admin", None),      # as in IAM, '*' spans '/': role/team-x/admin
    ("arn:aws:iam::1:role/*/app", "web", False),
    ("arn:aws:iam::1:role/team/*", "admin", None),      # the ARN decides: role/team/admin or role/admin
    ("arn:aws:iam::1:role/te*-api", "x-api", None),     # the '*' may span a path: role/team/x-api
    ("arn:aws:iam::1:role/te*-api", "x-web", False),
    ("arn:aws:iam::*:role/app", "app", None),
    ("arn:aws:iam::*:role/app", "app2", False),
])
def test_role_allowlist_name_precheck(entries, name, expected):
    assert le.RoleAllowlist.parse(entries).name_allowed(name) is expected


@pytest.mark.parametrize("entries,arn,expected", [
    ("arn:aws:iam::1:role/team-*", "arn:aws:iam::1:role/team-api", True),
    ("arn:aws:iam::1:role/team-*", "arn:aws:iam::2:role/team-api", False),
    ("arn:aws:iam::*:role/app", "arn:aws:iam::2:role/app", True),
    ("arn:aws:iam::1:role/team/*", "arn:aws:iam::1:role/team/a/b", True),
    ("arn:aws:iam::1:role/a.b", "arn:aws:iam::1:role/aXb", False),   # only '*' is special
    ("app", "arn:aws:iam::1:role/app", False),
])
def test_role_allowlist_arn_globs(entries, arn, expected):
    assert le.RoleAllowlist.parse(entries).arn_allowed(arn) is expected


# ---------------------------------------------------------------------------
# 3. The audit trail
# ---------------------------------------------------------------------------

def test_audit_trail_of_served_cached_and_refused_requests(start_server, moto, secrets, tmp_path):
    token = token_urlsafe(24)
    secrets.add(token, "authorization token")
    audit = tmp_path / "audit.jsonl"
    app = moto.create_role("le-team-app")
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_ROLES="le-team-app", ECS_LOCAL_AUDIT_LOG=audit,
                                      ECS_LOCAL_AUTHORIZATION_TOKEN=token,
                                      ECS_LOCAL_ALLOWED_CALLERS="127.0.0.1/32"))
    auth = {"Authorization": token}
    first = vended(secrets, get(server.port, "/role/le-team-app", auth))
    assert vended(secrets, get(server.port, "/role/le-team-app", auth)) == first
    own = vended(secrets, get(server.port, "/creds", auth))
    error_of(get(server.port, "/role/le-team-admin", auth), 403, "RoleNotAllowed")
    error_of(get(server.port, "/creds"), 401, "Unauthorized")
    error_of(get(server.port, "/creds", auth, source="127.0.0.2"), 403, "CallerNotAllowed")
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [list(r)[:len(AUDIT_KEYS)] for r in records] == [AUDIT_KEYS] * 6
    served = [r for r in records if r["outcome"] == "served"]
    assert [(r["route"], r["source"], r["accessKeyId"]) for r in served] == [
        ("/role/le-team-app", "sts", first["AccessKeyId"]), ("/role/le-team-app", "cache", first["AccessKeyId"]),
        ("/creds", "sts", own["AccessKeyId"])]
    assert served[0]["role"] == app and served[0]["expiration"] == first["Expiration"]
    assert served[2]["role"] == f"arn:aws:sts::{ACCOUNT}:user/moto"   # the base identity
    assert all(r["caller"] == "127.0.0.1" and r["container"] is None for r in served)
    refused = [r for r in records if r["outcome"] != "served"]
    assert [(r["route"], r["outcome"], r["caller"]) for r in refused] == [
        ("/role/le-team-admin", "RoleNotAllowed", "127.0.0.1"), ("/creds", "Unauthorized", "127.0.0.1"),
        ("/creds", "CallerNotAllowed", "127.0.0.2")]
    assert all(r["accessKeyId"] is None and r["reason"] for r in refused)
    assert "ECS_LOCAL_ALLOWED_ROLES" in refused[0]["reason"]
    times = [datetime.fromisoformat(r["time"].replace("Z", "+00:00")) for r in records]
    assert times == sorted(times) and abs((times[-1] - datetime.now(timezone.utc)).total_seconds()) < 60
    # The same six records in the log, one line each.
    lines = audit_lines(server.log())
    assert len(lines) == 6
    assert re.search(rf"INFO local_endpoints.audit: credentials route=/role/le-team-app caller=127\.0\.0\.1 "
                     rf"role={re.escape(app)} accessKeyId={first['AccessKeyId']} "
                     rf"expiration={first['Expiration']} source=sts outcome=served status=200 "
                     rf"elapsed=\d+\.\dms$", lines[0]), lines[0]
    assert "source=cache outcome=served status=200" in lines[1]
    assert re.search(r"WARNING .*route=/creds caller=127\.0\.0\.2 outcome=CallerNotAllowed status=403 "
                     r"elapsed=\d+\.\dms reason=", lines[5])
    # A 60 KB role "ARN" (refused) is cut in both records.
    huge = f"arn:aws:iam::{ACCOUNT}:role/" + "p/" * 30000 + "x"
    error_of(get(server.port, "/role-arn/" + huge, auth), 400, "InvalidRoleArn")
    last = json.loads(audit.read_text().splitlines()[-1])
    assert last["outcome"] == "InvalidRoleArn" and len(last["route"]) <= 700 and len(last["role"]) <= 700
    assert max(len(line) for line in audit_lines(server.log())) < 2500
    # For credentials routes the audit line stands for the access line; other routes keep theirs.
    server.get("/health")
    assert not re.search(r"GET /(creds|role)", server.log())
    assert wait_for(lambda: re.search(r"GET /health 200 \d+\.\dms 127\.0\.0\.1", server.log()), 5)
    # No secret anywhere: vended secret keys and tokens, the authorization token.
    assert first["SecretAccessKey"] in secrets and token in secrets
    no_secrets_in(secrets, server.log(), audit.read_text())


def test_imds_credentials_are_in_the_audit_trail(start_server, moto, secrets, tmp_path):
    """The IMDS credentials route hands out credentials too: served and refused answers are recorded
    (it is an audited route: its audit line stands for the access line)."""
    audit = tmp_path / "audit.jsonl"
    server = start_server(env=aws_env(moto, ECS_LOCAL_AUDIT_LOG=audit))
    path = "/latest/meta-data/iam/security-credentials/local-endpoints"
    status, _, session = server.request("PUT", "/latest/api/token",
                                        {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200
    secrets.add(session.decode(), "IMDS session token")
    document = vended(secrets, server.get(path, {"X-aws-ec2-metadata-token": session.decode()}))
    assert server.get(path, {"X-aws-ec2-metadata-token": "wrong-token-0123456789"})[0] == 401
    served, refused = [json.loads(line) for line in audit.read_text().splitlines()]
    assert (served["route"], served["accessKeyId"], served["outcome"]) == (path, document["AccessKeyId"], "served")
    assert served["role"] == f"arn:aws:sts::{ACCOUNT}:user/moto"
    assert (refused["route"], refused["outcome"], refused["accessKeyId"]) == (path, "Unauthorized", None)
    assert f"route={path} caller=127.0.0.1" in server.log()
    no_secrets_in(secrets, server.log(), audit.read_text())


def test_only_credentials_routes_are_audited(start_server, moto):
    """Task protection's PUT is guarded too, but hands out no credentials: its refusal keeps its
    access line and makes no audit record."""
    assert [r.rule for r in le.ROUTES if r.audited] == ["/creds", "/role/{name}", "/role-arn/{arn:path}",
                                                        "/v2/credentials[/{id:secret}]",
                                                        "/latest/meta-data/iam/security-credentials/{listed}"]
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_CALLERS="127.0.0.1/32"))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0))
    try:
        conn.request("PUT", "/api/task-protection/v1/state", body=b'{"ProtectionEnabled":true}')
        assert conn.getresponse().status == 403
    finally:
        conn.close()
    assert wait_for(lambda: "PUT /api/task-protection/v1/state 403" in server.log(), 5), server.log()
    assert not audit_lines(server.log())


def test_unwritable_audit_log_stops_startup(tmp_path):
    result = subprocess.run([sys.executable, "local_endpoints.py", "--port", "0"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=20,
                            env={**os.environ, "ECS_LOCAL_AUDIT_LOG": str(tmp_path / "missing" / "audit")})
    assert result.returncode == 2 and "ECS_LOCAL_AUDIT_LOG" in result.stderr, result.stderr


def test_audit_names_the_calling_container(start_server, moto, secrets, docker_engine, containers,
                                           busybox_image, tmp_path):
    """A real container on a bridge network: the record carries its name, from the server's view
    of Docker (no Docker call on the request)."""
    gateway = "10.213.78.1"
    network = containers.network(containers.name("le-audit-net"), "10.213.78.0/24", "--gateway", gateway)
    name = containers.name("le-audit-app")
    app = containers.run("--name", name, "--network", network, busybox_image, "sleep", "300")
    audit = tmp_path / "audit.jsonl"
    server = start_server(env=aws_env(moto, DOCKER_HOST=docker_engine.host, ECS_LOCAL_AUDIT_LOG=audit),
                          args=("--bind", "0.0.0.0"))
    assert wait_for(lambda: json.loads(server.get("/health")[2])["docker"]["reachable"], 15)
    pid = docker_engine.inspect(app)["State"]["Pid"]
    body = creds_from_namespace(pid, gateway, server.port)
    vended(secrets, (200, {}, body.encode()))
    app_ip = docker_engine.inspect(app)["NetworkSettings"]["Networks"][network]["IPAddress"]
    record = json.loads(audit.read_text().splitlines()[-1])
    assert (record["caller"], record["container"], record["outcome"]) == (app_ip, name, "served")
    assert f"caller={app_ip} container={name} " in audit_lines(server.log())[-1]


# ---------------------------------------------------------------------------
# 4. What SDKs read: AccountId; a rotated token file
# ---------------------------------------------------------------------------

def test_botocore_credentials_carry_the_account_id(start_server, moto, secrets, monkeypatch):
    other_account = "210987654321"
    server = start_server(env=aws_env(moto))
    for path, account in (("/creds", ACCOUNT), (f"/role-arn/arn:aws:iam::{other_account}:role/x", other_account)):
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", server.url + path)
        credentials = botocore.credentials.ContainerProvider().load()
        frozen = credentials.get_frozen_credentials()
        secrets.add(frozen.secret_key, "secret access key")
        secrets.add(frozen.token, "session token")
        assert credentials.account_id == account
    moto.reset_counts()
    assert json.loads(server.get("/creds")[2])["AccountId"] == ACCOUNT
    assert moto.count("GetCallerIdentity") == 0   # asked once per identity, then remembered


def test_failed_caller_identity_leaves_account_id_out_and_is_not_retried_at_once(caplog):
    identity = IdentityWithoutCallerIdentity()
    vendor = le.CredentialVendor(identity, le.default_config())
    with caplog.at_level(logging.WARNING, logger="local_endpoints"):
        first = vendor.own()
        second = vendor.own()
    assert "AccountId" not in first.credentials.response() and first.identity is None
    assert (first.source, second.source) == ("sts", "cache") and identity.asked == 1
    assert "without AccountId" in caplog.text


def test_rotated_token_file_takes_effect_without_a_restart(start_server, moto, secrets, tmp_path):
    old, new = token_urlsafe(24), token_urlsafe(24)
    secrets.add(old, "authorization token")
    secrets.add(new, "authorization token")
    token_file = tmp_path / "token"
    token_file.write_text(old + "\n")
    server = start_server(env=aws_env(moto, ECS_LOCAL_AUTHORIZATION_TOKEN_FILE=token_file))
    vended(secrets, server.get("/creds", {"Authorization": old}))
    staged = tmp_path / "token.new"   # rotated the usual way: a new file renamed over the old one
    staged.write_text(new + "\n")
    staged.replace(token_file)
    error_of(server.get("/creds", {"Authorization": old}), 401, "Unauthorized")
    vended(secrets, server.get("/creds", {"Authorization": new}))
    token_file.write_text("")   # a broken rotation keeps the last good token
    vended(secrets, server.get("/creds", {"Authorization": new}))
    assert "keeping the previous authorization token" in server.log()
    token_file.write_text(old)   # rewritten in place
    error_of(server.get("/creds", {"Authorization": new}), 401, "Unauthorized")
    vended(secrets, server.get("/creds", {"Authorization": old}))

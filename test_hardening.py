"""Hardening tests: who may get credentials, bad input, faults and load.

Everything runs against a real ``local_endpoints.py`` process (``start_server``),
a real moto_server behind the counting proxy (``moto``) and, where the behaviour
involves Docker, the real shared Docker Engine. Two fakes are used, each only
for a fault a real component cannot produce on demand, and each says so: a Unix
socket that accepts and never answers (a hung Docker Engine), and an STS client
issuing two-second credentials (real STS and moto never issue credentials that
short, and the expiry path needs them to run out during the test).

Every server runs at DEBUG (the ``start_server`` default); every secret access
key, session token and authorization token the tests see is registered in the
``secrets`` fixture, which fails the test if one reaches a server log.

Figures worth quoting (fuzz inputs tried; load-test requests, failures, AWS
calls, threads and RSS) are printed (``pytest -s``) and recorded as user
properties of the test (``record_property``: in the JUnit XML).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import socket
import string
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from secrets import token_urlsafe
from urllib.parse import quote

import botocore.exceptions
import botocore.session
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import local_endpoints
from testlib import SERVER_SCRIPT, creds_from_namespace, get, require_ipv6_loopback, wait_for

# Every status the server may give; 500 would be a bug in our own code.
STATUSES = {200, 400, 401, 403, 404, 405, 413, 414, 431, 502, 503, 504}

# IAM's own rules (ASCII only), the oracle for "never reaches AWS".
IAM_ROLE_NAME = re.compile(r"[A-Za-z0-9+=,.@_-]{1,64}")
IAM_ROLE_ARN = re.compile(r"arn:aws(?:-[a-z]+)*:iam::[0-9]{12}:role/(?:[!-.0-~]+/)*[A-Za-z0-9+=,.@_-]{1,64}")

MISSING_DOCKER = "unix:///nonexistent.sock"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def aws_env(moto, **extra) -> dict:
    """Server environment: moto's dummy identity, STS/IAM at the counting proxy, no Docker."""
    env = dict(moto.env, STS_ENDPOINT=moto.url, IAM_ENDPOINT=moto.url, DOCKER_HOST=MISSING_DOCKER)
    env.update(extra)
    return env


def vended(secrets, body: bytes) -> dict:
    """A credentials response, its secret parts registered so the log check looks for them."""
    doc = json.loads(body)
    secrets.add(doc["SecretAccessKey"], "secret access key")
    secrets.add(doc["Token"], "session token")
    return doc


def error_of(response, status: int, code: str | None = None) -> dict:
    """The JSON error body of ``(status, headers, body)``, checked against the one error shape."""
    got_status, headers, body = response
    assert got_status == status, (got_status, body[:300])
    assert headers.get("Content-Type") == "application/json", headers
    doc = json.loads(body)
    assert set(doc) == {"code", "message", "HTTPErrorCode"}, doc
    assert doc["HTTPErrorCode"] == status and isinstance(doc["message"], str), doc
    if code is not None:
        assert doc["code"] == code, doc
    return doc


def raw_exchange(port: int, data: bytes, method: str = "GET", timeout: float = 10.0):
    """Send raw bytes on a new connection; ``(status, headers, body, trailing bytes)``.

    The answer is parsed by http.client, so a malformed response fails here;
    the trailing bytes (read until the server closes) must be empty: nothing
    may follow the declared body, and HEAD answers carry none.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read()
        trailing = response.fp.read() if response.fp else b""
        return response.status, dict(response.getheaders()), body, trailing


def proc_status(pid: int) -> tuple[int, int]:
    """(threads, resident memory in KiB) of a process, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def settled_threads(pid: int, at_most: int | None = None, timeout: float = 10.0) -> int:
    """The process's thread count once it stops changing (or drops to ``at_most``)."""
    samples = [proc_status(pid)[0]]

    def steady():
        samples.append(proc_status(pid)[0])
        if at_most is not None:
            return samples[-1] <= at_most
        return len(samples) >= 4 and len(set(samples[-4:])) == 1

    wait_for(steady, timeout, 0.1)
    return samples[-1]


def wait_docker_synced(server, timeout: float = 15.0) -> None:
    """Until /health says the server's container view is in sync with the engine."""
    def synced():
        return json.loads(server.get("/health")[2])["docker"]["reachable"]
    assert wait_for(synced, timeout, 0.2), f"server never reached Docker:\n{server.log()[-2000:]}"


def poll(fetch, until, timeout: float, interval: float = 0.3):
    """Call ``fetch`` until ``until(result)`` holds; the last result either way."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if until(result) or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def figure(record_property, name: str, value) -> None:
    """A measured figure: printed (pytest -s) and kept as a JUnit user property."""
    print(f"[figure] {name} = {value}")
    record_property(name, value)


# ---------------------------------------------------------------------------
# Who may ask
# ---------------------------------------------------------------------------

def test_loopback_allowed_by_default(start_server, moto, secrets):
    server = start_server(env=aws_env(moto))
    status, headers, body = server.get("/creds")
    assert status == 200, body
    assert vended(secrets, body)["AccessKeyId"]


def test_caller_outside_allowlist_gets_403_on_credentials_routes(start_server, moto):
    """ECS_LOCAL_ALLOWED_CALLERS replaces the default, so loopback itself is refused."""
    arn = moto.create_role("le-hardening-refused")
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_CALLERS="10.99.0.0/16"))
    moto.reset_counts()
    for path in ("/creds", "/creds/", "/role/le-hardening-refused", "/role-arn/" + arn):
        doc = error_of(server.get(path), 403, "CallerNotAllowed")
        assert "127.0.0.1" in doc["message"] and "ECS_LOCAL_ALLOWED_CALLERS" in doc["message"], doc
    assert moto.count() == 0, moto.requests
    assert re.search(r"WARNING .*127\.0\.0\.1", server.log()), server.log()
    # Metadata stays open: /health answers, /v4 reaches the (missing) Docker Engine.
    assert server.get("/health")[0] == 200
    error_of(server.get("/v4/anything"), 503, "DockerUnavailable")


def test_source_address_outside_allowlist(start_server, moto, secrets):
    """Same server, two loopback source addresses: 127.0.0.1 allowed, 127.0.0.2 refused."""
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_CALLERS="127.0.0.1/32"))
    status, _, body = get(server.port, "/creds", source="127.0.0.1")
    assert status == 200, body
    vended(secrets, body)
    doc = error_of(get(server.port, "/creds", source="127.0.0.2"), 403, "CallerNotAllowed")
    assert "127.0.0.2" in doc["message"] and "ECS_LOCAL_ALLOWED_CALLERS" in doc["message"], doc
    assert re.search(r"WARNING .*127\.0\.0\.2", server.log())
    assert get(server.port, "/health", source="127.0.0.2")[0] == 200


def test_ipv4_mapped_callers_compared_as_ipv4(start_server, moto, secrets):
    """On a dual-stack '::' socket 127.0.0.1 arrives as ::ffff:127.0.0.1 and must match 127.0.0.1/32."""
    require_ipv6_loopback()
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_CALLERS="127.0.0.1/32"), args=("--bind", "::"))
    status, _, body = get(server.port, "/creds", host="127.0.0.1")
    assert status == 200, body
    vended(secrets, body)
    doc = error_of(get(server.port, "/creds", host="::1"), 403, "CallerNotAllowed")
    assert "::1" in doc["message"], doc
    assert "::ffff:" not in server.log()


def test_bridge_network_callers_allowed_by_default(start_server, moto, secrets, docker_engine,
                                                   containers, busybox_image):
    """A container on a user-defined bridge reaches the server at the gateway and gets credentials."""
    gateway = "10.213.77.1"
    network = containers.network(containers.name("le-hard-net"), "10.213.77.0/24", "--gateway", gateway)
    app = containers.run("--network", network, busybox_image, "sleep", "300")
    pid = docker_engine.inspect(app)["State"]["Pid"]
    server = start_server(env=aws_env(moto, DOCKER_HOST=docker_engine.host), args=("--bind", "0.0.0.0"))
    wait_docker_synced(server)
    body = creds_from_namespace(pid, gateway, server.port)
    vended(secrets, body.encode())
    app_ip = docker_engine.inspect(app)["NetworkSettings"]["Networks"][network]["IPAddress"]
    assert re.search(rf"route=/creds caller={re.escape(app_ip)} .*outcome=served status=200 ", server.log(),
                     re.M), server.log()[-2000:]


# ---------------------------------------------------------------------------
# Authorization token
# ---------------------------------------------------------------------------

def test_authorization_token_on_credentials_routes(start_server, moto, secrets):
    token = token_urlsafe(32)
    secrets.add(token, "authorization token")
    arn = moto.create_role("le-hardening-token")
    server = start_server(env=aws_env(moto, ECS_LOCAL_AUTHORIZATION_TOKEN=token,
                                      ECS_LOCAL_ALLOWED_CALLERS="127.0.0.1/32"))
    for path in ("/creds", "/role/le-hardening-token", "/role-arn/" + arn):
        error_of(server.get(path), 401, "Unauthorized")
        error_of(server.get(path, {"Authorization": token[:-1]}), 401, "Unauthorized")
        error_of(server.get(path, {"Authorization": "Bearer " + token}), 401, "Unauthorized")
        status, _, body = server.get(path, {"Authorization": token})
        assert status == 200, body
        vended(secrets, body)
    # Outside the allowlist the right token does not help: 403, not 401.
    error_of(get(server.port, "/creds", {"Authorization": token}, source="127.0.0.2"), 403, "CallerNotAllowed")
    # Metadata routes stay open without a token, as on ECS.
    assert server.get("/health")[0] == 200
    error_of(server.get("/v4/anything"), 503, "DockerUnavailable")


@pytest.mark.parametrize("server_side, client_side", [("value", "value"), ("file", "file"), ("file", "value")])
def test_botocore_container_provider_sends_the_token(start_server, moto, secrets, tmp_path, monkeypatch,
                                                     server_side, client_side):
    """botocore's real container credential provider, with AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)."""
    token = token_urlsafe(32)
    secrets.add(token, "authorization token")
    server_file = tmp_path / "server-token"
    server_file.write_text(token + "\n")    # as `echo` writes it: the server strips the newline
    client_file = tmp_path / "client-token"
    client_file.write_text(token)           # botocore sends the file verbatim and refuses a newline
    env = {"ECS_LOCAL_AUTHORIZATION_TOKEN": token} if server_side == "value" else \
        {"ECS_LOCAL_AUTHORIZATION_TOKEN_FILE": str(server_file)}
    server = start_server(env=aws_env(moto, **env))
    served = vended(secrets, server.get("/creds", {"Authorization": token})[2])

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{server.url}/creds")
    if client_side == "value":
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", token)
    else:
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(client_file))
    credentials = botocore.session.Session().get_credentials()
    assert credentials is not None and credentials.method == "container-role"
    frozen = credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == \
        (served["AccessKeyId"], served["SecretAccessKey"], served["Token"])


def test_generate_token_prints_a_fresh_random_token():
    def generate():
        result = subprocess.run([sys.executable, str(SERVER_SCRIPT), "--generate-token"],
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout.strip()

    first, second = generate(), generate()
    assert first != second
    for token in (first, second):
        assert len(token) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", token), token


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

# Each request ends within the server's buffered reads when it answers: bytes left
# unread in the kernel would turn its close() into a TCP reset racing the answer.
BAD_REQUESTS = [
    ("request line over 64 KiB", b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\n", 414, "RequestURITooLong"),
    ("101 headers", b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n",
     431, "RequestHeaderFieldsTooLarge"),
    ("header line over 64 KiB", b"GET /health HTTP/1.1\r\nX-Big: " + b"b" * 65536 + b"\r\n\r\n",
     431, "RequestHeaderFieldsTooLarge"),
    ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "BadRequest"),
    ("unknown method", b"BREW /creds HTTP/1.1\r\nHost: x\r\n\r\n", 405, "MethodNotAllowed"),
    ("POST on a GET route", b"POST /v4/x/task HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405,
     "MethodNotAllowed"),
    ("Content-Length body", b"GET /creds HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 413,
     "RequestBodyNotAccepted"),
    ("chunked body", b"GET /creds HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     413, "RequestBodyNotAccepted"),
]


@pytest.mark.parametrize("data, status, code", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_a_json_error_and_the_server_keeps_serving(start_server, moto, secrets,
                                                                   data, status, code):
    server = start_server(env=aws_env(moto))
    pid = server.proc.pid
    baseline = settled_threads(pid)
    got, headers, body, trailing = raw_exchange(server.port, data)
    error_of((got, headers, body), status, code)
    assert trailing == b""
    if status == 405:
        assert headers.get("Allow") == "GET, HEAD", headers
    status_after, _, body = server.get("/creds")
    assert status_after == 200, body
    vended(secrets, body)
    assert settled_threads(pid, at_most=baseline) <= baseline, "a bad request left a thread behind"
    assert "Traceback" not in server.log()


PERCENT_ESCAPES = ["%00", "%2F", "%2f", "%ff", "%FF", "%25", "%2e%2e", "%0A", "%0d", "%20", "%3F", "%23",
                   "%", "%G1", "%C3%A9", "%e2%82%ac", "%c3", "%ed%a0%80", "%f4%90%80%80"]
ROUTE_PREFIXES = ["", "/creds", "/role", "/role-arn", "/health", "/v2/metadata", "/v2/metadataWithTags",
                  "/v2/stats", "/v3", "/v4", "/v3/containers", "/v4/containers", "/v5", "/v4/task"]
META_SUFFIXES = ["", "/task", "/taskWithTags", "/stats", "/task/stats", "/", "//task", "/task/"]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get"]
IAM_CHARS = string.ascii_letters + string.digits + "+=,.@_-"


def segments():
    """One path segment: plain ASCII, percent-escapes, encoded or raw unicode."""
    plain = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="/?#%"),
                    max_size=20)
    escaped = st.text(max_size=10).map(lambda t: quote(t, safe=""))
    raw_unicode = st.text(st.characters(min_codepoint=0xA0, blacklist_categories=("Cs",)), min_size=1,
                          max_size=5)
    piece = st.one_of(plain, st.sampled_from(PERCENT_ESCAPES), escaped, raw_unicode)
    return st.lists(piece, min_size=1, max_size=4).map("".join)


def role_names():
    """Mostly plausible IAM names, with some too long, empty or non-ASCII."""
    return st.one_of(
        st.text(st.sampled_from(IAM_CHARS), min_size=0, max_size=70),
        st.text(st.sampled_from(IAM_CHARS + "éß٣µ\u00a0 \t\n\x00:*/?#%"), min_size=1, max_size=20),
        st.text(min_size=1, max_size=20),
    )


def role_arns():
    """Valid role ARNs, near-miss ARNs built from plausible and broken parts, and arbitrary text.

    The near misses alone are almost never valid (every part must be right at once), so valid
    ARNs get a branch of their own: without it the test would never see one reach AWS."""
    partition = st.sampled_from(["aws", "aws-cn", "aws-us-gov", "aws-iso-b", "AWS", "aws-", "aws_cn", "", "aws-é"])
    service = st.sampled_from(["iam", "sts", "IAM", ""])
    region = st.sampled_from(["", "us-east-1"])
    account = st.one_of(st.just("123456789012"),
                        st.text(st.sampled_from("0123456789٠١٢٣४५"), min_size=10, max_size=13))
    resource = st.sampled_from(["role/", "role", "user/", "assumed-role/"])
    path = st.lists(st.text(st.sampled_from(IAM_CHARS + "é~!*\n"), min_size=1, max_size=8), max_size=3) \
        .map(lambda parts: "".join(p + "/" for p in parts))
    built = st.builds(lambda p, s, r, a, res, pa, n: f"arn:{p}:{s}:{r}:{a}:{res}{pa}{n}",
                      partition, service, region, account, resource, path, role_names())
    valid = st.builds(lambda p, pa, n: f"arn:{p}:iam::123456789012:role/{pa}{n}",
                      st.sampled_from(["aws", "aws-cn", "aws-us-gov"]),
                      st.lists(st.text(st.sampled_from(IAM_CHARS), min_size=1, max_size=8), max_size=2)
                      .map(lambda parts: "".join(p + "/" for p in parts)),
                      st.text(st.sampled_from(IAM_CHARS), min_size=1, max_size=64))
    return st.one_of(valid, built, st.text(min_size=1, max_size=40))


def quoted_arn(arn: str) -> str:
    return quote(arn, safe=":/")


def fuzz_paths(container: str):
    """Paths at every route family, with random identifiers, role names, ARNs and segments."""
    exact = st.sampled_from(["/creds", "/creds/", "/health", "//health", "/v2/metadata", "/v2/stats", "/v3",
                             "/v4/task", f"/v4/{container}", f"/v3/containers/{container}/task",
                             f"/v4/{container}/taskWithTags", f"/v2/metadata/{container}"])
    random_path = st.builds(lambda prefix, segs, slash: prefix + "/" + "/".join(segs) + slash,
                            st.sampled_from(ROUTE_PREFIXES), st.lists(segments(), max_size=4),
                            st.sampled_from(["", "/", "//"]))
    identifier = st.one_of(st.just(container), st.just(container[:6]), segments())
    metadata = st.builds(lambda v, ident, suffix: f"/{v}/{ident}{suffix}",
                         st.sampled_from(["v2/metadata", "v2/stats", "v3", "v4", "v3/containers", "v4/containers"]),
                         identifier, st.sampled_from(META_SUFFIXES))
    role = role_names().map(lambda n: "/role/" + quote(n, safe=""))
    arn = role_arns().map(lambda a: "/role-arn/" + quoted_arn(a))
    query = st.one_of(st.just(""), segments().map(lambda s: "?" + s))
    return st.builds(lambda p, q: p + q, st.one_of(exact, random_path, metadata, role, arn), query)


def fuzz_methods():
    """Mostly GET and HEAD, so most inputs reach a handler; the rest other and unknown methods."""
    return st.sampled_from(["GET"] * 12 + ["HEAD"] * 4 + METHODS + ["BREW", "M-SEARCH", "QUERY", "A" * 40])


def fuzz_headers():
    """Random names and Latin-1 values; now and then a body header (413) or Expect."""
    common = ["Authorization", "Accept", "Host", "Content-Type", "X-Forwarded-For", "Range", "User-Agent"]
    names = st.one_of(st.sampled_from(common * 4 + ["Content-Length", "Transfer-Encoding", "Expect"]),
                      st.text(st.sampled_from(string.ascii_letters + string.digits + "-_"), min_size=1,
                              max_size=20))
    values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_categories=("Cc",)),
                     max_size=60).map(str.strip)
    return st.lists(st.tuples(names, values), max_size=4)


def test_fuzzed_requests_get_well_formed_json_answers(start_server, moto, secrets, docker_engine, containers,
                                                     busybox_image, record_property):
    """Random methods, paths, identifiers, role names, ARNs and headers over raw sockets."""
    name = containers.name("le-fuzz")
    containers.run("--name", name, busybox_image, "sleep", "300")
    server = start_server(env=aws_env(moto, DOCKER_HOST=docker_engine.host))
    wait_docker_synced(server)
    tried = []
    statuses: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(method=fuzz_methods(), path=fuzz_paths(name), headers=fuzz_headers())
    def exchange(method, path, headers):
        tried.append(path)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers if k.lower() != "connection")
        data = f"{method} {path} HTTP/1.1\r\n".encode() + head.encode("latin-1") + b"Connection: close\r\n\r\n"
        status, response_headers, body, trailing = raw_exchange(server.port, data, method=method)
        statuses[status] = statuses.get(status, 0) + 1
        assert status in STATUSES, (status, body[:300])
        assert response_headers.get("Content-Type") == "application/json", response_headers
        assert trailing == b""
        if method == "HEAD":
            assert body == b""
            return
        doc = json.loads(body)
        assert isinstance(doc, dict)
        if status == 200 and "SecretAccessKey" in doc:
            vended(secrets, body)
        if status != 200:
            assert set(doc) == {"code", "message", "HTTPErrorCode"} and doc["HTTPErrorCode"] == status, doc
        if status == 405:
            assert response_headers.get("Allow"), response_headers

    exchange()
    figure(record_property, "fuzz_inputs_tried", len(tried))
    figure(record_property, "fuzz_statuses", dict(sorted(statuses.items())))
    # It tried enough, and reached the handlers (200s) as well as the router's refusals.
    assert len(tried) >= 100, f"only {len(tried)} fuzz inputs tried"
    assert statuses.get(200, 0) >= 10 and len(set(statuses) - {200}) >= 3, statuses
    assert server.get("/health")[0] == 200
    assert "Traceback" not in server.log() and "InternalError" not in server.log()


def check_role_request(server, moto, secrets, path: str, valid: bool, code: str) -> None:
    """A valid name may reach AWS (200, or 404 for no such role); an invalid one is a 400 without."""
    before = moto.count()
    status, headers, body = server.get(path)
    if valid:
        assert status in (200, 404), (path, body)
        if status == 200:
            vended(secrets, body)
    else:
        error_of((status, headers, body), 400, code)
        assert moto.count() == before, (path, moto.requests[before:])


def test_invalid_role_names_never_reach_aws(start_server, moto, secrets, record_property):
    server = start_server(env=aws_env(moto))
    tried = {True: 0, False: 0}   # valid, invalid

    @settings(max_examples=150, deadline=None, database=None)
    @given(name=role_names())
    def role(name):
        if not name or "/" in name:
            return   # another route after percent-decoding, not a role name
        valid = bool(IAM_ROLE_NAME.fullmatch(name))
        tried[valid] += 1
        check_role_request(server, moto, secrets, "/role/" + quote(name, safe=""), valid, "InvalidRoleName")

    role()
    figure(record_property, "role_names_tried", tried)
    assert tried[True] >= 20 and tried[False] >= 20, f"too few valid or invalid names tried: {tried}"


def test_invalid_role_arns_never_reach_aws(start_server, moto, secrets, record_property):
    server = start_server(env=aws_env(moto))
    tried = {True: 0, False: 0}   # valid, invalid

    @settings(max_examples=150, deadline=None, database=None)
    @given(arn=role_arns())
    def role_arn(arn):
        if "//" in arn or arn.startswith("/") or arn.endswith("/"):
            return   # the path's slashes are normalised before routing
        valid = bool(IAM_ROLE_ARN.fullmatch(arn))
        tried[valid] += 1
        check_role_request(server, moto, secrets, "/role-arn/" + quoted_arn(arn), valid, "InvalidRoleArn")

    role_arn()
    figure(record_property, "role_arns_tried", tried)
    assert tried[True] >= 20 and tried[False] >= 20, f"too few valid or invalid ARNs tried: {tried}"


# ---------------------------------------------------------------------------
# Faults: slow and idle clients, connection bound
# ---------------------------------------------------------------------------

def test_idle_connections_do_not_delay_requests(start_server, moto, secrets, record_property):
    server = start_server(env=aws_env(moto))
    pid = server.proc.pid
    baseline = settled_threads(pid)
    idle = []
    for _ in range(300):
        idle.append((socket.create_connection(("127.0.0.1", server.port), timeout=15), time.monotonic()))
    try:
        assert wait_for(lambda: proc_status(pid)[0] >= baseline + 300, 5), proc_status(pid)
        started = time.monotonic()
        status, _, body = server.get("/creds", timeout=5)
        elapsed = time.monotonic() - started
        assert status == 200, body
        vended(secrets, body)
        figure(record_property, "request_latency_with_300_idle_s", round(elapsed, 3))
        assert elapsed < 1.0
        # The server closes each idle connection after its 5 s idle timeout.
        lifetimes = []
        for sock, opened in idle:
            assert sock.recv(1) == b""
            lifetimes.append(time.monotonic() - opened)
        figure(record_property, "idle_connections_closed_after_s",
               f"{min(lifetimes):.1f}..{max(lifetimes):.1f}")
        assert 4.5 < min(lifetimes) and max(lifetimes) < 8.0
    finally:
        for sock, _ in idle:
            sock.close()
    assert settled_threads(pid, at_most=baseline) <= baseline


def test_slow_client_does_not_block_others(start_server, moto, secrets):
    """A byte a second: others are served meanwhile, and a request that arrives in full
    within 5 s is answered."""
    server = start_server(env=aws_env(moto))
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        for i, byte in enumerate(request[:3]):
            slow.sendall(bytes([byte]))
            started = time.monotonic()
            status, _, body = server.get("/creds" if i % 2 else "/health", timeout=5)
            assert status == 200 and time.monotonic() - started < 1.0, body
            if i % 2:
                vended(secrets, body)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        slow.sendall(request[3:])
        response = http.client.HTTPResponse(slow, method="GET")
        response.begin()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"


def test_request_trickled_over_more_than_five_seconds_is_cut_off(start_server):
    """The agent's 5 s read timeout covers the whole request, not each byte: a client
    sending a byte a second cannot hold a connection (and a thread) for ever."""
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as slow:
        started = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            readable, _, _ = select.select([slow], [], [], 1.0)
            if readable and slow.recv(100) == b"":
                closed = True
                break
        assert closed and 4.5 < time.monotonic() - started < 8.0
    assert server.get("/health")[0] == 200


def test_connections_beyond_the_bound_get_a_quick_503_and_no_thread(start_server, moto):
    server = start_server(env=aws_env(moto, ECS_LOCAL_MAX_CONNECTIONS="20"))
    pid = server.proc.pid
    baseline = settled_threads(pid)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    try:
        assert wait_for(lambda: proc_status(pid)[0] == baseline + 20, 3), (baseline, proc_status(pid))
        for _ in range(10):
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
                response = http.client.HTTPResponse(extra, method="GET")
                response.begin()
                doc = error_of((response.status, dict(response.getheaders()), response.read()), 503,
                               "TooManyConnections")
                assert doc["message"]
            assert time.monotonic() - started < 1.0
        assert proc_status(pid)[0] == baseline + 20
    finally:
        for sock in held:
            sock.close()
    assert settled_threads(pid, at_most=baseline) <= baseline
    assert server.get("/health")[0] == 200


# ---------------------------------------------------------------------------
# Faults: Docker hung or missing
# ---------------------------------------------------------------------------

class HungDockerEngine:
    """A Unix socket that accepts connections and never answers.

    A fake is justified here: a real dockerd cannot be made to hang on demand,
    and a hung engine (stuck daemon, paused VM of Docker Desktop) is exactly
    the fault under test. Accepted connections are kept open, never read.
    """

    def __init__(self, path: Path):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, name="hung-docker", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for sock in self.accepted:
            sock.close()


def test_hung_docker_engine_gives_504_while_credentials_work(start_server, moto, secrets, tmp_path):
    hung = HungDockerEngine(tmp_path / "hung-docker.sock")
    try:
        server = start_server(env=aws_env(moto, DOCKER_HOST=f"unix://{hung.path}"))
        answer = {}

        def metadata():
            started = time.monotonic()
            answer["response"] = server.get("/v4/anything", timeout=20)
            answer["seconds"] = time.monotonic() - started

        waiting = threading.Thread(target=metadata)
        waiting.start()
        time.sleep(0.5)
        for path in ("/creds", "/health"):
            started = time.monotonic()
            status, _, body = server.get(path, timeout=5)
            assert status == 200 and time.monotonic() - started < 1.0, (path, body)
            if path == "/creds":
                vended(secrets, body)
        waiting.join(15)
        assert "response" in answer, "no answer from a metadata route within 15 s"
        doc = error_of(answer["response"], 504, "DockerTimeout")
        assert str(hung.path) in doc["message"], doc
        assert 4.0 <= answer["seconds"] <= 8.5, answer["seconds"]
        assert server.get("/health")[0] == 200
    finally:
        hung.close()


def test_missing_docker_engine_gives_503_naming_the_socket(start_server, moto):
    server = start_server(env=aws_env(moto, DOCKER_HOST=MISSING_DOCKER))
    for path in ("/v4/anything", "/v4/anything/task", "/v3", "/v2/metadata", "/v4/x/stats"):
        started = time.monotonic()
        doc = error_of(server.get(path), 503, "DockerUnavailable")
        assert MISSING_DOCKER in doc["message"], doc
        assert time.monotonic() - started < 2.0


# ---------------------------------------------------------------------------
# Faults: STS down, then back
# ---------------------------------------------------------------------------

def test_sts_outage_serves_cached_credentials_and_recovers(start_server, moto, secrets):
    cached_arn = moto.create_role("le-hardening-cached")
    new_arn = moto.create_role("le-hardening-during-outage")
    server = start_server(env=aws_env(moto))
    first = {path: vended(secrets, server.get(path)[2]) for path in ("/creds", "/role-arn/" + cached_arn)}
    moto.reset_counts()
    moto.pause()
    try:
        for _ in range(3):
            for path, credentials in first.items():
                started = time.monotonic()
                status, _, body = server.get(path)
                assert status == 200 and json.loads(body) == credentials, body
                assert time.monotonic() - started < 0.5
        started = time.monotonic()
        doc = error_of(server.get("/role-arn/" + new_arn), 502, "UpstreamUnavailable")
        assert time.monotonic() - started < 5.0
        assert "AssumeRole" in doc["message"], doc
    finally:
        moto.resume()
    status, _, body = server.get("/role-arn/" + new_arn)
    assert status == 200, body
    assert vended(secrets, body)["RoleArn"] == new_arn
    assert moto.count("AssumeRole") == 1 and moto.count("GetSessionToken") == 0, moto.requests


class ShortLivedSts:
    """Stands in for botocore's STS client in a CredentialVendor unit test.

    A fake is justified here: no real STS (nor moto) issues credentials that
    expire within seconds, and the expiry path needs them to run out during the
    test. Failures are real botocore exceptions, mapped by the server's own code.
    """

    profile = None   # read by the vendor's error messages, as AwsIdentity.profile

    def __init__(self, lifetime: float):
        self.lifetime = lifetime
        self.down = False
        self.calls = 0

    def check_mfa_session(self) -> None:
        """AwsIdentity.check_mfa_session: no MFA profile here."""

    def assume_role(self, arn: str, session_name: str, duration: int) -> dict:
        """AwsIdentity.assume_role: the reply's Credentials."""
        self.calls += 1
        if self.down:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/")
        return {
            "AccessKeyId": f"ASIAFAKE{self.calls:08d}",
            "SecretAccessKey": f"fake-secret-{self.calls:08d}",
            "SessionToken": f"fake-token-{self.calls:08d}",
            "Expiration": datetime.now(timezone.utc) + timedelta(seconds=self.lifetime)}


def test_sts_outage_after_expiry_gives_502_then_recovers():
    sts = ShortLivedSts(lifetime=2.0)
    vendor = local_endpoints.CredentialVendor(sts, local_endpoints.default_config())
    arn = "arn:aws:iam::123456789012:role/app"
    first = vendor.role_arn(arn).credentials
    sts.down = True
    assert vendor.role_arn(arn).credentials == first, "still valid: served from the cache while STS is down"
    time.sleep(2.5)
    with pytest.raises(local_endpoints.ApiError) as raised:
        vendor.role_arn(arn)
    assert (raised.value.status, raised.value.code) == (502, "UpstreamUnavailable")
    sts.down = False
    fresh = vendor.role_arn(arn).credentials
    assert fresh.access_key_id != first.access_key_id and fresh.seconds_left() > 0


# ---------------------------------------------------------------------------
# Faults: Docker engine restarted
# ---------------------------------------------------------------------------

def stats_read_time(server, name: str):
    """The `read` time of /v4/{name}/stats, or None when it does not answer 200."""
    status, _, body = server.get(f"/v4/{name}/stats")
    if status != 200:
        return None
    return datetime.fromisoformat(json.loads(body)["read"])


@pytest.mark.usefixtures("private_engine")   # stops and starts the engine
def test_stats_collectors_recover_after_engine_restart(start_server, moto, docker_engine, containers,
                                                      busybox_image):
    name = containers.name("le-restart")
    containers.run("--name", name, "--restart", "always", "--init", busybox_image, "sleep", "3600")
    server = start_server(env=aws_env(moto, DOCKER_HOST=docker_engine.host))
    wait_docker_synced(server)
    assert poll(lambda: stats_read_time(server, name), bool, 15), "no stats before the restart"
    started_before = json.loads(server.get(f"/v4/{name}")[2])["StartedAt"]

    docker_engine.stop()
    docker_engine.start()
    restarted = datetime.now(timezone.utc)
    assert wait_for(lambda: docker_engine.inspect(name)["State"]["Running"], 30)
    read = poll(lambda: stats_read_time(server, name), lambda r: r is not None and r > restarted, 30)
    assert read is not None and read > restarted, "stats did not come back after the engine restart"
    started_after = json.loads(server.get(f"/v4/{name}")[2])["StartedAt"]
    assert started_after != started_before, "the container view did not see the restart"


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------

LOAD_CLIENTS = 32
LOAD_SECONDS = 30.0


def test_load_mixed_routes(start_server, moto, secrets, docker_engine, containers, busybox_image,
                           record_property):
    names = [containers.name("le-load") for _ in range(3)]
    for name in names:
        containers.run("--name", name, busybox_image, "sleep", "600")
    arn = moto.create_role("le-hardening-load")
    server = start_server(env=aws_env(moto, DOCKER_HOST=docker_engine.host))
    wait_docker_synced(server)
    paths = ["/creds", "/role/le-hardening-load", "/role-arn/" + arn]
    for name in names:
        paths += [f"/v4/{name}", f"/v4/{name}/task", f"/v4/{name}/stats"]
    for path in paths:   # warm-up: caches filled, stats collectors running
        status, _, body = poll(lambda: server.get(path), lambda r: r[0] == 200, 15)
        assert status == 200, (path, body)
        if "/v4/" not in path:
            vended(secrets, body)
    pid = server.proc.pid
    threads_start = settled_threads(pid)
    rss_start = proc_status(pid)[1]
    moto.reset_counts()

    counts = {"requests": 0, "failures": 0}
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_SECONDS

    def client(index: int):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        done = failed = 0
        i = index
        while time.monotonic() < deadline:
            path = paths[i % len(paths)]
            i += 1
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and isinstance(json.loads(body), dict)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                ok, body = False, repr(exc).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            done += 1
            if not ok:
                failed += 1
                with lock:
                    failures.append(f"{path}: {body[:200]!r}")
        conn.close()
        with lock:
            counts["requests"] += done
            counts["failures"] += failed

    workers = [threading.Thread(target=client, args=(n,)) for n in range(LOAD_CLIENTS)]
    for worker in workers:
        worker.start()
    threads_peak = 0
    while any(worker.is_alive() for worker in workers):
        threads_peak = max(threads_peak, proc_status(pid)[0])
        time.sleep(0.5)
    for worker in workers:
        worker.join()

    threads_end = settled_threads(pid, at_most=threads_start + 2)
    rss_end = proc_status(pid)[1]
    aws_calls = moto.count()
    figure(record_property, "load_requests", counts["requests"])
    figure(record_property, "load_requests_per_second", round(counts["requests"] / LOAD_SECONDS))
    figure(record_property, "load_failures", counts["failures"])
    figure(record_property, "load_aws_calls", aws_calls)
    figure(record_property, "load_threads_start_peak_end", f"{threads_start}/{threads_peak}/{threads_end}")
    figure(record_property, "load_rss_kib_start_end", f"{rss_start}/{rss_end}")
    assert counts["failures"] == 0, failures[:10]
    assert counts["requests"] > LOAD_CLIENTS * 10
    assert aws_calls <= 3, moto.requests
    assert threads_end <= threads_start + 2
    assert rss_end - rss_start < 30 * 1024

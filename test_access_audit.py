"""Access and audit: the guard and audit columns of ROUTES, as the one dispatch path applies them.

The routes under test are derived from ROUTES, not listed by hand: every route whose guard is
not OPEN refuses a caller outside ECS_LOCAL_ALLOWED_CALLERS (and, by its guard, a request
without the authorization token or without an IMDS session token, or any IMDS request while
IMDS is off), for every method it answers (HEAD too where it answers GET); every answer of
an audited route makes exactly one audit record, and no other route makes any.

Records name the role and the source of what was handed out: ``sts``, ``cache``, or
``passthrough`` for the base identity's own temporary credentials.

The server is a real local_endpoints.py subprocess with STS and IAM at moto_server; the
caller outside the allowlist is 127.0.0.2, a real source address on loopback.  Two faults
no real component gives on demand are made in-process, and say so: a GetCallerIdentity
that fails while GetSessionToken works, and a handler that breaks (a 500).
"""

from __future__ import annotations

import http.client
import inspect
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import replace
from secrets import token_urlsafe

import pytest

import local_endpoints as le
from testlib import IdentityWithoutCallerIdentity, aws_env, http_request, in_process_server

OUTSIDER = "127.0.0.2"   # a loopback source address outside ECS_LOCAL_ALLOWED_CALLERS below


def sample_path(rule: str) -> str:
    """A path the rule matches: optional parts left out, each parameter given a plain value
    (the first of its words, else "x")."""
    while "[" in rule:
        rule = re.sub(r"\[[^\[\]]*\]", "", rule)

    def value(kind: str) -> str:
        return "x" if kind in le.SEGMENT_PATTERNS else kind.split("|")[0]
    return re.sub(r"\{[^}:]*:?([^}]*)\}", lambda m: value(m.group(1)), rule)


def methods_of(route: le.Route) -> tuple[str, ...]:
    return (route.method, "HEAD") if route.method == "GET" else (route.method,)


GUARDED = [(r, m) for r in le.ROUTES if r.guard is not le.Guard.OPEN for m in methods_of(r)]


def call(port: int, method: str, path: str, headers: dict | None = None, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        body = b'{"ProtectionEnabled":true}' if method == "PUT" and "task-protection" in path else None
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_sample_paths_resolve_to_their_routes():
    for route in le.ROUTES:
        for method in methods_of(route):
            assert le.resolve(method, sample_path(route.rule))[0] is route, (method, route.rule)


def test_the_table_has_guarded_and_audited_routes_of_every_kind():
    """What the derived tests below cover; a table without them would make those tests vacuous."""
    assert {r.guard for r in le.ROUTES} == set(le.Guard)
    assert {r.rule for r in le.ROUTES if r.audited} >= {"/creds", "/latest/meta-data/iam/security-credentials/{listed}"}
    assert all(r.guard is not le.Guard.OPEN for r in le.ROUTES if r.audited)


def test_no_handler_checks_a_caller_itself():
    """The guard column is the only caller check: no handler of the table reads the policy,
    the IMDS session tokens or the Authorization header."""
    for route in le.ROUTES:
        source = inspect.getsource(route.handler)
        for word in ("policy", "imds_tokens.valid", "authorization", "admit"):
            assert word not in source.lower(), (route.rule, word)


def expected_refusals(route: le.Route) -> tuple[int, int]:
    """(status for a caller outside the allowlist, status for an allowed caller without the
    token or session) of a guarded route."""
    if route.guard is le.Guard.TASK_ID:   # no network check: any caller without the id, as the agent answers
        return 400, 400
    inside = {le.Guard.TOKEN: 401, le.Guard.IMDS_SESSION: 401, le.Guard.IMDS: None}[route.guard]
    return 403, inside


def audit_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_guarded_route_refuses_and_every_audited_answer_is_recorded(start_server, moto, secrets, tmp_path):
    token = token_urlsafe(24)
    secrets.add(token, "authorization token")
    audit = tmp_path / "audit.jsonl"
    server = start_server(env=aws_env(moto, ECS_LOCAL_ALLOWED_CALLERS="127.0.0.1/32", ECS_LOCAL_IMDS="ON",
                                      ECS_LOCAL_AUTHORIZATION_TOKEN=token, ECS_LOCAL_AUDIT_LOG=audit))
    assert GUARDED
    for route, method in GUARDED:
        path = sample_path(route.rule)
        logged = route.loggable(path, le.resolve(method, path)[1])   # secret parameters masked
        outside, inside = expected_refusals(route)
        for status, source in ((outside, OUTSIDER), (inside, "127.0.0.1")):
            if status is None:
                continue
            before = len(audit_records(audit))
            assert call(server.port, method, path, source=source) == status, (method, route.rule, source)
            records = audit_records(audit)
            if route.audited:
                assert len(records) == before + 1, (method, route.rule)
                assert (records[-1]["route"], records[-1]["caller"], records[-1]["accessKeyId"]) == \
                    (logged, source, None)
                assert records[-1]["outcome"] != "served"
            else:
                assert len(records) == before, (method, route.rule)


def test_imds_routes_refuse_everyone_while_imds_is_off(start_server, moto, tmp_path):
    audit = tmp_path / "audit.jsonl"
    server = start_server(env=aws_env(moto, ECS_LOCAL_IMDS="OFF", ECS_LOCAL_AUDIT_LOG=audit))
    imds = [(r, m) for r, m in GUARDED if r.guard in (le.Guard.IMDS, le.Guard.IMDS_SESSION)]
    assert imds
    for route, method in imds:
        before = len(audit_records(audit))
        assert call(server.port, method, sample_path(route.rule)) == 404, (method, route.rule)
        assert len(audit_records(audit)) == before + route.audited, (method, route.rule)


def test_temporary_base_credentials_are_recorded_as_passed_through(start_server, moto, secrets, tmp_path):
    audit = tmp_path / "audit.jsonl"
    session_token = "le-audit-session-token-" + token_urlsafe(24)
    server = start_server(env=aws_env(moto, AWS_SESSION_TOKEN=session_token, ECS_LOCAL_AUDIT_LOG=audit))
    for _ in range(2):
        status, _, body = server.get("/creds")
        assert status == 200 and json.loads(body)["Token"] == session_token
    records = audit_records(audit)
    assert [r["source"] for r in records] == ["passthrough", "passthrough"]
    assert records[0]["role"] == "arn:aws:sts::123456789012:user/moto"
    assert re.search(r"route=/creds caller=127\.0\.0\.1 role=\S+ accessKeyId=\S+ expiration=\S+ "
                     r"source=passthrough outcome=served status=200", server.log()), server.log()


def test_every_answer_is_recorded_before_it_leaves_500_included(tmp_path):
    audit = tmp_path / "audit.jsonl"
    config = replace(le.default_config(), audit_log=str(audit), docker_host="unix:///nonexistent.sock")
    endpoints = le.build_endpoints(config, le.DockerClient(config.docker_host), IdentityWithoutCallerIdentity())
    with in_process_server(endpoints) as url:
        status, _, body = http_request(url, path="/creds")
        # Read as soon as the answer is in: the record was written before it left.
        served = audit_records(audit)
        assert status == 200 and len(served) == 1
        # The role is unknown, not botocore's credential method ("shared-credentials-file").
        assert (served[0]["role"], served[0]["source"], served[0]["outcome"]) == (None, "sts", "served")

        def broken() -> le.Issued:   # a fault in the server itself: no real component makes one
            raise RuntimeError("a bug")
        endpoints.family(le.CredentialRoutes).vendor.own = broken
        status, _, body = http_request(url, path="/creds")
        records = audit_records(audit)
        assert status == 500 and json.loads(body)["code"] == "InternalError"
        assert len(records) == 2
        assert (records[1]["route"], records[1]["outcome"], records[1]["accessKeyId"]) == \
            ("/creds", "InternalError", None)


def test_log_lines_from_many_threads_arrive_whole_on_a_pipe():
    """LineHandler writes each line with one write(2) and no lock: lines up to PIPE_BUF, which
    every audit line fits in, are never mixed on a pipe (the log of a container)."""
    read_end, write_end = os.pipe()
    logger = logging.getLogger("local_endpoints.test-lines")
    logger.propagate = False
    handler = le.LineHandler(write_end)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()
    lines = {f"thread {t} line {n} " + "x" * 2000 for t in range(8) for n in range(50)}
    try:
        threads = [threading.Thread(target=lambda t=t: [logger.warning("%s", line) for line in sorted(lines)
                                                        if line.startswith(f"thread {t} ")]) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        logger.removeHandler(handler)
        os.close(write_end)
        reader.join()
        os.close(read_end)
    written = b"".join(chunks).decode().splitlines()
    assert sorted(written) == sorted(f"local_endpoints.test-lines: {line}" for line in lines)


def test_the_auditors_guide_lists_every_public_method_of_the_two_edge_classes_with_its_call():
    """The module docstring names each public method of DockerClient and AwsIdentity, and each
    method marked @outbound, with the call it declares in brackets after it ([] for none): a
    method added, removed or declared otherwise must be named so there too, and its protocol
    (what the rest of the module sees) must have the same public methods and signatures."""
    for cls, protocol in ((le.DockerClient, le.DockerApi), (le.AwsIdentity, le.AwsApi)):
        listed = re.search(rf"``{cls.__name__}``\s*\(([^()]*)\)", le.__doc__)
        assert listed, cls.__name__
        in_guide = {}
        for methods, calls in re.findall(r"((?:``\w+``(?:,\s*)?)+)\s*\[([^\]]*)\]", listed.group(1)):
            for method in re.findall(r"``(\w+)``", methods):
                in_guide[method] = set(re.findall(r"``([\w:-]+)``", calls))
        assert set(in_guide) == set(re.findall(r"``(\w+)``", listed.group(1))), f"{cls.__name__}: a method without []"
        in_code = {name: {getattr(value, "outbound")} if hasattr(value, "outbound") else set()
                   for name, value in vars(cls).items()
                   if callable(value) and (not name.startswith("_") or hasattr(value, "outbound"))}
        assert in_guide == in_code, cls.__name__
        public = {name for name, value in vars(cls).items() if not name.startswith("_") and callable(value)}
        declared = {name for name, value in vars(protocol).items() if not name.startswith("_") and callable(value)}
        assert declared == public, cls.__name__
        for name in public:
            assert inspect.signature(getattr(protocol, name)) == inspect.signature(getattr(cls, name)), name


def test_the_handlers_are_built_from_edges_a_test_can_replace():
    """build_endpoints takes the two edges: here stand-ins that record what is asked of them, so
    the routes serve from them alone (no Docker socket, no AWS)."""
    asked = []

    class Docker:
        host, api_version = "unix:///nowhere.sock", "1.43"

        def __getattr__(self, name):
            asked.append(f"docker:{name}")
            raise ConnectionError("no Docker here")

    class Aws:
        profile, region, mfa = None, "eu-west-1", None

        def __getattr__(self, name):
            asked.append(f"aws:{name}")
            raise AssertionError(name)

    config = le.default_config()
    endpoints = le.build_endpoints(config, Docker(), Aws())
    assert {route.family for route in le.ROUTES} == set(endpoints.families)
    for route in le.ROUTES:
        assert getattr(type(endpoints.families[route.family]), route.handler.__name__) is route.handler
    request = le.Request({"item": "region"}, le.plain_ip("127.0.0.1"), le.email.message.Message(), 0.0)
    assert endpoints.family(le.ImdsRoutes).placement(request).body == b"eu-west-1"
    assert asked == []


def test_lines_of_one_millisecond_keep_their_own_level_and_logger():
    """LineHandler.write_line reuses a line's head (time, level, logger) within a millisecond:
    lines of other levels or loggers in that millisecond still get their own."""
    read_end, write_end = os.pipe()
    handler = le.LineHandler(write_end)
    try:
        for level, name in [(logging.INFO, "a.audit"), (logging.WARNING, "a.audit"), (logging.INFO, "b.audit"),
                            (logging.INFO, "a.audit")]:
            handler.write_line(level, name, "same message")
    finally:
        os.close(write_end)
    lines = os.read(read_end, 65536).decode().splitlines()
    os.close(read_end)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert [re.sub(stamp, "", line) for line in lines] == [
        "INFO a.audit: same message", "WARNING a.audit: same message", "INFO b.audit: same message",
        "INFO a.audit: same message"]
    assert all(re.match(stamp, line) for line in lines)


def test_the_audit_lines_fast_path_writes_what_a_log_record_would():
    """AuditTrail hands its lines to LineHandler.write_line when that handler alone writes the
    audit logger's records (as main() configures logging): the text must be a record's."""
    read_end, write_end = os.pipe()
    parent = logging.getLogger("le-test-lines")
    parent.propagate = False
    child = logging.getLogger("le-test-lines.audit")
    handler = le.LineHandler(write_end)
    parent.addHandler(handler)
    try:
        assert le.sole_line_handler(child) is handler
        child.warning("%s", "credentials route=/creds outcome=Unauthorized")
        handler.write_line(logging.WARNING, child.name, "credentials route=/creds outcome=Unauthorized")
        other = logging.NullHandler()
        parent.addHandler(other)
        assert le.sole_line_handler(child) is None   # another handler: records, not the fast path
        parent.removeHandler(other)
        child.addFilter(lambda record: True)
        assert le.sole_line_handler(child) is None   # a filter: records too
    finally:
        parent.removeHandler(handler)
        os.close(write_end)
    record_line, fast_line = os.read(read_end, 65536).decode().splitlines()
    os.close(read_end)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert re.fullmatch(stamp + "WARNING le-test-lines.audit: credentials route=/creds outcome=Unauthorized", record_line)
    assert re.sub(stamp, "", fast_line) == re.sub(stamp, "", record_line)
    assert re.match(stamp, fast_line)


class SlowDocker:
    """A Docker stand-in whose container list takes a while, as on an engine with many
    containers: the first sync of a server that has just started is still under way."""
    host, api_version = "unix:///stand-in.sock", "1.43"

    def __init__(self, delay: float, reachable: bool = True):
        self.delay, self.reachable = delay, reachable

    def containers(self) -> list[dict]:
        time.sleep(self.delay)
        if not self.reachable:
            raise le.ApiError(502, "DockerUnavailable", "no engine here")
        return []

    def networks(self) -> list[dict]:
        return [{"Id": "n1", "Driver": "bridge", "IPAM": {"Config": [{"Subnet": "172.30.0.0/16"}]}}]


def test_a_bridge_caller_is_judged_after_the_views_first_sync_not_on_the_empty_view():
    view = le.ContainerView(SlowDocker(delay=0.5))
    policy = le.CallerPolicy(le.default_config(), view)
    threading.Thread(target=view.sync, daemon=True).start()
    policy.check_caller(le.plain_ip("172.30.0.5"))   # waits for the sync, then finds its subnet
    with pytest.raises(le.ApiError) as refused:
        policy.check_caller(le.plain_ip("10.9.9.9"))
    assert refused.value.status == 403


def test_with_docker_unreachable_a_caller_is_refused_once_the_first_sync_failed():
    view = le.ContainerView(SlowDocker(delay=0.0, reachable=False))
    policy = le.CallerPolicy(le.default_config(), view)
    with pytest.raises(le.ApiError):
        view.sync()
    started = time.monotonic()
    with pytest.raises(le.ApiError) as refused:
        policy.check_caller(le.plain_ip("172.30.0.5"))
    assert refused.value.status == 403 and time.monotonic() - started < 1


def test_routes_of_long_request_targets_are_not_remembered():
    """RequestHandler remembers the route of a target of up to ROUTE_MEMO_TARGET characters
    only, so the memo stays small whatever clients send."""
    config = replace(le.default_config(), docker_host="unix:///nonexistent.sock")
    endpoints = le.build_endpoints(config, le.DockerClient(config.docker_host), le.AwsIdentity(config))
    with in_process_server(endpoints) as url:
        le.remembered_route.cache_clear()
        http_request(url, path="/health?" + "x" * le.ROUTE_MEMO_TARGET)
        assert le.remembered_route.cache_info().currsize == 0
        http_request(url, path="/health?x")
        assert le.remembered_route.cache_info().currsize == 1


def test_the_access_line_times_each_request_from_its_own_request_line(caplog):
    """The handler keeps no state between requests: each access line's time is its own request's,
    and a request http.server refuses while reading it (a 400) says "-" for a time it never had."""
    config = replace(le.default_config(), docker_host="unix:///nonexistent.sock")
    endpoints = le.build_endpoints(config, le.DockerClient(config.docker_host), le.AwsIdentity(config))
    with caplog.at_level(logging.INFO, logger="local_endpoints"), in_process_server(endpoints) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
            conn.sendall(b"GET /health HTTP/9.9\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 505 ")
    lines = [r.getMessage() for r in caplog.records if r.name == "local_endpoints"]
    assert any(re.fullmatch(r"GET /health 200 \d+\.\dms 127\.0\.0\.1", line) for line in lines), lines
    assert any(re.fullmatch(r"- /health 505 - 127\.0\.0\.1", line) for line in lines), lines

"""Access and audit: the guard and audit columns of ROUTES, as the one dispatch path applies them.

The routes under test are derived from ROUTES, not listed by hand: every route whose guard is
not OPEN refuses a caller outside ECS_LOCAL_ALLOWED_CALLERS (and, by its guard, a request
without the authorization token or without an IMDS session token, or any IMDS request while
IMDS is off), for every method it answers (HEAD too where it answers GET); every answer of
an audited route makes exactly one audit record, and no other route makes any.

The server is a real local_endpoints.py subprocess with STS and IAM at moto_server; the
caller outside the allowlist is 127.0.0.2, a real source address on loopback.
"""

from __future__ import annotations

import http.client
import inspect
import json
import re
from secrets import token_urlsafe

import local_endpoints as le
from testlib import aws_env

OUTSIDER = "127.0.0.2"   # a loopback source address outside ECS_LOCAL_ALLOWED_CALLERS below


def sample_path(rule: str) -> str:
    """A path the rule matches: optional parts left out, each parameter given a plain value
    (the first of its words, else "x")."""
    while "[" in rule:
        rule = re.sub(r"\[[^\[\]]*\]", "", rule)

    def value(kind: str) -> str:
        words = kind.split("|")
        return words[0] if len(words) > 1 or kind.isdigit() else "x"
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
                    (path, source, None)
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

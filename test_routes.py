"""The lean request path keeps the answers of what it replaces.

The route index is checked against a scan of the whole ROUTES table, as an oracle,
for every method. No server is needed; the wire behaviour (limits, statuses,
keep-alive) is covered by test_hardening.py.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

import local_endpoints as le

def scan(method: str, path: str):
    """What resolve() would answer from a scan of the whole table: the first route matching
    path and method (HEAD as GET), else the methods allowed there, else nothing."""
    matching = [r for r in le.ROUTES if r.pattern.fullmatch(path)]
    for r in matching:
        if method in (r.method, "HEAD" if r.method == "GET" else None):
            return r
    return {r.method for r in matching} or None


SEGMENTS = st.sampled_from(["v2", "v3", "v4", "v5", "creds", "role", "role-arn", "health", "task", "stats",
                            "containers", "taskWithTags", "metadata", "metadataWithTags", "web", "a%2Fb", "",
                            "api", "task-protection", "v1", "state", "latest", "meta-data", "iam",
                            "security-credentials", "placement", "region", "dynamic", "instance-identity",
                            "document"])
METHODS = st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"])


@settings(max_examples=5000, deadline=None)
@given(method=METHODS, segments=st.lists(SEGMENTS, min_size=0, max_size=5))
def test_route_index_finds_what_a_table_scan_finds(method, segments):
    path = le.normalize_path("/" + "/".join(segments))
    expected = scan(method, path)
    try:
        chosen, _ = le.resolve(method, path)
    except le.ApiError as exc:
        if expected is None:
            assert exc.status == 404, (method, path)
        else:
            assert exc.status == 405 and isinstance(expected, set), (method, path, expected)
            assert set(exc.headers["Allow"].split(", ")) - {"HEAD"} == expected, (method, path)
    else:
        assert chosen is expected, (method, path)


def test_every_route_is_indexed_under_its_first_segments():
    for route in le.ROUTES:
        for segment in le.first_segments(route.rule) or [None]:
            assert route in le.ROUTE_INDEX[segment], route.rule
    assert le.first_segments("/v{version:3|4}[[/containers]/{ident:container}]/task") == ("v3", "v4")
    assert le.first_segments("/{anything}/x") is None


@settings(max_examples=2000, deadline=None)
@given(method=METHODS, segments=st.lists(SEGMENTS, min_size=0, max_size=5), query=st.sampled_from(["", "?a=b"]))
def test_a_remembered_route_is_what_resolve_finds_for_the_normalized_target(method, segments, query):
    target = "//" + "/".join(segments) + "/" + query
    path = le.normalize_path(target)
    try:
        expected = le.resolve(method, path)
    except le.ApiError as exc:
        for _ in range(2):   # an error is raised again, not remembered
            try:
                le.remembered_route(method, target)
            except le.ApiError as again:
                assert (again.status, again.message) == (exc.status, exc.message)
            else:
                raise AssertionError(f"{method} {target} answered, resolve() raised {exc.status}")
        return
    for _ in range(2):
        chosen, params, normalized, loggable = le.remembered_route(method, target)
        assert (chosen, dict(params), normalized) == (*expected, path)
        assert loggable == chosen.loggable(path, expected[1])


def test_remembered_parameters_are_read_only_and_secrets_masked():
    """The memo's parameters are shared by every request for the target: nobody may change them."""
    chosen, params, path, loggable = le.remembered_route("GET", "/v2/credentials/the-id")
    assert (dict(params), path, loggable) == ({"id": "the-id"}, "/v2/credentials/the-id", "/v2/credentials/{id}")
    try:
        params["id"] = "another"
    except TypeError:
        pass
    else:
        raise AssertionError("a remembered route's parameters could be changed")
    assert le.remembered_route("GET", "/v2/credentials/the-id")[1] is params

"""The lean request path of issue 12 keeps the standard library's answers.

Two shortcuts of the hot path are checked against the code they replace, as
oracles: ``read_headers`` against ``http.client.parse_headers`` (what
http.server uses), and the route index against a scan of the whole ROUTES
table. No server is needed; the wire behaviour (limits, statuses, keep-alive)
is covered by test_hardening.py.
"""

from __future__ import annotations

import io
import http.client

import pytest
from hypothesis import given, settings, strategies as st

import local_endpoints as le

LATIN1 = st.characters(min_codepoint=0, max_codepoint=255, blacklist_characters="\r\n")
HEADER_LINES = st.one_of(
    st.builds(lambda name, sep, value: name + sep + value,
              st.text(LATIN1, max_size=10), st.sampled_from([":", ": ", ":\t", " :", ""]), st.text(LATIN1, max_size=10)),
    st.sampled_from(["Host: x", "Authorization: abc", " continued", "\tcontinued", ":no-name", "No Colon",
                     "Content-Length: 0", "Connection: close", "X-Tab\t: v"]),
)


@settings(max_examples=2000, deadline=None)
@given(lines=st.lists(HEADER_LINES, max_size=8), eol=st.sampled_from(["\r\n", "\n"]))
def test_read_headers_matches_http_client(lines, eol):
    # An mbox "From " line is the one documented difference (email skips it; HTTP has none).
    lines = [line for line in lines if line and not line.startswith("From ")]
    block = ("".join(line + eol for line in lines) + eol).encode("latin-1")
    expected = http.client.parse_headers(io.BytesIO(block))
    got = le.read_headers(io.BytesIO(block))
    assert isinstance(got, http.client.HTTPMessage)
    assert got.items() == expected.items()
    for name in ("host", "AUTHORIZATION", "content-length", "x-missing"):
        assert got.get(name) == expected.get(name)


@pytest.mark.parametrize("count, error", [(le.MAX_HEADER_LINES - 1, None), (le.MAX_HEADER_LINES, "Too many headers")])
def test_read_headers_limits_as_http_client(count, error):
    block = b"".join(b"X-H%d: v\r\n" % i for i in range(count)) + b"\r\n"
    try:
        http.client.parse_headers(io.BytesIO(block))
        expected = None
    except http.client.HTTPException:
        expected = "Too many headers"
    assert expected == error
    if error:
        with pytest.raises(le.HeadersTooLarge, match=error):
            le.read_headers(io.BytesIO(block))
    else:
        assert len(le.read_headers(io.BytesIO(block))) == count


def scan(method: str, path: str):
    """The first route of the whole table matching path (any method), as resolve() used to look."""
    return next((r for r in le.ROUTES if r.pattern.fullmatch(path)), None)


SEGMENTS = st.sampled_from(["v2", "v3", "v4", "v5", "creds", "role", "role-arn", "health", "task", "stats",
                            "containers", "taskWithTags", "metadata", "metadataWithTags", "web", "a%2Fb", ""])


@settings(max_examples=3000, deadline=None)
@given(segments=st.lists(SEGMENTS, min_size=0, max_size=5))
def test_route_index_finds_what_a_table_scan_finds(segments):
    path = le.normalize_path("/" + "/".join(segments))
    expected = scan("GET", path)
    try:
        chosen, _ = le.resolve("GET", path)
    except le.ApiError as exc:
        assert expected is None and exc.status == 404, (path, expected)
    else:
        assert chosen is expected, path


def test_every_route_is_indexed_under_its_first_segments():
    for route in le.ROUTES:
        for segment in le.first_segments(route.rule) or [None]:
            assert route in le.ROUTE_INDEX[segment], route.rule
    assert le.first_segments("/v{version:3|4}[[/containers]/{ident:container}]/task") == ("v3", "v4")
    assert le.first_segments("/{anything}/x") is None

"""No input gets a 500: property tests over every HTTP surface, and the cases that once did.

One real broker and one real proxy linked to it (127.0.0.1). Hypothesis sends, per surface:

- the broker's API with an API key: every operation of its OpenAPI document, with bodies that are
  arbitrary JSON or a valid body with one member replaced by arbitrary JSON, arbitrary path
  parameters and query strings;
- the broker's proxy-only operations (heartbeat, redeem, events) with a proxy credential, same;
- the proxy's endpoints (``/console``, ``/websockify``, ``/token-status``, ``/healthz``,
  ``/metrics``, ``/openapi.json``, unknown paths) with arbitrary query strings and headers;
- the proxy's static files (``/static/``, ``/novnc/``) with arbitrary paths.

"Arbitrary" leans on what broke things before: lone surrogates (``"\\ud800"`` in JSON,
``%ED%A0%80`` in a URL), NUL (raw and ``%00``), huge and negative integers, ``1e400``, NaN and
Infinity, nesting up to the body limit, wrong types, encoded dots, backslashes, overlong paths.
Every answer must be below 500 and every error (a body on a 4xx) the documented
``{"error": CODE, "message": TEXT}``; neither process may log a traceback.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from brokerproc import BrokerProcess, BrokerState, healthy_proxies, start_broker, start_linked_proxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxyproc import ProxyProcess
from tornado.httpclient import AsyncHTTPClient

from broker import api, openapi, schemas
from broker.ratelimit import AuthThrottle
from console_proxy import strictjson
from console_proxy.handlerlog import PathOnlyLogging
from console_proxy.httperrors import JsonErrors

TIMEOUT = 10.0
EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""Modest and reproducible (a few milliseconds an example): the whole file runs in seconds."""
MEMBER_EXAMPLES = settings(EXAMPLES, max_examples=25)
"""Per member of a body: the scalars that broke things come first (see ``member_values``)."""
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
#: Log text that means a handler raised on its input.
BUG_SIGNS = ("Traceback", "Uncaught exception", "uncaught exception", " 500 ")


@dataclass
class Fleet:
    broker: BrokerProcess
    proxy: ProxyProcess
    proxy_auth: str
    """The proxy-only endpoints' credential: a proxy of its own ("fuzz"), so that a fuzzed
    heartbeat (draining, no capacity) never takes the real proxy, which mints need, out of use."""
    session_id: str
    """A live console session: the ``{id}`` of the body-member requests (shares of it)."""

    @property
    def admin_auth(self) -> str:
        return f"Bearer {self.broker.state.admin_key}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("no-5xx")
    state = BrokerState.create(tmp / "state")
    fuzz = json.loads(state.add_proxy("fuzz", "http://127.0.0.1:1").read_text())
    broker = start_broker(state, "--auth-burst", "1000000")  # fuzzed credentials must not throttle the real ones
    proxy = start_linked_proxy(tmp, broker, "real")
    try:
        healthy_proxies(broker, 1)
        broker.admin.request("POST", "/targets", {"id": "t1", "name": "t1", "host": "127.0.0.1", "port": 5900})
        session = broker.admin.mint("t1", ttl=3600, single_use=False)["session_id"]
        yield Fleet(broker, proxy, f"Bearer {fuzz['proxy_id']}.{fuzz['secret']}", session)
    finally:
        proxy.stop()
        broker.stop()
    for process in (broker, proxy):
        log = process.log_text()
        assert not [sign for sign in BUG_SIGNS if sign in log], log[-4000:]


# --- HTTP on a raw socket: any bytes in the request line ----------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(
    port: int, method: str, target: bytes, headers: dict[str, bytes] | None = None, body: bytes | None = None
) -> Answer:
    """One request on its own connection; the answer read as its framing says (a fuzzed
    ``Connection`` header may keep the connection open)."""
    head = bytearray(method.encode() + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for name, value in (headers or {}).items():
        head += name.encode() + b": " + value + b"\r\n"
    if body is not None:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(bytes(head) + b"\r\n" + (body or b""))
        reader = sock.makefile("rb")
        status_line, *lines = _read_head(reader).decode("latin-1").split("\r\n")
        fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        status = int(status_line.split()[1])
        if method == "HEAD" or status in (204, 304):
            content = b""
        elif "content-length" in fields:
            content = reader.read(int(fields["content-length"]))
        else:
            assert "transfer-encoding" not in fields, fields
            content = reader.read()
    return Answer(status, fields, content)


def _read_head(reader: Any) -> bytes:
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline(65537)
        assert line, f"the connection closed before an answer: {bytes(head)!r}"
        head += line
    return bytes(head[:-4])


def assert_no_server_error(answer: Answer, method: str) -> None:
    assert answer.status < 500, (answer.status, answer.body[:500])
    if answer.status >= 400 and answer.body and method != "HEAD":
        error = json.loads(answer.body)
        assert set(error) == {"error", "message"}, error
        assert isinstance(error["error"], str) and error["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert answer.headers.get("content-type", "").startswith("application/json")


# --- strategies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text put into a body as is: what ``json.dumps`` would never write."""

    text: str


def encode(value: Any) -> str:
    """JSON text; NaN and Infinity as their (invalid) literals, lone surrogates as ``\\udXXX``."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value, allow_nan=True)


NASTY_TEXT = (
    "\ud800",
    "\udfff",
    "\ud800x",
    "x\udc00",
    "\x00",
    "a\x00b",
    "\\",
    "..",
    "../..",
    "%00",
    "\u202e",
    "\ufeff",
    "\uffff",
    "💥",
    "",
)
texts = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.sampled_from(NASTY_TEXT),
    st.text(max_size=3000),
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**62 - 2, max_value=2**64 + 2),
    st.integers(max_value=-(2**63) + 2, min_value=-(2**64)),
    st.integers(10**300, 10**1000),
    st.floats(),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**53 + 1, -0.0, 0.5]),
    st.sampled_from(
        ["1e400", "-1e400", "1" + "0" * 5000, "-0", "1E+2", "1e-400", "123456789012345678901234567890"]
    ).map(Raw),
)
nesting = st.integers(1, 20_000).map(lambda depth: Raw("[" * depth + "]" * depth))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.one_of(
    nesting,
    st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(texts, inner, max_size=5)),
        max_leaves=20,
    ),
)
#: What replaces one member of a valid body: mostly the scalars that broke things, sometimes anything.
member_values = st.one_of(st.sampled_from(NASTY_TEXT), numbers, json_values)

#: A valid body for each operation that takes one; fuzzing replaces one member at a time.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/targets": {"name": "n", "host": "127.0.0.1", "port": 5900},
    "/consoles": {"target_id": "t1", "ttl": 30},
    "/sessions/{id}/viewers": {"user": "u", "ttl": 30},
    "/keys/rotate": {},
    "/proxy/heartbeat": {
        "proxy_id": "fuzz",
        "public_url": None,
        "sessions": 0,
        "capacity": 10,
        "draining": False,
        "version": 0,
    },
    "/proxy/redeem": {"jti": "a" * 22, "session_id": "s", "exp": 1},
    "/proxy/events": {"events": [{"event": "closed", "session_id": "s", "at": 1.5, "bytes_up": 1}]},
    "/proxy/enroll": {"join_token": "cgj1.e30", "csr": "-----BEGIN CERTIFICATE REQUEST-----"},
    "/proxy/renew": {"csr": "-----BEGIN CERTIFICATE REQUEST-----"},
}
#: Where each body's members are: the events' members are those of its first event.
BODY_MEMBERS = {"/proxy/events": ("events", 0)}
UNKNOWN_MEMBER = "not-a-member"

bodies = st.one_of(
    json_values.map(encode).map(lambda text: text.encode("utf-8", "surrogatepass")), st.binary(max_size=200)
)
"""A whole body: arbitrary JSON (surrogates escaped, as a client may send them) or arbitrary bytes."""

URL_PIECES = (
    "..",
    ".",
    "%2e%2e",
    "%2E%2e",
    "%2e",
    "%00",
    "\x00",
    "%5c",
    "\\",
    "%2f",
    "/",
    "//",
    "%ff",
    "%ED%A0%80",
    "%c0%af",
    "%c0%ae%c0%ae",
    "%",
    "%zz",
    "\x7f",
    "\xff",
    "%0d%0a",
    "~",
    "?",
    "#",
    ";",
    "*",
    "a" * 3000,
)


def _url_text(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


segments = st.one_of(st.sampled_from(URL_PIECES), texts.map(_url_text), st.integers().map(str))
url_paths = st.lists(segments, min_size=1, max_size=6).map("/".join)
query_strings = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(("token", "state", "limit", "after", "type", "cursor")), segments),
        st.one_of(segments, numbers.map(lambda n: _url_text(encode(n)))),
    ),
    max_size=4,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))


def _target(path: str, query: str) -> bytes:
    return (path + ("?" + query if query else "")).encode("latin-1")


def _operations(proxy_only: bool) -> list[tuple[str, str]]:
    """(METHOD, path) of every operation the broker documents for API keys, or for proxies."""
    found = []
    for path, item in openapi.document()["paths"].items():
        for method, operation in item.items():
            if method != "parameters" and (operation["security"] == [{"proxyCredential": []}]) == proxy_only:
                found.append((method.upper(), path))
    return found


def _members(operations: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(METHOD, path, member) for every member of every documented request body, and one unknown."""
    found = []
    for method, path in operations:
        schema = openapi.document()["paths"][path][method.lower()].get("requestBody")
        if schema is None:
            continue
        schema = schema["content"]["application/json"]["schema"]
        if path in BODY_MEMBERS:
            schema = schema["properties"][BODY_MEMBERS[path][0]]["items"]
        found += [(method, path, member) for member in [*schema.get("properties", {}), UNKNOWN_MEMBER]]
    return found


ADMIN_OPERATIONS, PROXY_OPERATIONS = _operations(False), _operations(True)


def _auth(fleet: Fleet, operations: list[tuple[str, str]]) -> str:
    return fleet.proxy_auth if operations is PROXY_OPERATIONS else fleet.admin_auth


def _any_request(fleet: Fleet, data: st.DataObject, operation: tuple[str, str], auth: str) -> None:
    """The operation (or another method on its path) with any path parameter, query and body."""
    method, template = operation
    method = data.draw(st.one_of(st.just(method), st.sampled_from(METHODS)), label="method")
    path = template.replace("{id}", data.draw(segments, label="id"))
    body = data.draw(bodies, label="body") if method in ("POST", "PUT", "PATCH", "DELETE") else None
    answer = exchange(
        fleet.broker.port,
        method,
        _target("/api/v1" + path, data.draw(query_strings, label="query")),
        {"Authorization": auth.encode()},
        body,
    )
    assert_no_server_error(answer, method)


def _member_request(fleet: Fleet, method: str, path: str, member: str, value: Any, auth: str) -> None:
    """A valid body with one member replaced (or added) by ``value``; ``{id}``: a live session."""
    body = json.loads(json.dumps(VALID_BODIES[path]))
    holder = body
    for step in BODY_MEMBERS.get(path, ()):
        holder = holder[step]
    holder[member] = value
    answer = exchange(
        fleet.broker.port,
        method,
        f"/api/v1{path.replace('{id}', fleet.session_id)}".encode(),
        {"Authorization": auth.encode()},
        encode(body).encode("utf-8", "surrogatepass"),
    )
    assert_no_server_error(answer, method)


@pytest.mark.parametrize("operation", ADMIN_OPERATIONS, ids=[" ".join(op) for op in ADMIN_OPERATIONS])
@EXAMPLES
@given(data=st.data())
def test_broker_api_with_an_api_key(fleet: Fleet, operation: tuple[str, str], data: st.DataObject) -> None:
    _any_request(fleet, data, operation, fleet.admin_auth)


@pytest.mark.parametrize(
    ("method", "path", "member"),
    _members(ADMIN_OPERATIONS),
    ids=[" ".join(case) for case in _members(ADMIN_OPERATIONS)],
)
@MEMBER_EXAMPLES
@given(value=member_values)
def test_broker_api_body_members(fleet: Fleet, method: str, path: str, member: str, value: Any) -> None:
    _member_request(fleet, method, path, member, value, fleet.admin_auth)


@pytest.mark.parametrize("operation", PROXY_OPERATIONS, ids=[" ".join(op) for op in PROXY_OPERATIONS])
@EXAMPLES
@given(data=st.data())
def test_broker_proxy_endpoints_with_a_proxy_credential(
    fleet: Fleet, operation: tuple[str, str], data: st.DataObject
) -> None:
    _any_request(fleet, data, operation, fleet.proxy_auth)


@pytest.mark.parametrize(
    ("method", "path", "member"),
    _members(PROXY_OPERATIONS),
    ids=[" ".join(case) for case in _members(PROXY_OPERATIONS)],
)
@MEMBER_EXAMPLES
@given(value=member_values)
def test_broker_proxy_endpoint_body_members(fleet: Fleet, method: str, path: str, member: str, value: Any) -> None:
    _member_request(fleet, method, path, member, value, fleet.proxy_auth)


@EXAMPLES
@given(
    method=st.sampled_from(METHODS),
    path=url_paths,
    query=query_strings,
    auth=st.sampled_from(("admin", "proxy", "none", "junk")),
)
def test_broker_any_path(fleet: Fleet, method: str, path: str, query: str, auth: str) -> None:
    authorization = {"admin": fleet.admin_auth, "proxy": fleet.proxy_auth, "none": "", "junk": "Bearer \x00x"}[auth]
    answer = exchange(
        fleet.broker.port,
        method,
        _target("/" + path, query),
        {"Authorization": authorization.encode()} if authorization else {},
    )
    assert_no_server_error(answer, method)


def test_every_broker_operation_and_member_is_fuzzed() -> None:
    document = openapi.document()
    assert len(ADMIN_OPERATIONS) + len(PROXY_OPERATIONS) == sum(
        1 for item in document["paths"].values() for method in item if method != "parameters"
    )
    assert {path for _, path in PROXY_OPERATIONS} == {
        "/proxy/heartbeat",
        "/proxy/redeem",
        "/proxy/events",
        "/proxy/watch",
        "/proxy/renew",
    }
    with_bodies = {
        path
        for path, item in document["paths"].items()
        if any("requestBody" in op for op in item.values() if isinstance(op, dict))
    }
    assert with_bodies == set(VALID_BODIES)
    members = {(path, member) for _, path, member in _members(ADMIN_OPERATIONS) + _members(PROXY_OPERATIONS)}
    assert ("/proxy/events", "at") in members and ("/consoles", "target_id") in members
    assert ("/proxy/redeem", "jti") in members and ("/targets", "name") in members


# --- the proxy ----------------------------------------------------------------------------------

PROXY_PATHS = (
    "/console",
    "/websockify",
    "/token-status",
    "/healthz",
    "/metrics",
    "/openapi.json",
    "/",
    "/static/console.js",
    "/novnc/core/rfb.js",
)
header_values = st.one_of(
    st.sampled_from(
        (
            b"",
            b"\x00",
            b"http://[",
            b"null",
            b"http://127.0.0.1:1",
            b"Bearer \xff\xfe",
            b"websocket",
            b"Upgrade",
            b"13",
            b"99999999999999",
            b"dGhlIHNhbXBsZSBub25jZQ==",
            b"binary, x",
            b"bytes=99999999999999999999-",
            b"bytes=0-0,1-1,2-2",
            b"Wed, 99 Foo 99999 99:99:99 GMT",
        )
    ),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
proxy_headers = st.dictionaries(
    st.sampled_from(
        (
            "Origin",
            "Authorization",
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Protocol",
            "X-Forwarded-For",
            "X-Forwarded-Proto",
            "X-Forwarded-Host",
            "Range",
            "If-Modified-Since",
            "If-None-Match",
            "Host",
        )
    ),
    header_values,
    max_size=6,
)


@EXAMPLES
@given(method=st.sampled_from(METHODS), path=st.sampled_from(PROXY_PATHS), query=query_strings, headers=proxy_headers)
def test_proxy_endpoints(fleet: Fleet, method: str, path: str, query: str, headers: dict[str, bytes]) -> None:
    upgrade = (
        {
            "Upgrade": b"websocket",
            "Connection": b"Upgrade",
            "Sec-WebSocket-Version": b"13",
            "Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==",
        }
        if path == "/websockify"
        else {}
    )
    answer = exchange(fleet.proxy.port, method, _target(path, query), {**upgrade, **headers})
    assert answer.status != 101  # no token we generate is valid
    assert_no_server_error(answer, method)


@EXAMPLES
@given(
    method=st.sampled_from(("GET", "HEAD")),
    root=st.sampled_from(("/static/", "/novnc/", "/")),
    path=url_paths,
    query=query_strings,
)
def test_proxy_static_files_and_any_path(fleet: Fleet, method: str, root: str, path: str, query: str) -> None:
    answer = exchange(fleet.proxy.port, method, _target(root + path, query))
    assert_no_server_error(answer, method)
    assert b"def verify" not in answer.body and b"root:" not in answer.body  # nothing outside the roots


# --- the cases that were 500s -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%00/x",
        "/static/%00",
        "/novnc/core%00/rfb.js",
        "/static/a%01b",
        "/static/%5c..%5cconsole_proxy%5ctoken.py",
        "/static/..\\console.js",
        "/static/%2e%2e/console_proxy/token.py",
        "/static/" + "a/" * 2000 + "x",
        "/static//etc/passwd",
        "/static/./console.js",
    ],
)
def test_static_paths_that_name_no_file_are_404(fleet: Fleet, path: str) -> None:
    answer = exchange(fleet.proxy.port, "GET", path.encode("latin-1"))
    assert answer.status == 404
    assert json.loads(answer.body) == {"error": "not_found", "message": "no such file"}


def test_a_raw_nul_in_the_request_line_is_400(fleet: Fleet) -> None:
    """Tornado refuses it while parsing the request, before any handler: a 400 without a body."""
    assert exchange(fleet.proxy.port, "GET", b"/static/a\x00b").status == 400


@pytest.mark.parametrize("length", [9_000, 70_000])
@pytest.mark.parametrize("server", ["proxy", "broker"])
def test_overlong_paths_get_no_5xx(fleet: Fleet, server: str, length: int) -> None:
    """Past the front door's 8 KiB a head is Tornado's; past Tornado's 64 KiB it closes the
    connection without an answer (so: a 404 or nothing, never a 5xx)."""
    port = fleet.proxy.port if server == "proxy" else fleet.broker.port
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /static/" + b"a" * length + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        try:
            first = sock.makefile("rb").read(12)
        except ConnectionResetError:  # closed with some of the head unread
            first = b""
    assert first == (b"HTTP/1.1 404" if length < 65536 else b"")


def test_unknown_proxy_paths_are_json_404(fleet: Fleet) -> None:
    answer = exchange(fleet.proxy.port, "GET", b"/nope%00?token=secret")
    assert (answer.status, json.loads(answer.body)["error"]) == (404, "not_found")
    assert "secret" not in fleet.proxy.log_text()


SURROGATE_BODIES = [
    ("/consoles", "admin", '{"target_id": "\\ud800"}'),
    ("/targets", "admin", '{"name": "\\ud800", "host": "127.0.0.1", "port": 5900}'),
    ("/targets", "admin", '{"name": "n", "host": "127.0.0.1", "port": 5900, "\\udc00": 1}'),
    ("/proxy/redeem", "proxy", '{"jti": "\\ud800aaaaaaaaaaaaaaaaaaaaaaaa", "session_id": "s", "exp": 1}'),
    ("/proxy/redeem", "proxy", '{"jti": "aaaaaaaaaaaaaaaaaaaaaaaa", "session_id": "\\ud800", "exp": 1}'),
    ("/proxy/events", "proxy", '{"events": [{"event": "opened", "session_id": "\\ud800"}]}'),
    ("/proxy/events", "proxy", '{"events": [{"event": "opened", "session_id": "s", "extra": ["\\udfff"]}]}'),
]


@pytest.mark.parametrize(("path", "who", "body"), SURROGATE_BODIES)
def test_lone_surrogates_are_400(fleet: Fleet, path: str, who: str, body: str) -> None:
    error = _posted(fleet, path, who, body)
    assert error["error"] == "bad_request" and "lone surrogate" in error["message"]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('{"events": [{"event": "opened", "session_id": "s", "at": 1' + "0" * 400 + "}]}", "64-bit range"),
        ('{"events": [{"event": "opened", "session_id": "s", "at": 1e400}]}', "too large"),
        ('{"events": [{"event": "opened", "session_id": "s", "at": NaN}]}', "NaN"),
        ('{"events": [{"event": "opened", "session_id": "s", "at": -Infinity}]}', "Infinity"),
        ('{"events": [{"event": "opened", "session_id": "s", "at": 9007199254740993}]}', "at most"),
        ('{"events": [{"event": "opened", "session_id": "s", "at": -1}]}', "at least"),
        ('{"events": [{"event": "refused", "status": 99999999999}]}', "at most"),
        ('{"events": [{"event": "opened", "duration_s": "1"}]}', "type number"),
        ('{"events": ' + "[" * 5000 + "]" * 5000 + "}", "nest deeper"),
    ],
)
def test_event_numbers_out_of_range_are_400(fleet: Fleet, body: str, why: str) -> None:
    error = _posted(fleet, "/proxy/events", "proxy", body)
    assert error["error"] == "bad_request" and why in error["message"], error


def _posted(fleet: Fleet, path: str, who: str, body: str) -> dict[str, str]:
    auth = fleet.admin_auth if who == "admin" else fleet.proxy_auth
    answer = exchange(
        fleet.broker.port, "POST", f"/api/v1{path}".encode(), {"Authorization": auth.encode()}, body.encode()
    )
    assert answer.status == 400, answer.body
    return json.loads(answer.body)


# --- the door all untrusted JSON comes through, and the schemas behind it -----------------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'"\\ud800"', "lone surrogate"),
        (b'{"\\udc00": 1}', "lone surrogate"),
        (b'["a\\udbffb"]', "lone surrogate"),
        (b"1" + b"0" * 5000, "64-bit range"),
        (b"9223372036854775808", "64-bit range"),
        (b"-9223372036854775809", "64-bit range"),
        (b"1e400", "too large"),
        (b"NaN", "NaN"),
        (b"[" * 33 + b"]" * 33, "nest deeper"),
        (b"[" * 20000 + b"]" * 20000, "nest deeper"),
        (b'{"a": 1, "a": 2}', "duplicate"),
        (b"\xff", "UTF-8"),
        (b"[1,", "at character"),
    ],
)
def test_strict_json_refuses_with_a_reason(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        strictjson.loads(raw)


def test_strict_json_keeps_what_is_valid() -> None:
    assert strictjson.loads(b'["\\ud83d\\ude00", 9223372036854775807, -9223372036854775808, 1e300]') == [
        "\U0001f600",
        2**63 - 1,
        -(2**63),
        1e300,
    ]
    assert strictjson.loads(b"[" * 32 + b"]" * 32) is not None


def test_every_schema_number_has_a_range() -> None:
    with pytest.raises(TypeError):
        schemas.Field("integer", minimum=0)
    with pytest.raises(TypeError):
        schemas.Field("number", maximum=1)


def test_openapi_documents_every_number_range() -> None:
    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            yield node
            for child in node.values():
                yield from walk(child)
        elif isinstance(node, list):
            for child in node:
                yield from walk(child)

    for path, item in openapi.document()["paths"].items():
        for operation in item.values():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            for node in walk(operation["requestBody"]):
                if node.get("type") in ("integer", "number"):
                    assert "minimum" in node and "maximum" in node, (path, node)


# --- the safety net: an input error no check caught is a logged 400, not a 500 -----------------


class _Unchecked:
    """A handler body that meets input no check stopped (the stand-in: no real handler does now)."""

    error: BaseException

    def get(self) -> None:
        raise self.error


class _ProxyHandler(_Unchecked, JsonErrors, PathOnlyLogging, tornado.web.RequestHandler):
    pass


class _BrokerHandler(_Unchecked, api.ApiHandler):
    pass


async def _answers(handler: type[_Unchecked], error: BaseException, options: dict[str, Any]) -> tuple[int, Any]:
    handler.error = error
    app = tornado.web.Application([("/x", handler, options)])
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    try:
        port = sockets[0].getsockname()[1]
        answer = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/x?token=secret", raise_error=False)
        return answer.code, json.loads(answer.body)
    finally:
        server.stop()


class _NoBroker:
    def list_proxies(self) -> dict[str, Any]:
        return {"proxies": []}


def _broker_options() -> dict[str, Any]:
    return {
        "broker": _NoBroker(),
        "metrics": api.BrokerMetrics(_NoBroker()),  # type: ignore[arg-type]
        "throttle": AuthThrottle(),
        "trusted": (),
    }


@pytest.mark.parametrize(
    "error",
    [
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        ValueError("embedded null byte"),
        OverflowError("int too large"),
        RecursionError("deep"),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("surface", ["proxy", "broker"])
def test_an_input_error_that_escapes_is_a_logged_400(
    surface: str, error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    if surface == "proxy":
        status, body = asyncio.run(_answers(_ProxyHandler, error, {}))
    else:
        options = _broker_options()
        status, body = asyncio.run(_answers(_BrokerHandler, error, options))
    assert status == 400 and body["error"] == "bad_request" and "cannot handle" in body["message"]
    assert any(record.exc_info and record.exc_info[1] is error for record in caplog.records)  # still seen
    if surface == "proxy":  # the proxy logs the path only: ?token= never reaches a log line
        assert "secret" not in caplog.text


@pytest.mark.parametrize("surface", ["proxy", "broker"])
def test_any_other_exception_is_still_a_500(surface: str) -> None:
    error = KeyError("a bug")
    if surface == "proxy":
        status, body = asyncio.run(_answers(_ProxyHandler, error, {}))
    else:
        options = _broker_options()
        status, body = asyncio.run(_answers(_BrokerHandler, error, options))
    assert status == 500 and body["error"] == "internal_error"

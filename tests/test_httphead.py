"""The front door's request-head parser and response writer, sans I/O: no sockets, no Tornado server.

Why this matters: :func:`httphead.parse_head` decides which requests the front door serves itself
and which go to Tornado. Accepting too much would let the front door act on a head Tornado
would have rejected (or read differently); declining is always safe, since Tornado still gets
the request. So every "None" below is a head the front door must leave alone, and the
properties check that whatever it does accept, it reads exactly as Tornado would.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import example, find, given, settings
from hypothesis import strategies as st
from tornado import httputil

from console_proxy.protocol.httphead import HEAD_END, Head, Headers, parse_head, response

#: What Chrome sends to open a console (the token travels as a subprotocol).
BROWSER_HEAD = (
    b"GET /websockify HTTP/1.1\r\n"
    b"Host: 127.0.0.1:6080\r\n"
    b"Connection: Upgrade\r\n"
    b"Pragma: no-cache\r\n"
    b"Cache-Control: no-cache\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36\r\n"
    b"Upgrade: websocket\r\n"
    b"Origin: http://127.0.0.1:6080\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-GB,en;q=0.9\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"Sec-WebSocket-Protocol: binary, token.abc.def"
)


def head_of(*lines: str | bytes, request_line: str | bytes = "GET /websockify HTTP/1.1") -> bytes:
    """A head (without its final CRLF CRLF, as parse_head takes it) from its lines."""
    raw = [line.encode("latin-1") if isinstance(line, str) else line for line in (request_line, *lines)]
    return b"\r\n".join(raw)


def parsed(raw: bytes) -> Head:
    head = parse_head(raw)
    assert head is not None, f"a well-formed head was declined: {raw!r}"
    return head


# --- what is accepted ----------------------------------------------------------------------------


def test_a_browser_upgrade_head_is_accepted_with_every_field() -> None:
    """The one head the front door exists for: every field the admission reads must be there,
    by any spelling of its name, with its value as sent."""
    head = parsed(BROWSER_HEAD)
    assert (head.method, head.path, head.query) == ("GET", "/websockify", "")
    assert head.headers.get("Host") == "127.0.0.1:6080"
    assert head.headers.get("sec-websocket-key") == "dGhlIHNhbXBsZSBub25jZQ=="
    assert head.headers.get("SEC-WEBSOCKET-PROTOCOL") == "binary, token.abc.def"
    assert head.headers.get("Upgrade") == "websocket"
    assert head.headers.get("Origin") == "http://127.0.0.1:6080"
    assert len(head.headers) == 13


def test_the_head_end_is_crlf_crlf_and_the_head_before_it_parses() -> None:
    """HEAD_END finds where the head stops; the bytes after it are not the head's."""
    wire = BROWSER_HEAD + b"\r\n\r\n\x82\x8cwebsocket-frame"
    end = HEAD_END.search(wire)
    assert end is not None and end.group() == b"\r\n\r\n"
    assert wire[: end.start()] == BROWSER_HEAD
    assert parsed(wire[: end.start()]).headers.get("Sec-WebSocket-Protocol") == "binary, token.abc.def"


@pytest.mark.parametrize(
    "wire", [b"GET / HTTP/1.1\nHost: x\n\n", b"GET / HTTP/1.1\r\nHost: x\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\n"]
)
def test_head_end_also_finds_bare_lf_ends_tornado_accepts(wire: bytes) -> None:
    """A bare-LF head must still be seen as complete (then handed to Tornado, which accepts it),
    not waited on until the head timeout."""
    end = HEAD_END.search(wire)
    assert end is not None and end.end() == len(wire) and end.group() != b"\r\n\r\n"


def test_the_target_splits_into_path_and_query_at_the_first_question_mark() -> None:
    head = parsed(head_of("Host: x", request_line="GET /websockify?token=a.b?c&x=1 HTTP/1.1"))
    assert (head.path, head.query) == ("/websockify", "token=a.b?c&x=1")


def test_other_methods_and_paths_are_parsed_for_the_caller_to_route() -> None:
    """The parser reads any plain head; choosing ``GET /websockify`` is the front door's job."""
    head = parsed(head_of("Host: x", request_line="POST /healthz HTTP/1.1"))
    assert (head.method, head.path) == ("POST", "/healthz")


def test_repeated_fields_are_joined_with_commas_in_order() -> None:
    """RFC 9110 5.3: a repeated field is one list; "binary" in a second Sec-WebSocket-Protocol
    line must still be seen."""
    head = parsed(
        head_of("Host: x", "Sec-WebSocket-Protocol: token.abc", "X-Other: 1", "sec-websocket-protocol: binary")
    )
    assert head.headers.get("Sec-WebSocket-Protocol") == "token.abc,binary"


def test_get_is_case_insensitive_with_a_default() -> None:
    head = parsed(head_of("Host: x", "X-Forwarded-For: 192.0.2.1"))
    for name in ("X-Forwarded-For", "x-forwarded-for", "X-FORWARDED-FOR", "x-FoRwArDeD-fOr"):
        assert head.headers.get(name) == "192.0.2.1"
    assert head.headers.get("Origin") is None
    assert head.headers.get("Origin", "absent") == "absent"
    assert head.headers.get("ORIGIN", "") == ""


def test_headers_get_lowercases_what_it_looks_up() -> None:
    """Headers stores lower-case names; get must find them whatever the caller's spelling."""
    headers = Headers({"sec-websocket-version": "13"})
    assert headers.get("Sec-WebSocket-Version") == "13"
    assert headers.get("Sec-WebSocket-Key", "none") == "none"


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("Upgrade:websocket", "websocket"),
        ("Upgrade:   websocket   ", "websocket"),
        ("Upgrade:\twebsocket\t", "websocket"),
        ("Upgrade: \t web socket \t ", "web socket"),
        ("Upgrade:", ""),
        ("Upgrade:    ", ""),
        ("Upgrade: a:b: c", "a:b: c"),
    ],
)
def test_optional_whitespace_around_values_is_stripped(line: str, value: str) -> None:
    """OWS (spaces and tabs) around a value is not part of it (RFC 9112 5.1); inside it stays."""
    assert parsed(head_of("Host: x", line)).headers.get("Upgrade") == value


def test_obs_text_in_a_value_is_kept_as_latin_1() -> None:
    """Bytes 0x80-0xFF are allowed (obs-text, as Tornado allows them) and read as latin-1."""
    assert parsed(head_of("Host: x", b"X-Name: caf\xe9")).headers.get("X-Name") == "caf\xe9"


# --- what is declined ----------------------------------------------------------------------------

#: Request lines that make a head declined (with a plain Host), and the test id of each.
BAD_REQUEST_LINES = [
    ("GET /websockify HTTP/1.0", "http-1.0"),
    ("GET /websockify HTTP/2.0", "http-2.0"),
    ("GET /websockify http/1.1", "lower-case-version"),
    ("GET /websockify", "no-version"),
    ("GET  /websockify HTTP/1.1", "two-spaces-after-method"),
    ("GET /websockify  HTTP/1.1", "two-spaces-before-version"),
    (" GET /websockify HTTP/1.1", "leading-space"),
    ("GET /websockify HTTP/1.1 ", "trailing-space"),
    ("GET\t/websockify HTTP/1.1", "tab-separator"),
    ("GET websockify HTTP/1.1", "target-without-slash"),
    ("GET http://x/websockify HTTP/1.1", "absolute-form"),
    ("GET * HTTP/1.1", "asterisk-form"),
    ("GET /web sockify HTTP/1.1", "space-in-target"),
    (b"GET /web\x7fsockify HTTP/1.1", "del-in-target"),
    (b"GET /caf\xe9 HTTP/1.1", "non-ascii-target"),
    ("G(T /websockify HTTP/1.1", "method-not-a-token"),
    (" /websockify HTTP/1.1", "empty-method"),
    ("", "empty-request-line"),
]

DECLINED = [
    *(pytest.param(head_of("Host: x", request_line=line), id=name) for line, name in BAD_REQUEST_LINES),
    pytest.param(b"\r\n" + head_of("Host: x"), id="leading-empty-line"),
    pytest.param(head_of("Host: x", "Upgrade: web", " socket"), id="obs-fold-space"),
    pytest.param(head_of("Host: x", "Upgrade: web", "\tsocket"), id="obs-fold-tab"),
    pytest.param(head_of("Host: x", "Upgrade websocket"), id="no-colon"),
    pytest.param(head_of("Host: x", ""), id="empty-header-line"),
    pytest.param(head_of("Host: x", ": websocket"), id="empty-name"),
    pytest.param(head_of("Host: x", "Upgrade : websocket"), id="space-before-colon"),
    pytest.param(head_of("Host: x", "Sec WebSocket-Key: k"), id="space-in-name"),
    pytest.param(head_of("Host: x", "Sec(WebSocket)-Key: k"), id="parens-in-name"),
    pytest.param(head_of("Host: x", "Sec/Key: k"), id="slash-in-name"),
    pytest.param(head_of("Host: x", b"Sec\xe9Key: k"), id="non-ascii-name"),
    pytest.param(head_of("Host: x", "X-A\x00: k"), id="nul-in-name"),
    pytest.param(head_of("Host: x", "X-A: a\x00b"), id="nul-in-value"),
    pytest.param(head_of("Host: x", "X-A: a\x01b"), id="soh-in-value"),
    pytest.param(head_of("Host: x", "X-A: a\x1bb"), id="esc-in-value"),
    pytest.param(head_of("Host: x", "X-A: a\x7fb"), id="del-in-value"),
    pytest.param(head_of("Host: x", "X-A: a\rb"), id="bare-cr-in-value"),
    pytest.param(head_of("Host: x", "X-A: a\nb"), id="bare-lf-in-value"),
    pytest.param(head_of("Host: x", "X-A: a\x0bb"), id="vertical-tab-in-value"),
    pytest.param(head_of("Host: x", "X-A: a\x0cb"), id="form-feed-in-value"),
    pytest.param(head_of("Host: x\nUpgrade: websocket"), id="bare-lf-between-lines"),
    pytest.param(b"GET /websockify HTTP/1.1\nHost: x", id="bare-lf-after-request-line"),
    pytest.param(head_of("Host: x", "X-A: 1", "") + b"\r\n", id="trailing-crlf-crlf"),
    pytest.param(head_of("Upgrade: websocket"), id="no-host"),
    pytest.param(head_of("X-Host: x"), id="only-a-lookalike-host"),
    pytest.param(head_of("Host: x", "Content-Length: 0"), id="content-length-zero"),
    pytest.param(head_of("Host: x", "Content-Length: 5"), id="content-length"),
    pytest.param(head_of("Host: x", "content-LENGTH: 5"), id="content-length-any-case"),
    pytest.param(head_of("Host: x", "Transfer-Encoding: chunked"), id="transfer-encoding"),
    pytest.param(head_of("Host: x", "TRANSFER-ENCODING: gzip"), id="transfer-encoding-any-case"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("raw", DECLINED)
def test_anything_not_plain_is_declined(raw: bytes) -> None:
    """Each of these is Tornado's to serve or to refuse, never the front door's to act on: a body
    (Content-Length, Transfer-Encoding) would be read as websocket frames, an old version or a
    fold would be read differently by other parsers, and no Host is a 400 in HTTP/1.1."""
    assert parse_head(raw) is None


def test_the_same_head_with_plain_fields_is_accepted() -> None:
    """The control for the declined cases: one request line and the fields they vary."""
    head = parsed(head_of("Host: x", "Upgrade: websocket", "X-A: a b"))
    assert head.headers == {"host": "x", "upgrade": "websocket", "x-a": "a b"}


# Tornado refuses these with 400 (RFC 9112 3.2: more than one Host, or an invalid one); the front
# door must hand them over rather than act on them. Found by this file: it does not.
HOST_TORNADO_REFUSES = [
    pytest.param(head_of("Host: a.example", "Host: b.example"), id="two-host-lines"),
    pytest.param(head_of("Host: a.example, b.example"), id="comma-in-host"),
    pytest.param(head_of("Host: a b"), id="space-in-host"),
    pytest.param(head_of("Host: user@a.example"), id="userinfo-in-host"),
    pytest.param(head_of("Host: a.example/path"), id="slash-in-host"),
]


@pytest.mark.parametrize("raw", HOST_TORNADO_REFUSES)
def test_a_host_tornado_refuses_is_declined(raw: bytes) -> None:
    """Tornado answers these heads 400 (duplicate or invalid Host); a front door that accepts
    them serves a request the rest of the proxy would refuse."""
    assert tornado_reading(raw) is None  # the premise: Tornado refuses it
    assert parse_head(raw) is None


# --- query_argument -------------------------------------------------------------------------------


def query(target_query: str) -> Head:
    return parsed(head_of("Host: x", request_line=f"GET /websockify?{target_query} HTTP/1.1"))


@pytest.mark.parametrize(
    ("qs", "expected"),
    [
        pytest.param("token=abc", "abc", id="plain"),
        pytest.param("token=first&token=last", "last", id="last-wins"),
        pytest.param("a=1&token=x.y.z&b=2", "x.y.z", id="among-others"),
        pytest.param("token=a%2Bb%3D%3D", "a+b==", id="percent-decoded"),
        pytest.param("token=a+b", "a b", id="plus-is-space"),
        pytest.param("token=%20padded%20", "padded", id="stripped"),
        pytest.param("token=", "", id="blank"),
        pytest.param("token", "", id="no-equals"),
        pytest.param("token=a&token=", "", id="blank-last-wins"),
        pytest.param("token=%E2%9C%93", "\u2713", id="utf-8"),
    ],
)
def test_query_argument(qs: str, expected: str) -> None:
    """As Tornado's get_query_argument: the last value, decoded and stripped; a blank value is
    "" (a missing token, refused as such), not None."""
    assert query(qs).query_argument("token") == expected


@pytest.mark.parametrize("qs", ["", "tokens=abc", "Token=abc", "x=token", "a=token&b=1"])
def test_query_argument_missing_is_none(qs: str) -> None:
    assert query(qs).query_argument("token") is None


def test_query_argument_of_a_target_without_query() -> None:
    assert parsed(head_of("Host: x")).query_argument("token") is None


@pytest.mark.parametrize("qs", ["token=abc", "a=1&token=%20x+y%20&token=z.w", "token=&token=a%2Fb", "token", "x=1"])
def test_query_argument_agrees_with_tornado(qs: str) -> None:
    """The front door and Tornado's handler must read the same token from the same URL."""
    request = httputil.HTTPServerRequest(
        headers=httputil.HTTPHeaders({"Host": "x"}),
        start_line=httputil.RequestStartLine("GET", f"/websockify?{qs}", "HTTP/1.1"),
    )
    values = request.query_arguments.get("token")
    tornado_value = values[-1].decode().strip() if values else None
    assert query(qs).query_argument("token") == tornado_value


# --- response ---------------------------------------------------------------------------------------


def test_response_bytes_exactly() -> None:
    """Status line with its reason phrase, the caller's fields in order, then the length and
    Connection: close the writer adds, a blank line and the body."""
    body = b'{"error":"websocket_version"}'
    wire = response(426, [("Content-Type", "application/json"), ("Sec-WebSocket-Version", "13")], body)
    assert wire == (
        b"HTTP/1.1 426 Upgrade Required\r\n"
        b"Content-Type: application/json\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Content-Length: 29\r\n"
        b"Connection: close\r\n"
        b"\r\n" + body
    )


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(400, b"Bad Request"), (401, b"Unauthorized"), (403, b"Forbidden"), (503, b"Service Unavailable")],
)
def test_response_status_lines(status: int, phrase: bytes) -> None:
    assert response(status, []).startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase))


def test_response_without_body_says_length_zero() -> None:
    assert response(400, []) == b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_response_length_counts_bytes_not_characters() -> None:
    body = "caf\u00e9 \u2713".encode()
    wire = response(400, [], body)
    head, _, rest = wire.partition(b"\r\n\r\n")
    assert rest == body
    assert b"Content-Length: %d" % len(body) in head.split(b"\r\n")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 426, 503])
def test_a_response_is_what_tornado_reads_as_one(status: int) -> None:
    """The refusal must parse as an HTTP/1.1 response by an independent reader: status line,
    headers (Connection: close), and exactly Content-Length bytes of body."""
    body = b'{"error": "x", "message": "y"}'
    wire = response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], body)
    head, _, rest = wire.partition(b"\r\n\r\n")
    start, _, fields = head.decode("latin-1").partition("\r\n")
    status_line = httputil.parse_response_start_line(start)
    headers = httputil.HTTPHeaders.parse(fields)
    assert status_line.code == status and status_line.version == "HTTP/1.1"
    assert headers["Connection"] == "close" and int(headers["Content-Length"]) == len(rest) == len(body)


# --- properties ----------------------------------------------------------------------------------------


def tornado_reading(raw: bytes) -> tuple[str, str, dict[str, str]] | None:
    """How Tornado's HTTP/1 server reads a head: (method, target, fields), or None if it refuses."""
    text = raw.decode("latin-1").lstrip("\r\n")
    eol = text.find("\n")
    if eol < 0:
        text += "\n"
        eol = len(text) - 1
    try:
        start = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
        headers = httputil.HTTPHeaders.parse(text[eol:])
        httputil.HTTPServerRequest(headers=headers, start_line=start)  # the Host checks
    except httputil.HTTPInputError:
        return None
    return start.method, start.path, {name.lower(): headers[name] for name in headers}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
@example(b"GET / HTTP/1.1")
@example(b"\xff\xfe\x00")
@example(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
def test_parse_head_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    """Bytes off the network: a Head or None, never an exception (which would kill the connection's
    callback instead of handing it to Tornado)."""
    assert parse_head(raw) is None or isinstance(parse_head(raw), Head)


# Near-valid heads: mostly clean lines, some broken ones (bad name or separator characters,
# controls, CR/LF, DEL, obs-fold), so that about a third are accepted and the rest declined for
# many different reasons. Host is always one valid line here (see HOST_TORNADO_REFUSES).
_clean_name = st.text(st.sampled_from("aZ-_.!~09'`|"), min_size=1, max_size=8) | st.sampled_from(
    ["Upgrade", "Connection", "X-Forwarded-For", "Content-Length", "Transfer-Encoding"]
)
_dirty_name = st.text(st.sampled_from("aZ-_ (\x00\xff\t:@"), max_size=8)
_clean_value = st.text(st.sampled_from('aZ ,;=/"09\t\xe9:'), max_size=12)
_dirty_value = st.text(st.sampled_from("aZ \t\r\n\x00\x7f\x0b\x1f\x85"), max_size=12)
_seps = st.sampled_from([":", ": ", ":\t", ": \t "])
_clean_line = st.tuples(_clean_name, _seps, _clean_value)
_dirty_line = st.one_of(
    st.tuples(_dirty_name, _seps, _clean_value),
    st.tuples(_clean_name, st.sampled_from(["", " :", "\r\n ", "\r\n\t"]), _clean_value),
    st.tuples(_clean_name, _seps, _dirty_value),
)
_targets = st.text(st.sampled_from("/ws?=&%+a.#"), max_size=12).map(lambda t: "/" + t)
_clean_request_line = st.tuples(
    st.sampled_from(["GET", "POST", "get"]), st.just(" "), _targets, st.just(" HTTP/1.1")
).map("".join)
_dirty_request_line = st.tuples(
    st.sampled_from(["GET", "G(T", ""]),
    st.sampled_from([" ", "  ", "\t"]),
    _targets | st.sampled_from(["/\x7f", "/\xe9", "websockify", "*", "http://x/"]),
    st.sampled_from([" HTTP/1.1", " HTTP/1.0", "HTTP/1.1", " HTTP/1.1 ", " HTTP/1.1\n"]),
).map("".join)
_request_lines = st.one_of(_clean_request_line, _clean_request_line, _clean_request_line, _dirty_request_line)
near_valid_heads = st.tuples(
    _request_lines,
    st.lists(st.one_of(_clean_line, _clean_line, _clean_line, _dirty_line).map("".join), max_size=5),
    st.integers(0, 5),
).map(
    lambda parts: "\r\n".join([parts[0], *parts[1][: parts[2]], "Host: 127.0.0.1:6080", *parts[1][parts[2] :]]).encode(
        "latin-1"
    )
)


@settings(max_examples=400, deadline=None)
@given(near_valid_heads)
@example(b"GET /websockify?token=a HTTP/1.1\r\nHost: 127.0.0.1:6080\r\nUpgrade:  websocket\t")
def test_whatever_is_accepted_tornado_reads_the_same_way(raw: bytes) -> None:
    """Never an exception; and any head accepted is one Tornado also accepts, with the same
    method, target and fields: the front door must not act on a head Tornado would refuse or
    read differently (e.g. a value a fold or a bare LF would extend)."""
    head = parse_head(raw)
    if head is None:
        return
    reading = tornado_reading(raw)
    assert reading is not None, f"accepted a head Tornado refuses: {raw!r}"
    method, target, fields = reading
    assert (head.method, head.path) == (method, target.partition("?")[0])
    assert head.query == target.partition("?")[2]
    assert dict(head.headers) == fields


def test_the_near_valid_heads_accept_some_and_decline_some() -> None:
    """The property above is only as good as its inputs: they must reach both answers."""
    quick = settings(max_examples=200, database=None)
    accepted = find(near_valid_heads, lambda raw: parse_head(raw) is not None, settings=quick)
    declined = find(near_valid_heads, lambda raw: parse_head(raw) is None, settings=quick)
    assert parse_head(accepted) is not None and parse_head(declined) is None


TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
RESERVED = {"host", "content-length", "transfer-encoding"}
names = st.text(TOKEN_CHARS, min_size=1, max_size=20).filter(lambda n: n.lower() not in RESERVED)
values = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)) | st.sampled_from(" \t"), max_size=40).map(
    lambda v: v.replace("\x7f", "")
)
ows = st.text(" \t", max_size=3)
targets = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(lambda t: "/" + t)
methods = st.text(TOKEN_CHARS, min_size=1, max_size=10)


@settings(max_examples=200, deadline=None)
@given(
    method=methods,
    target=targets,
    host=st.from_regex(r"[a-z0-9.\-]{1,30}(:[0-9]{1,5})?", fullmatch=True),
    fields=st.lists(st.tuples(names, ows, values, ows), max_size=12),
)
def test_well_formed_heads_round_trip(
    method: str, target: str, host: str, fields: list[tuple[str, str, str, str]]
) -> None:
    """Any head of token names and printable values is accepted, and reads back as written:
    names case-insensitively, values without their OWS, repeats joined with commas in order,
    the target split at its first "?"."""
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host}",
        *(f"{name}:{before}{value}{after}" for name, before, value, after in fields),
    ]
    head = parsed("\r\n".join(lines).encode("latin-1"))
    expected: dict[str, list[str]] = {"host": [host]}
    for name, _, value, _ in fields:
        expected.setdefault(name.lower(), []).append(value.strip(" \t"))
    assert head.method == method
    assert head.path + ("?" if "?" in target else "") + head.query == target
    assert "?" not in head.path
    assert dict(head.headers) == {name: ",".join(vals) for name, vals in expected.items()}
    for name, vals in expected.items():
        assert head.headers.get(name.upper()) == ",".join(vals)


def test_query_argument_turns_control_characters_into_spaces_as_tornado() -> None:
    """Tornado replaces C0 controls (except tab to CR) with spaces before stripping: a token
    behind an escaped control character is the same token on both paths."""
    head = parse_head(b"GET /websockify?token=%01abc%1f HTTP/1.1\r\nHost: h")
    assert head is not None and head.query_argument("token") == "abc"


def test_query_argument_that_is_not_utf8_cannot_be_a_token() -> None:
    """Tornado answers 400 for such a query; here the value keeps a replacement character, which
    no token's alphabet contains, so admission refuses it (counted, as JSON)."""
    head = parse_head(b"GET /websockify?token=%C0abc HTTP/1.1\r\nHost: h")
    assert head is not None and head.query_argument("token") == "\ufffdabc"


def test_headers_look_up_in_any_case() -> None:
    head = parse_head(b"GET / HTTP/1.1\r\nHost: h\r\nX-Thing: 1")
    assert head is not None
    assert "x-thing" in head.headers and "X-Thing" in head.headers and head.headers["X-THING"] == "1"

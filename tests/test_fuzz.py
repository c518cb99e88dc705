"""Fuzzing the running proxy over raw sockets with generated requests.

Whatever bytes arrive, the proxy keeps serving (/healthz stays 200), never answers 500,
never leaks a secret, a trap server on another port receives nothing, and the upstream
receives only well-formed, admitted requests carrying exactly the configured credentials.

The servers run on their own event loop in a thread so that hypothesis can drive plain
blocking sockets, one generated request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import string
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from io import StringIO
from typing import Any, TypeVar
from urllib.parse import unquote

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy import logs
from proxy.app import make_app
from proxy.credentials import Secret, query_param_values
from proxy.edge.server import ProxyRunner, runner_options
from proxy.forward import ALLOWED_METHODS
from tests.conftest import Recorder, proxy_config

API_KEY = "FUZZKEY-1c2d3e4f5a6b7c8d"
ACCESS_TOKEN = "FUZZTOKEN-7a8b9c0d1e2f3a4b"
CLIENT_TOKEN = "fuzz-client-token-0a1b2c3d"
OTHER_CLIENT_TOKEN = "fuzz-client-token-9z8y7x6w"
SECRETS = (API_KEY, ACCESS_TOKEN, CLIENT_TOKEN, OTHER_CLIENT_TOKEN)
READ_TIMEOUT = 4.0

T = TypeVar("T")


@dataclass
class Stack:
    """The servers under test and what they have seen."""

    loop: asyncio.AbstractEventLoop
    proxy_port: int
    upstream: Recorder
    upstream_host: str
    trap: Recorder
    trap_port: int
    log: StringIO
    forwarded: int = 0
    silent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application, **extra: Any) -> int:
        runner = ProxyRunner(app, **{**runner_options(), **extra})
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    log = StringIO()
    logs.configure("json", "info", stream=log)

    upstream = Recorder()

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        # Like the real API: never echoes credentials back.
        return web.json_response({"results": [], "received": len(body)})

    upstream.answer = answer
    upstream_port = run(serve(upstream.app()))
    trap = Recorder()
    trap_port = run(serve(trap.app()))
    config = proxy_config(
        tmp_path_factory.mktemp("fuzz"),
        URL(f"http://127.0.0.1:{upstream_port}"),
        api_key=Secret(API_KEY),
        access_token=Secret(ACCESS_TOKEN),
        client_token=(Secret(CLIENT_TOKEN), Secret(OTHER_CLIENT_TOKEN)),
        max_body=4096,
        body_timeout=0.5,
        max_wait=2.0,
    )
    # Short connection timers so that a generated request that leaves the server waiting
    # for more bytes costs about a second, not the production minute.
    proxy_port = run(serve(make_app(config), keepalive_timeout=1.0, lingering_time=0.5))
    yield Stack(loop, proxy_port, upstream, f"127.0.0.1:{upstream_port}", trap, trap_port, log)
    for runner in reversed(runners):
        run(runner.cleanup())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection; everything answered until the server closes."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        # The server may close early on a malformed request: read its answer regardless.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


# -- what gets generated -------------------------------------------------------------------

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
JUNK = string.printable + "\x00\x01\x7f\x80\xe9\u20ac"
TRAP = "127.0.0.1:{trap}"

methods = st.one_of(
    st.sampled_from(["GET"] * 4 + ["POST"] * 3 + ["PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    st.sampled_from(["CONNECT", "TRACE", "PRI", "get", "G@T", "", "GET GET"]),
    st.text(alphabet=TCHAR, min_size=1, max_size=8),
)
segments = st.one_of(
    st.sampled_from(["lists", "contacts", "activities", "emailmarketing", "a%20b", "~x"]),
    st.sampled_from(["..", ".", "%2e%2e", "%2E.", "%2f", "%5C", "%00", "%252e%252e", "", ";p=1"]),
    st.text(alphabet=string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@", max_size=8),
    st.text(alphabet=JUNK, max_size=4),
)
api_paths = st.builds(
    lambda generation, parts: f"/{generation}/" + "/".join(parts),
    st.sampled_from(["v2", "v3"]),
    st.lists(segments, max_size=4),
)
odd_targets = st.one_of(
    st.sampled_from(
        [
            "/healthz",
            "/status",
            "/metrics",
            "/",
            "/v2",
            "/v4/lists",
            "*",
            "//" + TRAP + "/v2/lists",
            "http://" + TRAP + "/v2/lists",
            "https://" + TRAP + "/v3/contacts",
            TRAP,
        ]
    ),
    st.text(alphabet=JUNK, max_size=24),
)
params = st.one_of(
    st.sampled_from(
        [
            "limit=1",
            "status=ACTIVE",
            "api_key=wrong-key",
            "api_key=",
            "access_token=zzz",
            "API_KEY=abc",
            "api%5Fkey=nope",
            "a=b=c",
            "",
            "x=%ZZ",
            "e=%E2%82%AC",
        ]
    ),
    st.text(alphabet=string.ascii_letters + string.digits + "=%&+-_.", max_size=12),
)
presentations = st.sampled_from(
    ["api_key"] * 2 + ["bearer"] * 2 + ["proxy"] * 2 + ["none", "wrong-bearer", "short"]
)
tokens = st.sampled_from([CLIENT_TOKEN, OTHER_CLIENT_TOKEN])
# Where else a client might put its token (next to a valid presentation, or instead of one):
# none of these may ever reach the upstream, in any encoding or case.
leaked_params = st.sampled_from(
    [
        "x={token}",
        ";x={token}",
        "x={token}%20",
        "x=%20{token}",
        "x={upper}",
        "{token}=1",
        "access_token={token}",
        "access%5Ftoken={token}",
        "api%5Fkey={token}",
        "x=a+{token}+b",
        "x={encoded}",
    ]
)
leaked_headers = st.sampled_from(
    [
        "Authorization: Token {token}",
        "Authorization: Bearer\t{token}",
        "Authorization: Bearer {token}, x",
        "X-Api-Token: {token}",
        "Cookie: session={token}",
    ]
)
hosts = st.sampled_from(
    ["Host: proxy.test"] * 4 + ["Host: " + TRAP, "Host: api.cc.email", "Host:", None]
)
versions = st.sampled_from(
    ["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 x", "", "HTTP/9"]
)
known_headers = st.sampled_from(
    [
        "X-Forwarded-Host: " + TRAP,
        "X-Forwarded-For: 10.0.0.1",
        "X-Forwarded-Proto: https",
        "Forwarded: for=1.2.3.4;host=" + TRAP,
        "X-Original-URL: /v3/admin",
        "Authorization: Basic dXNlcjpwYXNz",
        "Authorization: Bearer not-a-client-token",
        "Proxy-Authorization: Basic eDp5",
        "Expect: 100-continue",
        "Expect: something-else",
        "Connection: keep-alive",
        "Connection: X-Hop, TE",
        "X-Hop: 1",
        "TE: trailers",
        "Upgrade: websocket",
        "Upgrade: h2c",
        "Content-Encoding: gzip",
        "Content-Type: application/json",
        "Prefer: wait=0",
        "Prefer: wait=abc",
        "Prefer: wait=\u00b2",
        "Prefer: wait=\u0663",
        "Prefer: wait=" + "9" * 5000,
        "X-Request-Id: fuzz-id",
        "X-Request-Id: \x7f",
        "Max-Forwards: 0",
        "Accept-Encoding: gzip",
        "Cookie: a=b",
    ]
)
random_headers = st.builds(
    lambda name, sep, value: f"{name}{sep}{value}",
    st.text(alphabet=TCHAR + " \t\x00", max_size=12),
    st.sampled_from([": ", ":", " : ", ":\t", "", "\r\n "]),
    st.text(alphabet=JUNK + "\t\r\n", max_size=24),
)
headers = st.lists(st.one_of(known_headers, known_headers, random_headers), max_size=6)
framings = st.sampled_from(
    ["none"] * 3
    + ["content-length"] * 3
    + ["chunked"] * 2
    + ["bad-chunk", "cl-and-te", "two-cls", "smuggle", "odd-te"]
)
odd_transfer_encodings = st.sampled_from(
    [
        "identity, chunked",
        "gzip, chunked",
        "CHUNKED",
        "Chunked",
        "chunked ",
        "chunked\t",
        "chunked,",
    ]
)
smuggled_targets = st.sampled_from(
    [
        "/v2/smuggled",
        "/v3/smuggled?api_key=wrong",
        "http://" + TRAP + "/v2/smuggled",
        "/healthz",
        "/v2/../../admin",
    ]
)


@dataclass
class Generated:
    """One generated request, the bytes sent and whether a client token was in its head."""

    data: bytes
    head: bytes
    presented: bool
    method: str
    version: str
    framing: str


# Half the requests are well-formed apart from their credentials and spoofing headers, so
# that admission and forwarding get exercised, not only the parser.
clean_methods = st.sampled_from(["GET", "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
clean_paths = st.builds(
    lambda generation, parts: f"/{generation}/" + "/".join(parts),
    st.sampled_from(["v2", "v3"]),
    st.lists(st.sampled_from(["lists", "contacts", "a%20b", "123", "x.json"]), max_size=3),
)
clean_framings = st.sampled_from(["none", "content-length", "chunked", "smuggle"])


@st.composite
def requests(draw: st.DrawFn, trap: int) -> Generated:
    chaos = draw(st.booleans())
    method = draw(methods if chaos else clean_methods)
    target = draw(st.one_of(api_paths, api_paths, odd_targets) if chaos else clean_paths)
    query = [p for p in draw(st.lists(params, max_size=3)) if p]
    presentation = draw(presentations)
    token = draw(tokens)
    host = draw(hosts) if chaos else "Host: proxy.test"
    head_headers = [h.replace("{trap}", str(trap)) for h in ([host] if host else [])]
    spoofing = headers if chaos else st.lists(known_headers, max_size=4)
    head_headers += [h.replace("{trap}", str(trap)) for h in draw(spoofing)]
    if presentation == "api_key":
        query.insert(draw(st.integers(0, len(query))), f"api_key={token}")
    elif presentation == "bearer":
        head_headers.append(f"Authorization: Bearer {token}")
    elif presentation == "proxy":
        head_headers.append(f"Proxy-Authorization: Bearer {token}")
    elif presentation == "wrong-bearer":
        head_headers.append(f"Authorization: Bearer {token}x")
    elif presentation == "short":
        head_headers.append(f"Authorization: Bearer {token[:-3]}")
    for leak in draw(st.lists(st.one_of(leaked_params, leaked_headers), max_size=2)):
        leak = leak.format(
            token=token,
            upper=token.upper(),
            encoded="".join(f"%{ord(c):02X}" for c in token),
        )
        if ":" in leak:
            head_headers.append(leak)
        else:
            query.insert(draw(st.integers(0, len(query))), leak)
    target = target.replace("{trap}", str(trap))
    if query:
        target += "?" + "&".join(query)
    version = draw(versions) if chaos else "HTTP/1.1"
    body = draw(st.binary(max_size=300))
    framing = draw(framings if chaos else clean_framings)
    close = True
    smuggled = b""
    if framing == "content-length":
        head_headers.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        head_headers.append("Transfer-Encoding: chunked")
        cut = draw(st.integers(0, len(body)))
        pieces = [p for p in (body[:cut], body[cut:]) if p]
        ext = draw(st.sampled_from(["", ";a=b", ";x"]))
        body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext.encode(), p) for p in pieces)
        body += b"0\r\n\r\n"
    elif framing == "odd-te":
        # llhttp reads each of these as chunked; the proxy refuses them (never forwarded).
        head_headers.append(f"Transfer-Encoding: {draw(odd_transfer_encodings)}")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif framing == "bad-chunk":
        head_headers.append("Transfer-Encoding: chunked")
        body = b"zz\r\n" + body + b"\r\n0\r\n\r\n"
    elif framing == "cl-and-te":
        head_headers += [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"]
    elif framing == "two-cls":
        head_headers += [f"Content-Length: {len(body)}", "Content-Length: 0"]
    elif framing == "smuggle":
        # A second, token-less request after the declared body: pipelined, never admitted.
        close = False
        host = f"127.0.0.1:{trap}"
        smuggled = (
            f"GET {draw(smuggled_targets).replace('{trap}', str(trap))} HTTP/1.1\r\n"
            f"Host: {host}\r\nConnection: close\r\n\r\n"
        ).encode()
        head_headers.append(f"Content-Length: {len(body)}")
    else:
        body = b""
    if close:
        head_headers.append("Connection: close")
    head = f"{method} {target} {version}".rstrip(" ") + "\r\n"
    head += "".join(f"{h}\r\n" for h in head_headers) + "\r\n"
    head_bytes = head.encode("utf-8", "surrogateescape")
    presented = any(t.encode() in head_bytes for t in (CLIENT_TOKEN, OTHER_CLIENT_TOKEN))
    return Generated(head_bytes + body + smuggled, head_bytes, presented, method, version, framing)


# -- the properties ------------------------------------------------------------------------

# aiohttp answers in the version the client named: "GET / HTTP/2.0" or a bare "GET /"
# (HTTP/0.9) gets "HTTP/2.0 ..." or "HTTP/0.9 ..." (the proxy forwards neither).
STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3}) ")


def check_upstream_request(stack: Stack, seen: Any) -> None:
    """What the upstream may receive: an API path, the real credentials, no client token."""
    path, _, query = seen.raw_path.partition("?")
    assert path.startswith(("/v2/", "/v3/")), seen.raw_path
    assert "/../" not in path and "/./" not in path
    assert seen.method in ALLOWED_METHODS, seen.method
    if path.startswith("/v2/"):
        assert query_param_values(query, "api_key") == [API_KEY]
    auth = [v for k, v in seen.header_list if k.lower() == "authorization"]
    assert auth == [f"Bearer {ACCESS_TOKEN}"]
    assert "Proxy-Authorization" not in seen.headers
    assert seen.headers["Host"] == stack.upstream_host
    assert "Transfer-Encoding" not in seen.headers
    assert int(seen.headers.get("Content-Length", "0")) == len(seen.body)
    everything = seen.raw_path + "".join(f"{k}:{v}" for k, v in seen.header_list)
    for form in (everything, unquote(everything), unquote(unquote(everything))):
        assert CLIENT_TOKEN not in form.lower()
        assert OTHER_CLIENT_TOKEN not in form.lower()


# Each example is normally a few milliseconds; a malformed one can wait out the 1 s keep-alive
# timer. The generous limit only matters on a machine busy with something else.
@pytest.mark.timeout(300)
@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_generated_requests_never_break_or_get_past_the_proxy(
    stack: Stack, data: st.DataObject
) -> None:
    generated = data.draw(requests(stack.trap_port))
    before = len(stack.upstream.seen)
    log_offset = len(stack.log.getvalue())

    raw = exchange(stack.proxy_port, generated.data)

    statuses = [int(s) for s in STATUS_LINE.findall(raw)]
    if raw:
        assert STATUS_LINE.match(raw), raw[:80]
        assert statuses, raw[:80]
    else:
        stack.silent += 1
    for status in statuses:
        stack.statuses[status] = stack.statuses.get(status, 0) + 1
        assert status != 500, raw[:300]
    text = raw.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in text
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    # The proxy's own refusals are in Constant Contact's shape; the exception is aiohttp's
    # plain-text 417 for an unknown Expect on a path that is not /v2 or /v3 (docs/security.md).
    if (
        statuses
        and 400 <= statuses[0] < 500
        and statuses[0] != 417
        and length
        and generated.method != "HEAD"
    ):
        payload = json.loads(rest[: int(length.group(1))])
        entry = payload[0] if isinstance(payload, list) else payload
        assert set(entry) == {"error_key", "error_message"}

    new = stack.upstream.seen[before:]
    if not generated.presented:
        assert new == [], "a request without a client token reached the upstream"
    assert len(new) <= 1, [s.raw_path for s in new]
    if generated.framing == "odd-te":
        assert new == [], "a Transfer-Encoding other than exactly chunked was forwarded"
    if new:
        assert generated.version in ("HTTP/1.1", "HTTP/1.0"), generated.version
    for seen in new:
        check_upstream_request(stack, seen)
    stack.forwarded += len(new)
    assert stack.trap.seen == []

    logged = stack.log.getvalue()[log_offset:]
    for secret in SECRETS:
        assert secret not in logged
    assert exchange(
        stack.proxy_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ).startswith(b"HTTP/1.1 200 ")


def test_the_fuzzing_reached_the_upstream_and_nothing_else(stack: Stack) -> None:
    # Runs after the property above (file order): the generator must not only make garbage.
    assert stack.forwarded >= 10, stack.statuses
    assert stack.trap.seen == []
    assert stack.silent <= 15, stack.statuses

"""Hardening: client tokens, loopback-only by default, limits, smuggling, redaction.

Every test talks to real servers on 127.0.0.1 and asserts on what the client got and on
what a recording upstream (and a trap server on another port) actually received.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import RequestInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import logs
from proxy.app import make_app
from proxy.cli import build_parser, main
from proxy.config import Config, ConfigError
from proxy.credentials import Injector, Secret, fingerprint, query_param_values, redact
from proxy.edge import limits
from proxy.edge.fields import parse_wait_preference
from proxy.edge.framing import MAX_HEAD_BYTES
from proxy.edge.limits import BodyBudget
from proxy.edge.server import (
    KEEPALIVE_TIMEOUT,
    MAX_HEADER_FIELD,
    MAX_HEADERS,
    MAX_REQUEST_TARGET,
    runner_options,
)
from proxy.errors import Unavailable
from proxy.exchange import BODY_RATE_FLOOR
from proxy.state import STATE
from tests.conftest import (
    Recorder,
    ServerFactory,
    StartProxy,
    proxy_config,
    raw_exchange,
    raw_url,
)

API_KEY = "REALKEY-4f0c9a2b7d1e"
ACCESS_TOKEN = "REALTOKEN-9b8a7c6d5e4f3a2b"
CLIENT_TOKEN = "ctok-alpha-3f9e1b7c55aa"
OTHER_CLIENT_TOKEN = "ctok-beta-8a2d4c6e77bb"
SECRETS = (API_KEY, ACCESS_TOKEN, CLIENT_TOKEN, OTHER_CLIENT_TOKEN)


def guarded(tmp_path: Path, upstream: URL, **overrides: Any) -> Config:
    """A proxy with real credentials to inject and two client tokens to demand."""
    settings: dict[str, Any] = {
        "api_key": Secret(API_KEY),
        "access_token": Secret(ACCESS_TOKEN),
        "client_token": (Secret(CLIENT_TOKEN), Secret(OTHER_CLIENT_TOKEN)),
        **overrides,
    }
    return proxy_config(tmp_path, upstream, **settings)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of the first answer in raw bytes."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def answers(raw: bytes) -> int:
    """How many responses (status lines) raw bytes hold."""
    return len(re.findall(rb"HTTP/\d\.\d \d{3} ", raw))


def request_bytes(target: str, *headers: str, body: bytes = b"", method: str = "GET") -> bytes:
    """One HTTP/1.1 request that asks the server to close after answering."""
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy.test", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One answer (head and Content-Length body), without waiting for the connection to close."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(parse(head)[1].get("content-length", "0"))
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


def assert_no_secret(text: str | bytes) -> None:
    data = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    for secret in SECRETS:
        assert secret not in data, f"{secret[:8]}... leaked"


def assert_clean_upstream_request(rec: Recorder) -> None:
    """Every request the upstream saw carries the real credentials and no client token."""
    for seen in rec.seen:
        path, _, query = seen.raw_path.partition("?")
        if path.startswith("/v2/"):
            assert query_param_values(query, "api_key") == [API_KEY]
        assert [v for k, v in seen.header_list if k.lower() == "authorization"] == [
            f"Bearer {ACCESS_TOKEN}"
        ]
        assert "Proxy-Authorization" not in seen.headers
        everything = seen.raw_path + "".join(f"{k}:{v}" for k, v in seen.header_list)
        assert CLIENT_TOKEN not in everything
        assert OTHER_CLIENT_TOKEN not in everything


@pytest.fixture
async def trap(start_server: ServerFactory) -> tuple[Recorder, URL]:
    """A server on another port that no request may ever reach."""
    rec = Recorder()
    server = await start_server(rec.app())
    return rec, server.make_url("")


@pytest.fixture
def captured_logs() -> Iterator[StringIO]:
    """Everything the process logs during a test, as JSON lines, at debug level."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = StringIO()
    logs.configure("json", "debug", stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


# -- client tokens -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (f"/v2/lists?api_key={CLIENT_TOKEN}&limit=5", ()),
        (f"/v2/lists?limit=5&api_key={OTHER_CLIENT_TOKEN}", ()),
        (f"/v2/lists?api%5Fkey={CLIENT_TOKEN}&limit=5", ()),
        ("/v2/lists?limit=5", (f"Authorization: Bearer {CLIENT_TOKEN}",)),
        ("/v3/contacts?limit=5", (f"Authorization: bearer {CLIENT_TOKEN}",)),
        ("/v2/lists?limit=5", (f"Proxy-Authorization: Bearer {CLIENT_TOKEN}",)),
        (
            "/v3/contacts?limit=5",
            (f"Proxy-Authorization: Bearer {CLIENT_TOKEN}", "Authorization: Bearer stale"),
        ),
        # A v3 client whose SDK also sends the token as api_key: it must not travel on.
        (f"/v3/contacts?limit=5&api_key={CLIENT_TOKEN}", ()),
    ],
)
async def test_each_way_of_presenting_a_client_token_is_admitted_and_stripped(
    target: str,
    headers: tuple[str, ...],
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    status, _, body = parse(await raw_exchange(server.port, request_bytes(target, *headers)))
    assert status == 200, body
    assert len(rec.seen) == 1
    seen = rec.seen[0]
    path, _, query = seen.raw_path.partition("?")
    assert path == target.partition("?")[0]
    assert "limit=5" in query.split("&")
    if path.startswith("/v3/"):
        assert "api_key" not in query
    assert_clean_upstream_request(rec)


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/v2/lists", ()),
        ("/v2/lists?api_key=wrong-token", ()),
        (f"/v2/lists?api_key={CLIENT_TOKEN}x", ()),
        (f"/v2/lists?API_KEY={CLIENT_TOKEN}", ()),
        (f"/v2/lists?apikey={CLIENT_TOKEN}", ()),
        ("/v2/lists", (f"Authorization: Bearer {CLIENT_TOKEN[:-1]}",)),
        ("/v2/lists", (f"Authorization: Basic {CLIENT_TOKEN}",)),
        ("/v2/lists", (f"Authorization: {CLIENT_TOKEN}",)),
        ("/v2/lists", (f"X-Client-Token: {CLIENT_TOKEN}",)),
        ("/v3/contacts", ()),
        ("/v3/contacts", ("Authorization: Bearer ",)),
        ("/v3/contacts", (f"Proxy-Authorization: Basic {CLIENT_TOKEN}",)),
        ("/v3/contacts", ("Authorization: Bearer caf\xe9",)),
    ],
)
async def test_missing_or_wrong_client_token_is_401_in_cc_shape(
    target: str,
    headers: tuple[str, ...],
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    data = request_bytes(target, *headers, body=b'{"a":1}', method="POST")
    data = data.replace(b"Connection: close", b"Content-Length: 7\r\nConnection: close")
    status, answer_headers, body = parse(await raw_exchange(server.port, data))
    assert status == 401
    assert answer_headers["content-type"].startswith("application/json")
    assert answer_headers["www-authenticate"] == 'Bearer realm="ctct-proxy"'
    payload = json.loads(body)
    if target.startswith("/v2/"):
        assert payload == [
            {
                "error_key": "http.status.authentication.invalid_token",
                "error_message": "A valid client token is required to use this proxy.",
            }
        ]
    else:
        assert payload["error_key"] == "unauthorized"
    assert rec.seen == []
    assert_no_secret(body)


async def test_client_tokens_never_pass_through_even_without_configured_credentials(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Pass-through mode: the client's own credentials travel, its proxy token never does.
    rec, upstream = recorder
    config = proxy_config(tmp_path, upstream, client_token=(Secret(CLIENT_TOKEN),))
    server, _ = await start_proxy(config)
    cases = [
        request_bytes("/v2/lists?api_key=own-key", f"Proxy-Authorization: Bearer {CLIENT_TOKEN}"),
        request_bytes(f"/v2/lists?api_key={CLIENT_TOKEN}&api_key=own-key"),
        request_bytes("/v3/contacts", f"Authorization: Bearer {CLIENT_TOKEN}"),
        request_bytes(
            f"/v3/contacts?x=1&api_key={CLIENT_TOKEN}", "Authorization: Bearer own-token"
        ),
    ]
    for data in cases:
        status, _, _ = parse(await raw_exchange(server.port, data))
        assert status == 200
    assert [s.raw_path for s in rec.seen] == [
        "/v2/lists?api_key=own-key",
        "/v2/lists?api_key=own-key",
        "/v3/contacts",
        "/v3/contacts?x=1",
    ]
    authorizations = [s.headers.get("Authorization") for s in rec.seen]
    assert authorizations == [None, None, None, "Bearer own-token"]
    assert all("Proxy-Authorization" not in s.headers for s in rec.seen)


def test_client_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("proxy.credentials.hmac.compare_digest", spy)
    injector = Injector(None, (Secret(CLIENT_TOKEN), Secret(OTHER_CLIENT_TOKEN)))
    # A match on the first token still compares against the second: no early exit.
    assert injector.admits("", f"Bearer {CLIENT_TOKEN}", None)
    assert len(calls) == 2
    assert all(isinstance(a, bytes) for a, _ in calls)
    # Values no str comparison could take safely (non-ASCII, lone surrogates) are refused.
    assert not injector.admits("api_key=%FF%FE", "Bearer caf\xe9", "Bearer \udcff")


def test_client_tokens_come_from_repeated_flags_or_a_comma_separated_variable() -> None:
    env = {"CTCT_PROXY_CLIENT_TOKENS": f"{CLIENT_TOKEN}, {OTHER_CLIENT_TOKEN}"}
    from_env = Config.from_sources({}, env)
    assert [t.reveal() for t in from_env.client_token] == [CLIENT_TOKEN, OTHER_CLIENT_TOKEN]
    flags = {"client_token": ["flag-token-1-0123456", "flag-token-2-0123456"]}
    from_flags = Config.from_sources(flags, env)
    assert [t.reveal() for t in from_flags.client_token] == [
        "flag-token-1-0123456",
        "flag-token-2-0123456",
    ]
    # Short tokens are guessable: refused, naming the setting, without echoing the value.
    with pytest.raises(ConfigError, match="--client-token: must be at least 16") as short:
        Config.from_sources({"client_token": [CLIENT_TOKEN, "hunter2"]}, {})
    assert "hunter2" not in str(short.value)
    with pytest.raises(ConfigError, match="CTCT_PROXY_CLIENT_TOKENS"):
        Config.from_sources({}, {"CTCT_PROXY_CLIENT_TOKENS": f"{CLIENT_TOKEN},abc"})


# -- listening beyond loopback -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["serve", "--host", "0.0.0.0"], {}),
        (["serve", "--host", "::"], {}),
        (["serve", "--host", "192.168.1.20"], {}),
        (["serve", "--host", "proxy.example.internal"], {}),
        (["serve"], {"CTCT_PROXY_HOST": "0.0.0.0"}),
        (["serve", "--host", "0.0.0.0"], {"CTCT_PROXY_TRUST_NETWORK": "false"}),
    ],
)
def test_listening_beyond_loopback_without_client_tokens_exits_2(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv, env) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--host" in err[0]
    assert "--client-token" in err[0]
    assert "--trust-network" in err[0]


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["serve", "--host", "127.0.0.1"], {}),
        (["serve", "--host", "127.0.0.5"], {}),
        (["serve", "--host", "::1"], {}),
        (["serve", "--host", "localhost"], {}),
        (["serve", "--host", "0.0.0.0", "--client-token", CLIENT_TOKEN], {}),
        (["serve", "--host", "0.0.0.0"], {"CTCT_PROXY_CLIENT_TOKENS": CLIENT_TOKEN}),
        (["serve", "--host", "0.0.0.0", "--trust-network"], {}),
        (["serve", "--host", "0.0.0.0"], {"CTCT_PROXY_TRUST_NETWORK": "1"}),
    ],
)
def test_loopback_client_tokens_or_trust_network_are_accepted(
    argv: list[str], env: dict[str, str]
) -> None:
    # The same parsing `main` does, short of serving.
    config = Config.from_sources(vars(build_parser().parse_args(argv)), env)
    assert config.host == argv[2]


# -- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", ["v2", "v3"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_max_body_is_413_in_cc_shape(
    generation: str,
    framing: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream, max_body=1000))
    auth = f"Authorization: Bearer {CLIENT_TOKEN}"
    target = f"/{generation}/activities"
    if framing == "content-length":
        data = request_bytes(target, auth, "Content-Length: 1001", body=b"x" * 1001, method="POST")
    else:
        chunks = b"".join(b"190\r\n" + b"x" * 400 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
        data = request_bytes(target, auth, "Transfer-Encoding: chunked", body=chunks, method="POST")
    status, headers, body = parse(await raw_exchange(server.port, data))
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    payload = json.loads(body)
    if generation == "v2":
        assert payload[0]["error_key"] == "http.status.request_entity_too_large"
        assert "1000 bytes" in payload[0]["error_message"]
    else:
        assert payload["error_key"] == "request_too_large"
    assert rec.seen == []
    # Exactly at the limit still goes through, chunked or not.
    ok = request_bytes(target, auth, "Content-Length: 1000", body=b"y" * 1000, method="POST")
    status, _, _ = parse(await raw_exchange(server.port, ok))
    assert status == 200
    assert rec.seen[0].body == b"y" * 1000


@pytest.mark.parametrize(
    ("name", "data", "status", "error_key"),
    [
        (
            "request target",
            request_bytes(
                f"/v2/lists?api_key={CLIENT_TOKEN}&q=" + "a" * MAX_REQUEST_TARGET,
            ),
            414,
            "http.status.request_uri_too_long",
        ),
        (
            "header value",
            request_bytes(
                "/v2/lists", f"Authorization: Bearer {CLIENT_TOKEN}", "X-Big: " + "b" * 9000
            ),
            431,
            "http.status.request_header_fields_too_large",
        ),
        (
            "header count",
            request_bytes(
                "/v2/lists",
                f"Authorization: Bearer {CLIENT_TOKEN}",
                *(f"X-H{i}: {i}" for i in range(MAX_HEADERS + 1)),
            ),
            431,
            "http.status.request_header_fields_too_large",
        ),
    ],
)
async def test_oversized_request_lines_and_headers_get_cc_shaped_answers(
    name: str,
    data: bytes,
    status: int,
    error_key: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    got, headers, body = parse(await raw_exchange(server.port, data))
    assert got == status, body
    assert headers["content-type"].startswith("application/json")
    [entry] = json.loads(body)
    assert entry["error_key"] == error_key
    assert_no_secret(body)
    assert rec.seen == []
    # Just under the limits is fine (leaving room for the headers the proxy adds, as the
    # recording upstream runs with the same limits).
    fits = request_bytes(
        f"/v2/lists?q={'a' * (MAX_REQUEST_TARGET - 200)}",
        f"Authorization: Bearer {CLIENT_TOKEN}",
        "X-Big: " + "b" * (MAX_HEADER_FIELD - 100),
        *(f"X-H{i}: {i}" for i in range(MAX_HEADERS - 8)),
    )
    ok, _, _ = parse(await raw_exchange(server.port, fits))
    assert ok == 200
    assert len(rec.seen) == 1


async def test_a_body_that_trickles_in_gets_408(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream, body_timeout=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        request_bytes(
            "/v3/contacts",
            f"Authorization: Bearer {CLIENT_TOKEN}",
            "Content-Length: 1000",
            method="POST",
        )
    )
    started = time.monotonic()

    async def trickle() -> None:
        # One byte every 50 ms: alive, but far below the rate floor.
        for _ in range(60):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    trickling = asyncio.ensure_future(trickle())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        elapsed = time.monotonic() - started
        length = int(parse(head)[1]["content-length"])
        answer = head + await asyncio.wait_for(reader.readexactly(length), 2)
    finally:
        trickling.cancel()
        writer.close()
    status, _, body = parse(answer)
    assert status == 408
    assert json.loads(body)["error_key"] == "request_timeout"
    assert 0.4 < elapsed < 1.5
    assert rec.seen == []


async def test_a_body_arriving_steadily_is_not_cut_off(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream, body_timeout=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    # Twice the grace in total, but each piece extends the deadline at the rate floor.
    piece = b"z" * BODY_RATE_FLOOR
    writer.write(
        request_bytes(
            "/v2/activities",
            f"Authorization: Bearer {CLIENT_TOKEN}",
            f"Content-Length: {len(piece) * 3}",
            method="POST",
        )
    )
    for _ in range(3):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.2)
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert parse(answer)[0] == 200
    assert rec.seen[0].body == piece * 3


async def test_a_client_trickling_its_headers_is_disconnected(
    recorder: tuple[Recorder, URL], start_server: ServerFactory, tmp_path: Path
) -> None:
    rec, upstream = recorder
    assert runner_options()["keepalive_timeout"] == KEEPALIVE_TIMEOUT
    server = await start_server(make_app(guarded(tmp_path, upstream)), keepalive_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    writer.write(b"GET /v2/lists HTTP/1.1\r\nHost: x\r\n")
    closed = False
    for i in range(40):
        writer.write(f"X-Slow-{i}: 1\r\n".encode())
        try:
            await writer.drain()
            closed = await asyncio.wait_for(reader.read(1), 0.1) == b""
        except TimeoutError:
            continue
        except ConnectionError:
            closed = True
        if closed:
            break
    writer.close()
    assert closed
    assert time.monotonic() - started < 1.5
    assert rec.seen == []


# -- smuggling and spoofing ----------------------------------------------------------------

AUTH = f"Authorization: Bearer {CLIENT_TOKEN}"
SMUGGLED = b"GET /v2/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "data",
    [
        # CL.TE and TE.CL
        request_bytes(
            "/v2/a",
            AUTH,
            "Content-Length: 4",
            "Transfer-Encoding: chunked",
            body=b"0\r\n\r\n" + SMUGGLED,
            method="POST",
        ),
        request_bytes(
            "/v2/a",
            AUTH,
            "Transfer-Encoding: chunked",
            "Content-Length: 40",
            body=b"0\r\n\r\n" + SMUGGLED,
            method="POST",
        ),
        # Duplicate Content-Length, equal or not
        request_bytes(
            "/v2/a",
            AUTH,
            "Content-Length: 3",
            "Content-Length: 3",
            body=b"abc",
            method="POST",
        ),
        request_bytes(
            "/v2/a",
            AUTH,
            "Content-Length: 0",
            f"Content-Length: {len(SMUGGLED)}",
            body=SMUGGLED,
            method="POST",
        ),
        request_bytes("/v2/a", AUTH, "Content-Length: 3, 3", body=b"abc", method="POST"),
        request_bytes("/v2/a", AUTH, "Content-Length: +3", body=b"abc", method="POST"),
        # Transfer-Encoding that is not exactly chunked
        request_bytes(
            "/v2/a", AUTH, "Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n", method="POST"
        ),
        request_bytes(
            "/v2/a", AUTH, "Transfer-Encoding: xchunked", body=b"0\r\n\r\n", method="POST"
        ),
        request_bytes(
            "/v2/a",
            AUTH,
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: chunked",
            body=b"0\r\n\r\n",
            method="POST",
        ),
        request_bytes(
            "/v2/a", AUTH, "Transfer-Encoding : chunked", body=b"0\r\n\r\n", method="POST"
        ),
        # ... which llhttp reads as chunked: refused at the edge (framing.HeadGuard).
        *(
            request_bytes(
                "/v2/a", AUTH, f"Transfer-Encoding: {value}", body=b"0\r\n\r\n", method="POST"
            )
            for value in ("identity, chunked", "gzip, chunked", "CHUNKED", "Chunked", "chunked ")
        ),
        request_bytes(
            "/v2/a", AUTH, "Transfer-Encoding: chunked\t", body=b"0\r\n\r\n", method="POST"
        ),
        request_bytes(
            "/v2/a", AUTH, "Transfer-Encoding:\tchunked ", body=b"0\r\n\r\n", method="POST"
        ),
        # obs-fold, bare CR / LF and NUL inside header values, whitespace before the colon
        request_bytes("/v2/a", AUTH, "X-Folded: one\r\n two"),
        request_bytes("/v2/a", AUTH, "X-Bad: one\rHost: trap"),
        request_bytes("/v2/a", AUTH, "X-Bad: one\nHost: trap"),
        request_bytes("/v2/a", AUTH, "X-Bad: one\x00two"),
        request_bytes("/v2/a", AUTH, "Host : trap"),
        # A second Host, and a request line with a stray space
        request_bytes("/v2/a", AUTH, "Host: trap"),
        request_bytes("/v2/a b", AUTH),
        # Versions llhttp lets through with HTTP/1 framing
        request_bytes("/v2/a", AUTH).replace(b"HTTP/1.1", b"HTTP/2.0", 1),
        request_bytes("/v2/a", AUTH).replace(b" HTTP/1.1", b"", 1),
    ],
    ids=[
        "cl-te",
        "te-cl",
        "dup-cl-equal",
        "dup-cl-different",
        "cl-list",
        "cl-plus",
        "te-chunked-identity",
        "te-xchunked",
        "te-twice",
        "te-space-colon",
        "te-identity-chunked",
        "te-gzip-chunked",
        "te-upper",
        "te-capital",
        "te-trailing-space",
        "te-trailing-tab",
        "te-tab-and-space",
        "obs-fold",
        "bare-cr",
        "bare-lf",
        "nul",
        "host-space-colon",
        "two-hosts",
        "space-in-target",
        "http-2.0",
        "http-0.9",
    ],
)
async def test_ambiguous_framing_and_malformed_headers_are_refused(
    data: bytes,
    recorder: tuple[Recorder, URL],
    trap: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    trapped, _ = trap
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    raw = await raw_exchange(server.port, data)
    status, headers, body = parse(raw)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    [entry] = json.loads(body)
    assert entry["error_key"] == "http.status.bad_request"
    assert_no_secret(body)
    assert answers(raw) == 1  # nothing smuggled got an answer of its own
    assert rec.seen == []
    assert trapped.seen == []


async def test_host_and_forwarding_headers_cannot_redirect_a_request(
    recorder: tuple[Recorder, URL],
    trap: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    trapped, trap_url = trap
    trap_host = f"{trap_url.host}:{trap_url.port}"
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    spoofing = (
        f"X-Forwarded-Host: {trap_host}",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Port: 443",
        "X-Forwarded-Prefix: /v3",
        f"Forwarded: host={trap_host};proto=https",
        "X-Original-URL: /v3/admin",
        "X-Rewrite-URL: /v3/admin",
        "X-HTTP-Method-Override: DELETE",
    )
    data = request_bytes("/v2/lists?x=1", AUTH, *spoofing).replace(
        b"Host: proxy.test", f"Host: {trap_host}".encode()
    )
    status, _, _ = parse(await raw_exchange(server.port, data))
    assert status == 200
    [seen] = rec.seen
    assert seen.method == "GET"
    assert seen.raw_path == f"/v2/lists?x=1&api_key={API_KEY}"
    assert seen.headers["Host"] == f"{upstream.host}:{upstream.port}"
    assert "X-Forwarded-Host" not in seen.headers
    assert seen.headers["X-Forwarded-Proto"] == "https, http"
    # Absolute-form and authority-form targets naming the trap are refused outright.
    for target in (f"http://{trap_host}/v2/lists", f"//{trap_host}/v2/lists", trap_host):
        raw = await raw_exchange(server.port, request_bytes(target, AUTH))
        assert raw.startswith(b"HTTP/1.") and parse(raw)[0] in (400, 404), raw[:60]
    assert len(rec.seen) == 1
    assert trapped.seen == []
    assert_clean_upstream_request(rec)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_request_inside_a_body_stays_a_body(
    framing: str,
    recorder: tuple[Recorder, URL],
    trap: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    trapped, trap_url = trap
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    inner = (
        f"POST /v2/smuggled?api_key={CLIENT_TOKEN} HTTP/1.1\r\nHost: {trap_url.host}:"
        f"{trap_url.port}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    if framing == "content-length":
        framed = request_bytes(
            "/v2/a", AUTH, f"Content-Length: {len(inner)}", body=inner, method="POST"
        )
    else:
        half = len(inner) // 2
        chunked = b"%x;ext=1\r\n%s\r\n%X\r\n%s\r\n0\r\n\r\n" % (
            half,
            inner[:half],
            len(inner) - half,
            inner[half:],
        )
        framed = request_bytes(
            "/v2/a", AUTH, "Transfer-Encoding: chunked", body=chunked, method="POST"
        )
    raw = await raw_exchange(server.port, framed)
    assert parse(raw)[0] == 200
    assert answers(raw) == 1
    [seen] = rec.seen
    assert (seen.method, seen.raw_path.partition("?")[0], seen.body) == ("POST", "/v2/a", inner)
    # Re-framed for the upstream: an exact length, never the client's transfer coding.
    assert seen.headers["Content-Length"] == str(len(inner))
    assert "Transfer-Encoding" not in seen.headers
    assert trapped.seen == []


async def test_unknown_expectations_are_ignored_and_100_continue_still_works(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    odd = request_bytes("/v2/a", AUTH, "Expect: secret-handshake", "Content-Length: 2", body=b"hi")
    status, _, _ = parse(await raw_exchange(server.port, odd, timeout=2))
    assert status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        request_bytes("/v3/a", AUTH, "Expect: 100-continue", "Content-Length: 2", method="PUT")
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"ok")
    final = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    assert parse(final)[0] == 200
    assert [s.body for s in rec.seen] == [b"hi", b"ok"]
    assert all("Expect" not in s.headers for s in rec.seen)


# -- redaction -----------------------------------------------------------------------------


def test_reprs_of_secrets_and_config_hide_every_value(tmp_path: Path) -> None:
    secret = Secret(API_KEY)
    assert repr(secret) == "Secret('***')"
    assert str(secret) == f"{secret}" == "***"
    config = guarded(
        tmp_path, URL("http://127.0.0.1:1"), redis_url=Secret("redis://:pw1234@r:6379")
    )
    for text in (repr(config), str(config.redacted()), json.dumps(config.redacted())):
        assert_no_secret(text)
        assert "pw1234" not in text


def test_redact_removes_overlapping_and_encoded_secrets() -> None:
    short, longer = "s3cr3t-part", "s3cr3t-part-and-more"
    Secret(short)
    Secret(longer)
    Secret("key/with+odd=chars")
    text = redact(f"a {longer} b {short} c key%2Fwith%2Bodd%3Dchars d")
    assert text == "a *** b *** c *** d"
    assert redact("GET /v2/x?limit=1&api_key=unknown-key&b=2") == (
        "GET /v2/x?limit=1&api_key=***&b=2"
    )
    assert redact("Authorization: Bearer eyJ.abc.def") == "Authorization: Bearer ***"


def test_aiohttp_exception_text_quoting_urls_is_scrubbed() -> None:
    url = URL(f"http://upstream.test/v2/lists?api_key={API_KEY}", encoded=True)
    info = RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    errors: list[BaseException] = [
        aiohttp.ClientResponseError(info, (), status=500, message="boom"),
        aiohttp.InvalidURL(url),
        aiohttp.ClientPayloadError(f"Response payload is not completed for {url}"),
    ]
    for error in errors:
        assert API_KEY in str(error) or API_KEY in repr(error)
        assert_no_secret(redact(str(error)))
        assert_no_secret(redact(repr(error)))


def test_log_pipeline_scrubs_events_foreign_records_and_tracebacks(
    captured_logs: StringIO,
) -> None:
    Secret(CLIENT_TOKEN)
    log = logs.get_logger("test")
    error = ValueError(f"upstream said no to api_key={API_KEY} and {CLIENT_TOKEN}")
    log.info("event", url=f"/v2/x?api_key={API_KEY}", nested={"t": [ACCESS_TOKEN]})
    log.warning("failed", error=error)
    try:
        raise error
    except ValueError:
        log.exception("crashed")
        logging.getLogger("aiohttp.server").exception(
            "Error handling request %s", f"Bearer {CLIENT_TOKEN}"
        )
    text = captured_logs.getvalue()
    assert text.count("\n") == 4
    assert "Traceback" in text
    assert_no_secret(text)


async def test_unparseable_requests_are_not_echoed_back_or_logged(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
    captured_logs: StringIO,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    bad = [
        f"G@T /v2/x?api_key={CLIENT_TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /v2/x?api_key={CLIENT_TOKEN} HTTP/9.1\r\nHost: x\r\n\r\n",
        f"GET /v2/x?api_key={CLIENT_TOKEN}\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /v2/x HTTP/1.1\r\nAuthorization: Bearer {CLIENT_TOKEN}\x01\r\n\r\n",
        f"GET /v2/x HTTP/1.1\r\nX-Token: {OTHER_CLIENT_TOKEN}\r\n\r\n\r\n".replace(
            "X-Token", "X Token"
        ),
    ]
    for data in bad:
        raw = await raw_exchange(server.port, data.encode("latin-1"))
        status, _, body = parse(raw)
        assert status == 400
        [entry] = json.loads(body)
        assert entry["error_key"] == "http.status.bad_request"
        assert entry["error_message"].startswith("The request is not valid HTTP/1.1 (")
        assert "b'" not in entry["error_message"]
        assert_no_secret(raw)
    assert rec.seen == []
    text = captured_logs.getvalue()
    assert text.count('"request_malformed"') == len(bad)
    assert_no_secret(text)


async def test_what_aiohttp_answers_outside_the_middleware_is_cc_shaped_and_clean(
    start_server: ServerFactory, captured_logs: StringIO
) -> None:
    Secret(CLIENT_TOKEN)

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError(f"failed on /v2/x?api_key={API_KEY} for Bearer {CLIENT_TOKEN}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", crash)
    server = await start_server(app)
    status, headers, body = parse(await raw_exchange(server.port, request_bytes("/v2/x")))
    assert status == 500
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)[0]["error_key"] == "http.status.internal_server_error"
    # A quoted header name is kept in the reason; the request's own bytes never are.
    no_host = b"GET /v2/x HTTP/1.1\r\nConnection: close\r\n\r\n"
    status, _, body = parse(await raw_exchange(server.port, no_host))
    assert status == 400
    assert "'Host'" in json.loads(body)[0]["error_message"]
    text = captured_logs.getvalue()
    assert "RuntimeError" in text
    assert_no_secret(text)


# -- one full scenario, scanned for secrets ------------------------------------------------


@pytest.fixture
async def cc_like_upstream(start_server: ServerFactory) -> tuple[Recorder, URL]:
    """A recording upstream that answers like Constant Contact (never echoing credentials)."""
    rec = Recorder()
    throttled_once: set[str] = set()

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        path = request.path
        if path.endswith("/throttle-once") and path not in throttled_once:
            throttled_once.add(path)
            return web.json_response(
                {"error_key": "throttled", "error_message": "Too Many Requests"}, status=429
            )
        if path.endswith("/unauthorized"):
            return web.json_response(
                [{"error_key": "http.status.authentication.invalid_token", "error_message": "x"}],
                status=401,
            )
        if path.endswith("/daily"):
            return web.json_response(
                {"error_key": "quota_exceeded", "error_message": "Limit Exceeded"}, status=429
            )
        return web.json_response({"results": [], "path": path})

    rec.answer = answer
    server = await start_server(rec.app())
    return rec, server.make_url("")


async def test_no_secret_escapes_a_full_scenario(
    cc_like_upstream: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: StringIO,
) -> None:
    import socket

    rec, upstream = cc_like_upstream
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = URL(f"http://127.0.0.1:{s.getsockname()[1]}")
    live, proxy = await start_proxy(guarded(tmp_path / "a", upstream, max_body=100))
    _, proxy_down = await start_proxy(guarded(tmp_path / "b", dead, connect_timeout=0.5))
    captured: list[str] = []
    statuses: list[int] = []
    auth = {"Authorization": f"Bearer {CLIENT_TOKEN}"}

    async def call(method: str, url: URL, **kwargs: Any) -> None:
        async with http.request(method, url, **kwargs) as resp:
            statuses.append(resp.status)
            captured.append(str(resp.status) + repr(list(resp.headers.items())))
            captured.append((await resp.read()).decode("utf-8", "replace"))

    await call("GET", raw_url(proxy, f"/v2/lists?api_key={CLIENT_TOKEN}&limit=1"))
    await call("POST", proxy / "v3/contacts", headers=auth, json={"email": "a@b.c"})
    await call(
        "GET",
        proxy / "v3/contacts",
        headers={"Proxy-Authorization": f"Bearer {OTHER_CLIENT_TOKEN}"},
    )
    await call("GET", proxy / "v3/throttle-once", headers=auth)  # replayed, then 200
    await call("GET", proxy / "v2/unauthorized", headers=auth)  # upstream 401 passes through
    await call("GET", raw_url(proxy, "/v2/lists?api_key=wrong-token"))  # proxy's 401
    await call("GET", proxy / "nothing/here", headers=auth)  # 404
    await call("POST", proxy / "v2/big", headers=auth, data=b"x" * 101)  # 413
    await call("GET", raw_url(proxy_down, f"/v2/lists?api_key={CLIENT_TOKEN}"))  # 502
    await call("GET", proxy / "v3/daily", headers=auth)  # daily quota: 429, key paused
    await call("GET", proxy / "v3/contacts", headers=auth)  # paused: 429 at once
    for data in (
        f"G@T /v2/x?api_key={CLIENT_TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /v2/{'a' * MAX_REQUEST_TARGET}?api_key={CLIENT_TOKEN} HTTP/1.1\r\n\r\n",
    ):
        raw = await raw_exchange(live.port, data.encode())
        statuses.append(parse(raw)[0])
        captured.append(raw.decode("utf-8", "replace"))
    for page in ("status", "metrics", "healthz", "readyz"):
        await call("GET", proxy / page)
        await call("GET", proxy_down / page)

    assert statuses[:13] == [200, 200, 200, 200, 401, 401, 404, 413, 502, 429, 429, 400, 414]
    # The secrets were in play: the upstream got the real ones.
    assert any(API_KEY in s.raw_path for s in rec.seen)
    assert all(s.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}" for s in rec.seen)
    log_text = captured_logs.getvalue()
    events = [json.loads(line) for line in log_text.splitlines()]
    finished = {e["status"] for e in events if e["event"] == "request_finished"}
    assert {200, 401, 404, 413, 429, 502} <= finished
    assert any(e["event"] == "request_malformed" for e in events)
    for text in [*captured, log_text]:
        assert_no_secret(text)


# -- hostile clients (issue 21) ------------------------------------------------------------


@pytest.fixture
async def reflector(start_server: ServerFactory) -> tuple[Recorder, URL]:
    """An upstream that answers every request with the request itself, as TRACE does."""
    rec = Recorder()

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        head = f"{request.method} {request.raw_path}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in request.headers.items()
        )
        return web.Response(body=head.encode() + body, content_type="message/http")

    rec.answer = answer
    server = await start_server(rec.app())
    return rec, server.make_url("")


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS", "PROPFIND", "MKCOL", "LINK", "SEARCH"])
@pytest.mark.parametrize("generation", ["v2", "v3"])
async def test_methods_the_api_never_uses_are_405_and_never_forwarded(
    method: str,
    generation: str,
    reflector: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = reflector
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    raw = await raw_exchange(
        server.port, request_bytes(f"/{generation}/contacts", AUTH, method=method)
    )
    status, headers, body = parse(raw)
    assert status == 405
    assert headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE"
    payload = json.loads(body)
    entry = payload[0] if generation == "v2" else payload
    assert entry["error_key"] == (
        "http.status.method_not_allowed" if generation == "v2" else "method_not_allowed"
    )
    assert rec.seen == []
    assert_no_secret(raw)
    # The methods the API does use still go through, with the real credentials.
    for allowed in ("GET", "POST", "PATCH", "DELETE"):
        raw = await raw_exchange(
            server.port, request_bytes(f"/{generation}/contacts", AUTH, method=allowed)
        )
        assert parse(raw)[0] == 200
    assert [s.method for s in rec.seen] == ["GET", "POST", "PATCH", "DELETE"]
    assert_clean_upstream_request(rec)


@pytest.mark.parametrize(
    "prefer",
    [
        "wait=\u00b2",  # a superscript two: str.isdigit() says yes, int() says no
        "wait=\u0663",  # an Arabic-Indic three: int() would read 3
        "wait=" + "9" * 5000,  # more digits than int() converts
        'wait="' + "1" * 40 + '"',
        "wait=-1",
        "wait=1e3",
    ],
    ids=["superscript", "arabic-indic", "5000-digits", "quoted-40-digits", "negative", "exp"],
)
async def test_unreadable_wait_preferences_are_ignored_not_crashes(
    prefer: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
    captured_logs: StringIO,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    # UTF-8 on the wire, as a client would send "²" (aiohttp decodes field values as UTF-8).
    data = request_bytes("/v3/contacts", AUTH, "Prefer: PREFER").replace(b"PREFER", prefer.encode())
    status, headers, body = parse(await raw_exchange(server.port, data))
    assert status == 200, body
    assert "preference-applied" not in headers
    assert len(rec.seen) == 1
    assert '"request_crashed"' not in captured_logs.getvalue()


def test_the_wait_preference_is_a_short_run_of_ascii_digits() -> None:
    assert parse_wait_preference("wait=5") == 5
    assert parse_wait_preference('respond-async, Wait = "12" ; x') == 12
    assert parse_wait_preference("wait=999999999") == 999_999_999
    assert parse_wait_preference("wait=1000000000") is None  # ten digits
    assert parse_wait_preference("wait=\u00b2, wait=3") is None  # the first one counts
    assert parse_wait_preference("wait=") is None
    assert parse_wait_preference(None) is None


def test_an_unresolvable_listen_address_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    argv = ["serve", "--host", "no-such-host.invalid", "--trust-network"]
    try:
        assert main([*argv, "--port", "0", "--state-dir", str(tmp_path)], {}) == 2
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ctct-proxy: error: --host")
    assert "no-such-host.invalid" in err[0]


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        ({"client_token": [",,,"]}, {}, "--client-token"),
        ({"client_token": [""]}, {}, "--client-token"),
        ({}, {"CTCT_PROXY_CLIENT_TOKENS": " , ,"}, "CTCT_PROXY_CLIENT_TOKENS"),
        ({"host": "0.0.0.0"}, {"CTCT_PROXY_CLIENT_TOKENS": ","}, "CTCT_PROXY_CLIENT_TOKENS"),
    ],
)
def test_a_client_token_list_naming_no_token_is_a_configuration_error(
    flags: dict[str, Any], env: dict[str, str], named: str
) -> None:
    # Not "no tokens": a setting that looks like it closes the door must not leave it open.
    with pytest.raises(ConfigError, match=f"^{named}: must name at least one token"):
        Config.from_sources(flags, env)


def assert_no_client_token_in_any_form(rec: Recorder) -> None:
    """Neither client token reached the upstream: not as sent, decoded, or in another case."""
    for seen in rec.seen:
        text = seen.raw_path + "".join(f"{k}:{v}" for k, v in seen.header_list)
        text += seen.body.decode("latin-1")
        forms = {text, unquote(text), unquote(unquote(text)), unquote_plus(text)}
        for form in forms:
            for token in (CLIENT_TOKEN, OTHER_CLIENT_TOKEN):
                assert token.lower() not in form.lower(), f"{token[:8]}... reached the upstream"


def _upper_first(token: str) -> str:
    return f"%{ord(token[0]):02X}{token[1:]}"


@pytest.mark.parametrize(
    ("target", "headers", "query_sent"),
    [
        # A client access_token next to the injected Bearer token: replaced, never appended.
        ("/v3/contacts?access_token=stale-token&limit=1", (AUTH,), "limit=1"),
        ("/v3/contacts?limit=1&access%5Ftoken=stale-token", (AUTH,), "limit=1"),
        ("/v3/contacts?limit=1;access_token=stale-token", (AUTH,), "limit=1"),
        (
            f"/v2/lists?access_token=stale&api_key={CLIENT_TOKEN}&limit=1",
            (),
            f"limit=1&api_key={API_KEY}",
        ),
        # The client token in odd places of the query, next to a valid presentation.
        (f"/v3/contacts?limit=1;x={CLIENT_TOKEN}", (AUTH,), "limit=1"),
        (f"/v3/contacts?limit=1&x={CLIENT_TOKEN}%20", (AUTH,), "limit=1"),
        (f"/v3/contacts?limit=1&x={_upper_first(CLIENT_TOKEN)}", (AUTH,), "limit=1"),
        (f"/v3/contacts?limit=1&x=%2520{CLIENT_TOKEN}", (AUTH,), "limit=1"),
        (f"/v3/contacts?limit=1&x={OTHER_CLIENT_TOKEN.upper()}", (AUTH,), "limit=1"),
        (f"/v3/contacts?limit=1&{OTHER_CLIENT_TOKEN}=1", (AUTH,), "limit=1"),
        (f"/v3/contacts?limit=1&x=a+{CLIENT_TOKEN}+b", (AUTH,), "limit=1"),
        # ... and in headers the proxy forwards.
        ("/v3/contacts?limit=1", (AUTH, f"X-Api-Token: {OTHER_CLIENT_TOKEN}"), "limit=1"),
        ("/v3/contacts?limit=1", (AUTH, f"Cookie: t={CLIENT_TOKEN}"), "limit=1"),
    ],
)
async def test_client_credentials_in_odd_forms_never_reach_the_upstream(
    target: str,
    headers: tuple[str, ...],
    query_sent: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    status, _, body = parse(await raw_exchange(server.port, request_bytes(target, *headers)))
    assert status == 200, body
    [seen] = rec.seen
    assert seen.raw_path.partition("?")[2] == query_sent
    assert "stale" not in seen.raw_path
    assert_clean_upstream_request(rec)
    assert_no_client_token_in_any_form(rec)


@pytest.mark.parametrize(
    "authorization",
    [
        f"Token {CLIENT_TOKEN}",
        f"Bearer\t{CLIENT_TOKEN}",
        f"Bearer {CLIENT_TOKEN}, x",
        f"bearer  {CLIENT_TOKEN.upper()}",
        f"Basic {CLIENT_TOKEN}",
        f"Bearer {CLIENT_TOKEN}%20",
    ],
)
async def test_a_client_token_in_authorization_never_passes_through_in_any_scheme(
    authorization: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    # Pass-through mode: the client's own Authorization travels, unless it holds a client token.
    rec, upstream = recorder
    config = proxy_config(tmp_path, upstream, client_token=(Secret(CLIENT_TOKEN),))
    server, _ = await start_proxy(config)
    admitted = f"Proxy-Authorization: Bearer {CLIENT_TOKEN}"
    for target in ("/v3/contacts", "/v2/lists?api_key=own-key"):
        data = request_bytes(target, admitted, f"Authorization: {authorization}")
        assert parse(await raw_exchange(server.port, data))[0] == 200
    assert [s.headers.get("Authorization") for s in rec.seen] == [None, None]
    assert_no_client_token_in_any_form(rec)
    # Its own credentials still pass.
    data = request_bytes("/v3/contacts", admitted, "Authorization: Bearer own-token")
    assert parse(await raw_exchange(server.port, data))[0] == 200
    assert rec.seen[-1].headers["Authorization"] == "Bearer own-token"


@pytest.mark.parametrize(
    "target",
    [
        "/v2/lists?limit=1#frag",
        f"/v2/lists?limit=1#&api_key={CLIENT_TOKEN}",
        "/v3/contacts#x",
        "/v2/lists%23x?limit=1#",
    ],
)
async def test_a_fragment_in_the_target_is_refused(
    target: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Upstream, a fragment would swallow the api_key the proxy appends to the query.
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    raw = await raw_exchange(
        server.port, request_bytes(target, AUTH, f"Proxy-Authorization: Bearer {CLIENT_TOKEN}")
    )
    status, _, body = parse(raw)
    assert status == 400, body
    payload = json.loads(body)
    entry = payload[0] if target.startswith("/v2/") else payload
    assert "fragment" in entry["error_message"]
    assert rec.seen == []
    assert_no_secret(raw)


async def test_one_api_key_in_any_spelling_is_one_queue_and_two_keys_are_refused(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # Pass-through mode: the client's api_key names the queue its request waits in.
    rec, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    spellings = [
        "/v2/lists?api_key=own-key-1",
        "/v2/lists?api%5Fkey=own-key-1",
        "/v2/lists?api%5fkey=own%2Dkey%2D1",
        "/v2/lists?x=1;api_key=own-key-1",
        "/v2/lists?api_key=own-key-1&api%5Fkey=own-key-1",
    ]
    for target in spellings:
        async with http.get(raw_url(proxy, target)) as resp:
            assert resp.status == 200
    async with http.get(proxy / "status") as resp:
        keys = (await resp.json())["keys"]
    assert [(k["key"], k["sent_today"]) for k in keys] == [
        (fingerprint("own-key-1"), len(spellings))
    ]
    for target in (
        "/v2/lists?api_key=own-key-1&api%5Fkey=own-key-2",
        "/v2/lists?api_key=own-key-1;api_key=own-key-2",
        "/v2/lists?api_key=&api_key=own-key-2",
    ):
        async with http.get(raw_url(proxy, target)) as resp:
            assert resp.status == 400
            assert "more than one api_key" in (await resp.json())[0]["error_message"]
    assert len(rec.seen) == len(spellings)


def _flood_headers(total: int) -> bytes:
    """Header lines of about `total` bytes, each well under every per-header limit."""
    line = b"X-Flood-%05d: " + b"f" * 4000 + b"\r\n"
    return b"".join(line % i for i in range(total // len(line % 0) + 1))


@pytest.mark.parametrize("writes", [1, 64])
async def test_a_request_head_over_the_total_bound_is_431_before_it_ends(
    writes: int, recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    # Each header is under max_field_size and there are fewer than max_headers: before the
    # total bound, aiohttp's parser held all of them (~780 KB) for as long as the client liked.
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    head = b"GET /v2/lists HTTP/1.1\r\nHost: x\r\n" + _flood_headers(300 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    step = -(-len(head) // writes)
    for i in range(0, len(head), step):  # never the blank line that would end the head
        writer.write(head[i : i + step])
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
    writer.close()
    status, headers, body = parse(answer)
    assert headers["content-type"].startswith("application/json")
    assert status == 431
    [entry] = json.loads(body)
    assert entry["error_key"] == "http.status.request_header_fields_too_large"
    assert f"{MAX_HEAD_BYTES} bytes" in entry["error_message"]
    assert rec.seen == []


async def test_the_head_bound_counts_each_request_on_a_connection_from_its_first_byte(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream, max_body=1024 * 1024))
    near = b"X-Near: " + b"n" * 7000 + b"\r\n"
    big_head = b"X-Pad: 1\r\n" + near * ((MAX_HEAD_BYTES - 1024) // len(near))
    body = b"\r\n\r\n" * (100 * 1024)  # a body full of blank lines is still a body
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)

    def request(method: str, extra: bytes, content: bytes = b"") -> bytes:
        return f"{method} /v2/a HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode() + extra + content

    # Keep-alive and pipelined: bodies far over the head bound, heads just under it, in
    # one write; none of it may count against the next head.
    data = b"".join(
        [
            request("POST", big_head + f"Content-Length: {len(body)}\r\n\r\n".encode(), body),
            request("PUT", big_head + b"Transfer-Encoding: chunked\r\n\r\n", chunked),
            request("GET", big_head + b"\r\n"),
            request("GET", big_head + b"Connection: close\r\n\r\n"),
        ]
    )
    raw = await raw_exchange(server.port, data, timeout=10)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", raw) == [b"200"] * 4
    assert [(s.method, len(s.body)) for s in rec.seen] == [
        ("POST", len(body)),
        ("PUT", len(body)),
        ("GET", 0),
        ("GET", 0),
    ]
    # The same requests pipelined behind a head over the bound: answered up to it.
    data = request("GET", b"\r\n") + request("GET", _flood_headers(MAX_HEAD_BYTES))
    raw = await raw_exchange(server.port, data)
    assert re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw) == [b"200", b"431"]


@pytest.mark.parametrize(
    "data",
    [
        request_bytes("/v3/contacts", AUTH).replace(b"Connection: close\r\n", b""),
        request_bytes("/v2/lists", AUTH, "Content-Length: 5", body=b"hello", method="POST"),
        request_bytes("/v2/lists", AUTH, "Transfer-Encoding: chunked", method="PUT")
        + b"5\r\nhello\r\n0\r\n\r\n",
        request_bytes("/v2/lists", AUTH).replace(b"HTTP/1.1", b"HTTP/1.0"),
    ],
    ids=["get", "post", "chunked", "http-1.0"],
)
async def test_a_client_that_shuts_its_sending_side_is_still_answered(
    data: bytes, start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec = Recorder()
    release = asyncio.Event()

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await release.wait()  # the client's end-of-stream arrives while the proxy works
        return web.json_response({"ok": True})

    rec.answer = slow
    upstream = await start_server(rec.app())
    server, _ = await start_proxy(guarded(tmp_path, upstream.make_url("")))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()  # shutdown(SHUT_WR): "that is all I am sending"
    for _ in range(100):
        if rec.seen:
            break
        await asyncio.sleep(0.01)
    release.set()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    # An HTTP/1.1 client may first get an interim 102 (how a client that left is noticed).
    final = re.sub(rb"^(HTTP/1\.1 1\d\d [^\r]*\r\n\r\n)*", b"", answer)
    assert parse(final)[0] == 200, answer[:200]
    assert len(rec.seen) == 1
    if b"HTTP/1.0" in data:
        assert not answer.startswith(b"HTTP/1.1 102")
    assert rec.seen[0].body in (b"", b"hello")


async def test_a_client_that_closes_while_queued_still_gives_up_its_place(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    # Two sends a second: the second request waits about half a second for its turn.
    server, _ = await start_proxy(guarded(tmp_path, upstream, qps=2.0))
    first = await raw_exchange(server.port, request_bytes("/v2/lists", AUTH))
    assert parse(first)[0] == 200
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes("/v2/lists?second=1", AUTH))
    await writer.drain()
    writer.close()  # gone altogether, not half-closed
    await asyncio.sleep(0.8)
    assert [s.raw_path.partition("?")[0] for s in rec.seen] == ["/v2/lists"]
    assert "second=1" not in "".join(s.raw_path for s in rec.seen)


async def test_body_memory_across_requests_is_bounded_503_before_reading_the_body(
    start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec = Recorder()
    release = asyncio.Event()

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await release.wait()  # keeps the proxy holding the bodies it sent
        return web.json_response({"ok": True})

    rec.answer = slow
    upstream = await start_server(rec.app())
    config = guarded(tmp_path, upstream.make_url(""), max_body=1000, max_body_memory=2500)
    server, _ = await start_proxy(config)
    bodies = server.app[STATE].bodies

    async def post(data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(data)
        await writer.drain()
        return reader, writer

    held = [
        await post(
            request_bytes("/v2/a", AUTH, "Content-Length: 1000", body=b"a" * 1000, method="POST")
        )
        for _ in range(2)
    ]
    for _ in range(200):
        if len(rec.seen) == 2:
            break
        await asyncio.sleep(0.01)
    assert bodies.held == 2000
    # Declared too big for what is left: refused before a byte of the body is sent.
    reader, writer = await post(request_bytes("/v3/a", AUTH, "Content-Length: 600", method="POST"))
    status, headers, body = parse(await read_answer(reader))
    writer.close()
    assert status == 503
    assert headers["retry-after"] == "1"
    assert json.loads(body)["error_key"] == "service_unavailable"
    # Chunked: refused when the chunk that would cross the bound arrives.
    chunked = b"".join(b"64\r\n" + b"c" * 100 + b"\r\n" for _ in range(6)) + b"0\r\n\r\n"
    reader, writer = await post(
        request_bytes("/v2/a", AUTH, "Transfer-Encoding: chunked", body=chunked, method="POST")
    )
    status, headers, _ = parse(await read_answer(reader))
    writer.close()
    assert (status, headers["retry-after"]) == (503, "1")
    assert len(rec.seen) == 2
    assert bodies.held == 2000
    # Answered: their bodies are let go, and a body fits again.
    release.set()
    for reader, writer in held:
        assert parse(await read_answer(reader))[0] == 200
        writer.close()
    assert bodies.held == 0
    raw = await raw_exchange(
        server.port,
        request_bytes("/v2/a", AUTH, "Content-Length: 1000", body=b"b" * 1000, method="POST"),
    )
    assert parse(raw)[0] == 200
    assert bodies.held == 0
    assert bodies.peak == 2000


def test_a_body_hold_reserves_declared_lengths_grows_with_chunks_and_releases_once() -> None:
    budget = BodyBudget(100)
    with budget.hold() as first:
        first.reserve(60)
        first.take(30)  # within what was reserved
        assert budget.held == 60
        second = budget.hold()
        second.take(40)
        assert budget.held == 100
        with pytest.raises(Unavailable) as refused:
            second.take(1)
        assert refused.value.status == 503
        assert refused.value.headers() == {"Retry-After": "1"}
        second.release()
        second.release()
        assert budget.held == 60
    assert budget.held == 0
    assert budget.peak == 100


def test_max_body_memory_below_max_body_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"^--max-body-memory: must be at least --max-body"):
        Config.from_sources({"max_body": "2000", "max_body_memory": "1000"}, {})
    env = {"CTCT_PROXY_MAX_BODY_MEMORY": str(32 * 1024 * 1024)}
    assert Config.from_sources({}, env).max_body_memory == 32 * 1024 * 1024


@pytest.mark.parametrize("piece", [1, 7, 4096])
@pytest.mark.parametrize(
    ("encoding", "status"),
    [
        ("chunked", 200),
        ("chunked ", 400),
        ("CHUNKED", 400),
        ("gzip, chunked", 400),
        (" " * 80 + "chunked", 200),  # leading whitespace is not part of a value
        ("x" * 80 + ", chunked", 400),
    ],
)
async def test_transfer_encoding_is_checked_however_the_head_is_cut_into_reads(
    piece: int,
    encoding: str,
    status: int,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(guarded(tmp_path, upstream))
    data = request_bytes(
        "/v2/a", AUTH, f"Transfer-Encoding: {encoding}", body=b"2\r\nok\r\n0\r\n\r\n", method="POST"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for i in range(0, len(data), piece):
        writer.write(data[i : i + piece])
        await writer.drain()
    answer = await read_answer(reader)
    writer.close()
    assert parse(answer)[0] == status
    assert [s.body for s in rec.seen] == ([b"ok"] if status == 200 else [])


async def test_freed_memory_is_given_back_periodically_where_the_allocator_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On glibc (the image's libc) both allocator settings take; elsewhere they are skipped.
    assert limits._libc() is not None
    assert limits.hold_mmap_threshold() is True
    trims: list[int] = []

    class FakeLibc:
        def malloc_trim(self, pad: int) -> int:
            trims.append(pad)
            return 1

    monkeypatch.setattr(limits, "_libc", FakeLibc)
    task = asyncio.create_task(limits.give_back_freed_memory(interval=0.001))
    for _ in range(200):
        if len(trims) >= 3:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    assert trims[:3] == [0, 0, 0]
    monkeypatch.setattr(limits, "_libc", lambda: None)
    await asyncio.wait_for(limits.give_back_freed_memory(interval=0.001), 1)  # returns at once

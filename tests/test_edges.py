"""Edges real clients reach: redirects that would leave the proxy, a bare `?`, an oversized body
announced with `Expect: 100-continue`, a raw UTF-8 byte in the target.

Each test talks raw bytes or aiohttp to the proxy on 127.0.0.1 and asserts on what the client
got and what a recording upstream received.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.credentials import Secret
from proxy.forward import relocate
from tests.conftest import Recorder, ServerFactory, StartProxy, proxy_config, raw_exchange

API_KEY = "EDGE-KEY-0f3c2b1a"


def _head(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """Status line, headers (lower-cased names) and body of the first answer in raw bytes."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


# -- Location / Content-Location ----------------------------------------------------------


def _redirecting(location: str, status: int = 302) -> Recorder:
    rec = Recorder()

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(
            status=status,
            headers={"Location": location, "Content-Location": location},
        )

    rec.answer = answer
    return rec


@pytest.mark.parametrize("status", [201, 302, 303, 307, 308])
async def test_location_pointing_at_the_upstream_is_rewritten_to_the_proxy(
    status: int, start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """A redirect-following client must come back through the proxy, never go around it."""
    rec = Recorder()
    upstream = (await start_server(rec.app())).make_url("")
    target = f"{str(upstream).rstrip('/')}/v3/contacts/7?include=list_memberships&x=%2F"
    rec.answer = _redirecting(target, status).answer
    server, _ = await start_proxy(proxy_config(tmp_path, upstream))
    request = (
        f"POST /v3/contacts HTTP/1.1\r\nHost: localhost:{server.port}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    status_line, headers, _ = _head(await raw_exchange(server.port, request.encode()))
    assert status_line.split(" ")[1] == str(status)
    # The client's own Host names the base it comes back to; path and query byte for byte.
    expected = f"http://localhost:{server.port}/v3/contacts/7?include=list_memberships&x=%2F"
    assert headers["location"] == expected
    assert headers["content-location"] == expected


async def test_a_redirect_is_not_followed_and_the_client_follows_it_through_the_proxy(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path == "/v3/old":
            location = f"{str(upstream).rstrip('/')}/v3/new?page=2"
            return web.Response(status=301, headers={"Location": location})
        return web.json_response({"path": request.raw_path})

    rec.answer = answer
    _, proxy = await start_proxy(
        proxy_config(tmp_path, upstream, access_token=Secret("REAL-EDGE-TOKEN"))
    )
    async with http.get(proxy / "v3/old") as resp:  # aiohttp follows redirects by default
        assert resp.status == 200
        assert resp.url.port == proxy.port
        assert await resp.json() == {"path": "/v3/new?page=2"}
    assert [s.raw_path for s in rec.seen] == ["/v3/old", "/v3/new?page=2"]
    # Both legs went through the proxy, so both carried the proxy's credentials.
    assert all(s.headers["Authorization"] == "Bearer REAL-EDGE-TOKEN" for s in rec.seen)


async def test_the_other_generations_upstream_is_rewritten_too(
    start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    v2 = Recorder()
    v2_url = (await start_server(v2.app())).make_url("")
    v3 = _redirecting(f"{str(v2_url).rstrip('/')}/v2/lists/1")
    v3_url = (await start_server(v3.app())).make_url("")
    server, _ = await start_proxy(
        proxy_config(tmp_path, v2_url, upstream_v3=v3_url.with_path("/base"))
    )
    request = b"GET /v3/x HTTP/1.1\r\nHost: proxy.test:8080\r\nConnection: close\r\n\r\n"
    _, headers, _ = _head(await raw_exchange(server.port, request))
    assert headers["location"] == "http://proxy.test:8080/v2/lists/1"
    assert [s.raw_path for s in v3.seen] == ["/base/v3/x"]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        # the configured upstreams, however their authority is spelled
        ("https://API.CC.Email/v3/contacts?a=1", "http://127.0.0.1:8080/v3/contacts?a=1"),
        ("https://api.cc.email:443/v3/x#frag", "http://127.0.0.1:8080/v3/x#frag"),
        ("HTTPS://api.constantcontact.com/v2/lists", "http://127.0.0.1:8080/v2/lists"),
        ("https://api.cc.email", "http://127.0.0.1:8080"),
        ("https://api.cc.email?x", "http://127.0.0.1:8080?x"),
        # anything else: untouched
        ("http://api.cc.email/v3/x", None),  # another scheme
        ("https://api.cc.email:8443/v3/x", None),  # another port
        ("https://api.cc.email.evil.test/v3/x", None),
        ("https://user@api.cc.email/v3/x", None),
        ("https://login.constantcontact.com/", None),
        ("/v3/contacts/7", None),  # relative: resolved against the proxy already
        ("//api.cc.email/v3/x", None),
        ("not a url", None),
    ],
)
def test_relocate_rewrites_only_configured_upstreams(location: str, expected: str | None) -> None:
    upstreams = (URL("https://api.constantcontact.com"), URL("https://api.cc.email"))
    own = "http://127.0.0.1:8080"
    assert relocate(location, upstreams, own) == (expected or location)


def test_relocate_with_a_base_path_strips_it_and_leaves_paths_outside_it() -> None:
    upstreams = (URL("http://127.0.0.1:9000/prefix"),)
    own = "http://proxy:8080"
    assert relocate("http://127.0.0.1:9000/prefix/v3/x", upstreams, own) == "http://proxy:8080/v3/x"
    assert relocate("http://127.0.0.1:9000/prefixed/v3/x", upstreams, own) == (
        "http://127.0.0.1:9000/prefixed/v3/x"
    )
    assert relocate("http://127.0.0.1:9000/other", upstreams, own) == "http://127.0.0.1:9000/other"


# -- the bare `?` ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "configured_key", "arrives"),
    [
        ("/v3/contacts?", False, "/v3/contacts?"),
        ("/v2/lists?", False, "/v2/lists?"),
        ("/v3/contacts", False, "/v3/contacts"),
        ("/v3/a?b", False, "/v3/a?b"),
        ("/v2/lists?", True, f"/v2/lists?api_key={API_KEY}"),
        ("/v2/lists", True, f"/v2/lists?api_key={API_KEY}"),
    ],
)
async def test_a_bare_question_mark_reaches_the_upstream(
    target: str,
    configured_key: bool,
    arrives: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    overrides = {"api_key": Secret(API_KEY)} if configured_key else {}
    server, _ = await start_proxy(proxy_config(tmp_path, upstream, **overrides))
    request = f"GET {target} HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n"
    status_line, _, _ = _head(await raw_exchange(server.port, request.encode()))
    assert status_line == "HTTP/1.1 200 OK"
    assert [s.raw_path for s in rec.seen] == [arrives]


# -- Expect: 100-continue with a body over --max-body -----------------------------------------


@pytest.mark.parametrize("generation", ["v2", "v3"])
async def test_expect_with_a_too_large_length_gets_413_without_a_100(
    generation: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(proxy_config(tmp_path, upstream, max_body=1000))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            f"POST /{generation}/activities HTTP/1.1\r\nHost: proxy.test\r\n"
            "Expect: 100-continue\r\nContent-Length: 1001\r\n\r\n".encode()
        )
        # The client waits for the interim answer before uploading: the first thing it hears
        # must be the refusal (no body has been sent, none will be).
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, headers, _ = _head(head)
        assert status_line == "HTTP/1.1 413 Request Entity Too Large"
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
        # The body will never come, so the connection cannot carry another request.
        assert headers["connection"] == "close"
    finally:
        writer.close()
    payload = json.loads(body)
    entry = payload[0] if generation == "v2" else payload
    assert entry["error_key"] == (
        "http.status.request_entity_too_large" if generation == "v2" else "request_too_large"
    )
    assert rec.seen == []


async def test_expect_within_the_limit_is_still_invited(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(proxy_config(tmp_path, upstream, max_body=1000))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            b"POST /v3/activities HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"x" * 1000)
        final = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert final.startswith(b"HTTP/1.1 200 OK")
    assert [len(s.body) for s in rec.seen] == [1000]


# -- an un-encoded UTF-8 byte in the target ---------------------------------------------------


@pytest.mark.parametrize(
    ("target", "version", "v3"),
    [
        (b"/v3/contacts?q=caf\xc3\xa9", b"HTTP/1.1", True),
        (b"/v3/caf\xc3\xa9", b"HTTP/1.1", True),
        (b"/v2/contacts?email=caf\xc3\xa9@example.com", b"HTTP/1.1", False),
        (b"/v3/contacts?q=caf\xc3\xa9", b"HTTP/1.0", True),
    ],
)
async def test_raw_utf8_in_the_target_gets_a_400_in_the_paths_shape_and_the_clients_version(
    target: bytes,
    version: bytes,
    v3: bool,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(proxy_config(tmp_path, upstream, api_key=Secret(API_KEY)))
    request = b"GET " + target + b" " + version + b"\r\nHost: proxy.test\r\n\r\n"
    status_line, headers, body = _head(await raw_exchange(server.port, request))
    assert status_line == f"{version.decode()} 400 Bad Request"
    assert headers["content-type"].startswith("application/json")
    if version == b"HTTP/1.1":
        assert headers["connection"] == "close"
    payload = json.loads(body)
    if v3:
        assert payload["error_key"] == "bad_request"
        assert "not valid HTTP" in payload["error_message"]
    else:
        assert payload[0]["error_key"] == "http.status.bad_request"
    assert rec.seen == []

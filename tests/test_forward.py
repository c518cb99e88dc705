"""The forwarding core against a recording upstream: bytes, headers, credentials, refusals."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.cli import main
from tests.conftest import Recorder, StartProxy, proxy_config, raw_exchange, raw_url

# The methods Constant Contact uses (others are refused: test_hardening).
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]


@pytest.mark.parametrize("method", METHODS)
async def test_every_method_is_forwarded(
    method: str,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    body = b'{"a": 1}' if method in ("POST", "PUT", "PATCH") else b""
    async with http.request(method, proxy / "v3/contacts/abc", data=body or None) as resp:
        assert resp.status == 200
    assert [(s.method, s.raw_path, s.body) for s in rec.seen] == [
        (method, "/v3/contacts/abc", body)
    ]


async def test_query_string_and_path_kept_byte_for_byte(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    raw = "/v2/lists/a%20b%2Bc?status=ACTIVE&modified_since=2024-01-01T00%3A00%3A00Z&x=a+b&flag&e=%E2%82%AC"
    async with http.get(raw_url(proxy, raw)) as resp:
        assert resp.status == 200
    assert rec.seen[0].raw_path == raw


async def test_multipart_upload_arrives_byte_exact(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    boundary = "----ctctBoundary7MA4YWxkTrZu0gW"
    csv = os.urandom(3 * 1024 * 1024)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file_name"\r\n\r\ncontacts.csv\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="lists"\r\n\r\n1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="contacts.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + csv
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f"multipart/form-data; boundary={boundary}"
    async with http.post(
        proxy / "v2/activities/addcontacts", data=body, headers={"Content-Type": content_type}
    ) as resp:
        assert resp.status == 200
    seen = rec.seen[0]
    assert hashlib.sha256(seen.body).hexdigest() == hashlib.sha256(body).hexdigest()
    assert seen.headers["Content-Type"] == content_type


async def test_stale_and_duplicated_credentials_are_replaced(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    from proxy.credentials import Secret

    config = proxy_config(
        tmp_path, upstream, api_key=Secret("REAL-KEY"), access_token=Secret("REAL-TOKEN")
    )
    _, proxy = await start_proxy(config)
    url = raw_url(proxy, "/v2/lists?api_key=stale&limit=50&api_key=stale2&API_KEY=x")
    async with http.get(url, headers={"Authorization": "Bearer stale"}) as resp:
        assert resp.status == 200
    seen = rec.seen[0]
    assert seen.raw_path == "/v2/lists?limit=50&API_KEY=x&api_key=REAL-KEY"
    assert [v for k, v in seen.header_list if k.lower() == "authorization"] == ["Bearer REAL-TOKEN"]
    # v3 gets the token but no api_key.
    async with http.get(proxy / "v3/contacts", headers={"Authorization": "Bearer stale"}) as resp:
        assert resp.status == 200
    assert rec.seen[1].raw_path == "/v3/contacts"
    assert rec.seen[1].headers["Authorization"] == "Bearer REAL-TOKEN"


async def test_client_credentials_pass_through_without_configured_ones(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    url = raw_url(proxy, "/v2/lists?api_key=client-own")
    async with http.get(url, headers={"Authorization": "Bearer client-token"}) as resp:
        assert resp.status == 200
    assert rec.seen[0].raw_path == "/v2/lists?api_key=client-own"
    assert rec.seen[0].headers["Authorization"] == "Bearer client-token"


async def test_header_policy_both_ways(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        resp = web.Response(
            body=b"hello", headers={"X-Up": "1", "X-Secret-Hop": "h", "Keep-Alive": "timeout=5"}
        )
        resp.headers["Connection"] = "X-Secret-Hop"
        return resp

    rec.answer = answer
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    headers = {
        "Connection": "X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "Upgrade": "websocket",
        "X-Forwarded-For": "10.1.1.1",
        "Host": "evil.example",
        "X-Keep": "yes",
        "X-Request-Id": "req-123",
    }
    async with http.get(proxy / "v3/contacts", headers=headers) as resp:
        assert resp.status == 200
        assert await resp.read() == b"hello"
        assert resp.headers["X-Up"] == "1"
        assert "X-Secret-Hop" not in resp.headers
        assert "Keep-Alive" not in resp.headers
        assert resp.headers["X-Request-Id"] == "req-123"
    seen = rec.seen[0].headers
    for name in ("X-Drop-Me", "Keep-Alive", "Proxy-Authorization", "TE", "Upgrade"):
        assert name not in seen, name
    assert seen["Host"] == f"{upstream.host}:{upstream.port}"
    assert seen["X-Forwarded-For"] == "10.1.1.1, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Keep"] == "yes"
    assert seen["X-Request-Id"] == "req-123"
    assert "User-Agent" not in seen or seen["User-Agent"].startswith("Python")  # the client's own


async def test_redirects_not_followed_and_bodies_not_decompressed(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    gz = gzip.compress(b'{"results": []}' * 100)

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.endswith("/moved"):
            raise web.HTTPFound("/v2/elsewhere")
        return web.Response(
            body=gz, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    rec.answer = answer
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    async with http.get(proxy / "v2/moved", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/v2/elsewhere"
    async with http.get(proxy / "v2/lists", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == gz
    assert [s.raw_path for s in rec.seen] == ["/v2/moved", "/v2/lists"]
    assert rec.seen[1].headers["Accept-Encoding"] == "gzip"


@pytest.mark.parametrize(
    "target",
    [
        "/v2/../admin",
        "/v2/%2e%2e/v3/x",
        "/v3/a/%2E%2E/%2e%2e/secret",
        "/v3/a/%252e%252e/b",
        "/v2/a%2fb",
        "/v2/a\\..\\b",
        "/v2/./lists",
        "/v4/lists",
        "/admin",
        "//evil.example/v2/lists",
    ],
)
async def test_unsafe_paths_are_refused(
    target: str, recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(proxy_config(tmp_path, upstream))
    raw = await raw_exchange(
        server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    status = int(raw.split(b" ", 2)[1])
    assert status in (400, 404)
    body = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert isinstance(body, list) or "error_key" in body
    assert rec.seen == []


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET http://evil.example/v2/lists HTTP/1.1",
        b"CONNECT evil.example:443 HTTP/1.1",
        b"CONNECT /v2/lists HTTP/1.1",
    ],
)
async def test_absolute_form_and_connect_refused(
    request_line: bytes, recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, _ = await start_proxy(proxy_config(tmp_path, upstream))
    raw = await raw_exchange(
        server.port, request_line + b"\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 4"), raw[:80]
    assert rec.seen == []


async def test_unknown_path_404_in_cc_shape(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    async with http.get(proxy / "nothing/here") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body[0]["error_key"] == "http.status.not_found"
    async with http.get(proxy / "healthz") as resp:
        assert resp.status == 200


async def test_upstream_unreachable_is_502_without_secrets(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    import socket

    from proxy.credentials import Secret

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = proxy_config(
        tmp_path,
        URL(f"http://127.0.0.1:{port}"),
        api_key=Secret("SECRET-KEY-502"),
        access_token=Secret("SECRET-TOK"),
    )
    _, proxy = await start_proxy(config)
    async with http.get(proxy / "v2/lists") as resp:
        assert resp.status == 502
        text = await resp.text()
        assert resp.headers["Retry-After"] == "1"
    assert "SECRET" not in text
    assert json.loads(text)[0]["error_key"] == "http.status.bad_gateway"


async def test_upstream_timeout_is_504(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.Response(text="late")

    rec.answer = slow
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, upstream_timeout=0.3))
    async with http.get(proxy / "v3/contacts") as resp:
        assert resp.status == 504
        body = await resp.json()
    assert body["error_key"] == "gateway_timeout"


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["serve", "--qps", "0"], {}, "--qps"),
        (["serve", "--port", "70000"], {}, "--port"),
        (["serve", "--upstream-v2", "ftp://x"], {}, "--upstream-v2"),
        (["serve"], {"CTCT_PROXY_MAX_WAIT": "soon"}, "CTCT_PROXY_MAX_WAIT"),
        (["serve", "--host", "0.0.0.0"], {}, "--host"),
        (["serve", "--log-format", "xml"], {}, "--log-format"),
        (["serve", "--redis-url", "http://x"], {}, "--redis-url"),
    ],
)
def test_bad_configuration_exits_2_naming_the_setting(
    argv: list[str], env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv, env) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert named in err[0]

"""Shared fixtures: real servers on 127.0.0.1, port 0 — a recording upstream, the proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from multidict import CIMultiDict
from yarl import URL

from proxy.app import make_app
from proxy.config import Config
from proxy.edge.server import ProxyRunner, runner_options
from proxy.quota import QuotaBackend
from tests.redis_server import RedisServer


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: CIMultiDict[str]
    header_list: list[tuple[str, str]]
    body: bytes


@dataclass
class Recorder:
    """A small upstream that records every request and answers as a test tells it to."""

    seen: list[Seen] = field(default_factory=list)
    answer: Callable[[web.Request, bytes], Awaitable[web.StreamResponse]] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                CIMultiDict(request.headers),
                list(request.headers.items()),
                body,
            )
        )
        if self.answer is not None:
            return await self.answer(request, body)
        return web.json_response({"ok": True, "path": request.raw_path})


class _Server(TestServer):
    """A TestServer run by the same runner, with the same settings, as `serve`."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return ProxyRunner(self.app, **kwargs)


ServerFactory = Callable[..., Awaitable[TestServer]]
StartProxy = Callable[..., Awaitable[tuple[TestServer, URL]]]


@pytest.fixture
async def start_server() -> AsyncIterator[ServerFactory]:
    """Start any aiohttp app on 127.0.0.1:0 the way `serve` runs it; all closed at the end."""
    servers: list[TestServer] = []

    async def start(app: web.Application, **kwargs: Any) -> TestServer:
        options = {**runner_options(), **kwargs}
        # TestServer passes handler_cancellation=True itself (and drops constructor kwargs).
        options.pop("handler_cancellation")
        server = _Server(app, host="127.0.0.1")
        await server.start_server(**options)
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def recorder(start_server: ServerFactory) -> tuple[Recorder, URL]:
    rec = Recorder()
    server = await start_server(rec.app())
    return rec, server.make_url("")


def raw_url(base: URL, target: str) -> URL:
    """A URL whose path and query are sent exactly as written (no re-encoding)."""
    return URL(str(base).rstrip("/") + target, encoded=True)


def proxy_config(tmp_path: Path, upstream: URL, **overrides: Any) -> Config:
    """A proxy configuration pointed at a local upstream, with state in a temp dir."""
    base = Config(
        upstream_v2=upstream,
        upstream_v3=upstream,
        state_dir=tmp_path / "state",
        qps=1000.0,
        connect_timeout=2.0,
        upstream_timeout=5.0,
    )
    return replace(base, **overrides)


@pytest.fixture
async def start_proxy(
    start_server: ServerFactory,
) -> StartProxy:
    async def start(config: Config, backend: QuotaBackend | None = None) -> tuple[TestServer, URL]:
        server = await start_server(make_app(config, backend))
        return server, server.make_url("")

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def raw_exchange(port: int | None, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return what comes back until the server closes.

    Requests written with `Connection: close` make the server close after its answer.
    """
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return b"".join(chunks)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on a free port, stopped at the end (tests may stop/start it)."""
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def log_lines() -> Iterator[Callable[[str], list[dict[str, Any]]]]:
    """The proxy's JSON log during the test; call it with an event name to get those lines."""
    import io
    import json
    import logging

    import structlog

    from proxy import logs

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    sink = logs._SINK
    saved_sink = (sink.stream, sink.level, sink.render)
    stream = io.StringIO()
    logs.configure("json", "debug", stream=stream)

    def lines(event: str) -> list[dict[str, Any]]:
        parsed = [json.loads(x) for x in stream.getvalue().splitlines() if x.startswith("{")]
        return [x for x in parsed if x.get("event") == event]

    yield lines
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    sink.stream, sink.level, sink.render = saved_sink
    structlog.reset_defaults()

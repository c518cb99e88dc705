"""The plainest fair aiohttp forwarder: the yardstick `bench/overhead.py` holds the proxy to.

No queue, no limits, no credentials, no logs, no metrics; but one `ClientSession`, bodies
streamed back as they come, and the same event loop as the proxy (uvloop when importable).

    python bench/plain_forwarder.py UPSTREAM_URL PORT [asyncio]

With `asyncio` as a third argument it runs on asyncio's own loop even when uvloop is
installed: the plainest aiohttp forwarder there is, as a first-time user would write it.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web


def make_app(upstream: str) -> web.Application:
    """An app that sends every request on to `upstream` and streams the answer back."""

    async def forward(request: web.Request) -> web.StreamResponse:
        session = request.app[SESSION]
        async with session.request(
            request.method, upstream + request.raw_path, data=await request.read() or None
        ) as up:
            response = web.StreamResponse(
                status=up.status, headers={"Content-Type": up.content_type}
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(
            auto_decompress=False, connector=aiohttp.TCPConnector(limit=0)
        )
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


SESSION = web.AppKey("session", aiohttp.ClientSession)


def main() -> None:
    """Serve on 127.0.0.1:PORT, forwarding to UPSTREAM_URL."""
    upstream, port = sys.argv[1].rstrip("/"), int(sys.argv[2])
    loop = None
    try:
        import uvloop
    except ImportError:
        pass
    else:
        if sys.argv[3:] != ["asyncio"]:
            loop = uvloop.new_event_loop()
    web.run_app(
        make_app(upstream), host="127.0.0.1", port=port, access_log=None, print=None, loop=loop
    )


if __name__ == "__main__":
    main()

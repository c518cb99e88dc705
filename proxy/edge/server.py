"""Running the proxy: the aiohttp server settings, the edge of the HTTP parser, signals.

What happens before a request reaches the app (limits on the request line and headers,
answers to requests aiohttp cannot parse, in Constant Contact's shape and without quoting
the request back) and the process lifecycle (SIGTERM / SIGINT, graceful shutdown).
"""

from __future__ import annotations

import ast
import asyncio
import re
import signal
import socket
from collections.abc import Callable
from typing import Any, cast

from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.app import make_app
from proxy.config import Config
from proxy.credentials import redact
from proxy.edge.framing import HeadGuard, HeadTooLarge
from proxy.edge.limits import give_back_freed_memory, hold_mmap_threshold
from proxy.logs import get_logger
from proxy.upstream_errors import Generation, cc_error_body

log = get_logger("proxy")
_JSON = "application/json"


# What a client may send before any handler runs, enforced by aiohttp's parser. The request
# target gets more room than one header field (long v2/v3 queries are legitimate) and the
# two differ so that an oversized one can be told apart from the other (414 vs 431).
MAX_REQUEST_TARGET = 16 * 1024
MAX_HEADER_FIELD = 8190
MAX_HEADERS = 100
# aiohttp has no header-read timeout: its keep-alive timer, started when a connection opens
# and after each answer, also drops a client still trickling its request line and headers.
KEEPALIVE_TIMEOUT = 75.0
# How much of a request body aiohttp buffers per connection before it stops reading from
# the socket (it stops at twice this). aiohttp 3.14's default is 256 KiB: 150 clients
# streaming bodies the proxy refuses or has not started to read then held ~120 MB of
# buffers; at 64 KiB, ~50 MB (bench/attack.py).
READ_BUFFER = 64 * 1024


def runner_options() -> dict[str, Any]:
    """The aiohttp server settings every server here runs with (tests' servers included)."""
    return {
        "handler_cancellation": True,  # a client that leaves gives up its place in the queue
        "auto_decompress": False,  # request bodies are forwarded as sent
        "access_log": None,  # request_finished replaces it
        "max_line_size": MAX_REQUEST_TARGET,
        "max_field_size": MAX_HEADER_FIELD,
        "max_headers": MAX_HEADERS,
        "keepalive_timeout": KEEPALIVE_TIMEOUT,
        "read_bufsize": READ_BUFFER,
    }


def _malformed_answer(status: int, exc: BaseException | None) -> web.Response:
    """A request aiohttp could not parse (or a fault outside the middleware), in CC's shape.

    aiohttp's own text quotes the offending bytes (query strings with `api_key` included),
    so none of it is sent back. The shape follows the generation of the path when the
    request line can be read from the parser's message (`request_line`); v2's array is the
    default, being what v2 sends for every error and v3 for some of its own.
    """
    generation = request_line(exc)[0]
    if isinstance(exc, HeadTooLarge):
        status, keys = 431, _HEADERS_TOO_LARGE
        text = f"The request line and headers are longer than {exc.limit} bytes together."
    elif isinstance(exc, LineTooLong) and len(exc.args) > 1 and exc.args[1] == MAX_HEADER_FIELD:
        status, keys = 431, _HEADERS_TOO_LARGE
        text = f"A request header is longer than {MAX_HEADER_FIELD} bytes."
    elif isinstance(exc, LineTooLong):
        status, keys = 414, ("http.status.request_uri_too_long", "uri_too_long")
        text = f"The request target is longer than {MAX_REQUEST_TARGET} bytes."
    elif isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower():
        status, keys = 431, _HEADERS_TOO_LARGE
        text = f"The request has more than {MAX_HEADERS} headers."
    elif status < 500:
        keys = ("http.status.bad_request", "bad_request")
        # Only aiohttp's words, cut before it quotes the request's bytes back.
        quoted = _QUOTED.split(getattr(exc, "message", "") or "", maxsplit=1)[0]
        reason = " ".join(line.strip() for line in quoted.splitlines()).strip(" :.")
        text = redact(f"The request is not valid HTTP/1.1 ({reason[:120] or 'malformed'}).")
    else:
        keys = ("http.status.internal_server_error", "internal_error")
        text = "The proxy failed to handle this request."
    key = keys[0] if generation == "v2" else keys[1]
    body = cc_error_body(generation, key, text)
    response = web.Response(status=status, body=body, content_type=_JSON)
    response.force_close()
    return response


_HEADERS_TOO_LARGE = ("http.status.request_header_fields_too_large", "header_fields_too_large")
# The line aiohttp's C parser quotes in its message: `{reason}:\n\n  b'{line}'\n  {pointer}`.
_QUOTED_LINE = re.compile(r"^  (b'.*'|b\".*\")$", re.MULTILINE)
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def request_line(exc: BaseException | None) -> tuple[Generation, HttpVersion]:
    """The generation and HTTP version of a request the parser refused, as far as it shows.

    The parser's message quotes the line it stopped in; when that is the request line, its
    path says the generation and its version the client's. Otherwise (a bad header, a line
    split across reads): v2 and HTTP/1.1, the version this server speaks (RFC 9112 §2.3).
    """
    match = _QUOTED_LINE.search(getattr(exc, "message", "") or "")
    if match is None:
        return "v2", HttpVersion11
    try:
        line = ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return "v2", HttpVersion11
    method, _, rest = line.partition(b" ")
    target, _, version = rest.rpartition(b" ")
    if not _METHOD.fullmatch(method) or not target.startswith(b"/"):
        return "v2", HttpVersion11
    generation: Generation = "v3" if target.startswith(b"/v3/") else "v2"
    return generation, HttpVersion10 if version == b"HTTP/1.0" else HttpVersion11


# Where aiohttp's parser messages start quoting the request's own bytes (a quoted header
# name such as 'Host' is kept: it says what was wrong and cannot carry a secret).
_QUOTED = re.compile(r"(?:^|\s)(?:b['\"]|bytearray\(|['\"](?![A-Za-z0-9-]{1,40}['\"]))")


# How often a half-closed connection is checked for its client having gone altogether.
HALF_CLOSED_CHECK = 0.05
# An interim answer every HTTP/1.1 client must accept and may ignore (RFC 9110 §15.2): sent
# to a half-closed client so that, if it has in fact closed its socket, its kernel answers
# with a reset the proxy can see.
_STILL_WORKING = b"HTTP/1.1 102 Processing\r\n\r\n"


class _EdgeProtocol(RequestHandler):
    """aiohttp's connection handler with the proxy's edge rules.

    It answers what never reaches the middleware in CC's shape, bounds each request head
    (`framing.HeadGuard`), and answers a client that shut only its sending side.
    """

    __slots__ = ("_guard", "_half_closed", "_probed")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = HeadGuard(self._parser, self)
        self._parser = cast(Any, self._guard)
        self._half_closed: asyncio.TimerHandle | asyncio.Handle | None = None
        self._probed = False

    # aiohttp declares None; asyncio's Protocol allows True (keep the sending side open).
    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client sent its last byte: answer what it asked for, unless nothing is owed.

        A client may shut its sending side once its request is out and still read the
        answer; one that closed its socket altogether looks the same here until a write
        draws a reset from its end (`_check_half_closed`), and then gives up its place.
        """
        nothing_owed = self._request_count == 0 or (self._waiter is not None and not self._messages)
        if nothing_owed or not self._guard.reading_head:
            return None  # idle, or a request that can no longer arrive whole: close now
        self.close()  # nothing can follow: close once the answers are out
        self._half_closed = self._loop.call_soon(self._check_half_closed)
        return True

    def _check_half_closed(self) -> None:
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            # The client's end reset the connection: it is gone, the request is abandoned.
            transport.abort()
            return
        request = self._current_request
        if (
            not self._probed
            and request is not None
            and request.version >= HttpVersion11
            and not _answer_started(request)
        ):
            self._probed = True
            transport.write(_STILL_WORKING)
            self._half_closed = self._loop.call_soon(self._check_half_closed)
            return
        self._half_closed = self._loop.call_later(HALF_CLOSED_CHECK, self._check_half_closed)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._half_closed is not None:
            self._half_closed.cancel()
            self._half_closed = None
        super().connection_lost(exc)
        # Without this the guard, the parser (and the head it holds) and this protocol
        # form a cycle that only the garbage collector's rarest pass would free.
        self._guard.close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # aiohttp logs the traceback (scrubbed by the log pipeline) and checks that no
            # answer has started; only its plain-text body is replaced.
            super().handle_error(request, status, exc, message)
        elif request.writer.output_size > 0:
            raise ConnectionError("an answer is already under way")
        else:
            log.info("request_malformed", status=status, error=redact(repr(exc)))
        _answer_in(request, request_line(exc)[1])
        return _malformed_answer(status, exc)


def _answer_in(request: BaseRequest, version: HttpVersion) -> None:
    """Have the answer to a request aiohttp could not parse written in `version`.

    aiohttp stands in a request of version HTTP/1.0 for it, and writes the status line in
    the request's version: an HTTP/1.1 client would be answered in 1.0. No public API sets
    it, so the stand-in's version (a cached property) is replaced before the answer is made;
    tests/test_edges.py fails if aiohttp ever stores it elsewhere.
    """
    request._cache.pop("version", None)
    request._version = version


def _answer_started(request: BaseRequest) -> bool:
    writer = request.writer
    # aiohttp buffers a prepared answer's status line and headers until its first body write.
    return (
        writer.output_size > 0
        or getattr(writer, "_headers_written", False)
        or getattr(writer, "_headers_buf", None) is not None
    )


class _EdgeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _EdgeProtocol(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparseable requests in CC's shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same server, same settings; only the per-connection protocol class differs.
        server.__class__ = _EdgeServer
        return server


class CannotListen(Exception):
    """The address to listen on does not resolve, is not local, or is taken."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        reason = cause.strerror or type(cause).__name__
        super().__init__(f"cannot listen on {host} port {port}: {reason}")


async def serve(config: Config, ready: Callable[[str, int], None] | None = None) -> None:
    """Run the proxy until SIGTERM or SIGINT, then shut down gracefully."""

    def listening(host: str, port: int) -> None:
        log.info("listening", host=host, port=port, config=config.redacted())
        if ready is not None:
            ready(host, port)

    # The app answers what is still in flight when the grace is over (app._on_shutdown);
    # aiohttp's own wait, a little longer, only backs that up.
    await run_until_stopped(
        make_app(config), config.host, config.port, config.shutdown_grace + 0.5, listening
    )


async def run_until_stopped(
    app: web.Application,
    host: str,
    port: int,
    shutdown_timeout: float,
    ready: Callable[[str, int], None],
) -> None:
    """Serve an app until SIGTERM or SIGINT: stop accepting, let handlers finish, clean up."""
    loop = asyncio.get_running_loop()
    try:
        # Before the app starts: a name that does not resolve is a configuration error.
        await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise CannotListen(host, port, exc) from None
    runner = ProxyRunner(app, shutdown_timeout=shutdown_timeout, **runner_options())
    try:
        await runner.setup()
    except BaseException:
        # Close exactly the resources that had started before the failure.
        await runner.cleanup()
        raise
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:  # socket.gaierror included: a host name that does not resolve
        await runner.cleanup()
        raise CannotListen(host, port, exc) from None
    ready(host, _bound_port(runner) or port)
    hold_mmap_threshold()
    trimmer = loop.create_task(give_back_freed_memory())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        trimmer.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        log.info("stopped")


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None

"""Getting a request to the upstream and its answer back: targets, header policy, streaming.

Bytes are forwarded as they came: the raw path and query (never re-encoded), the body
(never decompressed), the upstream's body (never decompressed or re-encoded).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.credentials import redact
from proxy.egress import connection_failure
from proxy.errors import (
    AnswerCut,
    BadRequest,
    ConnectionLost,
    MethodNotAllowed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.upstream_errors import Generation

# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard ones still seen in the wild.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Fields the proxy sets itself on the way out (Host from the upstream URL, length from the body;
# Expect is answered here: the body is already read, so the upstream gets it at once).
_REQUEST_OWN = frozenset({"host", "content-length", "authorization", "x-request-id", "expect"})
_RESPONSE_OWN = frozenset({"content-length"})
# Priority (RFC 9218) orders the proxy's own queue: hop-by-hop to it, never sent upstream.
_REQUEST_DROP = HOP_BY_HOP | _REQUEST_OWN | {"priority"}
_RESPONSE_DROP = HOP_BY_HOP | _RESPONSE_OWN
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Short pause before re-trying a connection that could not be made (nothing was sent).
CONNECT_RETRY_PAUSE = 0.2
CONNECT_RETRIES = 2

# Response fields that name a URL a client may go to next (RFC 9110 §10.2.2, §8.7).
LOCATION_FIELDS = ("Location", "Content-Location")
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
# A Host header fit to build a URL from: a name or an IPv4 or bracketed IPv6 address, and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")

_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# The methods Constant Contact's v2 and v3 APIs use, plus HEAD (a GET without the body).
# Everything else is refused before anything is sent: TRACE would have an upstream that
# reflects it echo the injected credentials back, OPTIONS would let a browser's CORS
# preflight open the proxy to cross-origin PUT and DELETE, CONNECT asks for a tunnel.
ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
_ALLOWED = frozenset(ALLOWED_METHODS)


def check_method(method: str) -> None:
    """Refuse (405, with `Allow`) any method the Constant Contact API does not use."""
    if method not in _ALLOWED:
        raise MethodNotAllowed(
            "This method is not used by the Constant Contact API; the proxy forwards only "
            + ", ".join(ALLOWED_METHODS)
            + ".",
            allow=ALLOWED_METHODS,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """A checked request target: the raw path (kept as sent) and the raw query string.

    `has_query` tells `/v3/contacts?` (an empty query, sent on as it came) from `/v3/contacts`.
    """

    generation: Generation
    path: str
    query: str
    has_query: bool = False


def check_target(raw_target: str) -> Target:
    """Accept only origin-form targets under /v2/ or /v3/ that cannot climb out of them.

    Dot segments are refused whether written plainly or percent-encoded, and so are
    encoded slashes and backslashes that an upstream might decode into a separator, and
    fragments.
    """
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise BadRequest("Only origin-form request targets (a path starting with /) are accepted.")
    if "#" in raw_target:
        # No request target has a fragment (RFC 9112 §3.2); upstream, everything after it
        # (the injected api_key included) would be dropped.
        raise BadRequest("The request target must not contain a fragment (#).")
    path, question, query = raw_target.partition("?")
    if path.startswith("/v2/"):
        generation: Generation = "v2"
    elif path.startswith("/v3/"):
        generation = "v3"
    else:
        raise BadRequest("Only paths under /v2/ and /v3/ are forwarded.")
    # Only a path with "%", ".", a backslash or an unprintable character can fail these.
    if "%" in path or "." in path or "\\" in path or not path.isprintable():
        decoded = unquote(unquote(path))
        lowered = path.lower()
        if (
            _DOT_SEGMENT.search(decoded)
            or "\\" in decoded
            or "%2f" in lowered
            or "%5c" in lowered
            or _CONTROL.search(decoded)
        ):
            raise BadRequest(
                "The request path is not allowed (dot segments or encoded separators)."
            )
    return Target(generation, path, query, bool(question))


def outbound_headers(
    incoming: CIMultiDictProxy[str],
    authorization: str | None,
    request_id: str,
    peer: str | None,
    scheme: str,
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop and proxy-owned ones, plus ours."""
    drop = _dropped(_REQUEST_DROP, incoming.get("Connection"))
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop or lower.startswith("x-forwarded-"):
            continue
        headers.add(name, value)
    if authorization is not None:
        headers["Authorization"] = authorization
    headers["X-Request-Id"] = request_id
    forwarded_for = incoming.get("X-Forwarded-For")
    if peer:
        headers["X-Forwarded-For"] = f"{forwarded_for}, {peer}" if forwarded_for else peer
    elif forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    proto = incoming.get("X-Forwarded-Proto")
    headers["X-Forwarded-Proto"] = f"{proto}, {scheme}" if proto else scheme
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's headers minus hop-by-hop ones (and those its Connection names)."""
    headers: CIMultiDict[str] = CIMultiDict()
    _copy_response_headers(upstream, headers)
    return headers


def _copy_response_headers(upstream: CIMultiDictProxy[str], into: CIMultiDict[str]) -> None:
    drop = _dropped(_RESPONSE_DROP, upstream.get("Connection"))
    into.extend([(k, v) for k, v in upstream.items() if k.lower() not in drop])


def relocate(value: str, upstreams: Iterable[URL], own_base: str) -> str:
    """An absolute URL under a configured upstream, moved under the proxy's own base.

    As nginx's `proxy_redirect default`: the upstream base (scheme, host and port, and its
    path if it has one) is replaced by `own_base`; the rest is kept byte for byte. Relative
    references and URLs anywhere else are returned unchanged.
    """
    match = _ABSOLUTE.match(value)
    if match is None or "@" in match.group(2):
        return value
    try:
        origin = URL(f"{match.group(1)}://{match.group(2)}")
    except ValueError:
        return value
    rest = value[match.end() :]
    for base in upstreams:
        if (origin.scheme, origin.host, origin.port) != (base.scheme, base.host, base.port):
            continue
        prefix = base.raw_path.rstrip("/")
        if prefix:
            if not rest.startswith(prefix) or rest[len(prefix) : len(prefix) + 1] not in (
                "",
                "/",
                "?",
                "#",
            ):
                continue
            rest = rest[len(prefix) :]
        return own_base + rest
    return value


def own_base(request: web.BaseRequest) -> str:
    """The proxy's base URL as this client reached it: its scheme and the Host it sent."""
    host = request.headers.get("Host", "")
    if not _HOST.fullmatch(host):
        # HTTP/1.0 without Host (or a Host no URL can carry): the address it connected to.
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not isinstance(sockname, tuple):
            return f"{request.scheme}://localhost"
        address, port = str(sockname[0]), int(sockname[1])
        host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return f"{request.scheme}://{host}"


def relocate_fields(
    headers: CIMultiDict[str], upstreams: Sequence[URL], request: web.BaseRequest
) -> None:
    base: str | None = None
    for name in LOCATION_FIELDS:
        value = headers.get(name)
        if value is None:
            continue
        base = base or own_base(request)
        moved = relocate(value, upstreams, base)
        if moved != value:
            headers[name] = moved


@functools.lru_cache(maxsize=64)
def _dropped(always: frozenset[str], connection: str | None) -> frozenset[str]:
    """The fields not to pass on: `always`, plus those a Connection header names."""
    if not connection:
        return always
    return always | {name.strip().lower() for name in connection.split(",")}


Departed = Callable[[], Awaitable[None]]


async def _headers_sent(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    departed = context.trace_request_ctx
    if departed is not None:
        await departed()


def departures() -> aiohttp.TraceConfig:
    """The upstream session's trace: tells each send's `departed` when its headers are out."""
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_headers_sent)
    return trace


class Upstream:
    """The one client session to the configured upstreams, and how to call them."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        bases: dict[Generation, URL],
    ) -> None:
        self._session = session
        self._bases = {gen: str(base) for gen, base in bases.items()}
        # What a Location pointing back at the API may start with (see `relocate`).
        self.bases: tuple[URL, ...] = tuple(dict.fromkeys(bases.values()))

    def url(self, target: Target, query: str) -> URL:
        """The upstream URL for a target, with its raw path and query kept byte for byte."""
        raw = self._bases[target.generation] + target.path
        if query:
            raw += "?" + query
        elif target.has_query:
            # yarl has no empty query (its URLs drop a bare "?"), so the "?" stays at the end
            # of the raw path, which is what goes on the request line.
            url = URL(raw, encoded=True)
            return url.with_path(url.raw_path + "?", encoded=True)
        return URL(raw, encoded=True)

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
        departed: Departed | None = None,
    ) -> aiohttp.ClientResponse:
        """Send once, re-trying only connections that could not be made (nothing was sent).

        `departed` is awaited when the request's headers are written (the session's
        `DEPARTURES` trace). Raises UpstreamUnreachable (502) or UpstreamTimeout (504);
        their messages never quote the URL, whose query carries the API key.
        """
        attempt = 0
        while True:
            try:
                return await self._session.request(
                    method,
                    url,
                    headers=headers,
                    data=body or None,
                    allow_redirects=False,
                    trace_request_ctx=departed,
                )
            except (aiohttp.ClientSSLError, aiohttp.ClientHttpProxyError) as exc:
                raise connection_failure(exc, url) from None  # certain to fail again
            except aiohttp.ClientConnectorError as exc:
                if attempt >= CONNECT_RETRIES:
                    raise UpstreamUnreachable(
                        "The proxy could not connect to the Constant Contact API "
                        f"({type(exc).__name__}); retry shortly.",
                        retry_after=1,
                    ) from None
                attempt += 1
                await asyncio.sleep(CONNECT_RETRY_PAUSE)
            except (TimeoutError, aiohttp.ServerTimeoutError):
                raise UpstreamTimeout(
                    "The Constant Contact API did not answer in time.",
                    retry_after=1 if method in IDEMPOTENT else None,
                ) from None
            except aiohttp.ClientError as exc:
                # The connection broke after the request may have been sent.
                raise ConnectionLost(redact(f"{type(exc).__name__}: {exc}")) from None


async def read_bounded(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to `limit` bytes of the upstream's body: all of it when it is shorter.

    Raises ConnectionLost when the body breaks off, UpstreamTimeout when it stalls.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        while size < limit:
            chunk = await upstream.content.read(limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeout("The Constant Contact API did not answer in time.") from None
    except aiohttp.ClientError as exc:
        raise ConnectionLost(redact(f"{type(exc).__name__}: {exc}")) from None
    return b"".join(chunks)


async def stream_back(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    extra: Iterable[tuple[str, str]],
    prefix: bytes | None = None,
    upstreams: Sequence[URL] = (),
) -> web.StreamResponse:
    """Send the upstream's status, headers and body to the client as they come.

    `prefix` is what was already read of the body (to classify it); the rest is streamed
    after it. Once the status line is out, a fault in the upstream's body raises AnswerCut:
    the edge then cuts the client's connection instead of writing anything more. Location
    fields that point at one of `upstreams` are moved to the proxy's own base, so that a
    client following them comes back through the proxy.
    """
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    # Filled in place: handing headers to the constructor would copy them once more.
    headers = response.headers
    _copy_response_headers(upstream.headers, headers)
    if upstreams:
        relocate_fields(headers, upstreams, request)
    headers.extend(extra)
    length = upstream.headers.get("Content-Length")
    whole = prefix is not None and upstream.content.at_eof()
    if whole:
        response.content_length = len(prefix or b"")
    elif length is not None and length.isdigit():
        response.content_length = int(length)
    await response.prepare(request)
    try:
        if prefix:
            await response.write(prefix)
        if not whole and request.method != "HEAD" and upstream.status not in (204, 304):
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        # The status line is gone already: all that is left is to cut the answer short.
        upstream.close()
        kind = "stalled" if isinstance(exc, TimeoutError) else type(exc).__name__
        raise AnswerCut(redact(f"{kind}: {exc}"), upstream.status) from None
    await response.write_eof()
    return response

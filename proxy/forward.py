"""Getting a request to the upstream and its answer back: targets, header policy, streaming.

Bytes are forwarded as they came: the raw path and query (never re-encoded), the body
(never decompressed), the upstream's body (never decompressed or re-encoded).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.credentials import redact
from proxy.errors import BadRequest, MethodNotAllowed, UpstreamTimeout, UpstreamUnreachable
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
_REQUEST_DROP = HOP_BY_HOP | _REQUEST_OWN
_RESPONSE_DROP = HOP_BY_HOP | _RESPONSE_OWN
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# What the proxy keeps of an upstream answer that might be a quota error, to classify it.
QUOTA_BODY_LIMIT = 64 * 1024
# Short pause before re-trying a connection that could not be made (nothing was sent).
CONNECT_RETRY_PAUSE = 0.2
CONNECT_RETRIES = 2

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
    """A checked request target: the raw path (kept as sent) and the raw query string."""

    generation: Generation
    path: str
    query: str


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
    path, _, query = raw_target.partition("?")
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
    return Target(generation, path, query)


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


@functools.lru_cache(maxsize=64)
def _dropped(always: frozenset[str], connection: str | None) -> frozenset[str]:
    """The fields not to pass on: `always`, plus those a Connection header names."""
    if not connection:
        return always
    return always | {name.strip().lower() for name in connection.split(",")}


class Upstream:
    """The one client session to the configured upstreams, and how to call them."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        bases: dict[Generation, URL],
    ) -> None:
        self._session = session
        self._bases = {gen: str(base) for gen, base in bases.items()}

    def url(self, target: Target, query: str) -> URL:
        """The upstream URL for a target, with its raw path and query kept byte for byte."""
        raw = self._bases[target.generation] + target.path
        if query:
            raw += "?" + query
        return URL(raw, encoded=True)

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> aiohttp.ClientResponse:
        """Send once, re-trying only connections that could not be made (nothing was sent).

        Raises UpstreamUnreachable (502) or UpstreamTimeout (504); their messages never
        quote the URL, whose query carries the API key.
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
                )
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


class ConnectionLost(UpstreamUnreachable):
    """The upstream connection broke after the request may have reached the application."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "The connection to the Constant Contact API was lost; the request may or may not "
            "have been processed.",
        )
        self.detail = detail


async def stream_back(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    extra: Iterable[tuple[str, str]],
    buffered: bytes | None = None,
) -> web.StreamResponse:
    """Send the upstream's status, headers and body to the client as they come."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    # Filled in place: handing headers to the constructor would copy them once more.
    headers = response.headers
    _copy_response_headers(upstream.headers, headers)
    headers.extend(extra)
    length = upstream.headers.get("Content-Length")
    if buffered is not None:
        response.content_length = len(buffered)
    elif length is not None and length.isdigit():
        response.content_length = int(length)
    await response.prepare(request)
    if buffered is not None:
        if buffered:
            await response.write(buffered)
    elif request.method != "HEAD" and upstream.status not in (204, 304):
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError):
            # Headers are gone already; all that is left is to cut the body short.
            upstream.close()
            raise
    await response.write_eof()
    return response

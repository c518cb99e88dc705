"""Everything that goes out: TLS trust, the route through an egress proxy, the client sessions.

Both outbound sessions are built here — the one that forwards API calls (`upstream_session`)
and the token endpoint's (`token_session`) — so they trust the same CAs and take the same
route. Certificate verification is always on: `--ca-bundle` (or `SSL_CERT_FILE`) replaces
the system's trust store, it never turns checking off. An egress proxy is `--egress-proxy`,
else `HTTPS_PROXY` / `HTTP_PROXY` by the URL's scheme; `NO_PROXY` names hosts reached
directly. HTTPS goes through the proxy inside a `CONNECT` tunnel, so the proxy never sees
credentials or bodies, and TLS is checked end to end.
"""

from __future__ import annotations

import base64
import ssl
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from yarl import URL

from proxy.config import Config
from proxy.credentials import SecretURL, redact
from proxy.errors import UpstreamCertificateError, UpstreamUnreachable
from proxy.logs import get_logger

log = get_logger("proxy")

# Resolved DNS answers are kept this long (the API's hosts sit behind a CDN).
DNS_CACHE_SECONDS: Final = 300

# urllib's NO_PROXY matching (what requests and urllib do), given the value to match against
# rather than reading the environment. It is public in urllib.request, unlisted in typeshed.
_proxy_bypass: Callable[[str, dict[str, str]], bool] = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]

# OpenSSL's X509_V_ERR_* codes behind the causes a client is told about (x509_vfy.h).
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
_EXPIRED, _NOT_YET_VALID, _HOST_MISMATCH = 10, 9, 62


def ssl_context(config: Config) -> ssl.SSLContext:
    """A client TLS context that verifies certificates and host names.

    It trusts `config.ca_bundle` (from --ca-bundle, CTCT_PROXY_CA_BUNDLE or SSL_CERT_FILE)
    when set, else the system's default store.
    """
    if config.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(config.ca_bundle))
    return ssl.create_default_context()


@dataclass(frozen=True, slots=True)
class Route:
    """Through which forward proxy a URL is reached, and the Proxy-Authorization it wants."""

    proxy: URL
    authorization: str | None = field(default=None, repr=False)


class EgressRoutes:
    """Which egress proxy, if any, each outbound URL goes through.

    `--egress-proxy` wins over `HTTPS_PROXY` / `HTTP_PROXY` (chosen by the URL's scheme);
    hosts that `NO_PROXY` names (urllib's rules: suffixes, an optional port, `*`) are
    reached directly, whichever proxy was configured.
    """

    def __init__(self, config: Config) -> None:
        environment = config.proxy_environment
        self._explicit = config.egress_proxy
        self._by_scheme = {"https": environment.https, "http": environment.http}
        self._no_proxy = environment.no_proxy
        self._known: dict[tuple[str, str, int | None], Route | None] = {}

    @property
    def active(self) -> bool:
        """Whether any URL may go through a proxy at all."""
        return self._explicit is not None or any(self._by_scheme.values())

    def route(self, url: URL) -> Route | None:
        """The route for a URL: a proxy, or None to connect directly."""
        key = (url.scheme, url.host or "", url.port)
        if key not in self._known:
            # A handful of hosts (the upstreams, the token endpoint): decided once each.
            chosen = self._explicit or self._by_scheme.get(key[0])
            bypassed = chosen is None or self._bypassed(key[1], key[2])
            self._known[key] = None if chosen is None or bypassed else _route_of(chosen)
        return self._known[key]

    def _bypassed(self, host: str, port: int | None) -> bool:
        if not self._no_proxy:
            return False
        no_proxy = {"no": self._no_proxy}
        return _proxy_bypass(host, no_proxy) or _proxy_bypass(f"{host}:{port}", no_proxy)

    async def middleware(
        self,
        request: aiohttp.ClientRequest,
        handler: Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]],
    ) -> aiohttp.ClientResponse:
        """aiohttp client middleware: set the request's proxy before it connects."""
        route = self.route(request.url)
        if route is not None:
            tunnel_headers = None
            if route.authorization is not None:
                if request.is_ssl():
                    # Sent on the CONNECT only: inside the tunnel the proxy sees nothing.
                    tunnel_headers = {"Proxy-Authorization": route.authorization}
                else:
                    request.headers["Proxy-Authorization"] = route.authorization
            request.update_proxy(route.proxy, None, tunnel_headers)
        return await handler(request)


def _route_of(proxy: SecretURL) -> Route:
    if proxy.user is None:
        return Route(proxy.address)
    pair = f"{proxy.user}:{proxy.password or ''}".encode()
    return Route(proxy.address, "Basic " + base64.b64encode(pair).decode())


def client_session(config: Config, **options: Any) -> aiohttp.ClientSession:
    """A client session with the proxy's TLS trust and egress route.

    `options` are ClientSession's own (timeout, cookie jar, ...); `connector_options` among
    them go to the TCPConnector. The environment is never read by aiohttp itself
    (`trust_env=False`): it reached the proxy once, through the configuration.
    """
    connector_options = options.pop("connector_options", {})
    routes = EgressRoutes(config)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_context(config), **connector_options),
        middlewares=(routes.middleware,) if routes.active else (),
        trust_env=False,
        **options,
    )


def upstream_session(
    config: Config, trace_configs: list[aiohttp.TraceConfig] | None = None
) -> aiohttp.ClientSession:
    """The one session API calls are forwarded on: byte-exact, no cookies, no added headers."""
    return client_session(
        config,
        connector_options={"limit": 0, "ttl_dns_cache": DNS_CACHE_SECONDS},
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.upstream_timeout
        ),
        auto_decompress=False,
        # Never add headers the client did not send, and never carry cookies between clients.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=trace_configs,
    )


def token_session(config: Config, timeout: float) -> aiohttp.ClientSession:
    """The token endpoint's session: a JSON API the proxy reads itself, `timeout` per call."""
    return client_session(
        config,
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def tls_cause(exc: aiohttp.ClientSSLError) -> str:
    """What went wrong in a TLS handshake, as OpenSSL said it (no secret can be in it)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        message = getattr(error, "verify_message", None) or str(error)
    else:
        error = exc.os_error
        message = getattr(error, "reason", None) or str(error)
    return redact(str(message))[:200]


def _certificate_phrase(exc: aiohttp.ClientSSLError) -> str:
    if not isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "the TLS handshake failed"
    code = getattr(exc.certificate_error, "verify_code", None)
    if code == _EXPIRED:
        return "its certificate has expired"
    if code == _NOT_YET_VALID:
        return "its certificate is not valid yet"
    if code == _HOST_MISMATCH:
        return "its certificate was issued for another host name"
    if code in _UNKNOWN_ISSUER:
        return "its certificate was issued by a certificate authority the proxy does not trust"
    return "its certificate could not be verified"


def connection_failure(
    exc: aiohttp.ClientSSLError | aiohttp.ClientHttpProxyError, url: URL
) -> UpstreamUnreachable:
    """The 502 for a connection that failed before anything was sent; logs its cause once.

    A certificate problem becomes UpstreamCertificateError: the client is told it was the
    certificate (and which kind of problem), the log line says OpenSSL's exact words.
    """
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        log.error("egress_proxy_refused", host=url.host, port=url.port, status=exc.status)
        return UpstreamUnreachable(
            f"The egress proxy refused the connection to the Constant Contact API "
            f"({exc.status}); nothing was sent.",
        )
    log.error("upstream_tls_failed", host=url.host, port=url.port, cause=tls_cause(exc))
    return UpstreamCertificateError(
        f"The proxy did not trust the Constant Contact API's TLS connection: "
        f"{_certificate_phrase(exc)}. Nothing was sent; see the proxy's log "
        "(--ca-bundle sets the trusted CAs).",
    )

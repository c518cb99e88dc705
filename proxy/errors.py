"""The proxy's own errors: a small tree, each knowing its status and Constant Contact error key.

Raised anywhere on the request path; turned into a response in exactly one place
(`edge.middleware.edge_middleware`), in the shape of the API generation the client called.

    Exception
    ├── StartupError             the proxy cannot start: one line, exit 2 (state files, dirs)
    └── ProxyError (500)         answered by the proxy itself, in Constant Contact's shape
        ├── NotFound (404), BadRequest (400), MethodNotAllowed (405)
        ├── BodyTooLarge (413), BodyTimeout (408), ClientUnauthorized (401)
        ├── Throttled (429)      the key's quota: Retry-After, the upstream's error_key kept
        ├── UpstreamUnreachable (502)
        │   ├── CredentialsNeedAttention   the proxy's OAuth refresh failed
        │   └── ConnectionLost             broke after the request may have been sent
        ├── UpstreamTimeout (504)
        ├── Unavailable (503)    shutting down, or a bound on the proxy's memory reached
        └── AnswerCut            a fault after the answer started: the connection is cut
"""

from __future__ import annotations

import math
from typing import ClassVar

from proxy.upstream_errors import Generation, QuotaKind, cc_error_body, error_key_for


class StartupError(Exception):
    """The proxy cannot start (an unusable state file or directory); the message is one line."""


class ProxyError(Exception):
    """Base of every error the proxy answers itself."""

    status: ClassVar[int] = 500
    v2_key: ClassVar[str] = "http.status.internal_server_error"
    v3_key: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        error_key: str | None = None,
        outcome: str = "refused",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.error_key = error_key
        self.outcome = outcome

    def key_for(self, generation: Generation) -> str:
        """The error_key this error carries for the API generation the client called."""
        if self.error_key is not None:
            return self.error_key
        return self.v2_key if generation == "v2" else self.v3_key

    def body(self, generation: Generation) -> bytes:
        """The response body in Constant Contact's shape."""
        return cc_error_body(generation, self.key_for(generation), self.message)

    def headers(self) -> dict[str, str]:
        """Headers the answer must carry (Retry-After in whole seconds, rounded up, ≥ 1)."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(retry_after_seconds(self.retry_after))}


def retry_after_seconds(wait: float) -> int:
    """A wait as Retry-After wants it: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait - 1e-9))


class NotFound(ProxyError):
    """Nothing is served at this path."""

    status = 404
    v2_key = "http.status.not_found"
    v3_key = "not_found"


class BadRequest(ProxyError):
    """The request is refused as it stands (unsafe path, absolute-form target, malformed)."""

    status = 400
    v2_key = "http.status.bad_request"
    v3_key = "bad_request"


class MethodNotAllowed(ProxyError):
    """CONNECT, TRACE and other methods the proxy never forwards."""

    status = 405
    v2_key = "http.status.method_not_allowed"
    v3_key = "method_not_allowed"

    def __init__(self, message: str, *, allow: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        """A 405 lists the methods that would be accepted (RFC 9110 §15.5.6)."""
        return {"Allow": ", ".join(self.allow)} if self.allow else {}


class BodyTooLarge(ProxyError):
    """The request body is larger than --max-body."""

    status = 413
    v2_key = "http.status.request_entity_too_large"
    v3_key = "request_too_large"


class BodyTimeout(ProxyError):
    """The client sent its request body too slowly (408)."""

    status = 408
    v2_key = "http.status.request_timeout"
    v3_key = "request_timeout"


class ClientUnauthorized(ProxyError):
    """The client presented no valid client token."""

    status = 401
    v2_key = "http.status.authentication.invalid_token"
    v3_key = "unauthorized"

    def headers(self) -> dict[str, str]:
        """A 401 names the scheme that would be accepted (RFC 9110 §11.6.1)."""
        return {"WWW-Authenticate": 'Bearer realm="ctct-proxy"'}


class Throttled(ProxyError):
    """The key's quota cannot serve this request within its deadline (429)."""

    status = 429

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        kind: QuotaKind = QuotaKind.PER_SECOND,
        error_key: str | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after, error_key=error_key, outcome="throttled")
        self.kind = kind

    def key_for(self, generation: Generation) -> str:
        return self.error_key or error_key_for(self.kind, generation)


class UpstreamUnreachable(ProxyError):
    """The upstream could not be reached, or dropped the connection (502)."""

    status = 502
    v2_key = "http.status.bad_gateway"
    v3_key = "bad_gateway"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after, outcome="failed")


class UpstreamCertificateError(UpstreamUnreachable):
    """The upstream's TLS certificate was refused (unknown CA, wrong host, expired) (502)."""


class CredentialsNeedAttention(UpstreamUnreachable):
    """The proxy's own credentials (e.g. its OAuth refresh token) stopped working (502)."""


class UpstreamTimeout(ProxyError):
    """The upstream did not answer in time (504)."""

    status = 504
    v2_key = "http.status.gateway_timeout"
    v3_key = "gateway_timeout"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after, outcome="failed")


class Unavailable(ProxyError):
    """The proxy is shutting down or not ready (503)."""

    status = 503
    v2_key = "http.status.service_unavailable"
    v3_key = "service_unavailable"


class ConnectionLost(UpstreamUnreachable):
    """The upstream connection broke after the request may have reached the application."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "The connection to the Constant Contact API was lost; the request may or may not "
            "have been processed.",
        )
        self.detail = detail


class AnswerCut(ProxyError):
    """The upstream failed after the answer's status line went to the client.

    Nothing more can be said to this client: the edge cuts the connection, so its HTTP
    library reports an incomplete body, and never writes a second answer.
    """

    def __init__(self, detail: str, status: int) -> None:
        super().__init__(f"The answer was cut short: {detail}", outcome="cut")
        self.detail = detail
        self.seen_status = status  # what the client was already told

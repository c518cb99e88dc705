"""A local stand-in for the Constant Contact API: credential checks, per-key quotas, exact errors.

It imitates both gateways of constant-contact.md closely enough that the proxy cannot tell it
from the real thing, and records what it saw (``/__sim__/stats``) so tests, benchmarks and the
demo can assert on the upstream's side of the conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import enum
import hashlib
import json
import math
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from aiohttp import web
from yarl import URL

from proxy.upstream_errors import (
    MASHERY_ERROR_HEADER,
    MASHERY_OVER_QPS,
    MASHERY_OVER_RATE,
    V2_INACTIVE,
    V2_INACTIVE_MESSAGE,
    V2_INVALID_TOKEN,
    V2_INVALID_TOKEN_MESSAGE,
    V2_OVER_QPS,
    V2_OVER_QPS_MESSAGE,
    V2_OVER_RATE,
    V2_OVER_RATE_MESSAGE,
    V3_QUOTA_EXCEEDED,
    V3_QUOTA_EXCEEDED_MESSAGE,
    V3_THROTTLED,
    V3_THROTTLED_MESSAGE,
    V3_UNAUTHORIZED,
    V3_UNAUTHORIZED_MESSAGE,
    Generation,
    cc_error_body,
)

Window = Literal["rolling", "fixed"]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9000
DEFAULT_QPS: Final = 4
DEFAULT_DAILY_QUOTA: Final = 10_000
WINDOWS: Final[tuple[Window, ...]] = ("rolling", "fixed")

# The bucket every v3 call without a readable client id shares, as one unknown application.
V3_SHARED_BUCKET: Final = "v3"
STATS_PATH: Final = "/__sim__/stats"
RESET_PATH: Final = "/__sim__/reset"
# The authorization server's endpoints, at the same paths as authz.constantcontact.com's.
OAUTH_AUTHORIZE_PATH: Final = "/oauth2/default/v1/authorize"
OAUTH_TOKEN_PATH: Final = "/oauth2/default/v1/token"
# Test levers: end every issued access token now; forget every refresh token too.
OAUTH_EXPIRE_PATH: Final = "/__sim__/oauth/expire"
OAUTH_REVOKE_PATH: Final = "/__sim__/oauth/revoke"
DEFAULT_TOKEN_TTL: Final = 86_400.0  # Constant Contact's access tokens live 24 hours
# The real token endpoint takes 1 request per second per application.
TOKEN_ENDPOINT_QPS: Final = 1
_CODE_TTL: Final = 300.0
_TOKEN_HISTORY: Final = 1_000
_OFFLINE_ACCESS: Final = "offline_access"

# Enough history for a long benchmark while bounding memory (a float and a slot each).
ARRIVAL_HISTORY: Final = 1_000_000
# Well above Constant Contact's 4 MB import limit, so the stand-in is never the reason a
# large upload fails in a test of the proxy.
MAX_BODY_BYTES: Final = 32 * 1024 * 1024

_SPAN: Final = 1.0  # seconds: the span the per-second quota and the busiest-second stats use
_SECONDS_PER_DAY: Final = 86_400
_JSON: Final = "application/json"
# The per-key ("developer") variants: each simulated key is a Mashery developer key.
_MASHERY_QPS_CODE: Final = MASHERY_OVER_QPS[0]
_MASHERY_RATE_CODE: Final = MASHERY_OVER_RATE[0]


def _require_int(value: int, flag: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum > 0 else "a non-negative integer"
        raise ValueError(f"{flag} must be {kind}")


def _require_seconds(value: float, flag: str, what: str = "a number of seconds") -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{flag} must be {what} >= 0")


def _require_text(value: str | None, flag: str) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{flag} must not be empty")


@dataclass(frozen=True)
class SimulatorConfig:
    """How the stand-in behaves: which credentials it demands, its limits and its latency.

    Validated on construction; error messages name the command-line flag of the field.
    """

    api_key: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)
    qps: int = DEFAULT_QPS
    window: Window = "rolling"
    daily_quota: int = DEFAULT_DAILY_QUOTA
    latency_in: float = 0.0
    jitter_in: float = 0.0
    latency_out: float = 0.0
    jitter_out: float = 0.0
    mashery_headers: bool = False
    neighbour_qps: float = 0.0
    neighbour_key: str | None = field(default=None, repr=False)
    seed: int | None = None
    oauth_client_id: str | None = field(default=None, repr=False)
    oauth_client_secret: str | None = field(default=None, repr=False)
    oauth_refresh_token: str | None = field(default=None, repr=False)
    token_ttl: float = DEFAULT_TOKEN_TTL
    rotate_refresh_tokens: bool = False

    def __post_init__(self) -> None:
        _require_text(self.api_key, "--api-key")
        _require_text(self.access_token, "--access-token")
        _require_int(self.qps, "--qps", minimum=1)
        if self.window not in WINDOWS:
            raise ValueError(f"--window must be one of {', '.join(WINDOWS)}")
        # 0 is allowed: it plays a key whose day is already used up.
        _require_int(self.daily_quota, "--daily-quota", minimum=0)
        _require_seconds(self.latency_in, "--latency-in")
        _require_seconds(self.jitter_in, "--jitter-in")
        _require_seconds(self.latency_out, "--latency-out")
        _require_seconds(self.jitter_out, "--jitter-out")
        _require_seconds(self.neighbour_qps, "--neighbour-qps", "a number of calls per second")
        _require_text(self.neighbour_key, "--neighbour-key")
        _require_text(self.oauth_client_id, "--oauth-client-id")
        _require_text(self.oauth_client_secret, "--oauth-client-secret")
        _require_text(self.oauth_refresh_token, "--oauth-refresh-token")
        _require_seconds(self.token_ttl, "--token-ttl")
        if self.token_ttl == 0:
            raise ValueError("--token-ttl must be a number of seconds > 0")
        if self.oauth_client_id is None and (
            self.oauth_client_secret is not None or self.oauth_refresh_token is not None
        ):
            raise ValueError("--oauth-client-id is required with the other --oauth-* flags")


def key_fingerprint(key: str) -> str:
    """A short, stable, non-reversible name for a key: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Verdict(enum.Enum):
    """What the gateway decided about one arrival."""

    ACCEPTED = "accepted"
    OVER_QPS = "per_second"
    OVER_DAILY = "daily"


class _Window(Protocol):
    def take(self, now: float) -> bool: ...


class _RollingWindow:
    """At most `limit` accepted arrivals in any span (t-1, t]: the stricter reading of Mashery."""

    __slots__ = ("_accepted", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._accepted: deque[float] = deque()

    def take(self, now: float) -> bool:
        accepted = self._accepted
        horizon = now - _SPAN
        while accepted and accepted[0] <= horizon:
            accepted.popleft()
        if len(accepted) >= self._limit:
            return False
        accepted.append(now)
        return True


class _FixedWindow:
    """At most `limit` accepted arrivals per whole second of the clock (2x can land in 1 s)."""

    __slots__ = ("_count", "_limit", "_second")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._second = -1
        self._count = 0

    def take(self, now: float) -> bool:
        second = math.floor(now)
        if second != self._second:
            self._second = second
            self._count = 0
        if self._count >= self._limit:
            return False
        self._count += 1
        return True


class _BusiestSecond:
    """The most events seen in any one-second span, kept current one event at a time.

    Events come in clock order, so the busiest span ending at each event is the deque of
    events within the last second; the maximum of those is the maximum over all spans.
    """

    __slots__ = ("_recent", "most")

    def __init__(self) -> None:
        self._recent: deque[float] = deque()
        self.most = 0

    def add(self, now: float) -> None:
        recent = self._recent
        horizon = now - _SPAN
        while recent and recent[0] <= horizon:
            recent.popleft()
        recent.append(now)
        if len(recent) > self.most:
            self.most = len(recent)


class _Traffic:
    """Counters for the requests of one key (or of all keys) that came in over HTTP."""

    __slots__ = (
        "accepted",
        "accepted_spans",
        "arrival_spans",
        "auth",
        "first_arrival",
        "last_arrival",
        "neighbour_accepted",
        "neighbour_rejected",
        "over_daily",
        "over_qps",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.accepted = 0
        self.over_qps = 0
        self.over_daily = 0
        self.auth = 0
        self.arrival_spans = _BusiestSecond()
        self.accepted_spans = _BusiestSecond()
        self.first_arrival: float | None = None
        self.last_arrival: float | None = None
        self.neighbour_accepted = 0
        self.neighbour_rejected = 0

    def arrival(self, now: float, verdict: Verdict) -> None:
        self.requests += 1
        self.arrival_spans.add(now)
        if self.first_arrival is None:
            self.first_arrival = now
        self.last_arrival = now
        if verdict is Verdict.ACCEPTED:
            self.accepted += 1
            self.accepted_spans.add(now)
        elif verdict is Verdict.OVER_QPS:
            self.over_qps += 1
        else:
            self.over_daily += 1

    def refusal(self) -> None:
        self.requests += 1
        self.auth += 1

    def neighbour(self, verdict: Verdict) -> None:
        if verdict is Verdict.ACCEPTED:
            self.neighbour_accepted += 1
        else:
            self.neighbour_rejected += 1

    def as_json(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "accepted": self.accepted,
            "rejected": {"per_second": self.over_qps, "daily": self.over_daily, "auth": self.auth},
            "max_arrivals_1s": self.arrival_spans.most,
            "max_accepted_1s": self.accepted_spans.most,
            "first_arrival": self.first_arrival,
            "last_arrival": self.last_arrival,
            "neighbour": {
                "accepted": self.neighbour_accepted,
                "rejected": self.neighbour_rejected,
            },
        }


class _KeyLedger:
    """One key's quota state (shared by its HTTP callers and the neighbour) and its traffic."""

    __slots__ = ("day", "day_count", "fingerprint", "history", "traffic", "window")

    def __init__(self, fingerprint: str, window: _Window) -> None:
        self.fingerprint = fingerprint
        self.window = window
        self.day = -1
        self.day_count = 0
        self.traffic = _Traffic()
        self.history: deque[float] = deque(maxlen=ARRIVAL_HISTORY)


class QuotaLedger:
    """The gateway's bookkeeping: per-key windows and daily counts, and what it saw.

    Pure and clock-driven (no I/O), so quota rules can be tested with a fake clock.
    `clock` must be monotonic; `wall_clock` gives epoch seconds for the UTC day.
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.neighbour_key = config.neighbour_key or config.api_key or V3_SHARED_BUCKET
        self._ledgers: dict[str, _KeyLedger] = {}
        self._totals = _Traffic()

    def _ledger(self, key: str) -> _KeyLedger:
        ledger = self._ledgers.get(key)
        if ledger is None:
            window: _Window
            if self.config.window == "fixed":
                window = _FixedWindow(self.config.qps)
            else:
                window = _RollingWindow(self.config.qps)
            ledger = self._ledgers[key] = _KeyLedger(key_fingerprint(key), window)
        return ledger

    def _today(self) -> int:
        return int(self.wall_clock() // _SECONDS_PER_DAY)

    def arrive(self, key: str, *, neighbour: bool = False) -> Verdict:
        """Record an arrival for `key` now and decide it; only accepted arrivals use quota."""
        now = self.clock()
        ledger = self._ledger(key)
        today = self._today()
        if ledger.day != today:
            ledger.day = today
            ledger.day_count = 0
        # Daily first: a key that is out for the day must hear so, not "try again in 1 s".
        if ledger.day_count >= self.config.daily_quota:
            verdict = Verdict.OVER_DAILY
        elif ledger.window.take(now):
            ledger.day_count += 1
            verdict = Verdict.ACCEPTED
        else:
            verdict = Verdict.OVER_QPS
        if neighbour:
            ledger.traffic.neighbour(verdict)
            self._totals.neighbour(verdict)
        else:
            ledger.history.append(now)
            ledger.traffic.arrival(now, verdict)
            self._totals.arrival(now, verdict)
        return verdict

    def refuse(self, key: str | None) -> None:
        """Count a request refused for its credentials; it never reaches the key's window."""
        self._totals.refusal()
        if key is not None:
            self._ledger(key).traffic.refusal()

    def arrivals(self, key: str) -> list[float]:
        """Clock times of the key's HTTP arrivals (accepted or not), oldest first, bounded."""
        ledger = self._ledgers.get(key)
        return list(ledger.history) if ledger is not None else []

    def reset(self) -> None:
        """Forget every key's windows, daily counts and traffic."""
        self._ledgers.clear()
        self._totals = _Traffic()

    def stats(self) -> dict[str, object]:
        """What the gateway saw, in total and per key fingerprint (never the key itself)."""
        today = self._today()
        return {
            "now": self.clock(),
            "config": {
                "qps": self.config.qps,
                "window": self.config.window,
                "daily_quota": self.config.daily_quota,
                "neighbour_qps": self.config.neighbour_qps,
            },
            "totals": self._totals.as_json(),
            "keys": {
                ledger.fingerprint: {
                    **ledger.traffic.as_json(),
                    "daily_used": ledger.day_count if ledger.day == today else 0,
                }
                for ledger in self._ledgers.values()
            },
        }


@dataclass(frozen=True, slots=True)
class _Canned:
    """A fixed answer, encoded once at start-up so rejections cost no per-request work."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


def _canned(
    generation: Generation,
    status: int,
    error_key: str,
    message: str,
    extra_headers: Mapping[str, str] | None = None,
) -> _Canned:
    headers = {"Content-Type": _JSON, **(extra_headers or {})}
    return _Canned(status, cc_error_body(generation, error_key, message), headers)


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A credential failure, and the key it was presented under when that is unambiguous."""

    key: str | None
    answer: _Canned


def _bearer_token(header: str) -> str | None:
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _jwt_client_id(token: str) -> str | None:
    """The `cid` (or `client_id`) claim of a JWT, read without verifying; None if not a JWT.

    Constant Contact counts v3 quota per application, and its access tokens name the
    application's client id in `cid`.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        # binascii.Error, UnicodeDecodeError and JSONDecodeError are all ValueErrors.
        return None
    if not isinstance(claims, dict):
        return None
    for claim in ("cid", "client_id"):
        value = claims.get(claim)
        if isinstance(value, str) and value:
            return value
    return None


async def _travel(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


@dataclass(slots=True)
class _Grant:
    """What a refresh token stands for."""

    client_id: str
    scope: str


@dataclass(slots=True)
class _Code:
    """An authorization code waiting to be exchanged (once)."""

    client_id: str
    redirect_uri: str
    challenge: str | None
    scope: str
    expires: float


class OAuthServer:
    """The authorization server's part: an authorize endpoint that approves at once, a token
    endpoint (refresh and authorization-code grants, PKCE S256), expiring JWT-shaped access
    tokens and, when configured, rotating refresh tokens. Limited to 1 call/s like the real one.
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        assert config.oauth_client_id is not None
        self.client_id = config.oauth_client_id
        self.config = config
        self._clock = clock
        self._wall_clock = wall_clock
        self._access: dict[str, float] = {}  # access token -> clock time it expires
        self._refresh: dict[str, _Grant] = {}
        self._codes: dict[str, _Code] = {}
        self._window = _RollingWindow(TOKEN_ENDPOINT_QPS)
        # The latest tokens it handed out, so tests can look for them where they must not be.
        self._handed_out: deque[str] = deque(maxlen=_TOKEN_HISTORY)
        if config.oauth_refresh_token is not None:
            self._refresh[config.oauth_refresh_token] = _Grant(
                self.client_id, f"contact_data {_OFFLINE_ACCESS}"
            )
        self.reset_counters()

    def reset_counters(self) -> None:
        """Forget what the endpoints saw (issued tokens stay valid)."""
        self.token_calls = 0
        self.authorize_calls = 0
        self.issued = 0
        self.rotated = 0
        self.errors: dict[str, int] = {}

    def issued_tokens(self) -> list[str]:
        """The latest access and refresh tokens it issued (bounded), for leak checks."""
        return list(self._handed_out)

    def access_ok(self, token: str) -> bool:
        """Whether `token` is an access token this server issued that has not expired."""
        expires = self._access.get(token)
        return expires is not None and self._clock() < expires

    def expire_access_tokens(self) -> int:
        """End every issued access token now (as a revocation or an early expiry would)."""
        count = len(self._access)
        self._access.clear()
        return count

    def revoke_refresh_tokens(self) -> int:
        """Forget every refresh token: the next refresh with any of them is `invalid_grant`."""
        count = len(self._refresh)
        self._refresh.clear()
        return count

    def stats(self) -> dict[str, object]:
        """What the authorization server saw; never a token."""
        now = self._clock()
        return {
            "token_calls": self.token_calls,
            "authorize_calls": self.authorize_calls,
            "issued": self.issued,
            "rotated": self.rotated,
            "errors": dict(self.errors),
            "live_access_tokens": sum(1 for t in self._access.values() if t > now),
            "rotate_refresh_tokens": self.config.rotate_refresh_tokens,
            "token_ttl": self.config.token_ttl,
        }

    def _fail(self, status: int, error: str, description: str) -> web.Response:
        self.errors[error] = self.errors.get(error, 0) + 1
        return _oauth_error(status, error, description)

    def _mint_access(self, scope: str) -> str:
        now = self._wall_clock()
        ttl = self.config.token_ttl
        header = {"kid": "simulator", "alg": "RS256"}
        claims = {
            "ver": 1,
            "jti": "AT." + secrets.token_urlsafe(16),
            "iss": "simulator/oauth2/default",
            "aud": "https://api.cc.email",
            "iat": int(now),
            "exp": int(now + ttl),
            "cid": self.client_id,
            "uid": "simulator-user",
            "scp": scope.split(),
        }
        token = ".".join(
            (
                _b64url(json.dumps(header).encode()),
                _b64url(json.dumps(claims).encode()),
                _b64url(secrets.token_bytes(32)),
            )
        )
        clock = self._clock()
        self._access = {t: e for t, e in self._access.items() if e > clock}
        self._access[token] = clock + ttl
        self._handed_out.append(token)
        self.issued += 1
        return token

    def _issue(self, scope: str, refresh_token: str | None) -> web.Response:
        ttl = self.config.token_ttl
        body: dict[str, object] = {
            "token_type": "Bearer",
            "expires_in": int(ttl) if float(ttl).is_integer() else ttl,
            "access_token": self._mint_access(scope),
            "scope": scope,
        }
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
            self._handed_out.append(refresh_token)
        # RFC 6749 §5.1: token answers must not be cached.
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _client(self, request: web.Request, form: Mapping[str, str]) -> str | web.Response:
        """The authenticated client id, or the error answer (Basic, or client_id in the form)."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, encoded = header.strip().partition(" ")
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode()
            except ValueError:
                decoded = ""
            if scheme.lower() != "basic" or ":" not in decoded:
                return self._fail(401, "invalid_client", "Client authentication failed.")
            client_id, _, secret = decoded.partition(":")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        expected = self.config.oauth_client_secret
        if client_id != self.client_id or (
            not secrets.compare_digest(secret, expected) if expected is not None else bool(secret)
        ):
            # A public (PKCE) client has no secret: presenting one is as wrong as a bad one.
            return self._fail(401, "invalid_client", "Client authentication failed.")
        return client_id

    async def handle_token(self, request: web.Request) -> web.StreamResponse:
        """POST the token endpoint: `refresh_token` and `authorization_code` grants."""
        self.token_calls += 1
        if not self._window.take(self._clock()):
            self.errors["rate_limited"] = self.errors.get("rate_limited", 0) + 1
            reset = math.ceil(self._wall_clock() + 1)
            return web.json_response(
                {
                    "errorCode": "E0000047",
                    "errorSummary": "API call exceeded rate limit due to too many requests.",
                },
                status=429,
                headers={
                    "X-Rate-Limit-Limit": str(TOKEN_ENDPOINT_QPS),
                    "X-Rate-Limit-Remaining": "0",
                    "X-Rate-Limit-Reset": str(reset),
                },
            )
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        client = self._client(request, fields)
        if isinstance(client, web.Response):
            return client
        grant_type = fields.get("grant_type")
        if grant_type == "refresh_token":
            return self._refresh_grant(client, fields)
        if grant_type == "authorization_code":
            return self._code_grant(client, fields)
        return self._fail(400, "unsupported_grant_type", "The grant type is not supported.")

    def _refresh_grant(self, client: str, form: Mapping[str, str]) -> web.Response:
        presented = form.get("refresh_token", "")
        grant = self._refresh.get(presented)
        if grant is None or grant.client_id != client:
            return self._fail(400, "invalid_grant", "The refresh token is invalid or expired.")
        refresh_token = presented
        if self.config.rotate_refresh_tokens:
            del self._refresh[presented]
            refresh_token = "RT." + secrets.token_urlsafe(32)
            self._refresh[refresh_token] = grant
            self.rotated += 1
        return self._issue(grant.scope, refresh_token)

    def _code_grant(self, client: str, form: Mapping[str, str]) -> web.Response:
        code = self._codes.pop(form.get("code", ""), None)
        if (
            code is None
            or code.expires <= self._clock()
            or code.client_id != client
            or code.redirect_uri != form.get("redirect_uri")
        ):
            return self._fail(400, "invalid_grant", "The authorization code is invalid or expired.")
        if code.challenge is not None:
            verifier = form.get("code_verifier", "")
            computed = _b64url(hashlib.sha256(verifier.encode()).digest())
            if not verifier or not secrets.compare_digest(computed, code.challenge):
                return self._fail(
                    400, "invalid_grant", "PKCE verification failed for code challenge method S256."
                )
        refresh_token = None
        if _OFFLINE_ACCESS in code.scope.split():
            refresh_token = "RT." + secrets.token_urlsafe(32)
            self._refresh[refresh_token] = _Grant(client, code.scope)
        return self._issue(code.scope, refresh_token)

    async def handle_authorize(self, request: web.Request) -> web.StreamResponse:
        """GET the authorize endpoint: the user approves at once (302 to redirect_uri)."""
        self.authorize_calls += 1
        query = request.query
        redirect_uri = query.get("redirect_uri", "")
        target = URL(redirect_uri)
        if query.get("client_id") != self.client_id or target.scheme not in ("http", "https"):
            # Like the real server: no redirect to an unverified place, an error page instead.
            self.errors["invalid_client"] = self.errors.get("invalid_client", 0) + 1
            return web.Response(status=400, text="Unknown client_id or bad redirect_uri.\n")
        reply: dict[str, str] = {}
        if "state" in query:
            reply["state"] = query["state"]
        challenge = query.get("code_challenge")
        if query.get("response_type") != "code":
            reply["error"] = "unsupported_response_type"
        elif challenge is not None and query.get("code_challenge_method") != "S256":
            reply["error"] = "invalid_request"
        elif challenge is None and self.config.oauth_client_secret is None:
            reply["error"] = "invalid_request"  # public clients must use PKCE
        else:
            code = secrets.token_urlsafe(24)
            self._codes[code] = _Code(
                self.client_id,
                redirect_uri,
                challenge,
                query.get("scope", ""),
                self._clock() + _CODE_TTL,
            )
            reply["code"] = code
        if "error" in reply:
            self.errors[reply["error"]] = self.errors.get(reply["error"], 0) + 1
        raise web.HTTPFound(target.update_query(reply))

    async def handle_expire(self, request: web.Request) -> web.StreamResponse:
        """POST `/__sim__/oauth/expire`: every issued access token stops working now."""
        return web.json_response({"expired": self.expire_access_tokens()})

    async def handle_revoke(self, request: web.Request) -> web.StreamResponse:
        """POST `/__sim__/oauth/revoke`: forget every refresh token and end every access token."""
        revoked = self.revoke_refresh_tokens()
        self.expire_access_tokens()
        return web.json_response({"revoked": revoked})


class Simulator:
    """The stand-in's HTTP face: routes, credential checks, travel delays and canned answers.

    Decisions and records live in `ledger`; everything per-configuration is prepared here once.
    """

    def __init__(self, config: SimulatorConfig, ledger: QuotaLedger | None = None) -> None:
        self.config = config
        self.ledger = ledger if ledger is not None else QuotaLedger(config)
        self._rng = random.Random(config.seed)
        self._expected_token = config.access_token
        self.oauth: OAuthServer | None = None
        if config.oauth_client_id is not None:
            self.oauth = OAuthServer(
                config, clock=self.ledger.clock, wall_clock=self.ledger.wall_clock
            )
        # Stock Mashery marks quota 403s with a header; Constant Contact's may not (a setting).
        over_qps_headers = over_rate_headers = None
        if config.mashery_headers:
            over_qps_headers = {MASHERY_ERROR_HEADER: _MASHERY_QPS_CODE, "Retry-After": "1"}
            over_rate_headers = {MASHERY_ERROR_HEADER: _MASHERY_RATE_CODE}
        self._v2_inactive = _canned("v2", 403, V2_INACTIVE, V2_INACTIVE_MESSAGE)
        self._v2_invalid_token = _canned("v2", 401, V2_INVALID_TOKEN, V2_INVALID_TOKEN_MESSAGE)
        self._v3_unauthorized = _canned("v3", 401, V3_UNAUTHORIZED, V3_UNAUTHORIZED_MESSAGE)
        self._rejections: dict[Generation, dict[Verdict, _Canned]] = {
            "v2": {
                Verdict.OVER_QPS: _canned(
                    "v2", 403, V2_OVER_QPS, V2_OVER_QPS_MESSAGE, over_qps_headers
                ),
                Verdict.OVER_DAILY: _canned(
                    "v2", 403, V2_OVER_RATE, V2_OVER_RATE_MESSAGE, over_rate_headers
                ),
            },
            "v3": {
                Verdict.OVER_QPS: _canned("v3", 429, V3_THROTTLED, V3_THROTTLED_MESSAGE),
                Verdict.OVER_DAILY: _canned(
                    "v3", 429, V3_QUOTA_EXCEEDED, V3_QUOTA_EXCEEDED_MESSAGE
                ),
            },
        }

    def routes(self) -> list[web.RouteDef]:
        """The whole HTTP surface in one table; new endpoints (e.g. OAuth) are one line each."""
        routes = [
            web.route("*", "/v2/{tail:.*}", self.handle_v2),
            web.route("*", "/v3/{tail:.*}", self.handle_v3),
            web.get(STATS_PATH, self.handle_stats, allow_head=False),
            web.post(RESET_PATH, self.handle_reset),
        ]
        if self.oauth is not None:
            routes += [
                web.get(OAUTH_AUTHORIZE_PATH, self.oauth.handle_authorize, allow_head=False),
                web.post(OAUTH_TOKEN_PATH, self.oauth.handle_token),
                web.post(OAUTH_EXPIRE_PATH, self.oauth.handle_expire),
                web.post(OAUTH_REVOKE_PATH, self.oauth.handle_revoke),
            ]
        return routes

    def _delay(self, base: float, jitter: float) -> float:
        return base + self._rng.uniform(0.0, jitter) if jitter else base

    def _token_ok(self, request: web.Request) -> bool:
        if self._expected_token is None:
            return True
        # Exactly one header: a client that appends a second Authorization is as wrong
        # upstream as one that sends a stale token.
        values = request.headers.getall("Authorization", [])
        return len(values) == 1 and _bearer_token(values[0]) == self._expected_token

    def _check_v2(self, request: web.Request) -> str | _Refusal:
        presented = request.query.getall("api_key", [])
        # Mashery reads a single api_key; a missing or duplicated one is an unknown key.
        if len(presented) != 1 or not presented[0]:
            return _Refusal(None, self._v2_inactive)
        key = presented[0]
        if self.config.api_key is not None and key != self.config.api_key:
            return _Refusal(key, self._v2_inactive)
        if not self._token_ok(request):
            return _Refusal(key, self._v2_invalid_token)
        return key

    def _check_v3(self, request: web.Request) -> str | _Refusal:
        values = request.headers.getall("Authorization", [])
        token = _bearer_token(values[0]) if len(values) == 1 else None
        key = (_jwt_client_id(token) if token else None) or V3_SHARED_BUCKET
        if self.oauth is not None:
            # With OAuth on, any access token it issued is good until it expires.
            issued = token is not None and self.oauth.access_ok(token)
            if not issued and (self._expected_token is None or not self._token_ok(request)):
                return _Refusal(key, self._v3_unauthorized)
        elif not self._token_ok(request):
            return _Refusal(key, self._v3_unauthorized)
        return key

    async def _pass_gateway(
        self,
        request: web.Request,
        generation: Generation,
        check: Callable[[web.Request], str | _Refusal],
    ) -> web.Response:
        # Read the whole body first: the gateway sees a request once it has fully arrived.
        body = await request.read()
        await _travel(self._delay(self.config.latency_in, self.config.jitter_in))
        checked = check(request)
        if isinstance(checked, _Refusal):
            self.ledger.refuse(checked.key)
            answer = checked.answer.response()
        else:
            verdict = self.ledger.arrive(checked)
            if verdict is Verdict.ACCEPTED:
                answer = _echo(request, body, generation)
            else:
                answer = self._rejections[generation][verdict].response()
        await _travel(self._delay(self.config.latency_out, self.config.jitter_out))
        return answer

    async def handle_v2(self, request: web.Request) -> web.StreamResponse:
        """Any method on `/v2/...`: api_key (and token) checks, then quota, then the echo."""
        return await self._pass_gateway(request, "v2", self._check_v2)

    async def handle_v3(self, request: web.Request) -> web.StreamResponse:
        """Any method on `/v3/...`: token check, quota per JWT client id, then the echo."""
        return await self._pass_gateway(request, "v3", self._check_v3)

    async def handle_stats(self, request: web.Request) -> web.StreamResponse:
        """GET `/__sim__/stats`: the ledger's stats (and the OAuth server's, if on) as JSON."""
        stats = self.ledger.stats()
        if self.oauth is not None:
            stats["oauth"] = self.oauth.stats()
        return web.json_response(stats)

    async def handle_reset(self, request: web.Request) -> web.StreamResponse:
        """POST `/__sim__/reset`: forget all counters, windows and daily counts."""
        self.ledger.reset()
        if self.oauth is not None:
            self.oauth.reset_counters()
        return web.json_response({"reset": True})

    async def run_neighbour(self, app: web.Application) -> AsyncIterator[None]:
        """Cleanup context: while the app runs, another program spends the neighbour key."""
        task = None
        if self.config.neighbour_qps > 0:
            task = asyncio.create_task(self._spend_as_neighbour(), name="simulator-neighbour")
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _spend_as_neighbour(self) -> None:
        interval = 1.0 / self.config.neighbour_qps
        key = self.ledger.neighbour_key
        clock = self.ledger.clock
        due = clock()
        while True:
            # Always yield, even when late, so a very high rate cannot starve the server.
            await asyncio.sleep(max(due - clock(), 0.0))
            self.ledger.arrive(key, neighbour=True)
            due += interval
            # After a stall, resume the rhythm rather than firing a catch-up burst.
            if clock() - due > interval:
                due = clock()


def _echo(request: web.Request, body: bytes, generation: Generation) -> web.Response:
    """What the upstream received, without values: query values and headers may be secrets."""
    payload = {
        "method": request.method,
        "path": request.rel_url.raw_path,
        # items(), not keys(): multidict 7 folds repeated names, and a duplicate is news.
        "query_names": [name for name, _ in request.query.items()],
        "content_type": request.headers.get("Content-Type"),
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "generation": generation,
        "host": request.headers.get("Host"),
        "header_names": [name for name, _ in request.headers.items()],
    }
    return web.Response(body=json.dumps(payload).encode(), content_type=_JSON)


SIMULATOR: Final = web.AppKey("simulator", Simulator)


def make_simulator_app(config: SimulatorConfig) -> web.Application:
    """Build the stand-in as an aiohttp app; its `Simulator` is at `app[SIMULATOR]`."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        handler_args={
            # Hash the bytes as sent: the proxy must forward Content-Encoding'd bodies untouched.
            "auto_decompress": False,
            # The access log's request line carries the api_key query value: never write it.
            "access_log": None,
        },
    )
    simulator = Simulator(config)
    app[SIMULATOR] = simulator
    app.add_routes(simulator.routes())
    app.cleanup_ctx.append(simulator.run_neighbour)
    return app


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `simulate` command's flags; the parser checks types, the config checks ranges."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free)")
    parser.add_argument(
        "--api-key", help="demand this v2 api_key (default: accept any one key, count per key)"
    )
    parser.add_argument("--access-token", help="demand Authorization: Bearer <token> on v2 and v3")
    parser.add_argument("--qps", type=int, default=DEFAULT_QPS, help="per-key calls per second")
    parser.add_argument(
        "--window",
        choices=WINDOWS,
        default="rolling",
        help="rolling: any 1 s span; fixed: each clock second",
    )
    parser.add_argument(
        "--daily-quota", type=int, default=DEFAULT_DAILY_QUOTA, help="per-key calls per UTC day"
    )
    parser.add_argument("--latency-in", type=float, default=0.0, help="seconds before arrival")
    parser.add_argument("--jitter-in", type=float, default=0.0, help="plus up to this, uniform")
    parser.add_argument("--latency-out", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--jitter-out", type=float, default=0.0, help="plus up to this, uniform")
    parser.add_argument(
        "--mashery-headers",
        action="store_true",
        help="v2 quota 403s also carry X-Mashery-Error-Code (and Retry-After: 1 for qps)",
    )
    parser.add_argument(
        "--neighbour-qps",
        type=float,
        default=0.0,
        help="another program spends this many calls/s of the neighbour key",
    )
    parser.add_argument(
        "--neighbour-key", help="the key the neighbour spends (default: --api-key, else v3's)"
    )
    parser.add_argument("--seed", type=int, help="seed for the jitter")
    parser.add_argument(
        "--oauth-client-id",
        help="run the OAuth authorize/token endpoints for this client id; v3 then accepts "
        "the access tokens they issue",
    )
    parser.add_argument(
        "--oauth-client-secret", help="the client's secret (default: a PKCE app without one)"
    )
    parser.add_argument(
        "--oauth-refresh-token", help="a refresh token the token endpoint accepts from the start"
    )
    parser.add_argument(
        "--token-ttl",
        type=float,
        default=DEFAULT_TOKEN_TTL,
        help="seconds an issued access token lives (default 86400)",
    )
    parser.add_argument(
        "--rotate-refresh-tokens",
        action="store_true",
        help="each refresh returns a new refresh token and invalidates the old one",
    )


def simulator_config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    """Build and validate the config from parsed `simulate` flags; ValueError names the flag."""
    if not 0 <= ns.port <= 65_535:
        raise ValueError("--port must be between 0 and 65535")
    if not ns.host.strip():
        raise ValueError("--host must not be empty")
    return SimulatorConfig(
        api_key=ns.api_key,
        access_token=ns.access_token,
        qps=ns.qps,
        window=ns.window,
        daily_quota=ns.daily_quota,
        latency_in=ns.latency_in,
        jitter_in=ns.jitter_in,
        latency_out=ns.latency_out,
        jitter_out=ns.jitter_out,
        mashery_headers=ns.mashery_headers,
        neighbour_qps=ns.neighbour_qps,
        neighbour_key=ns.neighbour_key,
        seed=ns.seed,
        oauth_client_id=ns.oauth_client_id,
        oauth_client_secret=ns.oauth_client_secret,
        oauth_refresh_token=ns.oauth_refresh_token,
        token_ttl=ns.token_ttl,
        rotate_refresh_tokens=ns.rotate_refresh_tokens,
    )

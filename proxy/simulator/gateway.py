"""A local stand-in for the Constant Contact API: credential checks, per-key quotas, exact errors.

It imitates both gateways of constant-contact.md closely enough that the proxy cannot tell it
from the real thing, and records what it saw (``/__sim__/stats``) so tests, benchmarks and the
demo can assert on the upstream's side of the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import random
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from proxy.credentials import jwt_client_id
from proxy.simulator.config import (
    _JSON,
    _MASHERY_QPS_CODE,
    _MASHERY_RATE_CODE,
    _SECONDS_PER_DAY,
    ARRIVAL_HISTORY,
    MAX_BODY_BYTES,
    OAUTH_AUTHORIZE_PATH,
    OAUTH_EXPIRE_PATH,
    OAUTH_REVOKE_PATH,
    OAUTH_TOKEN_PATH,
    RESET_PATH,
    STATS_PATH,
    V3_SHARED_BUCKET,
    SimulatorConfig,
)
from proxy.simulator.oauth_server import OAuthServer
from proxy.simulator.windows import ArrivalWindow, BusiestSecond, FixedWindow, RollingWindow
from proxy.upstream_errors import (
    MASHERY_ERROR_HEADER,
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


def key_fingerprint(key: str) -> str:
    """A short, stable, non-reversible name for a key: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Verdict(enum.Enum):
    """What the gateway decided about one arrival."""

    ACCEPTED = "accepted"
    OVER_QPS = "per_second"
    OVER_DAILY = "daily"


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
        self.arrival_spans = BusiestSecond()
        self.accepted_spans = BusiestSecond()
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

    def __init__(self, fingerprint: str, window: ArrivalWindow) -> None:
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
            window: ArrivalWindow
            if self.config.window == "fixed":
                window = FixedWindow(self.config.qps)
            else:
                window = RollingWindow(self.config.qps)
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


async def _travel(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


class Simulator:
    """The stand-in's HTTP face: routes, credential checks, travel delays and canned answers.

    Decisions and records live in `ledger`; everything per-configuration is prepared here once.
    """

    def __init__(self, config: SimulatorConfig, ledger: QuotaLedger | None = None) -> None:
        self.config = config
        self.ledger = ledger if ledger is not None else QuotaLedger(config)
        self._rng = random.Random(config.seed)
        self._expected_token = config.access_token
        # Echoes served so far: each echo carries its number, so a reused answer shows.
        self.echoes = 0
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
        self._accepted_calls = 0
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
        key = (jwt_client_id(token) if token else None) or V3_SHARED_BUCKET
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
    ) -> web.StreamResponse:
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
                self.echoes += 1
                answer = _echo(request, body, generation, self.echoes)
                if self._misbehave_now():
                    await _travel(self._delay(self.config.latency_out, self.config.jitter_out))
                    return await self._fault(request, answer, generation)
            else:
                answer = self._rejections[generation][verdict].response()
        await _travel(self._delay(self.config.latency_out, self.config.jitter_out))
        return answer

    def _misbehave_now(self) -> bool:
        if self.config.fault is None:
            return False
        self._accepted_calls += 1
        return self._accepted_calls % self.config.fault_every == 0

    async def _fault(
        self, request: web.Request, echo: web.Response, generation: Generation
    ) -> web.StreamResponse:
        """Answer the way `--fault` says a broken upstream would."""
        fault = self.config.fault
        if fault == "app-403":
            text = "Hover QPS testers are not enabled for this account."
            return web.json_response({"error_key": "forbidden", "error_message": text}, status=403)
        if fault == "huge-retry-after":
            over = self._rejections[generation][Verdict.OVER_QPS].response()
            over.headers["Retry-After"] = "999999999"
            return over
        body = echo.body if isinstance(echo.body, bytes) else b"{}"
        response = web.StreamResponse(status=200)
        response.content_type = "application/json"
        response.content_length = len(body) + 64
        await response.prepare(request)
        await response.write(body[: max(1, len(body) // 2)])
        transport = request.transport
        if fault == "stall":
            # Nothing more for a minute.
            await asyncio.sleep(60)
        elif transport is not None and fault == "reset":
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        elif transport is not None:
            transport.close()
        return response

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


def _echo(request: web.Request, body: bytes, generation: Generation, number: int) -> web.Response:
    """What the upstream received, without values: query values and headers may be secrets.

    `echo` numbers the answers the stand-in has given, so a client can tell a fresh one.
    """
    payload = {
        "echo": number,
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

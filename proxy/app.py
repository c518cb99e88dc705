"""The proxy application: routes, the request path, and the resources the app owns.

One request flows one way: admission (target, client token, body, queue) -> credentials ->
send -> classify the answer -> respond. Errors raised anywhere on that path become a
Constant Contact-shaped answer in `edge_middleware`, which also writes the one
`request_finished` log line and the request metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.clock import SystemClock
from proxy.config import Config
from proxy.credentials import Injector, TokenSource, fingerprint, redact, strip_params
from proxy.edge.fields import parse_seconds, parse_wait_preference
from proxy.edge.limits import BodyBudget
from proxy.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    ClientUnauthorized,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    Throttled,
    Unavailable,
)
from proxy.forward import (
    IDEMPOTENT,
    QUOTA_BODY_LIMIT,
    ConnectionLost,
    Target,
    Upstream,
    check_method,
    check_target,
    outbound_headers,
    stream_back,
)
from proxy.logs import enabled_for, get_logger
from proxy.metrics import Metrics
from proxy.oauth.redis_store import RedisTokenStore
from proxy.oauth.tokens import open_token_source
from proxy.quota import (
    FLUSH_INTERVAL,
    KeyQueue,
    Limits,
    LocalBackend,
    QuotaBackend,
    QuotaEngine,
    Ticket,
    next_reset,
)
from proxy.quota.redis import RedisBackend
from proxy.upstream_errors import Generation, QuotaKind, classify, error_key_for

log = get_logger("proxy")

_SECRET_PARAMS = ("api_key", "access_token", "refresh_token", "client_secret", "code")
_JSON = "application/json"


@dataclass
class AppState:
    """What the app owns while it runs (created in `cleanup_ctx`, closed on shutdown)."""

    config: Config
    engine: QuotaEngine
    backend: QuotaBackend
    upstream: Upstream
    injector: Injector
    tokens: TokenSource
    metrics: Metrics
    bodies: BodyBudget
    mode: Callable[[], str] = lambda: "local"
    shutting_down: bool = False
    ready_checks: list[Callable[[], Awaitable[str | None]]] = field(default_factory=list)
    # v2's (fixed) token when `tokens` is v3's OAuth source; None: `tokens` serves both.
    v2_tokens: TokenSource | None = None


@dataclass(slots=True)
class RequestRecord:
    """What the request_finished line says about one request."""

    request_id: str
    started: float
    method: str
    target: str  # as sent: made loggable (secrets out) only when the line is written
    generation: Generation = "v2"
    key: str | None = None
    queue: KeyQueue | None = None
    queued: float = 0.0
    upstream_status: int | None = None
    outcome: str = "forwarded"
    replays: int = 0
    throttle_kind: QuotaKind | None = None  # set when the proxy answered 429
    # Per send: the wait so far when it left the queue, and the upstream's time to headers
    # (observed into the histograms with the rest of the request's bookkeeping).
    waits: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


class RequestLedger:
    """Counts and logs finished requests a batch at a time, once per pass of the event loop.

    Under load one pass of the loop finishes many requests; writing their metrics and
    request_finished lines together, rather than one at a time between the sockets' work,
    keeps that code and its data hot: measured in the running proxy, the line costs about
    40 us less per request (docs/performance.md). A line is written at most one pass after
    its request finished, before the loop polls for more I/O.
    """

    def __init__(self) -> None:
        self.metrics: Metrics | None = None  # set when the app's resources exist
        self._pending: list[tuple[RequestRecord, int, float]] = []

    def add(self, record: RequestRecord, status: int, duration: float) -> None:
        """Book a finished request; the batch is written by the loop's next pass."""
        self._pending.append((record, status, duration))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Count and log every booked request now."""
        batch, self._pending = self._pending, []
        metrics = self.metrics
        # The request_finished line is built only when it is written.
        info, debug = enabled_for(logging.INFO), enabled_for(logging.DEBUG)
        for record, status, duration in batch:
            if metrics is not None:
                metrics.count_request(record.outcome, status)
                for wait in record.waits:
                    metrics.queue_wait.observe(wait)
                for latency in record.latencies:
                    metrics.upstream_latency.observe(latency)
                if record.outcome == "throttled":
                    daily = record.throttle_kind is QuotaKind.DAILY
                    metrics.throttled.labels("daily" if daily else "per_second").inc()
            # Probes and scrapes come every few seconds: at info they would drown the API
            # traffic.
            local = record.outcome == "local"
            if local and debug:
                log.debug("request_finished", **_line(record, status, duration))
            elif not local and info:
                log.info("request_finished", **_line(record, status, duration))


def _line(record: RequestRecord, status: int, duration: float) -> dict[str, object]:
    return {
        "request_id": record.request_id,
        "method": record.method,
        "path": _loggable_target(record.target),
        "key": record.key,
        "queued_ms": round(record.queued * 1000, 1),
        "upstream_status": record.upstream_status,
        "status": status,
        "outcome": record.outcome,
        "replays": record.replays,
        "duration_ms": round(duration * 1000, 1),
    }


CONFIG = web.AppKey("config", Config)
STATE = web.AppKey("state", AppState)
RECORD = web.RequestKey("record", RequestRecord)
LEDGER = web.AppKey("ledger", RequestLedger)


def make_app(config: Config, backend: QuotaBackend | None = None) -> web.Application:
    """Build the proxy application for a configuration (resources start with the app)."""
    app = web.Application(middlewares=[edge_middleware], client_max_size=config.max_body)
    app[CONFIG] = config
    app[LEDGER] = RequestLedger()
    app.cleanup_ctx.append(_resources(backend))
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/status", status_page)
    app.router.add_route("*", "/v2/{tail:.*}", forward, expect_handler=_expect)
    app.router.add_route("*", "/v3/{tail:.*}", forward, expect_handler=_expect)
    return app


def _resources(
    backend: QuotaBackend | None,
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def resources(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        clock = SystemClock()
        local = None
        shared = None
        chosen = backend
        if chosen is None and config.redis_url is not None:
            shared = RedisBackend.from_config(config, clock)
            await shared.start()
            chosen = shared
        elif chosen is None:
            assert config.state_dir is not None
            local = LocalBackend(clock, config.state_dir / "daily.json")
            chosen = local
        engine = QuotaEngine(
            Limits(config.qps, config.daily_quota, config.max_queue, config.pacing_margin),
            chosen,
            clock,
        )
        share = None
        if shared is not None and config.client_id is not None:
            client, client_id = shared.client, config.client_id.reveal()
            share = lambda local: RedisTokenStore(client, client_id, local)  # noqa: E731
        oauth = await open_token_source(config, share=share)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=config.connect_timeout, sock_read=config.upstream_timeout
            ),
            auto_decompress=False,
            # Never add headers the client did not send, and never carry cookies between clients.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        mode = getattr(chosen, "mode", None)
        mode = mode if callable(mode) else lambda: "local"
        state = AppState(
            config=config,
            engine=engine,
            backend=chosen,
            upstream=Upstream(session, {"v2": config.upstream_v2, "v3": config.upstream_v3}),
            injector=Injector(config.api_key, config.client_token),
            tokens=oauth if oauth is not None else TokenSource(config.access_token),
            metrics=Metrics(engine, mode),
            bodies=BodyBudget(config.max_body_memory),
            mode=mode,
            v2_tokens=TokenSource(config.access_token) if oauth is not None else None,
        )
        if shared is not None:
            state.ready_checks.append(shared.ready_problem)
        app[STATE] = state
        app[LEDGER].metrics = state.metrics
        flusher = None
        if local is not None:
            flusher = asyncio.get_running_loop().create_task(_flush_forever(local))
        try:
            yield
        finally:
            app[LEDGER].flush()
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            engine.shutdown(retry_after=1)
            if local is not None:
                local.flush()
            if shared is not None:
                await shared.close()
            if oauth is not None:
                await oauth.close()
            await session.close()

    return resources


async def _flush_forever(backend: LocalBackend) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        try:
            backend.flush()
        except OSError as exc:
            log.warning("state_not_saved", error=str(exc))


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.shutting_down = True
    queued = sum(q.queued for q in state.engine.queues.values())
    log.info("shutting_down", queued=queued, grace_seconds=state.config.shutdown_grace)
    state.engine.shutdown(retry_after=max(1.0, state.config.shutdown_grace))


# -- the edge: one place that turns errors into answers and writes the request line --------


def _error_response(error: ProxyError, generation: Generation) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(generation),
        content_type=_JSON,
        headers=error.headers(),
    )


def _loggable_target(raw: str) -> str:
    path, sep, query = raw.partition("?")
    if not sep:
        return redact(path)
    kept = strip_params(query, _SECRET_PARAMS)
    dropped = [p.partition("=")[0] for p in query.split("&") if p and p not in kept.split("&")]
    suffix = "&".join(filter(None, [kept, *(f"{name}=***" for name in dropped)]))
    return redact(f"{path}?{suffix}")


@web.middleware
async def edge_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn the proxy's errors into CC-shaped answers; log and count every request once."""
    request_id = request.headers.get("X-Request-Id", "")[:128]
    if not request_id or not request_id.isprintable():
        request_id = secrets.token_hex(16)
    raw = request.raw_path
    record = RequestRecord(
        request_id=request_id,
        started=time.monotonic(),
        method=request.method,
        target=raw,
        generation="v3" if raw.startswith("/v3/") else "v2",
        # /healthz, /readyz, /metrics, /status: answered here, never API traffic.
        outcome="forwarded" if raw.startswith(("/v2/", "/v3/")) else "local",
    )
    request[RECORD] = record
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
    except ProxyError as error:
        record.outcome = error.outcome
        if isinstance(error, Throttled):
            record.throttle_kind = error.kind
        response = _error_response(error, record.generation)
    except web.HTTPNotFound:
        record.outcome = "refused"
        response = _error_response(NotFound("Nothing is served at this path."), record.generation)
    except web.HTTPMethodNotAllowed:
        record.outcome = "refused"
        response = _error_response(
            MethodNotAllowed("This method is not allowed here."), record.generation
        )
    except asyncio.CancelledError:
        record.outcome = "abandoned"
        raise
    except Exception as exc:  # the one catch-all: the process keeps serving, nothing leaks
        record.outcome = "failed"
        log.error("request_crashed", request_id=request_id, error=redact(repr(exc)))
        response = _error_response(
            ProxyError("The proxy failed to handle this request."), record.generation
        )
    finally:
        status = response.status if response is not None else 499
        request.app[LEDGER].add(record, status, time.monotonic() - record.started)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
        if record.queue is not None and response.status == 429:
            response.headers.update(_rate_headers(request.app[STATE], record.queue))
    return response


def _rate_headers(state: AppState, queue: KeyQueue) -> dict[str, str]:
    """Draft IETF RateLimit-Policy / RateLimit fields for the per-second and daily policies."""
    config = state.config
    wall = time.time()
    per_second = math.floor(config.qps)
    per_second_left = max(0, per_second - 1 - queue.queued)
    daily_left = max(0, config.daily_quota - queue.sent_today)
    return {
        "RateLimit-Policy": _rate_policy(per_second, config.daily_quota),
        "RateLimit": (
            f'"per-second";r={per_second_left};t={math.ceil(queue.predicted_wait(0))}, '
            f'"daily";r={daily_left};t={math.ceil(next_reset(wall) - wall)}'
        ),
    }


@functools.lru_cache(maxsize=8)
def _rate_policy(per_second: int, daily_quota: int) -> str:
    return f'"per-second";q={per_second};w=1, "daily";q={daily_quota};w=86400'


# -- the request path ---------------------------------------------------------------------


# Past --body-timeout a body must keep averaging this rate: a slow link uploading a big file
# gets through, a client that holds a connection open by trickling bytes does not.
BODY_RATE_FLOOR = 16 * 1024


async def _read_body(request: web.Request, limit: int, grace: float, budget: BodyBudget) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"The request body is larger than the proxy's limit of {limit} bytes.")
    if not request.body_exists:
        return b""
    # The body counts against the budget until its request is answered (this task's end).
    hold = budget.hold(until_done=asyncio.current_task())
    if length is not None:
        hold.reserve(length)
    chunks = []
    size = 0
    start = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(grace) as deadline:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(
                        f"The request body is larger than the proxy's limit of {limit} bytes."
                    )
                hold.take(len(chunk))
                chunks.append(chunk)
                deadline.reschedule(start + grace + size / BODY_RATE_FLOOR)
    except TimeoutError:
        raise BodyTimeout(
            f"The request body arrived too slowly ({size} bytes); the proxy allows "
            f"{grace:g} seconds plus one per {BODY_RATE_FLOOR // 1024} KiB.",
        ) from None
    return b"".join(chunks)


async def _expect(request: web.Request) -> None:
    """Answer `Expect: 100-continue`; other expectations are ignored (RFC 9110 allows it).

    aiohttp's default answers those with a plain-text 417 from outside the middleware.
    """
    expect = request.headers.get("Expect", "").strip().lower()
    if expect == "100-continue" and request.version == aiohttp.HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # An interim answer: the real one has not started yet.
        request.writer.output_size = 0


async def forward(request: web.Request) -> web.StreamResponse:
    """Queue a /v2 or /v3 request for its key, send it with our credentials, answer."""
    state = request.app[STATE]
    record = request[RECORD]
    check_method(request.method)
    target = check_target(request.raw_path)
    if request.version.major != 1:
        # llhttp lets "HTTP/0.9" and "HTTP/2.0" through with HTTP/1 framing; nobody real does.
        raise BadRequest("Only HTTP/1.0 and HTTP/1.1 requests are forwarded.")
    if state.shutting_down:
        raise Unavailable("The proxy is shutting down; retry shortly.", retry_after=1)
    headers_in = request.headers
    client_auth = headers_in.get("Authorization")
    if not state.injector.admits(target.query, client_auth, headers_in.get("Proxy-Authorization")):
        raise ClientUnauthorized("A valid client token is required to use this proxy.")
    tokens = state.tokens if target.generation == "v3" else state.v2_tokens or state.tokens
    token = await tokens.current()
    out = state.injector.outbound(target.generation, target.query, client_auth, token)
    record.key = fingerprint(out.quota_key)
    body = (
        await _read_body(request, state.config.max_body, state.config.body_timeout, state.bodies)
        if request.body_exists
        else b""
    )

    budget = float(state.config.max_wait)
    preferred = parse_wait_preference(headers_in.get("Prefer"))
    if preferred is not None and preferred < budget:
        budget = float(preferred)
    queue = await state.engine.load(out.quota_key)
    record.queue = queue
    ticket = queue.admit(budget)
    url = state.upstream.url(target, out.raw_query)
    headers = outbound_headers(
        headers_in, out.authorization, record.request_id, request.remote, request.scheme
    )
    state.injector.drop_client_tokens(headers)
    connection_retried = renewed = False
    try:
        while True:
            await queue.wait(ticket)
            sent = time.monotonic()
            record.queued = sent - ticket.enqueued
            record.waits.append(record.queued)
            try:
                upstream = await state.upstream.send(request.method, url, headers, body)
            except ConnectionLost as lost:
                log.warning(
                    "upstream_connection_lost", request_id=record.request_id, detail=lost.detail
                )
                if request.method in IDEMPOTENT and not connection_retried:
                    connection_retried = True
                    await queue.replay(
                        ticket, None, error_key_for(QuotaKind.PER_SECOND, target.generation)
                    )
                    continue
                raise
            record.latencies.append(time.monotonic() - sent)
            record.upstream_status = upstream.status
            if upstream.status == 401 and target.generation == "v3" and token and not renewed:
                # Our token expired or was revoked early: renew it, send once more (queued anew).
                try:
                    fresh = await tokens.refresh_after_401(token)
                except ProxyError:
                    upstream.release()
                    raise
                if fresh is not None:
                    upstream.release()
                    renewed, token = True, fresh
                    out = state.injector.outbound("v3", target.query, client_auth, fresh)
                    if out.authorization is not None:
                        headers["Authorization"] = out.authorization
                    queue.leave(ticket)
                    ticket = queue.admit(max(0.0, ticket.deadline - state.engine.clock.monotonic()))
                    record.replays += 1
                    continue
            buffered = None
            if upstream.status in (403, 429):
                buffered = await upstream.content.read(QUOTA_BODY_LIMIT)
                kind = classify(target.generation, upstream.status, upstream.headers, buffered)
                if kind is not QuotaKind.NONE:
                    upstream.release()
                    await _on_quota_error(state, record, target, queue, ticket, kind, upstream)
                    continue
            queue.sent_ok()
            if record.outcome == "forwarded" and record.replays:
                record.outcome = "replayed"
            extra = [
                *_rate_headers(state, queue).items(),
                ("X-Request-Id", record.request_id),
                ("Server-Timing", f"queue;dur={record.queued * 1000:.1f}"),
            ]
            if preferred is not None and preferred <= state.config.max_wait:
                extra.append(("Preference-Applied", f"wait={preferred}"))
            try:
                return await stream_back(request, upstream, extra, buffered)
            finally:
                upstream.release()
    finally:
        queue.leave(ticket)


async def _on_quota_error(
    state: AppState,
    record: RequestRecord,
    target: Target,
    queue: KeyQueue,
    ticket: Ticket,
    kind: QuotaKind,
    upstream: aiohttp.ClientResponse,
) -> None:
    """Learn from a gateway quota error: replay after a per-second one, pause after a daily one."""
    state.metrics.quota_errors.labels(kind.value).inc()
    error_key = error_key_for(kind, target.generation)
    if kind is QuotaKind.PER_SECOND:
        retry_after = _retry_after_header(upstream.headers.get("Retry-After"))
        log.info("upstream_over_qps", request_id=record.request_id, key=record.key)
        await queue.replay(ticket, retry_after, error_key)
        record.replays += 1
        state.metrics.replays.inc()
        return
    hour = state.config.v2_reset_hour if target.generation == "v2" else 0
    until = next_reset(time.time(), hour)
    log.warning("upstream_daily_quota", key=record.key, paused_until=until)
    await queue.pause_daily(until)
    raise Throttled(
        "The daily quota for this API key is used up at the gateway; retry after "
        f"{math.ceil(until - time.time())} seconds.",
        retry_after=until - time.time(),
        kind=QuotaKind.DAILY,
        error_key=error_key,
    )


def _retry_after_header(value: str | None) -> float | None:
    seconds = parse_seconds(value)
    return None if seconds is None else float(seconds)


# -- operator endpoints -------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to serve: upstreams configured, shared state and credentials usable."""
    state = request.app[STATE]
    problems = [p for check in state.ready_checks if (p := await check())]
    if not state.tokens.ready:
        problems.append("the proxy's OAuth credentials need attention")
    if state.shutting_down:
        problems.append("shutting down")
    body = {"ready": not problems, "mode": state.mode(), "problems": problems}
    return web.json_response(body, status=200 if not problems else 503)


async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[STATE].metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def status_page(request: web.Request) -> web.Response:
    """Per-key quota state as JSON; keys appear only as fingerprints."""
    state = request.app[STATE]
    config = state.config
    body = {
        "mode": state.mode(),
        "qps": config.qps,
        "daily_quota": config.daily_quota,
        "upstreams": {"v2": str(config.upstream_v2), "v3": str(config.upstream_v3)},
        "keys": state.engine.status(),
    }
    return web.Response(text=redact(json.dumps(body)), content_type=_JSON)

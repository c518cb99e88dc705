"""The proxy application: routes and the resources it owns, each with its own cleanup.

A request's path through the modules (docs/architecture.md): `edge.middleware` (record,
errors, the request line) -> `exchange.forward` (admission, body) -> `reads` (a GET or HEAD
answered from the cache or sharing an identical one's send) -> `quota` (the key's
queue) -> `exchange.Exchange` (attempts: credentials, send, classify) -> `forward` (the
upstream client, streaming back). `edge.ops` answers the operator endpoints.

Each resource is one `cleanup_ctx`, in the order they depend on each other: a start-up
failure half-way closes exactly what had started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from proxy.clock import SystemClock
from proxy.config import Config
from proxy.credentials import Injector, TokenSource
from proxy.edge import ops
from proxy.edge.dashboard import DASHBOARD, ClientQueue, Dashboard, add_dashboard_routes
from proxy.edge.limits import BodyBudget
from proxy.edge.middleware import LEDGER, RequestLedger, edge_middleware
from proxy.egress import upstream_session
from proxy.errors import StartupError
from proxy.exchange import expect_continue, forward
from proxy.files import check_writable_dir
from proxy.forward import Upstream, departures
from proxy.history import History, HistoryFeed
from proxy.logs import get_logger
from proxy.metrics import ConfiguredLimits, Metrics
from proxy.oauth.redis_store import RedisTokenStore
from proxy.oauth.tokens import OAuthTokens, open_token_source
from proxy.quota import FLUSH_INTERVAL, KeyQueue, Limits, LocalBackend, QuotaBackend, QuotaEngine
from proxy.quota.redis import RedisBackend
from proxy.reads import reads_context
from proxy.state import CONFIG, STATE, AppState

log = get_logger("proxy")

BACKEND = web.AppKey("backend", QuotaBackend)
TOKENS = web.AppKey("tokens", TokenSource)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(config: Config, backend: QuotaBackend | None = None) -> web.Application:
    """Build the proxy application for a configuration (resources start with the app)."""
    app = web.Application(middlewares=[edge_middleware], client_max_size=config.max_body)
    app[CONFIG] = config
    app[LEDGER] = RequestLedger()
    app.cleanup_ctx.extend(
        [_quota_backend(backend), _token_source, _client_session, _request_path, reads_context]
    )
    app.on_shutdown.append(_on_shutdown)
    ops.add_routes(app)
    add_dashboard_routes(app)
    app.router.add_route("*", "/v2/{tail:.*}", forward, expect_handler=expect_continue)
    app.router.add_route("*", "/v3/{tail:.*}", forward, expect_handler=expect_continue)
    return app


def _quota_backend(
    given: QuotaBackend | None,
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """The quota backend: the one given (tests), Redis when configured, else local files."""

    @contextlib.asynccontextmanager
    async def quota_backend(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        if given is not None:
            app[BACKEND] = given
            yield
            return
        if config.redis_url is not None:
            shared = RedisBackend.from_config(config, SystemClock())
            await shared.start()
            app[BACKEND] = shared
            try:
                yield
            finally:
                await shared.close()
            return
        assert config.state_dir is not None
        problem = check_writable_dir(config.state_dir)
        if problem is not None:
            raise StartupError(f"--state-dir {str(config.state_dir)!r} {problem}")
        local = LocalBackend(SystemClock(), config.state_dir / "daily.json")
        app[BACKEND] = local
        flusher = asyncio.get_running_loop().create_task(_flush_forever(local))
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            local.flush()

    return quota_backend


async def _flush_forever(backend: LocalBackend) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        try:
            backend.flush()
        except OSError as exc:
            log.warning("state_not_saved", error=str(exc))


@contextlib.asynccontextmanager
async def _token_source(app: web.Application) -> AsyncIterator[None]:
    """The access token: a fixed one, or the OAuth refresher (shared through Redis if any)."""
    config = app[CONFIG]
    backend = app[BACKEND]
    share = None
    if isinstance(backend, RedisBackend) and config.client_id is not None:
        client, client_id = backend.client, config.client_id.reveal()
        share = lambda local: RedisTokenStore(client, client_id, local)  # noqa: E731
    oauth = await open_token_source(config, share=share)
    app[TOKENS] = oauth if oauth is not None else TokenSource(config.access_token)
    try:
        yield
    finally:
        if oauth is not None:
            await oauth.close()


@contextlib.asynccontextmanager
async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """The one client session to the upstreams (TLS trust and egress proxy: `egress.py`)."""
    config = app[CONFIG]
    session = upstream_session(config, trace_configs=[departures()])
    # aiohttp re-sends an idempotent request once by itself when a pooled connection breaks:
    # a send outside the key's pacing. The exchange decides about every send, so it is off.
    session._retry_connection = False
    app[SESSION] = session
    try:
        yield
    finally:
        await session.close()


@contextlib.asynccontextmanager
async def _request_path(app: web.Application) -> AsyncIterator[None]:
    """The quota engine and everything a request uses, assembled; queued requests end first."""
    config = app[CONFIG]
    backend = app[BACKEND]
    tokens = app[TOKENS]
    clock = SystemClock()
    feed = HistoryFeed(History(), clock)
    engine = QuotaEngine(
        Limits(config.qps, config.daily_quota, config.max_queue, config.pacing_margin),
        backend,
        clock,
        on_grant=feed.granted,
    )
    oauth = isinstance(tokens, OAuthTokens)
    state = AppState(
        config=config,
        engine=engine,
        backend=backend,
        upstream=Upstream(app[SESSION], {"v2": config.upstream_v2, "v3": config.upstream_v3}),
        injector=Injector(config.api_key, config.client_token),
        tokens=tokens,
        bodies=BodyBudget(config.max_body_memory),
        metrics=Metrics(
            engine,
            backend.mode,
            history=feed.history,
            limits=ConfiguredLimits(config.qps, config.daily_quota, config.max_wait),
            oauth=tokens.status,
        ),
        feed=feed,
        v2_tokens=TokenSource(config.access_token) if oauth else None,
    )
    if isinstance(backend, RedisBackend):
        state.ready_checks.append(backend.ready_problem)
    app[STATE] = state
    app[DASHBOARD] = Dashboard(
        config, engine, feed.history, backend.mode, tokens, client_breakdown=client_queues
    )
    app[LEDGER].metrics = state.metrics
    try:
        yield
    finally:
        app[LEDGER].flush()
        engine.shutdown(retry_after=1)


def client_queues(queue: KeyQueue) -> list[ClientQueue]:
    """The dashboard's per-client rows of a key: its fair-share queues (names, never tokens)."""
    lanes = queue.client_lanes()
    return [
        ClientQueue(str(row["client"]), int(str(row["queued"])), lanes.get(str(row["client"])))
        for row in queue.clients_status()
    ]


async def _on_shutdown(app: web.Application) -> None:
    """Stop queueing; after the grace, answer whatever is still in flight (503)."""
    state = app[STATE]
    state.shutting_down = True
    queued = sum(q.queued for q in state.engine.queues.values())
    grace = state.config.shutdown_grace
    log.info("shutting_down", queued=queued, grace_seconds=grace)
    state.engine.shutdown(retry_after=max(1.0, grace))

    def end_inflight() -> None:
        state.ending = True
        for task in list(state.inflight):
            task.cancel()

    if state.inflight:
        asyncio.get_running_loop().call_later(grace, end_inflight)

"""What the running app owns, and the typed keys it is found under."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from proxy.config import Config
from proxy.credentials import Injector, TokenSource
from proxy.edge.limits import BodyBudget
from proxy.forward import Upstream
from proxy.history import HistoryFeed
from proxy.metrics import Metrics
from proxy.quota import QuotaBackend, QuotaEngine


@dataclass
class AppState:
    """The resources a request uses, assembled once they have all started."""

    config: Config
    engine: QuotaEngine
    backend: QuotaBackend
    upstream: Upstream
    injector: Injector
    tokens: TokenSource
    metrics: Metrics
    bodies: BodyBudget  # request bodies held across all requests, bounded
    feed: HistoryFeed  # what the dashboard's history is told about sends, rejections, replays
    # v2's (fixed) token when `tokens` is v3's OAuth source; None: `tokens` serves both.
    v2_tokens: TokenSource | None = None
    ready_checks: list[Callable[[], Awaitable[str | None]]] = field(default_factory=list)
    shutting_down: bool = False
    # Set when the shutdown grace is over: requests still in flight are answered 503 now.
    ending: bool = False
    # The handler tasks of /v2 and /v3 requests, so the end of the grace can reach them.
    inflight: set[asyncio.Task[object]] = field(default_factory=set)

    def tokens_for(self, generation: str) -> TokenSource:
        """The token source of an API generation."""
        if generation == "v3":
            return self.tokens
        return self.v2_tokens or self.tokens


CONFIG = web.AppKey("config", Config)
STATE = web.AppKey("state", AppState)

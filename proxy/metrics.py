"""Prometheus metrics: counters and histograms on the request path, per-key gauges at scrape.

Each app has its own registry, so several apps (tests, replicas in one process) never mix.
Per-key gauges are read from the quota engine when scraped rather than updated per request,
for the busiest `TOP_KEYS` keys and one aggregate of the rest: a scrape writes a bounded
number of series however many keys there are, and the walk over the keys is shared by
scrapes that come close together (`REUSE_FACTOR`). The per-key send counters (from the
dashboard's bounded history), the configured limits (for dashboards and alerts to compare
against) and the OAuth token state are read at scrape time too.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import compress, repeat
from operator import add, attrgetter
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.history import History

if TYPE_CHECKING:
    from proxy.quota import KeyQueue, QuotaEngine

_WAIT_BUCKETS = (0.005, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Clients identified by User-Agent can be many: the first CLIENT_SERIES clients to send get a
# series of their own, any later one counts under OTHER_CLIENT (a counter never moves between
# series, so it stays monotonic). With client tokens, clients are the configured tokens.
CLIENT_SERIES = 20
OTHER_CLIENT = "other"


# Per-key series for this many keys, the busiest (sent today plus queued now); the others are
# summed under key="other". Without client tokens every api_key a client invents is a key:
# exporting each would make a scrape's cost, and its size at Prometheus, grow with them.
TOP_KEYS = 50
OTHER = "other"
# Walking the keys takes about 0.3 ms per 1,000 (10,000 keys: ~3 ms of the event loop). A
# walk's result is reused for this many times as long as it took, so that scrapers looping
# back to back spend at most a tenth of the loop on it; with a few keys it is always fresh.
REUSE_FACTOR = 10

# key, queued, sent, remaining, spacing, paused, moved-back misses
_Row = tuple[str, int, int, int, float, float, int]


class _KeyCollector(Collector):
    def __init__(self, engine: QuotaEngine, mode: Callable[[], str]) -> None:
        self._engine = engine
        self._mode = mode
        self._rows: list[_Row] = []
        self._keys = 0
        self._fresh_until = 0.0

    def _walk(self) -> None:
        """One pass over the keys: rows for the busiest, one aggregate row for the rest."""
        engine = self._engine
        quota = engine.limits.daily_quota
        wall = engine.clock.time()
        queues = list(engine.queues.values())
        self._keys = len(queues)
        rows: list[_Row] = []
        if len(queues) > TOP_KEYS:
            traffic = list(map(add, map(_SENT, queues), map(_QUEUED, queues)))
            busiest = heapq.nlargest(TOP_KEYS, range(len(queues)), key=traffic.__getitem__)
            top = [queues[i] for i in busiest]
            others = [True] * len(queues)
            for i in busiest:
                others[i] = False
            rest = list(compress(queues, others))
        else:
            top, rest = queues, []
        for queue in top:
            sent = queue.sent_today
            paused = queue.blocked_until is not None and queue.blocked_until > wall
            rows.append(
                (
                    queue.fingerprint,
                    queue.queued,
                    sent,
                    max(0, quota - sent),
                    round(queue.pace, 4),
                    1.0 if paused else 0.0,
                    queue.moved_back_misses,
                )
            )
        if rest:
            sent_rest = list(map(_SENT, rest))
            blocked = [b for b in map(_BLOCKED, rest) if b is not None and b > wall]
            rows.append(
                (
                    OTHER,
                    sum(map(_QUEUED, rest)),
                    sum(sent_rest),
                    quota * len(rest) - sum(map(min, sent_rest, repeat(quota))),
                    # KeyQueue.pace, the wider of the two, without a call per key.
                    round(max(max(map(_SPACING, rest)), max(map(_PACED, rest))), 4),
                    float(len(blocked)),
                    sum(map(_MOVED_BACK, rest)),
                )
            )
        self._rows = rows

    def collect(self) -> Iterator[Metric]:
        began = time.perf_counter()
        if began >= self._fresh_until:
            self._walk()
            self._fresh_until = began + REUSE_FACTOR * (time.perf_counter() - began)
        count = GaugeMetricFamily(
            "ctct_proxy_keys",
            f"Keys with a queue; the {TOP_KEYS} busiest have per-key series, the others are "
            f'summed under key="{OTHER}".',
            value=self._keys,
        )
        depth = GaugeMetricFamily(
            "ctct_proxy_queue_depth", "Requests waiting, per key.", labels=["key"]
        )
        used = GaugeMetricFamily(
            "ctct_proxy_daily_used", "Requests sent today, per key.", labels=["key"]
        )
        left = GaugeMetricFamily(
            "ctct_proxy_daily_remaining", "Requests left today, per key.", labels=["key"]
        )
        spacing = GaugeMetricFamily(
            "ctct_proxy_spacing_seconds",
            f'Current spacing between sends, per key (key="{OTHER}": the widest).',
            labels=["key"],
        )
        paused = GaugeMetricFamily(
            "ctct_proxy_paused",
            f'1 while a key is paused for its daily quota (key="{OTHER}": how many are).',
            labels=["key"],
        )
        moved_back = CounterMetricFamily(
            "ctct_proxy_moved_back_misses",
            "Admitted requests answered 429 at their deadline after later arrivals (other "
            "clients' turns, more urgent lanes) went before them, per key.",
            labels=["key"],
        )
        for key, queued, sent, remaining, pace, pause, misses in self._rows:
            labels = [key]
            depth.add_metric(labels, queued)
            used.add_metric(labels, sent)
            left.add_metric(labels, remaining)
            spacing.add_metric(labels, pace)
            paused.add_metric(labels, pause)
            moved_back.add_metric(labels, misses)
        mode = GaugeMetricFamily(
            "ctct_proxy_shared_mode",
            "1 for the mode the quota state is in (local, shared, fallback).",
            labels=["mode"],
        )
        current = self._mode()
        for name in ("local", "shared", "fallback"):
            mode.add_metric([name], 1.0 if name == current else 0.0)
        yield from (count, depth, used, left, spacing, paused, moved_back, mode)


_SENT: Callable[[KeyQueue], int] = attrgetter("sent_today")
_QUEUED: Callable[[KeyQueue], int] = attrgetter("queued")
_BLOCKED: Callable[[KeyQueue], float | None] = attrgetter("blocked_until")
_SPACING: Callable[[KeyQueue], float] = attrgetter("spacing")
_PACED: Callable[[KeyQueue], float] = attrgetter("_paced")
_MOVED_BACK: Callable[[KeyQueue], int] = attrgetter("moved_back_misses")


@dataclass(frozen=True, slots=True)
class ConfiguredLimits:
    """The limits a dashboard or an alert compares the live figures with."""

    qps: float
    daily_quota: int
    max_wait: float


class _ActivityCollector(Collector):
    """Sends per key, the configured limits, the OAuth token state."""

    def __init__(
        self,
        history: History | None,
        limits: ConfiguredLimits | None,
        oauth: Callable[[], Mapping[str, object]] | None,
    ) -> None:
        self._history = history
        self._limits = limits
        self._oauth = oauth

    def collect(self) -> Iterator[Metric]:
        if self._history is not None:
            sends = CounterMetricFamily(
                "ctct_proxy_upstream_sends",
                "Requests let out of the queue to the upstream (replays included), per key; kept "
                "for the most recently active keys.",
                labels=["key"],
            )
            for key, sent, _, _ in self._history.totals():
                sends.add_metric([key], float(sent))
            yield sends
        if self._limits is not None:
            limits = self._limits
            yield GaugeMetricFamily(
                "ctct_proxy_qps_limit",
                "Configured requests per second per key (--qps).",
                value=limits.qps,
            )
            yield GaugeMetricFamily(
                "ctct_proxy_daily_quota",
                "Configured requests per key per UTC day (--daily-quota).",
                value=float(limits.daily_quota),
            )
            yield GaugeMetricFamily(
                "ctct_proxy_max_wait_seconds",
                "Configured longest wait in the queue (--max-wait).",
                value=limits.max_wait,
            )
        if self._oauth is not None:
            state = self._oauth()
            if state.get("kind") != "oauth":
                return
            yield CounterMetricFamily(
                "ctct_proxy_oauth_refresh_failures",
                "Failed OAuth access token refreshes since start.",
                value=_number(state.get("failures_total")),
            )
            yield GaugeMetricFamily(
                "ctct_proxy_oauth_refresh_failing",
                "Refreshes failed in a row, not yet followed by a success (0: fine).",
                value=_number(state.get("failures")),
            )
            expires_in = state.get("expires_in")
            yield GaugeMetricFamily(
                "ctct_proxy_oauth_token_expires_in_seconds",
                "Seconds until the current access token expires (0: none, or expired).",
                value=max(0.0, _number(expires_in)),
            )


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


class Metrics:
    """The proxy's metrics, in a registry of their own."""

    def __init__(
        self,
        engine: QuotaEngine,
        mode: Callable[[], str],
        *,
        history: History | None = None,
        limits: ConfiguredLimits | None = None,
        oauth: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ctct_proxy_requests",
            "Requests answered, by outcome (forwarded, replayed, throttled, refused, failed, "
            "abandoned; local for the proxy's own pages) and status.",
            ["outcome", "status"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "ctct_proxy_queue_wait_seconds",
            "Time requests spent queued.",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "ctct_proxy_upstream_latency_seconds",
            "Time from send to upstream response headers.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.quota_errors = Counter(
            "ctct_proxy_upstream_quota_errors",
            "Quota errors the upstream answered, by kind.",
            ["kind"],
            registry=r,
        )
        self.replays = Counter(
            "ctct_proxy_replays", "Requests replayed after a quota error.", registry=r
        )
        self.throttled = Counter(
            "ctct_proxy_throttled", "429 answers the proxy gave, by kind.", ["kind"], registry=r
        )
        self.client_sends = Counter(
            "ctct_proxy_client_sends",
            f"Sends to the upstream per client (its client token's name or User-Agent "
            f"fingerprint; the first {CLIENT_SERIES} clients, later ones as {OTHER_CLIENT}).",
            ["client"],
            registry=r,
        )
        self._client_children: dict[str, Counter] = {}
        r.register(_KeyCollector(engine, mode))
        r.register(_ActivityCollector(history, limits, oauth))
        # `.labels()` validates and locks on every call; the children are few, so keep them.
        self._request_children: dict[tuple[str, int], Counter] = {}

    def count_request(self, outcome: str, status: int) -> None:
        """Count one answered request."""
        child = self._request_children.get((outcome, status))
        if child is None:
            child = self._request_children[outcome, status] = self.requests.labels(
                outcome, str(status)
            )
        child.inc()

    def count_client_sends(self, client: str, sends: int) -> None:
        """Count a request's sends to the upstream for its client (bounded in clients)."""
        child = self._client_children.get(client)
        if child is None:
            if len(self._client_children) >= CLIENT_SERIES:
                client = OTHER_CLIENT
            child = self._client_children.get(client)
            if child is None:
                child = self._client_children[client] = self.client_sends.labels(client)
        child.inc(sends)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

"""Prometheus metrics: counters and histograms on the request path, per-key gauges at scrape.

Each app has its own registry, so several apps (tests, replicas in one process) never mix.
Per-key gauges are read from the quota engine when scraped rather than updated per request,
for the busiest `TOP_KEYS` keys and one aggregate of the rest: a scrape walks the keys once
and writes a bounded number of series, however many keys there are.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from proxy.quota import KeyQueue, QuotaEngine

_WAIT_BUCKETS = (0.005, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


# Per-key series for this many keys, the busiest (sent today plus queued now); the others are
# summed under key="other". Without client tokens every api_key a client invents is a key:
# exporting each would make a scrape's cost, and its size at Prometheus, grow with them.
TOP_KEYS = 50
OTHER = "other"


class _KeyCollector(Collector):
    def __init__(self, engine: QuotaEngine, mode: Callable[[], str]) -> None:
        self._engine = engine
        self._mode = mode

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        queues = list(engine.queues.values())
        count = GaugeMetricFamily(
            "ctct_proxy_keys",
            f"Keys with a queue; the {TOP_KEYS} busiest have per-key series, the others are "
            f'summed under key="{OTHER}".',
            value=len(queues),
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
        quota = engine.limits.daily_quota
        wall = engine.clock.time()
        top = heapq.nlargest(TOP_KEYS, queues, key=_traffic) if len(queues) > TOP_KEYS else queues
        for queue in top:
            key = [queue.fingerprint]
            depth.add_metric(key, queue.queued)
            used.add_metric(key, queue.sent_today)
            left.add_metric(key, max(0, quota - queue.sent_today))
            spacing.add_metric(key, round(queue.pace, 4))
            paused.add_metric(key, 1.0 if _paused(queue, wall) else 0.0)
        if len(top) < len(queues):
            shown = {id(queue) for queue in top}
            rest = [queue for queue in queues if id(queue) not in shown]
            key = [OTHER]
            depth.add_metric(key, sum(queue.queued for queue in rest))
            sent = sum(queue.sent_today for queue in rest)
            used.add_metric(key, sent)
            left.add_metric(key, sum(max(0, quota - queue.sent_today) for queue in rest))
            spacing.add_metric(key, round(max(queue.pace for queue in rest), 4))
            paused.add_metric(key, sum(1 for queue in rest if _paused(queue, wall)))
        mode = GaugeMetricFamily(
            "ctct_proxy_shared_mode",
            "1 for the mode the quota state is in (local, shared, fallback).",
            labels=["mode"],
        )
        current = self._mode()
        for name in ("local", "shared", "fallback"):
            mode.add_metric([name], 1.0 if name == current else 0.0)
        yield from (count, depth, used, left, spacing, paused, mode)


def _traffic(queue: KeyQueue) -> int:
    return queue.sent_today + queue.queued


def _paused(queue: KeyQueue, wall: float) -> bool:
    return queue.blocked_until is not None and queue.blocked_until > wall


class Metrics:
    """The proxy's metrics, in a registry of their own."""

    def __init__(self, engine: QuotaEngine, mode: Callable[[], str]) -> None:
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
        r.register(_KeyCollector(engine, mode))
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

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

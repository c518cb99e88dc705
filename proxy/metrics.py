"""Prometheus metrics: counters and histograms on the request path, per-key gauges at scrape.

Each app has its own registry, so several apps (tests, replicas in one process) never mix.
Per-key gauges are read from the quota engine when scraped rather than updated per request;
so are the per-key send counters (from the dashboard's history), the configured limits (for
dashboards and alerts to compare against) and the OAuth token state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.history import History

_WAIT_BUCKETS = (0.005, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Clients identified by User-Agent can be many: the first CLIENT_SERIES clients to send get a
# series of their own, any later one counts under OTHER_CLIENT (a counter never moves between
# series, so it stays monotonic). With client tokens, clients are the configured tokens.
CLIENT_SERIES = 20
OTHER_CLIENT = "other"


class _KeyCollector(Collector):
    def __init__(
        self, status: Callable[[], list[dict[str, object]]], mode: Callable[[], str]
    ) -> None:
        self._status = status
        self._mode = mode

    def collect(self) -> Iterator[Metric]:
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
            "ctct_proxy_spacing_seconds", "Current spacing between sends, per key.", labels=["key"]
        )
        paused = GaugeMetricFamily(
            "ctct_proxy_paused", "1 while a key is paused for its daily quota.", labels=["key"]
        )
        moved_back = CounterMetricFamily(
            "ctct_proxy_moved_back_misses",
            "Admitted requests answered 429 at their deadline after later arrivals (other "
            "clients' turns, more urgent lanes) went before them, per key.",
            labels=["key"],
        )
        for entry in self._status():
            key = str(entry["key"])
            depth.add_metric([key], float(entry["queued"]))  # type: ignore[arg-type]
            used.add_metric([key], float(entry["sent_today"]))  # type: ignore[arg-type]
            left.add_metric([key], float(entry["remaining_today"]))  # type: ignore[arg-type]
            spacing.add_metric([key], float(entry["spacing_seconds"]))  # type: ignore[arg-type]
            paused.add_metric([key], 1.0 if entry["paused_until"] else 0.0)
            moved_back.add_metric([key], float(entry["moved_back_misses"]))  # type: ignore[arg-type]
        mode = GaugeMetricFamily(
            "ctct_proxy_shared_mode",
            "1 for the mode the quota state is in (local, shared, fallback).",
            labels=["mode"],
        )
        current = self._mode()
        for name in ("local", "shared", "fallback"):
            mode.add_metric([name], 1.0 if name == current else 0.0)
        yield from (depth, used, left, spacing, paused, moved_back, mode)


@dataclass(frozen=True, slots=True)
class ConfiguredLimits:
    """The limits a dashboard or an alert compares the live figures with."""

    qps: float
    daily_quota: int
    max_wait: float


class _ActivityCollector(Collector):
    """Sends per key (and per named client), the configured limits, the OAuth token state."""

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
            clients = CounterMetricFamily(
                "ctct_proxy_client_sends",
                "Sends per key and named client (empty until the queues name clients).",
                labels=["key", "client"],
            )
            for key, client, sent in self._history.client_totals():
                clients.add_metric([key, client], float(sent))
            yield from (sends, clients)
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
        status: Callable[[], list[dict[str, object]]],
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
        r.register(_KeyCollector(status, mode))
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

"""The edge of the app: one place that turns errors into answers and writes the request line.

Every request gets a `RequestRecord`; whatever happens to it (answered, refused, throttled,
cut, abandoned) ends in `edge_middleware`, which renders the proxy's errors in Constant
Contact's shape and books the request with the `RequestLedger` (metrics and the one
`request_finished` line).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from proxy.credentials import redact, strip_params
from proxy.errors import AnswerCut, MethodNotAllowed, NotFound, ProxyError, Throttled, Unavailable
from proxy.logs import enabled_for, get_logger
from proxy.metrics import Metrics
from proxy.quota import DEFAULT_URGENCY, KeyQueue, next_reset
from proxy.state import STATE, AppState
from proxy.upstream_errors import Generation, QuotaKind

log = get_logger("proxy")

_SECRET_PARAMS = ("api_key", "access_token", "refresh_token", "client_secret", "code")
_JSON = "application/json"


@dataclass(slots=True)
class RequestRecord:
    """What the request_finished line says about one request."""

    request_id: str
    started: float
    method: str
    target: str  # as sent: made loggable (secrets out) only when the line is written
    generation: Generation = "v2"
    key: str | None = None
    wait_applied: int | None = None  # the `Prefer: wait` honoured (echoed in Preference-Applied)
    queue: KeyQueue | None = None
    client: str = ""  # the client's name in its key's fair order ("": not known yet)
    lane: int = DEFAULT_URGENCY  # its RFC 9218 urgency
    queued: float = 0.0
    upstream_status: int | None = None
    outcome: str = "forwarded"
    replays: int = 0  # sends repeated after a gateway quota rejection
    retries: int = 0  # sends repeated after a lost connection or a renewed token
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
                if record.client and record.latencies:
                    metrics.count_client_sends(record.client, len(record.latencies))
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
        "client": record.client or None,
        "lane": record.lane if record.client else None,
        "queued_ms": round(record.queued * 1000, 1),
        "upstream_status": record.upstream_status,
        "status": status,
        "outcome": record.outcome,
        "replays": record.replays,
        "retries": record.retries,
        "duration_ms": round(duration * 1000, 1),
    }


RECORD = web.RequestKey("record", RequestRecord)
# Set when `Expect: 100-continue` was refused: the body will never come, so the answer closes.
UNINVITED = web.RequestKey("uninvited", bool)
LEDGER = web.AppKey("ledger", RequestLedger)


def error_response(error: ProxyError, generation: Generation) -> web.Response:
    """A proxy error as an answer in Constant Contact's shape for the generation."""
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
    api = raw.startswith(("/v2/", "/v3/"))
    record = RequestRecord(
        request_id=request_id,
        started=time.monotonic(),
        method=request.method,
        target=raw,
        generation="v3" if raw.startswith("/v3/") else "v2",
        # /healthz, /readyz, /metrics, /status: answered here, never API traffic.
        outcome="forwarded" if api else "local",
    )
    request[RECORD] = record
    state = request.app.get(STATE)
    task = asyncio.current_task()
    if api and state is not None and task is not None:
        state.inflight.add(task)
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
    except AnswerCut as cut:
        record.outcome = cut.outcome
        log.warning("answer_cut", request_id=request_id, status=cut.seen_status, detail=cut.detail)
        # The client was told a status already: cut the connection (its HTTP library then
        # reports an incomplete body) and never write a second answer onto it.
        _cut(request)
        response = web.Response(status=cut.seen_status)
    except ProxyError as error:
        record.outcome = error.outcome
        if isinstance(error, Throttled):
            record.throttle_kind = error.kind
        response = error_response(error, record.generation)
    except web.HTTPNotFound:
        record.outcome = "refused"
        response = error_response(NotFound("Nothing is served at this path."), record.generation)
    except web.HTTPMethodNotAllowed:
        record.outcome = "refused"
        response = error_response(
            MethodNotAllowed("This method is not allowed here."), record.generation
        )
    except asyncio.CancelledError:
        if state is None or not state.ending or task is None or request.writer.output_size:
            record.outcome = "abandoned"
            raise
        # The shutdown grace is over and this request was still waiting on the upstream:
        # answer it now rather than leave the client with nothing.
        task.uncancel()
        record.outcome = "shutdown"
        response = error_response(
            Unavailable("The proxy is shutting down; retry shortly.", retry_after=1),
            record.generation,
        )
    except Exception as exc:  # the one catch-all: the process keeps serving, nothing leaks
        record.outcome = "failed"
        log.error("request_crashed", request_id=request_id, error=redact(repr(exc)))
        if request.writer.output_size:
            _cut(request)
        response = error_response(
            ProxyError("The proxy failed to handle this request."), record.generation
        )
    finally:
        if task is not None and state is not None:
            state.inflight.discard(task)
        status = response.status if response is not None else 499
        request.app[LEDGER].add(record, status, time.monotonic() - record.started)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
        if request.get(UNINVITED):
            response.force_close()
        if record.queue is not None and response.status == 429 and state is not None:
            response.headers.update(rate_headers(state, record.queue))
    return response


def _cut(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


def rate_headers(state: AppState, queue: KeyQueue) -> dict[str, str]:
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

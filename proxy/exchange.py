"""One request's exchange with the upstream, as a small state machine.

    arrive ──admission──▶ QUEUED ──slot──▶ SENDING ──answer──▶ classify ──▶ outcome
                            ▲                                             │
                            └────────── Requeue(reason), at the head ◀────┤
                                                                          ├─▶ Deliver ─▶ stream back
                                                                          └─▶ Fail ────▶ error answer

Each attempt takes a send slot from the key's queue, attaches the credentials current at
that moment (a token refreshed while the request queued is the one sent), sends once and
classifies the answer into exactly one outcome. Each requeue reason has its own side
effects and no other:

- `GATEWAY_QUOTA`: the gateway's documented per-second signal. The key backs off and is
  held on every replica; 429 with Retry-After when the deadline cannot be met.
- `CONNECTION_LOST`: the connection broke after the request may have been sent. An
  idempotent request is sent once more; the key's pacing is left alone (a network blip is
  not a quota signal). Otherwise, or a second time: 502.
- `TOKEN_RENEWED`: a 401 for the proxy's own OAuth token. The token is renewed and the
  request goes again from the head of the queue with the new one.

The upstream's response is released by the one context manager of its attempt.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.clients import client_name, urgency
from proxy.credentials import Outbound, fingerprint
from proxy.edge.fields import parse_wait_preference
from proxy.edge.limits import BodyBudget
from proxy.edge.middleware import RECORD, UNINVITED, RequestRecord, rate_headers
from proxy.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    ClientUnauthorized,
    ConnectionLost,
    ProxyError,
    Throttled,
    Unavailable,
)
from proxy.forward import (
    IDEMPOTENT,
    Target,
    check_method,
    check_target,
    outbound_headers,
    read_bounded,
    stream_back,
)
from proxy.logs import get_logger
from proxy.quota import KeyQueue, Ticket, next_reset
from proxy.reads import READS, WRITE_METHODS
from proxy.state import STATE, AppState
from proxy.upstream_errors import (
    QUOTA_BODY_LIMIT,
    QuotaKind,
    classify,
    error_key_for,
    parse_retry_after,
)

log = get_logger("proxy")
T = TypeVar("T")

# A request replayed this often after gateway quota rejections is answered 429: the gateway
# keeps refusing it, and a bounded loop is the only safe one.
MAX_REPLAYS = 8
# Past --body-timeout a body must keep averaging this rate: a slow link uploading a big file
# gets through, a client that holds a connection open by trickling bytes does not.
BODY_RATE_FLOOR = 16 * 1024


class Reason(enum.Enum):
    """Why an attempt goes back to the queue."""

    GATEWAY_QUOTA = "gateway_quota"
    CONNECTION_LOST = "connection_lost"
    TOKEN_RENEWED = "token_renewed"


@dataclass(frozen=True, slots=True)
class Deliver:
    """Stream this answer to the client (`prefix`: what was read of its body to classify it)."""

    response: aiohttp.ClientResponse
    prefix: bytes | None = None


@dataclass(frozen=True, slots=True)
class Requeue:
    """Send again from the head of the key's queue, with the side effects of `reason`."""

    reason: Reason
    error: ProxyError  # the answer when the request cannot be sent again
    retry_after: float | None = None  # the gateway's Retry-After (GATEWAY_QUOTA)


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer the client with an error; `pause_until` pauses the key first (daily quota)."""

    error: ProxyError
    pause_until: float | None = None


Outcome = Deliver | Requeue | Fail


class Attempt:
    """One send's outcome, and the upstream response it holds until the block ends."""

    __slots__ = ("outcome", "response")

    def __init__(self, outcome: Outcome, response: aiohttp.ClientResponse | None) -> None:
        self.outcome = outcome
        self.response = response

    async def __aenter__(self) -> Outcome:
        return self.outcome

    async def __aexit__(self, *_: object) -> None:
        if self.response is not None:
            self.response.release()


class Exchange:
    """A request admitted to its key's queue, and its attempts until one outcome ends it."""

    def __init__(
        self,
        state: AppState,
        request: web.Request,
        target: Target,
        queue: KeyQueue,
        arrival: Outbound,
        body: bytes,
        budget: float,
        token: str | None,
    ) -> None:
        self.state = state
        self.request = request
        self.record: RequestRecord = request[RECORD]
        self.target = target
        self.queue = queue
        self.body = body
        self.budget = budget
        self.clock = state.engine.clock
        self.tokens = state.tokens_for(target.generation)
        self.token = token  # the access token `arrival` was made with
        self.url = state.upstream.url(target, arrival.raw_query)
        self.headers: CIMultiDict[str] = outbound_headers(
            request.headers,
            arrival.authorization,
            self.record.request_id,
            request.remote,
            request.scheme,
        )
        state.injector.drop_client_tokens(self.headers)
        self.connection_retried = False
        self.renewed = False

    async def run(self) -> web.StreamResponse:
        """Queue, send, classify, until one attempt delivers or fails."""
        return await self.run_with(self._deliver)

    async def run_with(self, deliver: Callable[[Deliver], Awaitable[T]]) -> T:
        """`run`, handing the answer to `deliver` while it is open (proxy/reads.py shares it)."""
        queue = self.queue
        ticket = queue.admit(self.budget, self.record.client, self.record.lane)
        try:
            while True:
                await queue.wait(ticket)
                now = self.clock.monotonic()
                self.record.queued = now - ticket.enqueued
                self.record.waits.append(self.record.queued)
                async with await self._attempt(ticket) as outcome:
                    if isinstance(outcome, Deliver):
                        queue.sent_ok()
                        return await deliver(outcome)
                if isinstance(outcome, Fail):
                    if outcome.pause_until is not None:
                        await queue.pause_daily(outcome.pause_until)
                    raise outcome.error
                await self._requeue(ticket, outcome)
        finally:
            queue.leave(ticket)

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(self, ticket: Ticket) -> Attempt:
        """Send once with the credentials current now; the answer is released on leaving it."""
        token = await self.tokens.current()
        if token != self.token:
            # Renewed while queued (or after a 401): the request leaves with the new one.
            out = self.state.injector.outbound(
                self.target.generation,
                self.target.query,
                self.request.headers.get("Authorization"),
                token,
            )
            if out.authorization is not None:
                self.headers["Authorization"] = out.authorization
            self.url = self.state.upstream.url(self.target, out.raw_query)
            self.token = token
        response: aiohttp.ClientResponse | None = None
        sent = self.clock.monotonic()
        try:
            response = await self.state.upstream.send(
                self.request.method,
                self.url,
                self.headers,
                self.body,
                functools.partial(self.queue.departed, ticket),
            )
            self.record.latencies.append(self.clock.monotonic() - sent)
            self.record.upstream_status = response.status
            outcome = await self._classify(response, token)
        except ConnectionLost as lost:
            log.warning(
                "upstream_connection_lost", request_id=self.record.request_id, detail=lost.detail
            )
            outcome = Requeue(Reason.CONNECTION_LOST, lost)
        except ProxyError as error:
            outcome = Fail(error)
        return Attempt(outcome, response)

    async def _classify(self, response: aiohttp.ClientResponse, token: str | None) -> Outcome:
        """The one outcome an upstream answer leads to."""
        generation = self.target.generation
        status = response.status
        if status == 401 and generation == "v3" and token and not self.renewed:
            # Our token expired or was revoked early: renew it, send once more.
            fresh = await self.tokens.refresh_after_401(token)
            if fresh is not None:
                self.renewed = True
                return Requeue(
                    Reason.TOKEN_RENEWED,
                    Throttled(
                        "The proxy renewed its access token but the request could not be "
                        "sent again within its wait budget; retry shortly.",
                        retry_after=1,
                    ),
                )
            return Deliver(response)
        if status not in (403, 429):
            return Deliver(response)
        prefix = await read_bounded(response, QUOTA_BODY_LIMIT + 1)
        kind = classify(generation, status, response.headers, prefix, self.target.path)
        if kind is QuotaKind.NONE:
            return Deliver(response, prefix)
        error_key = error_key_for(kind, generation)
        self.state.metrics.quota_errors.labels(kind.value).inc()
        self.state.feed.rejected(self.queue.fingerprint)
        if kind is QuotaKind.DAILY:
            wall = self.clock.time()
            until = next_reset(wall, self.state.config.v2_reset_hour if generation == "v2" else 0)
            log.warning("upstream_daily_quota", key=self.record.key, paused_until=until)
            return Fail(
                Throttled(
                    "The daily quota for this API key is used up at the gateway; retry after "
                    f"{math.ceil(until - wall)} seconds.",
                    retry_after=until - wall,
                    kind=QuotaKind.DAILY,
                    error_key=error_key,
                ),
                pause_until=until,
            )
        log.info("upstream_over_qps", request_id=self.record.request_id, key=self.record.key)
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self.clock.time())
        over = Throttled(
            "This API key is over its per-second quota at the gateway; retry after "
            f"{math.ceil(max(1.0, retry_after or 1.0))} seconds.",
            retry_after=max(1.0, retry_after or 1.0),
            error_key=error_key,
        )
        if self.record.replays >= MAX_REPLAYS:
            return Fail(over)
        return Requeue(Reason.GATEWAY_QUOTA, over, retry_after)

    # -- the outcomes ------------------------------------------------------------------------

    async def _requeue(self, ticket: Ticket, outcome: Requeue) -> None:
        """Apply a requeue reason's side effects, or raise its error when it cannot go again."""
        queue, record = self.queue, self.record
        if outcome.reason is Reason.GATEWAY_QUOTA:
            await queue.replay(
                ticket, outcome.retry_after, outcome.error.key_for(self.target.generation)
            )
            record.replays += 1
            self.state.metrics.replays.inc()
            self.state.feed.replayed(queue.fingerprint)
            return
        if outcome.reason is Reason.CONNECTION_LOST:
            if self.request.method not in IDEMPOTENT or self.connection_retried:
                raise outcome.error
            self.connection_retried = True
        if not queue.retry(ticket):
            raise outcome.error
        record.retries += 1

    async def _deliver(self, outcome: Deliver) -> web.StreamResponse:
        return await stream_back(
            self.request,
            outcome.response,
            self.answer_fields(),
            outcome.prefix,
            self.state.upstream.bases,
        )

    def answer_fields(self) -> list[tuple[str, str]]:
        """The proxy's own fields on this request's answer (and the record's final outcome)."""
        state, record, queue = self.state, self.record, self.queue
        if record.outcome == "forwarded" and (record.replays or record.retries):
            record.outcome = "replayed"
        extra = [
            *rate_headers(state, queue).items(),
            ("X-Request-Id", record.request_id),
            ("Server-Timing", f"queue;dur={record.queued * 1000:.1f}"),
        ]
        if record.wait_applied is not None:
            extra.append(("Preference-Applied", f"wait={record.wait_applied}"))
        return extra


# -- admission: from an arriving request to an exchange ------------------------------------


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
    proxy_auth = headers_in.get("Proxy-Authorization")
    token_name = state.injector.client_of(target.query, client_auth, proxy_auth)
    if token_name is None and not state.injector.admits(target.query, client_auth, proxy_auth):
        raise ClientUnauthorized("A valid client token is required to use this proxy.")
    record.client = client_name(token_name, headers_in.get("User-Agent"), request.remote)
    record.lane = urgency(headers_in.get("Priority"))
    # The quota key is known from the credentials in effect now; the token itself is chosen
    # again when the request is sent.
    token = await state.tokens_for(target.generation).current()
    arrival = state.injector.outbound(target.generation, target.query, client_auth, token)
    record.key = fingerprint(arrival.quota_key)
    budget = float(state.config.max_wait)
    preferred = parse_wait_preference(headers_in.get("Prefer"))
    if preferred is not None and preferred <= budget:
        budget = float(preferred)
        record.wait_applied = preferred
    queue = await state.engine.load(arrival.quota_key)
    record.queue = queue
    reads = request.app[READS]
    read = reads.match(request, target, arrival)
    if read is not None:
        # A GET or HEAD that may share an answer: cached, in flight, or about to be (reads.py).
        return await reads.answer(
            read,
            request,
            queue,
            budget,
            lambda wait: Exchange(state, request, target, queue, arrival, b"", wait, token),
        )
    body = b""
    if request.body_exists:
        # Refuse before reading a body that could not be sent in time anyway.
        queue.check(budget, record.client, record.lane)
        body = await read_body(
            request, state.config.max_body, state.config.body_timeout, state.bodies
        )
    exchange = Exchange(state, request, target, queue, arrival, body, budget, token)
    if request.method in WRITE_METHODS:
        return await reads.writing(target, exchange.run())
    return await exchange.run()


async def read_body(request: web.Request, limit: int, grace: float, budget: BodyBudget) -> bytes:
    """The whole request body (kept for replays), bounded in size, in time and, across all
    requests, in memory (`budget`: 503 beyond it)."""
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


async def expect_continue(request: web.Request) -> None:
    """Answer `Expect: 100-continue`; other expectations are ignored (RFC 9110 allows it).

    aiohttp's default answers those with a plain-text 417 from outside the middleware.
    """
    expect = request.headers.get("Expect", "").strip().lower()
    if expect == "100-continue" and request.version == aiohttp.HttpVersion11:
        length = request.content_length
        if length is not None and length > request.app[STATE].config.max_body:
            # forward() answers 413 before reading a byte: inviting the upload would only
            # have the client send what is thrown away.
            request[UNINVITED] = True
            return
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # An interim answer: the real one has not started yet.
        request.writer.output_size = 0

"""Reads beyond the quota: identical concurrent GETs share one send, and a short opt-in cache.

    GET / HEAD ──match──▶ fresh in the cache? ──yes──▶ the stored answer (Age, Cache-Status: hit)
                               │ no
                               ▼
                     the same read in flight? ──yes──▶ join it: its answer (Cache-Status: collapsed)
                               │ no
                               ▼
                     lead a flight: one exchange, in a task of its own, whose answer it shares

Two reads are the same when everything that can change the upstream's answer is the same:
the API generation, the raw path, the query and the Authorization they leave with (so the
credentials in effect, whether the proxy's or, in pass-through mode, the client's own), the
quota key, `Accept` and `Accept-Encoding`. Clients with different credentials never share.

A flight's exchange runs in its own task so that no client leaving cancels the send for the
others; it is cancelled only when every client waiting for it has left. Its answer is kept in
memory (up to SHARED_BODY_LIMIT) only when someone can use it: a client that joined, or the
cache. Otherwise, or when it is larger, or carries Set-Cookie, the leader streams it as any
other answer and whoever joined sends on their own.

A write through the proxy (POST, PUT, PATCH, DELETE) drops the cached reads of its path and
of the parent collection, when it arrives and again when it is answered, and keeps reads
already in flight for those paths out of the cache and from new joiners.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.clock import Clock
from proxy.config import Config
from proxy.credentials import Outbound, redact
from proxy.edge.middleware import RECORD, RequestRecord, rate_headers
from proxy.errors import ProxyError, Unavailable
from proxy.forward import Target, read_bounded, relocate_fields, response_headers, stream_back
from proxy.logs import get_logger
from proxy.quota import KeyQueue
from proxy.state import STATE

if TYPE_CHECKING:
    from proxy.exchange import Deliver, Exchange

log = get_logger("proxy")

READ_METHODS = frozenset({"GET", "HEAD"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The most of one answer held in memory to share it; a larger one is streamed to its leader.
SHARED_BODY_LIMIT = 2 * 1024 * 1024
# What an entry costs beyond its body and headers (objects, index), counted against the limit.
ENTRY_OVERHEAD = 256
# The name this cache gives itself in Cache-Status (RFC 9211).
CACHE_NAME = "ctct-proxy"
# Requests whose answer depends on more than the key: conditional and partial reads go alone.
_CONDITIONAL = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "Range")
# Request fields the key already covers; an answer that varies on anything else is not stored.
_KEYED = frozenset({"accept", "accept-encoding", "authorization"})
# Upstream fields a shared answer does not repeat: each client gets its own.
_PER_CLIENT = frozenset({"x-request-id", "age"})
# An upstream Age beyond a day is not believed (a number from outside is bounded).
_MAX_UPSTREAM_AGE = 86_400


@dataclass(frozen=True, slots=True)
class Read:
    """A GET or HEAD that may share an answer: its key, the path it belongs to, what it allows."""

    key: bytes  # the same for GET and HEAD of one resource (a HEAD may use a stored GET)
    method: str
    place: tuple[str, str]  # (generation, path without a trailing slash): what writes drop
    lookup: bool  # may be answered from the cache
    store: bool  # its answer may be stored
    refresh: bool  # the client asked for a fresh answer (no-cache, max-age=0)
    max_age: float | None  # the client's max-age, when it allows stored answers at all


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream answer held in memory: status, the headers any client may see, the body."""

    status: int
    reason: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    length: int | None  # Content-Length to announce (a HEAD's answer has no body)
    received: float  # monotonic
    upstream_age: int

    @property
    def size(self) -> int:
        """Bytes this answer holds, for the cache's bound."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + ENTRY_OVERHEAD


@dataclass(frozen=True, slots=True)
class Handoff:
    """An answer not to share: the leader streams it from the open response."""

    response: aiohttp.ClientResponse
    prefix: bytes | None


@dataclass(slots=True)
class Entry:
    """One stored answer and when it stops being fresh."""

    answer: Answer
    place: tuple[str, str]
    stored: float
    expires: float


class ReadCache:
    """Stored GET answers: fresh for the TTL, bounded in bytes, least recently used out first."""

    def __init__(self, ttl: float, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        # One answer never takes more than a quarter of the cache.
        self.entry_limit = min(SHARED_BODY_LIMIT, max_bytes // 4)
        self.bytes = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._by_place: dict[tuple[str, str], set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Entry | None:
        """The fresh entry under `key`, if any (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, place: tuple[str, str], answer: Answer, now: float) -> bool:
        """Store an answer for the TTL; False when it is too large to keep."""
        size = answer.size
        if size > self.entry_limit:
            return False
        self._remove(key)
        self._entries[key] = Entry(answer, place, now, now + self.ttl)
        self._by_place.setdefault(place, set()).add(key)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
        return True

    def drop(self, place: tuple[str, str]) -> None:
        """Forget every answer stored for a path."""
        for key in self._by_place.pop(place, ()):
            self._remove(key)

    def purge(self, now: float) -> None:
        """Forget expired answers now (lookups drop them one at a time otherwise)."""
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            self._remove(key)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self._by_place.clear()
        self.bytes = 0

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= entry.answer.size
        keys = self._by_place.get(entry.place)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_place[entry.place]


class Flight:
    """One send that identical reads share, and the clients waiting for its answer."""

    __slots__ = (
        "abandoned",
        "deadline",
        "joined",
        "leader_done",
        "leader_waiting",
        "read",
        "result",
        "store",
        "stored",
        "task",
    )

    def __init__(self, read: Read, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        self.read = read
        self.deadline = deadline  # the leader's: the send comes by then, or a 429 does
        self.result: asyncio.Future[Answer | Handoff] = loop.create_future()
        self.task: asyncio.Task[None] | None = None
        self.joined = 0  # joiners still waiting
        self.leader_waiting = True
        # Resolved when the leader is done with the response (streamed it, or left).
        self.leader_done: asyncio.Future[None] = loop.create_future()
        self.store = read.store  # cleared when a write to its path comes through meanwhile
        self.stored = False
        self.abandoned = False  # called off: a read arriving now leads a new one

    @property
    def key(self) -> tuple[str, bytes]:
        return self.read.method, self.read.key

    async def wait(self, joiner: bool) -> Answer | Handoff:
        """The flight's answer; the last client to leave before it comes calls the send off."""
        if joiner:
            self.joined += 1
        try:
            return await asyncio.shield(self.result)
        finally:
            if joiner:
                self.joined -= 1
            elif not self.result.done():
                self.leader_waiting = False
            nobody = not self.joined and not self.leader_waiting
            if nobody and not self.result.done() and self.task is not None:
                self.abandoned = True
                self.task.cancel()

    def leader_left(self) -> None:
        """The leader has finished with the answer (or left): the response may be released."""
        self.leader_waiting = False
        if not self.leader_done.done():
            self.leader_done.set_result(None)

    def landed(self, task: asyncio.Task[None]) -> None:
        """The flight's task ended: whoever still waits learns how, if the answer never came."""
        error: BaseException | None
        if task.cancelled():
            # Called off because every client left, or because the app is stopping.
            error = Unavailable("The proxy is shutting down; retry shortly.", retry_after=1)
        else:
            error = task.exception()
        if self.result.done():
            if error is not None and not isinstance(error, ProxyError):
                log.error("read_flight_failed", error=redact(repr(error)))
            return
        if error is None:  # not reached: an exchange either delivers or raises
            error = ProxyError("The proxy failed to handle this request.")
        self.result.set_exception(error)
        # Marked as seen: when nobody waits any more, nobody is there to retrieve it.
        self.result.exception()


class Reads:
    """The coalescing table and the cache of one app, with what they saved."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.coalesce = config.coalesce
        self.cache = (
            ReadCache(config.cache_ttl, config.cache_max_bytes) if config.cache_ttl else None
        )
        self.clock = clock
        self.enabled = self.coalesce or self.cache is not None
        self.flights: dict[tuple[str, bytes], Flight] = {}  # the ones a read may join
        self.live: set[Flight] = set()  # every flight under way, for writes to reach
        self.saved: dict[str, int] = {"cached": 0, "coalesced": 0}
        self._counter: Counter | None = None

    # -- which requests ------------------------------------------------------------------------

    def match(self, request: web.Request, target: Target, arrival: Outbound) -> Read | None:
        """The read a request is, when it may share an answer; None for everything else."""
        method = request.method
        if not self.enabled or method not in READ_METHODS or request.body_exists:
            return None
        headers = request.headers
        if any(name in headers for name in _CONDITIONAL):
            return None
        control = _directives(headers.getall("Cache-Control", ()))
        if not control and "no-cache" in _directives(headers.getall("Pragma", ())):
            control = {"no-cache": ""}
        max_age = _seconds(control.get("max-age"))
        refresh = "no-cache" in control or max_age == 0
        no_store = "no-store" in control
        cache = self.cache is not None
        return Read(
            key=_identity(target, arrival, headers),
            method=method,
            place=_place(target.generation, target.path),
            lookup=cache and not refresh and not no_store,
            store=cache and method == "GET" and not no_store,
            refresh=refresh,
            max_age=max_age,
        )

    # -- answering a read ----------------------------------------------------------------------

    async def answer(
        self,
        read: Read,
        request: web.Request,
        queue: KeyQueue,
        budget: float,
        exchange_for: Callable[[float], Exchange],
    ) -> web.StreamResponse:
        """Answer a read from the cache, from a flight it joins, or by leading a new one.

        `exchange_for(budget)` makes this request's own exchange, for leading a flight or for
        sending alone.
        """
        now = self.clock.monotonic()
        if read.lookup and self.cache is not None:
            entry = self.cache.get(read.key, now)
            if entry is not None and (read.max_age is None or now - entry.stored <= read.max_age):
                return await self._from_cache(request, queue, entry, now)
        flight = self.flights.get((read.method, read.key)) if self.coalesce else None
        if flight is not None and not flight.abandoned:
            # Joined only when that send comes within this request's own wait budget: by the
            # leader's deadline, or because even the back of the queue would be sent in time.
            if flight.deadline <= now + budget or queue.predicted_wait() <= budget:
                return await self._join(flight, request, queue, budget, exchange_for, now)
            return await exchange_for(budget).run()  # 429 at once, as without coalescing
        if not self.coalesce and not read.store:
            return await exchange_for(budget).run()
        queue.check(budget)
        return await self._lead(read, request, budget, exchange_for(budget))

    async def _from_cache(
        self, request: web.Request, queue: KeyQueue, entry: Entry, now: float
    ) -> web.StreamResponse:
        record = request[RECORD]
        record.outcome = "cached"
        self._saved("cached")
        ttl = int(entry.expires - now)
        fields = self._fields(request, record, queue, entry.answer, now, 0.0)
        fields.append(("Cache-Status", f"{CACHE_NAME}; hit; ttl={ttl}"))
        return await write_back(request, entry.answer, fields)

    async def _join(
        self,
        flight: Flight,
        request: web.Request,
        queue: KeyQueue,
        budget: float,
        exchange_for: Callable[[float], Exchange],
        arrived: float,
    ) -> web.StreamResponse:
        result = await flight.wait(joiner=True)
        now = self.clock.monotonic()
        if isinstance(result, Handoff):
            # Too large (or not fit) to share: this one goes on its own, within its budget.
            return await exchange_for(max(0.0, budget - (now - arrived))).run()
        record = request[RECORD]
        record.outcome = "coalesced"
        record.queued = now - arrived
        self._saved("coalesced")
        fields = self._fields(request, record, queue, result, now, now - arrived)
        fields.append(("Cache-Status", f"{CACHE_NAME}; fwd=miss; collapsed"))
        return await write_back(request, result, fields)

    async def _lead(
        self, read: Read, request: web.Request, budget: float, exchange: Exchange
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        flight = Flight(read, self.clock.monotonic() + budget, loop)
        if self.coalesce:
            self.flights[flight.key] = flight
        self.live.add(flight)
        task = loop.create_task(self._fly(flight, exchange))
        flight.task = task
        task.add_done_callback(flight.landed)
        try:
            result = await flight.wait(joiner=False)
            fields = exchange.answer_fields()
            if self.cache is not None:
                how = "fwd=request" if read.refresh else "fwd=miss"
                stored = "; stored" if flight.stored else ""
                fields.append(("Cache-Status", f"{CACHE_NAME}; {how}{stored}"))
            if isinstance(result, Handoff):
                return await stream_back(
                    request,
                    result.response,
                    fields,
                    result.prefix,
                    request.app[STATE].upstream.bases,
                )
            return await write_back(request, result, fields)
        finally:
            flight.leader_left()

    async def _fly(self, flight: Flight, exchange: Exchange) -> None:
        try:
            await exchange.run_with(functools.partial(self._settle, flight))
        finally:
            self._detach(flight)
            self.live.discard(flight)

    async def _settle(self, flight: Flight, outcome: Deliver) -> None:
        """The flight's answer came: keep it to share and store, or hand it to the leader."""
        response = outcome.response
        shareable = "Set-Cookie" not in response.headers and "Set-Cookie2" not in response.headers
        store = flight.store and self.cache is not None and _storable(response)
        if shareable and (store or flight.joined):
            body = outcome.prefix or b""
            if not response.content.at_eof():
                body += await read_bounded(response, SHARED_BODY_LIMIT + 1 - len(body))
            if len(body) <= SHARED_BODY_LIMIT:
                now = self.clock.monotonic()
                answer = _held(response, body, now)
                # A write may have come through while the body was read.
                if store and flight.store and self.cache is not None:
                    flight.stored = self.cache.put(flight.read.key, flight.read.place, answer, now)
                self._detach(flight)
                flight.result.set_result(answer)
                return
            outcome_prefix: bytes | None = body
        else:
            outcome_prefix = outcome.prefix
        self._detach(flight)
        flight.result.set_result(Handoff(response, outcome_prefix))
        if flight.leader_waiting:
            # The response stays open (the attempt releases it) until the leader has it all.
            await flight.leader_done

    def _detach(self, flight: Flight) -> None:
        """No more joiners for this flight."""
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]

    def _fields(
        self,
        request: web.Request,
        record: RequestRecord,
        queue: KeyQueue,
        answer: Answer,
        now: float,
        waited: float,
    ) -> list[tuple[str, str]]:
        """A shared answer's own fields for one client: its request id, the key's rate, Age."""
        age = answer.upstream_age + int(now - answer.received)
        return [
            *rate_headers(request.app[STATE], queue).items(),
            ("X-Request-Id", record.request_id),
            ("Server-Timing", f"queue;dur={waited * 1000:.1f}"),
            ("Age", str(age)),
        ]

    def _saved(self, reason: str) -> None:
        self.saved[reason] += 1
        if self._counter is not None:
            self._counter.labels(reason).inc()

    # -- writes --------------------------------------------------------------------------------

    async def writing(
        self, target: Target, send: Awaitable[web.StreamResponse]
    ) -> web.StreamResponse:
        """Run a write's exchange, dropping what is known of its paths before and after it."""
        self.invalidate(target)
        try:
            return await send
        finally:
            self.invalidate(target)

    def invalidate(self, target: Target) -> None:
        """Forget the reads of a path and its parent collection; flights for them stop sharing."""
        cache = self.cache
        if not self.live and not cache:
            return
        places = _places_written(target)
        for flight in [f for f in self.live if f.read.place in places]:
            flight.store = False
            self._detach(flight)
        if cache is not None:
            for place in places:
                cache.drop(place)

    # -- operator views ------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """What /status shows: the settings, the cache's size, what was saved."""
        cache = self.cache
        if cache is not None:
            cache.purge(self.clock.monotonic())
        return {
            "coalesce": self.coalesce,
            "cache_ttl": cache.ttl if cache is not None else 0,
            "cache_entries": len(cache) if cache is not None else 0,
            "cache_bytes": cache.bytes if cache is not None else 0,
            "cache_max_bytes": cache.max_bytes if cache is not None else 0,
            "in_flight": len(self.flights),
            "sends_saved": dict(self.saved),
        }

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Count saved sends in the app's registry; cache size is read when scraped."""
        self._counter = Counter(
            "ctct_proxy_sends_saved",
            "Requests answered without a send of their own, by reason (cached, coalesced).",
            ["reason"],
            registry=registry,
        )
        for reason in self.saved:
            self._counter.labels(reason)
        registry.register(_CacheCollector(self))

    async def close(self) -> None:
        """Call off every flight still going (the app is stopping)."""
        tasks = [f.task for f in self.live if f.task is not None]
        self.flights.clear()
        for task in tasks:
            task.cancel()
        # Their errors, if any, have reached their clients already (Flight.landed).
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.cache is not None:
            self.cache.clear()


class _CacheCollector(Collector):
    def __init__(self, reads: Reads) -> None:
        self._reads = reads

    def collect(self) -> Iterator[Metric]:
        cache = self._reads.cache
        entries = GaugeMetricFamily("ctct_proxy_cache_entries", "Answers in the read cache.")
        size = GaugeMetricFamily("ctct_proxy_cache_bytes", "Bytes held by the read cache.")
        entries.add_metric([], float(len(cache)) if cache is not None else 0.0)
        size.add_metric([], float(cache.bytes) if cache is not None else 0.0)
        yield from (entries, size)


READS = web.AppKey("reads", Reads)


@contextlib.asynccontextmanager
async def reads_context(app: web.Application) -> AsyncIterator[None]:
    """The app's coalescing table and cache (after the request path: it uses its clock)."""
    state = app[STATE]
    reads = Reads(state.config, state.engine.clock)
    reads.register_metrics(state.metrics.registry)
    app[READS] = reads
    try:
        yield
    finally:
        await reads.close()


# -- answers held in memory --------------------------------------------------------------------


async def write_back(
    request: web.Request, answer: Answer, fields: Iterable[tuple[str, str]]
) -> web.StreamResponse:
    """Send a held answer to one client, with that client's own fields.

    Location fields pointing at an upstream are moved to the base this client used.
    """
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    headers = response.headers
    headers.extend(answer.headers)
    relocate_fields(headers, request.app[STATE].upstream.bases, request)
    headers.extend(fields)
    if answer.length is not None and answer.status not in (204, 304):
        response.content_length = answer.length
    await response.prepare(request)
    if request.method != "HEAD" and answer.body:
        await response.write(answer.body)
    await response.write_eof()
    return response


def _held(response: aiohttp.ClientResponse, body: bytes, now: float) -> Answer:
    headers = response_headers(response.headers)
    for name in _PER_CLIENT:
        headers.popall(name, None)
    if response.method == "HEAD":
        declared = response.headers.get("Content-Length")
        length = int(declared) if declared is not None and declared.isdigit() else None
    else:
        length = len(body)
    return Answer(
        status=response.status,
        reason=response.reason,
        headers=tuple(headers.items()),
        body=body,
        length=length,
        received=now,
        upstream_age=min(_seconds_int(response.headers.get("Age")), _MAX_UPSTREAM_AGE),
    )


def _storable(response: aiohttp.ClientResponse) -> bool:
    """A 200 that does not forbid storing, sets no cookie and varies only on what is keyed."""
    if response.status != 200 or response.method != "GET":
        return False
    headers: CIMultiDictProxy[str] = response.headers
    if "Set-Cookie" in headers or "Set-Cookie2" in headers:
        return False
    if "no-store" in _directives(headers.getall("Cache-Control", ())):
        return False
    for value in headers.getall("Vary", ()):
        for name in value.split(","):
            name = name.strip().lower()
            if name and name not in _KEYED:
                return False  # "*" included
    return True


# -- keys and places -----------------------------------------------------------------------------


def _identity(target: Target, arrival: Outbound, headers: CIMultiDictProxy[str]) -> bytes:
    """A digest of everything that can change the answer to a read (credentials included)."""
    digest = hashlib.blake2b(digest_size=20)
    parts: tuple[str | None, ...] = (
        target.generation,
        target.path,
        arrival.raw_query,
        arrival.authorization,
        arrival.quota_key,
        ",".join(headers.getall("Accept", ())),
        ",".join(headers.getall("Accept-Encoding", ())),
    )
    for part in parts:
        if part is None:
            digest.update(b"\xff\xff\xff\xff")
            continue
        data = part.encode("utf-8", "surrogatepass")
        # Length-prefixed: no two different sequences of parts hash the same bytes.
        digest.update(len(data).to_bytes(4, "big"))
        digest.update(data)
    return digest.digest()


def _place(generation: str, path: str) -> tuple[str, str]:
    return generation, path.rstrip("/") or path


def _places_written(target: Target) -> set[tuple[str, str]]:
    """A written path and its parent collection: `/v3/contacts/abc` and `/v3/contacts`."""
    generation, path = _place(target.generation, target.path)
    parent = path.rpartition("/")[0]
    return {(generation, path), (generation, parent)} if parent else {(generation, path)}


def _directives(values: Iterable[str]) -> dict[str, str]:
    """Cache-Control (or Pragma) directives, names lowercased, arguments unquoted."""
    found: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            name, _, argument = item.partition("=")
            name = name.strip().lower()
            if name:
                found[name] = argument.strip().strip('"')
    return found


def _seconds(text: str | None) -> float | None:
    if text is None or not text.isdigit() or len(text) > 10:
        return None
    return float(text)


def _seconds_int(text: str | None) -> int:
    value = _seconds(text.strip() if text else None)
    return int(value) if value is not None else 0

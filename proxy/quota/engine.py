"""Per-key queues that pace sends to the key's quota, with deadlines and a daily count.

The queue is the product's own idea: a fair order between the programs that share a key
(`fair.py`: lanes by urgency, clients in turn, FIFO within a client), a predicted wait for
every arrival, a place given up when the client leaves. What is shared between replicas
(the next free send slot, the day's count, pauses) sits behind `QuotaBackend`, so the Redis
backend replaces the in-process one without touching the request path.

Pacing model: sends of one key are spaced `(1 s + margin) / qps` apart, measured from the
previous actual send. Uniform spacing is what a rolling one-second window at the far end
needs: any qps + 1 consecutive arrivals then span more than a second as long as the spread
of network latency stays under the margin. A token bucket (e.g. `AsyncLimiter(4, 1)`) would
let a burst of qps through at once and up to 2·qps - 1 into one rolling second.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from proxy.clock import Clock, SystemClock
from proxy.credentials import fingerprint
from proxy.errors import Throttled, Unavailable, retry_after_seconds
from proxy.quota.backend import QuotaBackend, next_reset, utc_day
from proxy.quota.fair import DEFAULT_URGENCY, FairOrder, RecentSends, Ticket, TicketState
from proxy.upstream_errors import QuotaKind

# Each per-second rejection from the gateway multiplies the spacing by BACKOFF (up to
# MAX_BACKOFF times the configured spacing); each accepted send takes EASE of the excess
# back off. Fast up, slow down: a neighbour spending part of the key costs a few
# rejections, then the spacing settles just above what the neighbour leaves.
BACKOFF = 1.5
MAX_BACKOFF = 4.0
EASE = 0.005
# After CALM seconds without a rejection the neighbour has likely gone: ease EASE_CALM of the
# excess per send instead, so the key is back near full speed within a few dozen sends.
CALM = 60.0
EASE_CALM = 0.05
# A send this much later than its slot pushes the next slot back (the next send is spaced
# from the actual one, so a late send never squeezes the next).
LATE = 0.002
# A ticket whose deadline passed while its slot was due is still granted this much later.
DEFER_SLACK = 0.05
# A gateway's Retry-After on a per-second rejection holds the key at most this long: the
# per-second window is one second, and a number from outside is never trusted unbounded.
MAX_HOLD = 10.0
# Past this many keys' queues, idle ones are forgotten when a new key arrives.
MAX_QUEUES = 10_000
# Admission stretches a new arrival's place in the fair order by how far admitted requests
# were actually moved back by later arrivals (sends before them / sends predicted), averaged
# over recent grants with this weight, and bounded: later, more urgent arrivals are not
# foreseen, so a request admitted on the bare count would miss its deadline when they come.
STRETCH_WEIGHT = 1 / 64
MAX_STRETCH = 3.0
# /status lists at most this many clients per key (most queued first).
STATUS_CLIENTS = 50


@dataclass(frozen=True, slots=True)
class Limits:
    """The numbers the engine enforces for every key."""

    qps: float
    daily_quota: int
    max_queue: int
    pacing_margin: float

    @property
    def spacing(self) -> float:
        return (1.0 + self.pacing_margin) / self.qps


class KeyQueue:
    """The queue of one upstream API key (in a fair order) and the task that paces its sends."""

    def __init__(self, key: str, engine: QuotaEngine) -> None:
        self.fingerprint = fingerprint(key)
        self._engine = engine
        self._clock = engine.clock
        self._backend = engine.backend
        self._limits = engine.limits
        self._order = FairOrder()
        self.queued = 0
        self._seq = 0  # tickets admitted
        self._grants = 0  # slots handed to tickets
        self._last_granted_seq = 0  # the most recently admitted ticket granted so far
        # Sends that actually went before admitted tickets, and those predicted (see STRETCH_*).
        self._went_before = 1.0
        self._predicted = 1.0
        self.moved_back_misses = 0  # admitted, overtaken by later arrivals, then expired
        self._recent = RecentSends()
        self.spacing = self._limits.spacing
        self._next_free = 0.0  # monotonic: our estimate of the next free slot
        # The backend's own spacing for our last slot, when it paced wider than we asked.
        self._paced = 0.0
        self.sent_today = 0
        self.sent_day = utc_day(self._clock.time())  # the UTC day sent_today counts
        self.blocked_until: float | None = None  # epoch
        self.blocked_kind = QuotaKind.NONE
        self._pump: asyncio.Task[None] | None = None
        self._holding = 0  # 1 while the pump holds a reserved slot for the head
        # Monotonic time before which nothing of this key may go (a gateway rejection's hold);
        # it also delays a slot the pump had already reserved when the rejection came back.
        self._not_before = 0.0
        self._last_rejection = -math.inf

    # -- admission -------------------------------------------------------------------------

    def predicted_wait(self, position: float | None = None) -> float:
        """Seconds until a request with `position` sends before it (default: all queued) goes."""
        ahead = self.queued if position is None else position
        return max(0.0, self._next_free - self._clock.monotonic()) + ahead * self.pace

    def place(self, client: str = "", lane: int = DEFAULT_URGENCY) -> tuple[int, float]:
        """A new request's place in the fair order (sends before it), and its predicted wait.

        The wait stretches the place by how far admitted requests have lately been moved
        back by later arrivals (at least 1x, at most MAX_STRETCH): one client alone, never.
        """
        ahead = self._order.ahead(client, lane)
        stretch = min(MAX_STRETCH, max(1.0, self._went_before / self._predicted))
        return ahead, self.predicted_wait(ahead * stretch)

    @property
    def pace(self) -> float:
        """Seconds between this key's sends now: `spacing`, or the backend's wider share of it."""
        return max(self.spacing, self._paced)

    def check(self, budget: float, client: str = "", lane: int = DEFAULT_URGENCY) -> int:
        """Raise Throttled if a request that may wait `budget` seconds would be refused now.

        Returns its place in the fair order (sends before it) when it would be admitted.
        """
        clock, limits = self._clock, self._limits
        wall = clock.time()
        if self.blocked_until is not None:
            if self.blocked_until > wall:
                raise self._blocked_error(wall)
            self.blocked_until = None
        if utc_day(wall) != self.sent_day:
            self.sent_today, self.sent_day = 0, utc_day(wall)
        # The head's slot is already counted in sent_today while it waits for it.
        if self.sent_today + self.queued - self._holding >= limits.daily_quota:
            reset = next_reset(wall)
            raise Throttled(
                f"The daily quota of {limits.daily_quota} requests for this API key is used up; "
                f"it resets at 00:00 UTC, retry after {_seconds(reset - wall)} seconds.",
                retry_after=reset - wall,
                kind=QuotaKind.DAILY,
            )
        ahead, wait = self.place(client, lane)
        if self.queued >= limits.max_queue:
            raise Throttled(
                f"The queue for this API key is full ({limits.max_queue} requests); "
                f"retry after {_seconds(wait)} seconds.",
                retry_after=wait,
            )
        if wait > budget:
            raise Throttled(
                f"This API key is at its limit of {limits.qps:g} requests per second; the wait "
                f"would be {_seconds(wait)} seconds, longer than allowed ({budget:g} s). "
                f"Retry after {_seconds(wait)} seconds.",
                retry_after=wait,
            )
        return ahead

    def admit(self, budget: float, client: str = "", lane: int = DEFAULT_URGENCY) -> Ticket:
        """Queue a request of `client` in `lane` that may wait `budget` seconds.

        Raises Throttled at once when its place in the fair order cannot be reached in time.
        """
        ahead = self.check(budget, client, lane)
        clock = self._clock
        now = clock.monotonic()
        loop = asyncio.get_running_loop()
        self._seq += 1
        ticket = Ticket(
            loop.create_future(),
            deadline=now + budget,
            enqueued=now,
            client=client,
            lane=lane,
            seq=self._seq,
            ahead=ahead,
            grants_at=self._grants,
        )
        ticket.timer = clock.call_later(budget, lambda: self._expire(ticket))
        self._order.push(ticket)
        self.queued += 1
        self._ensure_pump(loop)
        return ticket

    async def wait(self, ticket: Ticket) -> None:
        """Return when the ticket may be sent; raise Throttled if its deadline passes first.

        A cancelled wait (the client disconnected) gives the place up: it is never sent.
        """
        try:
            await ticket.future
        except asyncio.CancelledError:
            self.leave(ticket)
            raise

    def leave(self, ticket: Ticket) -> None:
        """Give up a ticket's place (client gone, or answered otherwise)."""
        if ticket.state is TicketState.QUEUED:
            ticket.state = TicketState.GONE
            self.queued -= 1
            self._order.remove(ticket)
        if ticket.timer is not None:
            ticket.timer.cancel()
            ticket.timer = None

    def _expire(self, ticket: Ticket) -> None:
        if ticket.state is not TicketState.QUEUED or ticket.future.done():
            return
        if self._order.peek() is ticket and self.predicted_wait(0) <= LATE and not ticket.deferred:
            # The slot is free now and this ticket is next: the pump may simply not have run
            # yet (a `Prefer: wait=0` budget expires at once). Let the pump decide: it grants
            # the ticket if it gets there within DEFER_SLACK of the deadline, else expires it.
            ticket.deferred = True
            return
        self.throttle_expired(ticket)

    def throttle_expired(self, ticket: Ticket) -> None:
        """Answer a ticket whose wait budget ran out 429 (with the wait a new request faces)."""
        self.leave(ticket)
        wait = self.predicted_wait(0)
        # Overtaken: a request admitted after it was sent before it (another client's turn,
        # a more urgent lane). Counted, and said, so that admission's promises can be checked.
        moved_back = self._last_granted_seq > ticket.seq
        if moved_back:
            self.moved_back_misses += 1
        why = " and requests of other clients went first," if moved_back else ""
        ticket.future.set_exception(
            Throttled(
                f"This API key is at its limit of {self._limits.qps:g} requests per second{why} "
                f"and the request could not be sent within its wait budget; retry after "
                f"{_seconds(wait)} seconds.",
                retry_after=wait,
            )
        )

    def _blocked_error(self, wall: float) -> Throttled:
        until = self.blocked_until or wall
        return Throttled(
            "The daily quota for this API key is used up; it resets at "
            f"{datetime.fromtimestamp(until, UTC):%Y-%m-%d %H:%M} UTC, "
            f"retry after {_seconds(until - wall)} seconds.",
            retry_after=until - wall,
            kind=QuotaKind.DAILY,
        )

    # -- feedback from the upstream --------------------------------------------------------

    async def departed(self, ticket: Ticket) -> None:
        """The ticket's request has just left for the upstream (its headers are written).

        A send that leaves later than its slot (a new connection to open, a TLS handshake, a
        busy loop) would arrive bunched with the next one: space the next send from this
        actual departure, as the pacing model says, on every replica.
        """
        granted = ticket.granted_at
        if granted is None:
            return
        now = self._clock.monotonic()
        if now - granted <= LATE:
            return
        pace = self.pace
        self._not_before = max(self._not_before, now + pace)
        self._next_free = max(self._next_free, now + pace)
        await self._backend.hold(self.fingerprint, pace)

    def sent_ok(self) -> None:
        """An accepted send: ease the spacing back toward the configured one."""
        base = self._limits.spacing
        if self.spacing > base:
            calm = self._clock.monotonic() - self._last_rejection > CALM
            ease = EASE_CALM if calm else EASE
            self.spacing = max(base, self.spacing - (self.spacing - base) * ease)

    async def replay(self, ticket: Ticket, retry_after: float | None, error_key: str) -> None:
        """Put a ticket the gateway rejected for per-second quota back at the head.

        Backs the key's spacing off and holds its next send (on every replica), for at most
        MAX_HOLD seconds whatever the upstream's Retry-After says; raises Throttled (keeping
        the upstream's error key) when the ticket's deadline cannot be met.
        """
        self.spacing = min(self.spacing * BACKOFF, self._limits.spacing * MAX_BACKOFF)
        hold = min(max(retry_after or 0.0, self.spacing), MAX_HOLD)
        now = self._clock.monotonic()
        self._last_rejection = now
        self._not_before = max(self._not_before, now + hold)
        self._next_free = max(self._next_free, now + hold)
        await self._backend.hold(self.fingerprint, hold)
        if now + hold > ticket.deadline:
            self.leave(ticket)
            raise Throttled(
                f"This API key is over its per-second quota at the gateway; retry after "
                f"{_seconds(hold)} seconds.",
                retry_after=hold,
                error_key=error_key,
            )
        ticket.replays += 1
        self._requeue_at_head(ticket)

    def retry(self, ticket: Ticket) -> bool:
        """Put a sent ticket back at the head without touching the key's pacing.

        For a send that told nothing about the quota (a lost connection, a renewed token):
        the key's spacing and holds stay as they are. False, and the ticket is given up, when
        the next slot would come after its deadline.
        """
        if self._clock.monotonic() + self.predicted_wait(0) > ticket.deadline:
            self.leave(ticket)
            return False
        self._requeue_at_head(ticket)
        return True

    def _requeue_at_head(self, ticket: Ticket) -> None:
        # At the head of its client's FIFO, and ahead of every other client: it had its turn.
        ticket.state = TicketState.QUEUED
        ticket.future = asyncio.get_running_loop().create_future()
        self._order.push_again(ticket)
        self.queued += 1
        self._ensure_pump()

    async def pause_daily(self, until: float) -> None:
        """The gateway says the day's quota is spent: refuse this key until `until`."""
        await self._backend.pause(self.fingerprint, until)
        self._block(until, QuotaKind.DAILY)

    def _block(self, until: float, kind: QuotaKind) -> None:
        self.blocked_until, self.blocked_kind = until, kind
        wall = self._clock.time()
        self.reject_all(lambda: self._blocked_error(wall))

    def reject_all(self, error: Callable[[], Exception]) -> None:
        """Answer every queued request with an error (daily pause, shutdown)."""
        for ticket in list(self._order.drain()):
            ticket.state = TicketState.GONE
            self.queued -= 1
            if ticket.timer is not None:
                ticket.timer.cancel()
                ticket.timer = None
            if not ticket.future.done():
                ticket.future.set_exception(error())

    # -- the pump --------------------------------------------------------------------------

    def _ensure_pump(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._pump is None or self._pump.done():
            loop = loop or asyncio.get_running_loop()
            self._pump = loop.create_task(self._run())

    async def _run(self) -> None:
        clock, backend, key = self._clock, self._backend, self.fingerprint
        order = self._order
        while order.peek() is not None:
            spacing = self.spacing
            reservation = await backend.reserve(key, spacing, self._limits.daily_quota)
            self.sent_today, self.sent_day = reservation.sent_today, utc_day(clock.time())
            if reservation.blocked_until is not None:
                self._block(reservation.blocked_until, reservation.kind)
                continue
            slot_at = clock.monotonic() + reservation.delay
            self._paced = reservation.spacing
            self._next_free = slot_at + max(spacing, reservation.spacing)
            self._holding = 1
            try:
                if reservation.delay > 0:
                    await clock.sleep(reservation.delay)
                while (held := self._not_before - clock.monotonic()) > 0:
                    await clock.sleep(held)
            except asyncio.CancelledError:
                # Shutting down mid-wait: the slot was counted toward today but never used.
                await backend.give_back(key, reservation, spacing)
                raise
            finally:
                self._holding = 0
            ticket = order.peek()
            if ticket is None:
                await backend.give_back(key, reservation, spacing)
                self.sent_today = max(0, self.sent_today - 1)
                break
            now = clock.monotonic()
            if ticket.deferred and now > ticket.deadline + DEFER_SLACK:
                # Its slot came later than it looked when the deadline passed: 429, and the
                # reserved slot goes to the next ticket.
                self.throttle_expired(ticket)
                await backend.give_back(key, reservation, spacing)
                continue
            order.pop()
            self.queued -= 1
            ticket.state = TicketState.GRANTED
            ticket.granted_at = now
            self._granted(ticket, now)
            ticket.future.set_result(None)
            if self._engine.on_grant is not None:
                self._engine.on_grant(key, now - ticket.enqueued, ticket.client or None)
            if now - slot_at > LATE:
                # Late (the loop was busy, or a rejection's hold came in): space the next send
                # from this one, at the spacing in force now.
                self._next_free = now + self.pace
                await backend.hold(key, self.spacing)

    def _granted(self, ticket: Ticket, now: float) -> None:
        """Book a grant: the client's share, and how far the ticket was moved back."""
        if ticket.ahead >= 0:  # its first grant: compare with what admission predicted
            went_before = self._grants - ticket.grants_at
            keep = 1.0 - STRETCH_WEIGHT
            self._went_before = self._went_before * keep + (went_before + 1) * STRETCH_WEIGHT
            self._predicted = self._predicted * keep + (ticket.ahead + 1) * STRETCH_WEIGHT
            ticket.ahead = -1
        self._grants += 1
        self._last_granted_seq = max(self._last_granted_seq, ticket.seq)
        self._recent.add(ticket.client, now)

    def idle(self, wall: float) -> bool:
        """Nothing queued, nothing being paced, no pause in force."""
        return (
            self.queued == 0
            and (self._pump is None or self._pump.done())
            and (self.blocked_until is None or self.blocked_until <= wall)
        )

    def cancel_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()

    def status(self) -> dict[str, object]:
        """What /status shows of this key (fingerprint only)."""
        wall = self._clock.time()
        paused = self.blocked_until if self.blocked_until and self.blocked_until > wall else None
        return {
            "key": self.fingerprint,
            "queued": self.queued,
            "spacing_seconds": round(self.pace, 4),
            "sent_today": self.sent_today,
            "remaining_today": max(0, self._limits.daily_quota - self.sent_today),
            "next_reset": _iso(next_reset(wall)),
            "paused_until": _iso(paused) if paused else None,
            "lanes": {str(u): n for u, n in self._order.lanes().items()},
            "moved_back_misses": self.moved_back_misses,
            "clients": self.clients_status(),
        }

    def client_lanes(self) -> dict[str, int]:
        """The most urgent lane each client with something queued waits in."""
        return self._order.client_lanes()

    def clients_status(self, limit: int = STATUS_CLIENTS) -> list[dict[str, object]]:
        """The clients with something queued or sent in the last minute, most queued first.

        Each: its name (a client token's name or a fingerprint, never a secret), requests
        queued, sends in the last minute and their share of this key's sends (this replica).
        """
        depths = self._order.depths()
        sent = self._recent.counts(self._clock.monotonic())
        total = sum(sent.values())
        names = sorted(set(depths) | set(sent), key=lambda c: (-depths[c], -sent[c], c))
        return [
            {
                "client": name,
                "queued": depths[name],
                "sent_last_minute": sent[name],
                "share_last_minute": round(sent[name] / total, 3) if total else 0.0,
            }
            for name in names[:limit]
        ]


@dataclass
class QuotaEngine:
    """All keys' queues, their shared limits, and the backend that holds their state."""

    limits: Limits
    backend: QuotaBackend
    clock: Clock = field(default_factory=SystemClock)
    queues: dict[str, KeyQueue] = field(default_factory=dict)
    # Told (key fingerprint, seconds queued, client name) each time a request is let go.
    on_grant: Callable[[str, float, str | None], None] | None = None

    def queue_for(self, key: str) -> KeyQueue:
        """The queue of an upstream API key (created on first use)."""
        queue = self.queues.get(key)
        if queue is None:
            if len(self.queues) >= MAX_QUEUES:
                self._forget_idle()
            queue = self.queues[key] = KeyQueue(key, self)
        return queue

    def _forget_idle(self) -> None:
        # Without client tokens, any api_key a client sends names a queue: keep only the busy
        # ones once there are many. The day's count stays in the backend and is read back
        # (`load`) if the key returns; only an idle key's backed-off spacing is forgotten.
        wall = self.clock.time()
        for key, queue in list(self.queues.items()):
            if queue.idle(wall):
                del self.queues[key]

    async def load(self, key: str) -> KeyQueue:
        """The queue of a key, with its day's count read from the backend."""
        queue = self.queue_for(key)
        if queue.sent_today == 0 and queue.blocked_until is None:
            usage = await self.backend.usage(queue.fingerprint)
            queue.sent_today, queue.sent_day = usage.sent_today, utc_day(self.clock.time())
            if usage.paused_until:
                queue.blocked_until, queue.blocked_kind = usage.paused_until, QuotaKind.DAILY
        return queue

    def shutdown(self, retry_after: float) -> None:
        """Answer every queued request 503 and stop the pumps."""
        for queue in self.queues.values():
            queue.reject_all(
                lambda: Unavailable(
                    "The proxy is shutting down; retry shortly.", retry_after=retry_after
                )
            )
            queue.cancel_pump()

    def status(self) -> list[dict[str, object]]:
        """Per-key state for /status."""
        return [q.status() for q in self.queues.values()]


_seconds = retry_after_seconds


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")

"""Per-key FIFO queues that pace sends to the key's quota, with deadlines and a daily count.

The queue is the product's own idea: strict FIFO, a predicted wait for every arrival, a
place given up when the client leaves. What is shared between replicas (the next free send
slot, the day's count, pauses) sits behind `QuotaBackend`, so the Redis backend replaces
the in-process one without touching the request path.

Pacing model: sends of one key are spaced `(1 s + margin) / qps` apart, measured from the
previous actual send. Uniform spacing is what a rolling one-second window at the far end
needs: any qps + 1 consecutive arrivals then span more than a second as long as the spread
of network latency stays under the margin. A token bucket (e.g. `AsyncLimiter(4, 1)`) would
let a burst of qps through at once and up to 2·qps - 1 into one rolling second.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from proxy.credentials import fingerprint
from proxy.errors import Throttled, Unavailable, retry_after_seconds
from proxy.upstream_errors import QuotaKind

DAY = 86_400.0
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
FLUSH_INTERVAL = 0.5
# Past this many keys' queues, idle ones are forgotten when a new key arrives.
MAX_QUEUES = 10_000


class Clock(Protocol):
    """Time as the quota engine sees it; tests substitute a controllable one."""

    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle: ...


class SystemClock:
    """The real clocks: `time.monotonic` for pacing, `time.time` for UTC days."""

    # The functions themselves, not methods wrapping them: read several times per request.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)


def next_reset(wall: float, hour: int = 0) -> float:
    """The next daily reset at `hour`:00 UTC after `wall` (epoch seconds)."""
    offset = hour * 3600.0
    return (((wall - offset) // DAY) + 1) * DAY + offset


def utc_day(wall: float) -> int:
    """The UTC day number of an epoch time."""
    return int(wall // DAY)


@dataclass(slots=True)
class Reservation:
    """A send slot handed out by a backend, or the reason there is none."""

    delay: float
    slot: float = 0.0
    sent_today: int = 0
    blocked_until: float | None = None  # epoch seconds; set when paused or out of daily quota
    kind: QuotaKind = QuotaKind.NONE
    # The spacing the backend paced this slot at, when wider than the one asked for (a
    # replica pacing alone at its share of the key while Redis is away); 0: as asked.
    spacing: float = 0.0


@dataclass(slots=True)
class Usage:
    """What a backend knows of a key's day."""

    sent_today: int
    paused_until: float | None


class QuotaBackend(Protocol):
    """The shared state of a key's quota: send slots, the day's count and pauses.

    Keys are fingerprints, never secrets. Each call is one atomic decision.
    """

    async def reserve(self, key: str, spacing: float, daily_quota: int) -> Reservation:
        """Take the next free send slot and count it toward today, or say why not."""
        ...

    async def give_back(self, key: str, reservation: Reservation, spacing: float) -> None:
        """Return a slot (and its count) that no request used."""
        ...

    async def hold(self, key: str, seconds: float) -> None:
        """Let no send of this key go before `seconds` from now."""
        ...

    async def pause(self, key: str, until: float) -> None:
        """Let no send of this key go before the epoch time `until` (a daily-quota pause)."""
        ...

    async def usage(self, key: str) -> Usage:
        """The key's count today and its pause, if any."""
        ...


@dataclass(slots=True)
class _LocalKey:
    next_free: float = 0.0
    day: int = 0
    sent: int = 0
    paused_until: float = 0.0


class LocalBackend:
    """Quota state in this process, with the daily counts persisted under the state dir.

    Counts are written atomically (temp file + rename) at most every FLUSH_INTERVAL, so a
    `kill -9` forgets at most the sends of that last interval.
    """

    def __init__(self, clock: Clock, state_file: Path | None = None) -> None:
        self._clock = clock
        self._keys: dict[str, _LocalKey] = {}
        self._state_file = state_file
        self._dirty = False
        if state_file is not None:
            self._load(state_file)

    def _key(self, key: str) -> _LocalKey:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _LocalKey(day=utc_day(self._clock.time()))
        day = utc_day(self._clock.time())
        if state.day != day:
            state.day, state.sent = day, 0
        return state

    async def reserve(self, key: str, spacing: float, daily_quota: int) -> Reservation:
        state = self._key(key)
        wall = self._clock.time()
        if state.paused_until > wall:
            return Reservation(
                0.0, sent_today=state.sent, blocked_until=state.paused_until, kind=QuotaKind.DAILY
            )
        if state.sent >= daily_quota:
            return Reservation(
                0.0, sent_today=state.sent, blocked_until=next_reset(wall), kind=QuotaKind.DAILY
            )
        now = self._clock.monotonic()
        slot = max(now, state.next_free)
        state.next_free = slot + spacing
        state.sent += 1
        self._dirty = True
        return Reservation(slot - now, slot=slot, sent_today=state.sent)

    async def give_back(self, key: str, reservation: Reservation, spacing: float) -> None:
        state = self._key(key)
        if abs(state.next_free - (reservation.slot + spacing)) < 1e-9:
            state.next_free = reservation.slot
        state.sent = max(0, state.sent - 1)
        self._dirty = True

    async def hold(self, key: str, seconds: float) -> None:
        state = self._key(key)
        state.next_free = max(state.next_free, self._clock.monotonic() + seconds)

    async def pause(self, key: str, until: float) -> None:
        state = self._key(key)
        state.paused_until = max(state.paused_until, until)
        self._dirty = True

    async def usage(self, key: str) -> Usage:
        state = self._key(key)
        paused = state.paused_until if state.paused_until > self._clock.time() else None
        return Usage(state.sent, paused)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            # A torn or foreign file: start the day's counts afresh rather than refuse to start.
            return
        today = utc_day(self._clock.time())
        for key, entry in data.get("keys", {}).items():
            if entry.get("day") == today:
                self._keys[key] = _LocalKey(
                    day=today,
                    sent=int(entry.get("sent", 0)),
                    paused_until=float(entry.get("paused_until", 0.0)),
                )

    def flush(self) -> None:
        """Write the counts to the state file if they changed (atomically)."""
        if self._state_file is None or not self._dirty:
            return
        self._dirty = False
        # Keys last seen on an earlier day, with no pause in force, hold nothing worth keeping
        # (their count restarts at 0): forget them, in memory and on disk.
        wall = self._clock.time()
        today = utc_day(wall)
        for key in [k for k, s in self._keys.items() if s.day != today and s.paused_until <= wall]:
            del self._keys[key]
        payload = {
            "keys": {
                key: {"day": s.day, "sent": s.sent, "paused_until": s.paused_until}
                for key, s in self._keys.items()
            }
        }
        directory = self._state_file.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".daily-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh)
            os.replace(tmp, self._state_file)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._dirty = True
            raise


class TicketState(enum.Enum):
    QUEUED = "queued"
    GRANTED = "granted"
    GONE = "gone"


@dataclass(slots=True, eq=False)
class Ticket:
    """One request's place in its key's queue."""

    future: asyncio.Future[None]
    deadline: float
    enqueued: float
    state: TicketState = TicketState.QUEUED
    timer: asyncio.TimerHandle | None = None
    granted_at: float | None = None
    replays: int = 0


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
    """The FIFO queue of one upstream API key and the task that paces its sends."""

    def __init__(self, key: str, engine: QuotaEngine) -> None:
        self.fingerprint = fingerprint(key)
        self._engine = engine
        self._clock = engine.clock
        self._backend = engine.backend
        self._limits = engine.limits
        self._tickets: deque[Ticket] = deque()
        self.queued = 0
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

    def predicted_wait(self, position: int | None = None) -> float:
        """Seconds until a request at `position` (default: the back) would be sent."""
        ahead = self.queued if position is None else position
        return max(0.0, self._next_free - self._clock.monotonic()) + ahead * self.pace

    @property
    def pace(self) -> float:
        """Seconds between this key's sends now: `spacing`, or the backend's wider share of it."""
        return max(self.spacing, self._paced)

    def admit(self, budget: float) -> Ticket:
        """Queue a request that may wait `budget` seconds, or raise Throttled at once."""
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
        wait = self.predicted_wait()
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
        now = clock.monotonic()
        loop = asyncio.get_running_loop()
        ticket = Ticket(loop.create_future(), deadline=now + budget, enqueued=now)
        ticket.timer = clock.call_later(budget, lambda: self._expire(ticket))
        self._tickets.append(ticket)
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
        if ticket.timer is not None:
            ticket.timer.cancel()
            ticket.timer = None

    def _expire(self, ticket: Ticket) -> None:
        if ticket.state is not TicketState.QUEUED or ticket.future.done():
            return
        self.leave(ticket)
        wait = self.predicted_wait(0)
        ticket.future.set_exception(
            Throttled(
                f"This API key is at its limit of {self._limits.qps:g} requests per second and "
                f"the request could not be sent within its wait budget; retry after "
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

    def sent_ok(self) -> None:
        """An accepted send: ease the spacing back toward the configured one."""
        base = self._limits.spacing
        if self.spacing > base:
            calm = self._clock.monotonic() - self._last_rejection > CALM
            ease = EASE_CALM if calm else EASE
            self.spacing = max(base, self.spacing - (self.spacing - base) * ease)

    async def replay(self, ticket: Ticket, retry_after: float | None, error_key: str) -> None:
        """Put a ticket the gateway rejected for per-second quota back at the head.

        Backs the key's spacing off and holds its next send; raises Throttled (keeping the
        upstream's error key) when the ticket's deadline cannot be met.
        """
        self.spacing = min(self.spacing * BACKOFF, self._limits.spacing * MAX_BACKOFF)
        hold = max(retry_after or 0.0, self.spacing)
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
        ticket.state = TicketState.QUEUED
        ticket.future = asyncio.get_running_loop().create_future()
        self._tickets.appendleft(ticket)
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
        while self._tickets:
            ticket = self._tickets.popleft()
            if ticket.state is TicketState.QUEUED and not ticket.future.done():
                self.leave(ticket)
                ticket.future.set_exception(error())

    # -- the pump --------------------------------------------------------------------------

    def _ensure_pump(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._pump is None or self._pump.done():
            loop = loop or asyncio.get_running_loop()
            self._pump = loop.create_task(self._run())

    def _head(self) -> Ticket | None:
        tickets = self._tickets
        while tickets and tickets[0].state is not TicketState.QUEUED:
            tickets.popleft()
        return tickets[0] if tickets else None

    async def _run(self) -> None:
        clock, backend, key = self._clock, self._backend, self.fingerprint
        while self._head() is not None:
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
            ticket = self._head()
            if ticket is None:
                await backend.give_back(key, reservation, spacing)
                self.sent_today = max(0, self.sent_today - 1)
                break
            self._tickets.popleft()
            self.queued -= 1
            ticket.state = TicketState.GRANTED
            now = clock.monotonic()
            ticket.granted_at = now
            ticket.future.set_result(None)
            if now - slot_at > LATE:
                # Late (the loop was busy, or a rejection's hold came in): space the next send
                # from this one, at the spacing in force now.
                self._next_free = now + self.pace
                await backend.hold(key, self.spacing)

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
        }


@dataclass
class QuotaEngine:
    """All keys' queues, their shared limits, and the backend that holds their state."""

    limits: Limits
    backend: QuotaBackend
    clock: Clock = field(default_factory=SystemClock)
    queues: dict[str, KeyQueue] = field(default_factory=dict)

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

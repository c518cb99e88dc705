"""A controllable clock for the quota engine: time moves only when a test says so."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class FakeTimer:
    """What `call_later` returns: cancellable, like asyncio.TimerHandle."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Monotonic and wall time that advance only through `advance`."""

    def __init__(self, wall: float = 1_800_000_000.0) -> None:
        self.now = 1000.0
        self.wall_offset = wall - self.now
        self._events: list[tuple[float, int, Callable[[], None], FakeTimer]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + self.wall_offset

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._events, (self.now + max(0.0, delay), next(self._seq), callback, timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        self.call_later(seconds, wake)
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward, running every timer due on the way, in order."""
        target = self.now + seconds
        await settle()
        while self._events and self._events[0][0] <= target:
            when, _, callback, timer = heapq.heappop(self._events)
            self.now = max(self.now, when)
            if not timer.cancelled:
                callback()
            await settle()
        self.now = target
        await settle()


async def settle() -> None:
    """Let every ready task run until none has anything left to do right now."""
    for _ in range(20):
        await asyncio.sleep(0)

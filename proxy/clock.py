"""The one clock of the proxy: monotonic time for pacing, wall time for UTC days.

Everything that waits or measures (the quota engine, the exchange, the OAuth refresher) takes
a `Clock`, so tests substitute `tests.fakes.FakeClock` and move time themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A scheduled callback that can be called off (`asyncio.TimerHandle` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time as the proxy sees it."""

    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class SystemClock:
    """The real clocks: `time.monotonic` for pacing, `time.time` for UTC days."""

    # The functions themselves, not methods wrapping them: read several times per request.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)

"""Counting arrivals in a one-second span: Mashery's rolling window, a fixed window, and the
busiest second seen (what benchmarks report)."""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from proxy.simulator.config import SPAN


class ArrivalWindow(Protocol):
    def take(self, now: float) -> bool: ...


class RollingWindow:
    """At most `limit` accepted arrivals in any span (t-1, t]: the stricter reading of Mashery."""

    __slots__ = ("_accepted", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._accepted: deque[float] = deque()

    def take(self, now: float) -> bool:
        accepted = self._accepted
        horizon = now - SPAN
        while accepted and accepted[0] <= horizon:
            accepted.popleft()
        if len(accepted) >= self._limit:
            return False
        accepted.append(now)
        return True


class FixedWindow:
    """At most `limit` accepted arrivals per whole second of the clock (2x can land in 1 s)."""

    __slots__ = ("_count", "_limit", "_second")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._second = -1
        self._count = 0

    def take(self, now: float) -> bool:
        second = math.floor(now)
        if second != self._second:
            self._second = second
            self._count = 0
        if self._count >= self._limit:
            return False
        self._count += 1
        return True


class BusiestSecond:
    """The most events seen in any one-second span, kept current one event at a time.

    Events come in clock order, so the busiest span ending at each event is the deque of
    events within the last second; the maximum of those is the maximum over all spans.
    """

    __slots__ = ("_recent", "most")

    def __init__(self) -> None:
        self._recent: deque[float] = deque()
        self.most = 0

    def add(self, now: float) -> None:
        recent = self._recent
        horizon = now - SPAN
        while recent and recent[0] <= horizon:
            recent.popleft()
        recent.append(now)
        if len(recent) > self.most:
            self.most = len(recent)

"""What a quota backend is: the shared state of a key's quota behind one interface.

The engine (`engine.py`) asks a backend for send slots; `local.py` keeps them in this process,
`redis.py` shares them between replicas. Keys are fingerprints, never secrets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.credentials import Fingerprint
from proxy.upstream_errors import QuotaKind

DAY = 86_400.0
Mode = Literal["local", "shared", "fallback"]


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

    async def reserve(self, key: Fingerprint, spacing: float, daily_quota: int) -> Reservation:
        """Take the next free send slot and count it toward today, or say why not."""
        ...

    async def give_back(self, key: Fingerprint, reservation: Reservation, spacing: float) -> None:
        """Return a slot (and its count) that no request used."""
        ...

    async def hold(self, key: Fingerprint, seconds: float) -> None:
        """Let no send of this key go before `seconds` from now."""
        ...

    async def pause(self, key: Fingerprint, until: float) -> None:
        """Let no send of this key go before the epoch time `until` (a daily-quota pause)."""
        ...

    async def usage(self, key: Fingerprint) -> Usage:
        """The key's count today and its pause, if any."""
        ...

    def mode(self) -> Mode:
        """`local` (this process alone), `shared` (Redis) or `fallback` (Redis away)."""
        ...

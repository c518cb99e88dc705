"""Quota state in this process, with the day's counts persisted under the state dir."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from proxy.clock import Clock
from proxy.quota.backend import Mode, Reservation, Usage, next_reset, utc_day
from proxy.upstream_errors import QuotaKind

# How often the day's counts are written to the state file, at most.
FLUSH_INTERVAL = 0.5


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

    def mode(self) -> Mode:
        """Always `local`: nothing is shared."""
        return "local"

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

"""Quota state in this process, with the day's counts persisted under the state dir."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from proxy.clock import Clock
from proxy.credentials import Fingerprint
from proxy.errors import StartupError
from proxy.files import atomic_write
from proxy.logs import get_logger
from proxy.quota.backend import DAY, Mode, Reservation, Usage, next_reset, utc_day
from proxy.upstream_errors import QuotaKind

log = get_logger("proxy.quota")

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
        self._keys: dict[Fingerprint, _LocalKey] = {}
        self._state_file = state_file
        self._dirty = False
        if state_file is not None:
            self._load(state_file)

    def _key(self, key: Fingerprint) -> _LocalKey:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _LocalKey(day=utc_day(self._clock.time()))
        day = utc_day(self._clock.time())
        if state.day != day:
            state.day, state.sent = day, 0
        return state

    async def reserve(self, key: Fingerprint, spacing: float, daily_quota: int) -> Reservation:
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

    async def give_back(self, key: Fingerprint, reservation: Reservation, spacing: float) -> None:
        state = self._key(key)
        if abs(state.next_free - (reservation.slot + spacing)) < 1e-9:
            state.next_free = reservation.slot
        state.sent = max(0, state.sent - 1)
        self._dirty = True

    async def hold(self, key: Fingerprint, seconds: float) -> None:
        state = self._key(key)
        state.next_free = max(state.next_free, self._clock.monotonic() + seconds)

    async def pause(self, key: Fingerprint, until: float) -> None:
        state = self._key(key)
        state.paused_until = max(state.paused_until, until)
        self._dirty = True

    def mode(self) -> Mode:
        """Always `local`: nothing is shared."""
        return "local"

    async def usage(self, key: Fingerprint) -> Usage:
        state = self._key(key)
        paused = state.paused_until if state.paused_until > self._clock.time() else None
        return Usage(state.sent, paused)

    def _load(self, path: Path) -> None:
        """Read the day's counts; StartupError when the file cannot be trusted.

        A count that cannot be read could have been anything up to the quota: starting at 0
        would overspend, so the proxy refuses to start and says which file to fix or remove.
        A pause beyond the next reset is cut to a day (a pause never outlasts one).
        """
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StartupError(f"state file {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise StartupError(
                f"state file {path} is not valid JSON (torn or foreign): today's counts cannot "
                "be known; restore it, or remove it to count today from 0"
            ) from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, dict):
            raise StartupError(f"state file {path} has no 'keys' object; restore or remove it")
        wall = self._clock.time()
        today = utc_day(wall)
        for key, entry in keys.items():
            day, sent, paused = _entry(entry)
            if day is None or sent is None or paused is None:
                raise StartupError(
                    f"state file {path}: the entry of key {str(key)[:16]!r} is not "
                    "{day, sent >= 0, paused_until}; restore or remove the file"
                )
            if paused > wall + DAY:
                log.warning("state_pause_cut", key=key, paused_until=paused, until=wall + DAY)
                paused = wall + DAY
            if day == today or paused > wall:
                self._keys[key] = _LocalKey(
                    day=day, sent=sent if day == today else 0, paused_until=paused
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
        try:
            atomic_write(self._state_file, json.dumps(payload).encode())
        except OSError:
            self._dirty = True
            raise


def _entry(entry: object) -> tuple[int | None, int | None, float | None]:
    """A state entry's day, count and pause, each None when it is not of the right kind."""
    if not isinstance(entry, dict):
        return None, None, None
    day, sent, paused = entry.get("day"), entry.get("sent", 0), entry.get("paused_until", 0.0)
    ok_day = day if isinstance(day, int) and not isinstance(day, bool) and day >= 0 else None
    ok_sent = sent if isinstance(sent, int) and not isinstance(sent, bool) and sent >= 0 else None
    ok_paused = (
        float(paused)
        if isinstance(paused, int | float)
        and not isinstance(paused, bool)
        and math.isfinite(paused)
        and paused >= 0
        else None
    )
    return ok_day, ok_sent, ok_paused

"""A short, bounded history of each key's traffic: what the dashboard draws and /metrics counts.

Per key the proxy keeps

- a ring of one-second buckets over the last `WINDOW` complete seconds (and the one filling
  now): sends (requests let out of the queue toward the upstream, replays included), gateway
  quota rejections, replays;
- the queue waits of the last `WAIT_SAMPLES` sends, for p50/p95 over the last minute;
- when the caller names clients (the fair-share queues do), each client's sends in the last
  minute in `CLIENT_BUCKET`-second buckets, for at most `MAX_CLIENTS` clients per key;
- running totals of the three counts (the counters `/metrics` exports).

Every event costs O(1): the second's bucket is found by its index in the ring and cleared if it
still holds an older second; a key or client is moved to the front of an ordered dict. Reading
a key (`snapshot`) costs O(WINDOW + WAIT_SAMPLES log WAIT_SAMPLES).

Memory is bounded. Per key, the counts live in `array`s of fixed size: the ring 901 × (8-byte
second + three 4-byte counts) = 18,020 bytes, the waits 512 × (two 8-byte floats) = 8,192
bytes, each named client 12 × (8 + 4) = 144 bytes plus its name and bookkeeping (about 0.4 KiB
with a short name). At most `MAX_KEYS` keys are kept, the least recently active forgotten
first (a forgotten key that comes back starts from nothing; its day's count lives in the quota
backend, not here). Measured with `python -m bench.history_memory [--clients 32]`: 28 KiB per
key without clients, 43 KiB with 32 named clients; 100 keys at most: 2.6 MiB, or 4.1 MiB when
every key has 32 named clients.

Times are wall-clock epoch seconds (what a browser can put on an axis). A wall clock that steps
back merely reuses buckets early; nothing here can grow or fail because of it.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from proxy.clock import Clock

WINDOW = 900  # seconds of per-second history per key (15 minutes)
WAIT_SAMPLES = 512  # queue waits kept per key; p50/p95 use those of the last minute
WAIT_SPAN = 60.0  # seconds the wait percentiles look back
MINUTE = 60  # seconds "the last minute" covers for sends_last_minute and client shares
MAX_KEYS = 100  # keys kept; the least recently active is forgotten first
MAX_CLIENTS = 32  # named clients kept per key; likewise
CLIENT_BUCKET = 5  # seconds per client bucket: a minute is 12 of them
_CLIENT_SLOTS = MINUTE // CLIENT_BUCKET

_SENDS, _REJECTIONS, _REPLAYS = 0, 1, 2


class _ClientCounts:
    """One client's sends: the last minute in 5-second buckets, and a running total."""

    __slots__ = ("counts", "stamps")

    def __init__(self) -> None:
        self.stamps = array("q", [-1]) * _CLIENT_SLOTS
        self.counts = array("I", [0]) * _CLIENT_SLOTS

    def add(self, second: int) -> None:
        slot = second // CLIENT_BUCKET
        i = slot % _CLIENT_SLOTS
        if self.stamps[i] != slot:
            self.stamps[i], self.counts[i] = slot, 0
        self.counts[i] += 1

    def last_minute(self, second: int) -> int:
        newest = second // CLIENT_BUCKET
        oldest = newest - _CLIENT_SLOTS + 1
        return sum(
            c for s, c in zip(self.stamps, self.counts, strict=True) if oldest <= s <= newest
        )


class _KeyRing:
    """One key's buckets, wait samples, clients and totals (fixed-size arrays)."""

    __slots__ = (
        "clients",
        "counts",
        "size",
        "stamps",
        "totals",
        "wait_at",
        "wait_next",
        "waits",
    )

    def __init__(self, size: int) -> None:
        self.size = size
        self.stamps = array("q", [-1]) * size
        # One array per series (sends, rejections, replays): 4 bytes a second each.
        self.counts = (
            array("I", [0]) * size,
            array("I", [0]) * size,
            array("I", [0]) * size,
        )
        self.totals = [0, 0, 0]
        self.wait_at = array("d", [-math.inf]) * WAIT_SAMPLES
        self.waits = array("d", [0.0]) * WAIT_SAMPLES
        self.wait_next = 0
        self.clients: OrderedDict[str, _ClientCounts] = OrderedDict()

    def add(self, series: int, second: int) -> None:
        i = second % self.size
        if self.stamps[i] != second:
            self.stamps[i] = second
            for counts in self.counts:
                counts[i] = 0
        self.counts[series][i] += 1
        self.totals[series] += 1

    def wait(self, seconds: float, now: float) -> None:
        i = self.wait_next
        self.wait_at[i], self.waits[i] = now, seconds
        self.wait_next = (i + 1) % WAIT_SAMPLES

    def client(self, name: str, second: int) -> None:
        counts = self.clients.get(name)
        if counts is None:
            if len(self.clients) >= MAX_CLIENTS:
                self.clients.popitem(last=False)
            counts = self.clients[name] = _ClientCounts()
        else:
            self.clients.move_to_end(name)
        counts.add(second)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One key's recent history, oldest second first (what the dashboard's JSON carries)."""

    end: int  # the epoch second of the last bucket: the last complete second
    sends: list[int]
    rejections: list[int]
    replays: list[int]
    sends_last_minute: int
    wait_p50: float | None  # seconds, over the waits of the last minute; None: no sends
    wait_p95: float | None
    wait_samples: int
    clients: dict[str, int] = field(default_factory=dict)  # named client -> sends, last minute


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an ascending, non-empty list (0 < fraction <= 1)."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class History:
    """Per-key recent traffic, bounded in keys, seconds and samples (see the module docstring)."""

    def __init__(self, window: int = WINDOW, max_keys: int = MAX_KEYS) -> None:
        if window < MINUTE or max_keys < 1:
            raise ValueError("window must cover a minute and max_keys must be positive")
        self.window = window
        self.max_keys = max_keys
        self._keys: OrderedDict[str, _KeyRing] = OrderedDict()

    def _ring(self, key_fp: str) -> _KeyRing:
        ring = self._keys.get(key_fp)
        if ring is None:
            if len(self._keys) >= self.max_keys:
                self._keys.popitem(last=False)
            # One bucket more than the window: the second being filled never overwrites the
            # oldest complete one.
            ring = self._keys[key_fp] = _KeyRing(self.window + 1)
        else:
            self._keys.move_to_end(key_fp)
        return ring

    def sent(self, key_fp: str, now: float, client: str | None = None) -> None:
        """A request of the key left the queue for the upstream at `now` (epoch seconds)."""
        ring = self._ring(key_fp)
        second = int(now)
        ring.add(_SENDS, second)
        if client is not None:
            ring.client(client, second)

    def rejected(self, key_fp: str, now: float) -> None:
        """The gateway answered one of the key's sends with a quota error."""
        self._ring(key_fp).add(_REJECTIONS, int(now))

    def replayed(self, key_fp: str, now: float) -> None:
        """A rejected request of the key went back to the head of its queue to be sent again."""
        self._ring(key_fp).add(_REPLAYS, int(now))

    def waited(self, key_fp: str, seconds: float, now: float) -> None:
        """A request of the key waited `seconds` in its queue before a send at `now`."""
        self._ring(key_fp).wait(seconds, now)

    def recent_keys(self) -> list[str]:
        """The keys with history, most recently active first."""
        return list(reversed(self._keys))

    def snapshot(self, key_fp: str, now: float, seconds: int | None = None) -> Snapshot:
        """The last `seconds` complete seconds (default: the whole window) of a key before `now`.

        The second `now` is in is still filling and left out, so every bucket is a whole
        second. A key without history gives zeros; reading never creates or refreshes a key.
        """
        span = self.window if seconds is None else max(1, min(seconds, self.window))
        end = int(now) - 1
        first = end - span + 1
        ring = self._keys.get(key_fp)
        if ring is None:
            zeros = [0] * span
            return Snapshot(end, zeros, zeros[:], zeros[:], 0, None, None, 0)
        series: tuple[list[int], list[int], list[int]] = ([], [], [])
        stamps, counts = ring.stamps, ring.counts
        size = ring.size
        for second in range(first, end + 1):
            i = second % size
            fresh = stamps[i] == second
            for out, source in zip(series, counts, strict=True):
                out.append(source[i] if fresh else 0)
        sends = series[_SENDS]
        sends_last_minute = sum(
            self._count(ring, _SENDS, s) for s in range(end - MINUTE + 1, end + 1)
        )
        recent = sorted(
            w for at, w in zip(ring.wait_at, ring.waits, strict=True) if now - at <= WAIT_SPAN
        )
        return Snapshot(
            end=end,
            sends=sends,
            rejections=series[_REJECTIONS],
            replays=series[_REPLAYS],
            sends_last_minute=sends_last_minute,
            wait_p50=percentile(recent, 0.5) if recent else None,
            wait_p95=percentile(recent, 0.95) if recent else None,
            wait_samples=len(recent),
            clients={name: n for name, c in ring.clients.items() if (n := c.last_minute(end)) > 0},
        )

    def _count(self, ring: _KeyRing, series: int, second: int) -> int:
        i = second % ring.size
        return ring.counts[series][i] if ring.stamps[i] == second else 0

    def totals(self) -> Iterator[tuple[str, int, int, int]]:
        """(key, sends, rejections, replays) since each key was first seen (or last forgotten)."""
        for key_fp, ring in self._keys.items():
            yield key_fp, ring.totals[_SENDS], ring.totals[_REJECTIONS], ring.totals[_REPLAYS]


class HistoryFeed:
    """The request path's one handle on the history: it reads the clock, so a call site is one line.

    Wire it where the events happen: `granted` where a queue lets a request go (the quota
    engine's `on_grant`), `rejected` where a gateway quota error is recognised, `replayed` where
    the rejected request is put back. Keys are fingerprints; `None` (not known yet) is ignored.
    """

    def __init__(self, history: History, clock: Clock) -> None:
        self.history = history
        self._clock = clock

    def granted(self, key_fp: str, waited: float, client: str | None = None) -> None:
        """A request of the key leaves its queue for the upstream after `waited` seconds."""
        now = self._clock.time()
        self.history.sent(key_fp, now, client)
        self.history.waited(key_fp, waited, now)

    def rejected(self, key_fp: str | None) -> None:
        """The gateway answered a send of the key with a quota error."""
        if key_fp is not None:
            self.history.rejected(key_fp, self._clock.time())

    def replayed(self, key_fp: str | None) -> None:
        """A request the gateway rejected is queued again to be replayed."""
        if key_fp is not None:
            self.history.replayed(key_fp, self._clock.time())

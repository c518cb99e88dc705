"""The dashboard's per-key history: buckets, expiry, percentiles and bounds, on a fake clock."""

from __future__ import annotations

import pytest

from proxy.history import (
    MAX_CLIENTS,
    MINUTE,
    WAIT_SAMPLES,
    WINDOW,
    History,
    HistoryFeed,
    percentile,
)
from tests.fakes import FakeClock

T0 = 1_800_000_000.0
KEY = "0fcd342887d4"


def test_events_land_in_their_second_and_oldest_comes_first() -> None:
    history = History()
    history.sent(KEY, T0 + 0.1)
    history.sent(KEY, T0 + 0.9)
    history.sent(KEY, T0 + 2.5)
    history.rejected(KEY, T0 + 2.6)
    history.replayed(KEY, T0 + 2.7)
    history.sent(KEY, T0 + 3.1)  # the second still filling at the read: not shown yet
    snap = history.snapshot(KEY, T0 + 3.2, seconds=5)
    assert snap.end == int(T0) + 2
    assert snap.sends == [0, 0, 2, 0, 1]
    assert snap.rejections == [0, 0, 0, 0, 1]
    assert snap.replays == [0, 0, 0, 0, 1]
    assert snap.sends_last_minute == 3
    assert len(history.snapshot(KEY, T0 + 3.2).sends) == WINDOW
    assert history.snapshot(KEY, T0 + 4).sends_last_minute == 4


def test_seconds_older_than_the_window_are_gone_even_where_their_bucket_is_reused() -> None:
    history = History()
    history.sent(KEY, T0)
    history.sent(KEY, T0 + 1)
    # The ring has WINDOW + 1 buckets: T0 + WINDOW + 1 reuses T0's, whose count must be
    # cleared, not added to.
    before = history.snapshot(KEY, T0 + WINDOW + 1.5)  # T0 + 1 .. T0 + WINDOW
    assert (before.sends[0], sum(before.sends)) == (1, 1)
    history.sent(KEY, T0 + WINDOW + 1)
    snap = history.snapshot(KEY, T0 + WINDOW + 2)  # T0 + 2 .. T0 + WINDOW + 1
    assert snap.sends[-1] == 1
    assert sum(snap.sends) == 1
    # Read much later without new events: nothing stale shows.
    later = history.snapshot(KEY, T0 + 5 * WINDOW)
    assert sum(later.sends) == 0
    assert later.sends_last_minute == 0
    # The totals keep counting what the window forgot.
    assert list(history.totals()) == [(KEY, 3, 0, 0)]


def test_sends_last_minute_counts_exactly_the_last_sixty_seconds() -> None:
    history = History()
    for second in range(120):
        history.sent(KEY, T0 + second)
    assert history.snapshot(KEY, T0 + 120).sends_last_minute == MINUTE
    assert history.snapshot(KEY, T0 + 150).sends_last_minute == 30


def test_wait_percentiles_cover_the_last_minute_only() -> None:
    history = History()
    history.waited(KEY, 100.0, T0)  # more than a minute before the read: ignored
    for n in range(1, 21):
        history.waited(KEY, n / 10, T0 + 30 + n)
    snap = history.snapshot(KEY, T0 + 61)
    assert snap.wait_samples == 20
    assert snap.wait_p50 == pytest.approx(1.0)  # nearest rank: the 10th of 0.1 .. 2.0
    assert snap.wait_p95 == pytest.approx(1.9)  # the 19th
    assert history.snapshot(KEY, T0 + 200).wait_p50 is None


def test_wait_samples_are_a_ring_of_the_most_recent() -> None:
    history = History()
    for n in range(WAIT_SAMPLES + 100):
        history.waited(KEY, 9.0 if n < 100 else 1.0, T0 + n / 1000)
    snap = history.snapshot(KEY, T0 + 1)
    assert snap.wait_samples == WAIT_SAMPLES
    assert snap.wait_p95 == 1.0  # the 100 oldest (9 s) were overwritten


def test_percentile_is_nearest_rank() -> None:
    assert percentile([1.0], 0.95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0


def test_keys_are_capped_and_the_least_recently_active_goes_first() -> None:
    history = History(max_keys=3)
    for key in ("a", "b", "c"):
        history.sent(key, T0)
    history.rejected("a", T0 + 1)  # a is now the most recent
    history.sent("d", T0 + 2)  # evicts b, the least recently active
    assert history.recent_keys() == ["d", "a", "c"]
    assert sum(history.snapshot("b", T0 + 2).sends) == 0
    # Reading a key neither creates nor refreshes it.
    history.snapshot("zzz", T0 + 2)
    history.snapshot("c", T0 + 2)
    history.sent("e", T0 + 3)
    assert history.recent_keys() == ["e", "d", "a"]


def test_named_clients_get_last_minute_shares_and_are_capped() -> None:
    history = History()
    for n in range(30):
        history.sent(KEY, T0 + n, client="alice")
    for n in range(10):
        history.sent(KEY, T0 + 20 + n, client="bob")
    history.sent(KEY, T0 + 29)  # unnamed sends count for the key only
    snap = history.snapshot(KEY, T0 + 30)
    assert snap.clients == {"alice": 30, "bob": 10}
    assert snap.sends_last_minute == 41
    # 90 s later (past a minute) nobody has sends in the last minute.
    assert history.snapshot(KEY, T0 + 120).clients == {}
    for n in range(MAX_CLIENTS + 5):
        history.sent(KEY, T0 + 200, client=f"c{n}")
    names = set(history.snapshot(KEY, T0 + 201).clients)
    assert len(names) == MAX_CLIENTS
    assert "alice" not in names and f"c{MAX_CLIENTS + 4}" in names


def test_a_wall_clock_stepping_back_reuses_buckets_without_failing() -> None:
    history = History()
    history.sent(KEY, T0 + 10)
    history.sent(KEY, T0 + 5)  # the clock went back 5 s
    snap = history.snapshot(KEY, T0 + 11)
    assert sum(snap.sends) == 2


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        History(window=10)
    with pytest.raises(ValueError, match="max_keys"):
        History(max_keys=0)


async def test_the_feed_stamps_events_with_its_clock() -> None:
    clock = FakeClock(wall=T0)
    history = History()
    feed = HistoryFeed(history, clock)
    feed.granted(KEY, 0.5)
    await clock.advance(1.0)
    feed.rejected(KEY)
    feed.replayed(KEY)
    feed.granted(KEY, 1.5, client="alice")
    feed.rejected(None)  # a key not known yet: nothing to record
    snap = history.snapshot(KEY, clock.time() + 1, seconds=2)
    assert snap.sends == [1, 1]
    assert snap.rejections == [0, 1]
    assert snap.replays == [0, 1]
    assert (snap.wait_p50, snap.wait_p95) == (0.5, 1.5)
    assert snap.clients == {"alice": 1}

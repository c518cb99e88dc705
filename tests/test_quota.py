"""The quota engine against a controllable clock: pacing, FIFO, deadlines, daily quota."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.credentials import Fingerprint
from proxy.errors import Throttled, Unavailable
from proxy.quota import Limits, LocalBackend, QuotaEngine, Ticket, next_reset
from proxy.upstream_errors import QuotaKind
from tests.fakes import FakeClock, settle

SPACING = 0.25625  # (1 + 0.025) / 4


def engine(
    clock: FakeClock, *, daily: int = 10_000, max_queue: int = 10_000, state: Path | None = None
) -> QuotaEngine:
    return QuotaEngine(Limits(4.0, daily, max_queue, 0.025), LocalBackend(clock, state), clock)


async def granted_at(
    clock: FakeClock, tickets: list[Ticket], seconds: float, step: float = 0.01
) -> dict[int, float]:
    times: dict[int, float] = {}
    elapsed = 0.0
    while elapsed < seconds:
        for i, t in enumerate(tickets):
            if (
                i not in times
                and t.future.done()
                and not t.future.cancelled()
                and t.future.exception() is None
            ):
                times[i] = clock.now
        await clock.advance(step)
        elapsed += step
    return times


async def test_sends_are_spaced_fifo_with_a_burst_of_one() -> None:
    clock = FakeClock()
    eng = engine(clock)
    queue = eng.queue_for("K")
    tickets = [queue.admit(30) for _ in range(9)]
    times = await granted_at(clock, tickets, 2.5, step=0.001)
    order = sorted(times, key=times.__getitem__)
    assert order == list(range(9))  # strict FIFO
    start = times[0]
    for i in range(9):
        assert times[i] - start == pytest.approx(i * SPACING, abs=0.0015)
    # No one-second span holds more than qps grants.
    stamps = sorted(times.values())
    assert all(stamps[i + 4] - stamps[i] >= 1.0 for i in range(len(stamps) - 4))


async def test_predicted_wait_refuses_at_once_with_retry_after() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    for _ in range(8):
        queue.admit(30)
    with pytest.raises(Throttled) as caught:
        queue.admit(1.0)  # 8 ahead: ~2 s, beyond a 1 s budget
    err = caught.value
    assert err.status == 429 and err.kind is QuotaKind.PER_SECOND
    assert err.headers()["Retry-After"] == "3"  # 8 × 0.256 = 2.05 s, rounded up
    assert err.key_for("v2") == "mashery.not.authorized.over.qps"
    assert err.key_for("v3") == "throttled"
    assert "3 seconds" in err.message
    assert queue.queued == 8  # the refused one never joined


async def test_deadline_expiry_gives_429_and_frees_the_place() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    first = [queue.admit(30) for _ in range(4)]
    # Predicted 1.03 s fits 1.1 s; hold the key so the real wait overruns the budget.
    late = queue.admit(1.1)
    await queue._backend.hold(queue.fingerprint, 5.0)  # a gateway Retry-After, say
    await clock.advance(1.2)
    assert late.future.done()
    assert isinstance(late.future.exception(), Throttled)
    assert queue.queued == 4 - sum(t.future.done() for t in first)


async def test_disconnected_client_loses_place_and_costs_no_quota() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    tickets = [queue.admit(30) for _ in range(5)]
    waiters = [asyncio.create_task(queue.wait(t)) for t in tickets]
    await settle()
    waiters[2].cancel()  # what handler cancellation does when the client leaves
    waiters[3].cancel()
    await settle()
    times = await granted_at(clock, tickets, 2.0, step=0.001)
    assert sorted(times) == [0, 1, 4]
    assert times[4] - times[1] == pytest.approx(SPACING, abs=0.0015)  # the place was given up
    assert queue.sent_today == 3
    for w in waiters:
        w.cancel()


async def test_the_last_waiter_leaving_gives_its_slot_back() -> None:
    clock = FakeClock()
    eng = engine(clock)
    queue = eng.queue_for("K")
    a = queue.admit(30)
    b = queue.admit(30)
    wb = asyncio.create_task(queue.wait(b))
    await clock.advance(0.01)
    assert a.future.done()
    wb.cancel()
    await clock.advance(1.0)
    usage = await eng.backend.usage(queue.fingerprint)
    assert usage.sent_today == 1


async def test_daily_quota_counts_sends_and_answers_until_reset() -> None:
    clock = FakeClock()
    queue = engine(clock, daily=3).queue_for("K")
    tickets = [queue.admit(30) for _ in range(3)]
    with pytest.raises(Throttled) as caught:
        queue.admit(30)  # 3 queued will use the day's 3
    err = caught.value
    assert err.kind is QuotaKind.DAILY
    assert err.key_for("v2") == "mashery.not.authorized.over.ratelimit"
    assert err.key_for("v3") == "quota_exceeded"
    wait = next_reset(clock.time()) - clock.time()
    assert int(err.headers()["Retry-After"]) == pytest.approx(wait, abs=1.0)
    await granted_at(clock, tickets, 1.0)
    assert queue.sent_today == 3
    # After midnight UTC the count starts again.
    await clock.advance(wait + 1)
    later = queue.admit(30)
    await clock.advance(0.01)
    assert later.future.done() and later.future.exception() is None


async def test_daily_count_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    state = tmp_path / "daily.json"
    eng = engine(clock, daily=100, state=state)
    queue = eng.queue_for("K")
    tickets = [queue.admit(30) for _ in range(7)]
    await granted_at(clock, tickets, 2.0)
    assert isinstance(eng.backend, LocalBackend)
    eng.backend.flush()
    assert "K" not in state.read_text()  # fingerprints only
    reborn = engine(clock, daily=100, state=state)
    queue2 = await reborn.load("K")
    assert queue2.sent_today == 7
    assert queue2.status()["remaining_today"] == 93


async def test_keys_of_an_earlier_day_are_forgotten_unless_paused(tmp_path: Path) -> None:
    # Without client tokens any api_key names a key: yesterday's must not pile up for ever.
    clock = FakeClock(wall=1_800_000_000.0 - 1_800_000_000.0 % 86400 + 3600)  # 01:00 UTC
    state = tmp_path / "daily.json"
    backend = LocalBackend(clock, state)
    for key in ("yesterday-only", "both-days"):
        await backend.reserve(Fingerprint(key), 0.25, 100)
    await backend.pause(Fingerprint("paused"), clock.time() + 2 * 86400)
    await clock.advance(86400)  # the next day
    await backend.reserve(Fingerprint("both-days"), 0.25, 100)
    backend.flush()
    kept = set(json.loads(state.read_text())["keys"])
    assert kept == {"both-days", "paused"}
    assert (await backend.usage(Fingerprint("both-days"))).sent_today == 1
    assert (await backend.usage(Fingerprint("paused"))).paused_until is not None


async def test_max_queue_bounds_each_key() -> None:
    clock = FakeClock()
    eng = engine(clock, max_queue=3)
    queue = eng.queue_for("K")
    for _ in range(3):
        queue.admit(3600)
    with pytest.raises(Throttled) as caught:
        queue.admit(3600)
    assert "full" in caught.value.message
    eng.queue_for("other").admit(30)  # other keys are not affected


async def test_replay_goes_to_the_head_and_backs_off() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    a, b = queue.admit(30), queue.admit(30)
    await clock.advance(0.001)
    assert a.future.done()
    await queue.replay(a, None, "mashery.not.authorized.over.qps")
    assert queue.spacing > SPACING
    times = await granted_at(clock, [a, b], 2.0, step=0.001)
    assert times[0] < times[1]  # the replayed one goes first
    for _ in range(2000):
        queue.sent_ok()
    assert queue.spacing == pytest.approx(SPACING, rel=0.01)


async def test_replay_past_the_deadline_keeps_the_upstream_error_key() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    a = queue.admit(0.5)
    await clock.advance(0.001)
    with pytest.raises(Throttled) as caught:
        await queue.replay(a, 2.0, "mashery.not.authorized.over.qps")
    assert caught.value.key_for("v2") == "mashery.not.authorized.over.qps"
    assert caught.value.headers()["Retry-After"] == "2"


async def test_daily_pause_rejects_queued_and_new_requests() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    a = queue.admit(30)
    rest = [queue.admit(30) for _ in range(3)]
    await clock.advance(0.001)
    until = next_reset(clock.time())
    await queue.pause_daily(until)
    for t in rest:
        exc = t.future.exception()
        assert isinstance(exc, Throttled) and exc.kind is QuotaKind.DAILY
    with pytest.raises(Throttled) as caught:
        queue.admit(30)
    assert caught.value.kind is QuotaKind.DAILY
    assert queue.status()["paused_until"] is not None
    assert a.future.done()


async def test_shutdown_answers_queued_503() -> None:
    clock = FakeClock()
    eng = engine(clock)
    queue = eng.queue_for("K")
    tickets = [queue.admit(30) for _ in range(3)]
    await clock.advance(0.001)
    eng.shutdown(retry_after=25)
    assert tickets[0].future.exception() is None
    for t in tickets[1:]:
        exc = t.future.exception()
        assert isinstance(exc, Unavailable) and exc.headers()["Retry-After"] == "25"


async def test_a_rejection_holds_a_slot_the_pump_had_already_booked() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    a, b = queue.admit(30), queue.admit(30)
    await clock.advance(0.001)
    assert a.future.done() and not b.future.done()  # the pump now sleeps on b's slot
    rejected_at = clock.now
    await queue.replay(a, 1.0, "throttled")  # the gateway said: come back in 1 s
    times = await granted_at(clock, [a, b], 2.0, step=0.001)
    assert times[0] - rejected_at >= 1.0
    assert times[1] - times[0] >= queue.spacing - 0.002


async def test_spacing_eases_fast_once_the_rejections_stop() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    a = queue.admit(30)
    await clock.advance(0.001)
    await queue.replay(a, None, "throttled")
    backed_off = queue.spacing
    for _ in range(20):
        queue.sent_ok()
    recent = queue.spacing
    assert recent > SPACING + (backed_off - SPACING) * 0.85  # slowly, near the rejection
    await clock.advance(61.0)
    for _ in range(20):
        queue.sent_ok()
    assert queue.spacing < SPACING + (backed_off - SPACING) * 0.4  # calm: back quickly


async def test_idle_queues_are_forgotten_when_keys_pile_up_but_counts_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("proxy.quota.engine.MAX_QUEUES", 3)
    clock = FakeClock()
    eng = engine(clock)
    busy = eng.queue_for("busy")
    busy.admit(30)
    busy.admit(30)
    for name in ("a", "b"):
        ticket = eng.queue_for(name).admit(30)
        await clock.advance(0.001)
        assert ticket.future.done()
    await clock.advance(0.01)
    eng.queue_for("c")  # a fourth key: the idle a and b go, the busy one stays
    assert set(eng.queues) == {"busy", "c"}
    again = await eng.load("a")
    assert again.sent_today == 1  # read back from the backend

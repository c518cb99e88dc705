"""Replicas sharing one key through a real redis-server: pacing, counts, pauses, outages."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from yarl import URL

from proxy.config import Config
from proxy.credentials import Fingerprint, Secret, fingerprint
from proxy.errors import Throttled
from proxy.quota import Limits, QuotaEngine, next_reset
from proxy.quota.redis import RedisBackend, fallback_spacing, redis_keys
from proxy.simulator import SimulatorConfig, make_simulator_app
from proxy.upstream_errors import QuotaKind
from tests.conftest import ServerFactory, StartProxy, proxy_config
from tests.fakes import FakeClock
from tests.redis_server import RedisServer, free_port

API_KEY = "shared-test-api-key-7f3a9c0d"
ACCESS_TOKEN = "shared-test-access-token-51be22"
FP = fingerprint(API_KEY)
SPACING = 0.25625  # (1 + 0.025) / 4
# The proxy-level tests pace with a wide margin: they test sharing, not how much jitter a
# 25 ms margin absorbs on a busy test machine (bench/shared.py measures that).
TEST_MARGIN = 0.1

MakeBackend = Callable[..., Awaitable[RedisBackend]]


@pytest.fixture
async def backends() -> AsyncIterator[MakeBackend]:
    made: list[RedisBackend] = []

    async def make(url: str, replicas: int = 3, start: bool = True) -> RedisBackend:
        config = Config(redis_url=Secret(url), replicas=replicas, pacing_margin=0.025)
        backend = RedisBackend.from_config(config)
        made.append(backend)
        if start:
            await backend.start()
        return backend

    yield make
    for backend in made:
        await backend.close()


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Poll until `condition` holds; return how long it took (fail after `timeout`)."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# -- the scripts, three backends against one Redis ----------------------------------------


async def test_reservations_are_atomic_and_ordered_across_replicas(
    redis_server: RedisServer, backends: MakeBackend
) -> None:
    trio = [await backends(redis_server.url) for _ in range(3)]
    results = await asyncio.gather(
        *(b.reserve(Fingerprint("k-atomic"), 0.25, 25) for b in trio for _ in range(10))
    )
    granted = [r for r in results if r.blocked_until is None]
    refused = [r for r in results if r.blocked_until is not None]
    assert len(granted) == 25 and len(refused) == 5
    # One slot each, exactly one spacing apart: no two replicas got the same slot or a gap.
    slots = sorted(round(r.slot * 1_000_000) for r in granted)
    assert [b - a for a, b in itertools.pairwise(slots)] == [250_000] * 24
    assert sorted(r.sent_today for r in granted) == list(range(1, 26))
    # Each replica sleeps its own delay, measured from Redis's clock at the reservation.
    first = slots[0] / 1_000_000
    for r in granted:
        assert r.delay == pytest.approx(r.slot - first, abs=0.1)
    reset = next_reset(time.time())
    for r in refused:
        assert r.kind is QuotaKind.DAILY and r.blocked_until == pytest.approx(reset)
        assert r.sent_today == 25
    assert (await trio[2].usage(Fingerprint("k-atomic"))).sent_today == 25


async def test_give_back_returns_the_slot_only_if_it_is_still_the_last(
    redis_server: RedisServer, backends: MakeBackend
) -> None:
    a, b = await backends(redis_server.url), await backends(redis_server.url)
    ra = await a.reserve(Fingerprint("k-give"), 0.25, 100)
    rb = await b.reserve(Fingerprint("k-give"), 0.25, 100)
    await a.give_back(Fingerprint("k-give"), ra, 0.25)  # b reserved after it: the slot is lost
    rc = await b.reserve(Fingerprint("k-give"), 0.25, 100)
    assert rc.slot == pytest.approx(rb.slot + 0.25, abs=1e-6)
    assert rc.sent_today == 2  # ...but its count came back
    await b.give_back(Fingerprint("k-give"), rc, 0.25)  # still the last: the slot comes back too
    rd = await a.reserve(Fingerprint("k-give"), 0.25, 100)
    assert rd.slot == pytest.approx(rc.slot, abs=1e-6)
    assert rd.sent_today == 2


async def test_hold_and_pause_on_one_replica_bind_the_others(
    redis_server: RedisServer, backends: MakeBackend
) -> None:
    a, b, c = [await backends(redis_server.url) for _ in range(3)]
    await a.hold(Fingerprint("k-hold"), 5.0)
    held = await b.reserve(Fingerprint("k-hold"), 0.25, 100)
    assert held.delay == pytest.approx(5.0, abs=0.1)
    until = time.time() + 3600
    await a.pause(Fingerprint("k-pause"), until)
    paused = await b.reserve(Fingerprint("k-pause"), 0.25, 100)
    assert paused.kind is QuotaKind.DAILY
    assert paused.blocked_until == pytest.approx(until, abs=0.01)
    usage = await c.usage(Fingerprint("k-pause"))
    assert usage.paused_until == pytest.approx(until, abs=0.01)


def test_fallback_share_is_a_whole_number_of_sends_per_window() -> None:
    assert fallback_spacing(SPACING, 1, 0.025) == SPACING
    assert fallback_spacing(SPACING, 2, 0.025) == pytest.approx(2 * SPACING)
    # 3 × 0.256 s would let three drifting replicas put 6 sends into one second.
    assert fallback_spacing(SPACING, 3, 0.025) == pytest.approx(1.025)
    assert fallback_spacing(SPACING, 4, 0.025) == pytest.approx(1.025)
    assert fallback_spacing(SPACING, 6, 0.025) == pytest.approx(6 * SPACING)
    # A backed-off key (larger spacing) gets a proportionally smaller share.
    assert fallback_spacing(2 * SPACING, 2, 0.025) == pytest.approx(1.025)


async def test_fallback_paces_alone_at_its_share_and_counts_for_everyone(
    backends: MakeBackend,
) -> None:
    clock = FakeClock()
    config = Config(
        redis_url=Secret(f"redis://127.0.0.1:{free_port()}/0"), replicas=3, pacing_margin=0.025
    )
    backend = RedisBackend.from_config(config, clock)
    try:
        assert backend.mode() == "fallback"  # no contact yet
        first = await backend.reserve(Fingerprint("k"), SPACING, 7)
        # Other replicas may hold one slot each within 3 × spacing: wait until they are a
        # whole window past before the first lone send.
        assert first.delay == pytest.approx(3 * SPACING + 1.025)
        second = await backend.reserve(Fingerprint("k"), SPACING, 7)
        assert second.slot - first.slot == pytest.approx(1.025)
        third = await backend.reserve(Fingerprint("k"), SPACING, 7)
        assert third.blocked_until is None
        # Three sends here may be nine across three replicas: 0 + 3 × 3 ≥ 7.
        fourth = await backend.reserve(Fingerprint("k"), SPACING, 7)
        assert fourth.kind is QuotaKind.DAILY
        assert fourth.blocked_until == next_reset(clock.time())
    finally:
        await backend.close()


async def test_in_fallback_the_queue_predicts_waits_at_its_share() -> None:
    # A replica pacing alone sends once per 1.025 s, not once per 0.256 s: a request whose
    # wait budget cannot be met at that pace must get its 429 at once, not after waiting.
    clock = FakeClock()
    config = Config(
        redis_url=Secret(f"redis://127.0.0.1:{free_port()}/0"), replicas=3, pacing_margin=0.025
    )
    backend = RedisBackend.from_config(config, clock)
    engine = QuotaEngine(Limits(4.0, 10_000, 10_000, 0.025), backend, clock)
    try:
        queue = engine.queue_for("k")
        admitted = []
        refused = None
        for _ in range(40):
            try:
                admitted.append(queue.admit(10.0))
            except Throttled as error:
                refused = error
                break
            await clock.advance(0)  # the pump takes its slot for the head
        assert refused is not None and refused.status == 429
        # 1.79 s of transition hold, then one send per 1.025 s: 8 fit in 10 s (at the
        # configured 4/s the queue would have promised 32).
        assert 6 <= len(admitted) <= 9
        assert queue.status()["spacing_seconds"] == pytest.approx(1.025)
        await clock.advance(10.5)
        assert all(t.future.done() and t.future.exception() is None for t in admitted)
    finally:
        engine.shutdown(retry_after=1)
        await backend.close()


async def test_slow_redis_falls_back_within_the_call_timeout_and_comes_back(
    redis_server: RedisServer, backends: MakeBackend
) -> None:
    backend = await backends(redis_server.url, replicas=2)
    assert backend.mode() == "shared"
    redis_server.freeze()
    try:
        started = time.monotonic()
        reservation = await backend.reserve(Fingerprint("k-slow"), SPACING, 100)
        assert time.monotonic() - started < 0.5
        assert backend.mode() == "fallback"
        assert reservation.blocked_until is None
        assert await backend.ready_problem() is None  # an outage is not a misconfiguration
    finally:
        redis_server.resume()

    async def shared() -> bool:
        return backend.mode() == "shared"

    await wait_for(shared, timeout=3.0)


async def test_after_an_outage_the_first_back_keeps_to_its_share_until_the_others_are(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.25)
    # Its partner (configured, never seen back) is still pacing alone somewhere.
    backend = RedisBackend(client, replicas=2, pacing_margin=0.025, settle=1.0)
    try:
        await backend.start()
        await redis_server.stop()
        await backend.reserve(Fingerprint("k-settle"), SPACING, 100)
        assert backend.mode() == "fallback"
        await redis_server.start()

        async def shared() -> bool:
            return backend.mode() == "shared"

        await wait_for(shared, timeout=2.0)
        one = await backend.reserve(Fingerprint("k-settle"), SPACING, 100)
        two = await backend.reserve(Fingerprint("k-settle"), SPACING, 100)
        assert two.slot - one.slot == pytest.approx(2 * SPACING, abs=1e-5)  # its fallback share
        await asyncio.sleep(1.1)  # nobody else came back within `settle`: full speed again
        three = await backend.reserve(Fingerprint("k-settle"), SPACING, 100)
        four = await backend.reserve(Fingerprint("k-settle"), SPACING, 100)
        assert four.slot - three.slot == pytest.approx(SPACING, abs=1e-5)
    finally:
        await backend.close()


async def test_redis_refusing_the_password_is_a_readiness_problem(
    tmp_path: Path, backends: MakeBackend
) -> None:
    server = RedisServer(tmp_path / "locked", extra_args=("--requirepass", "right-password"))
    await server.start()
    try:
        backend = await backends(f"redis://:wrong-password@127.0.0.1:{server.port}/0")
        assert backend.mode() == "fallback"
        problem = await backend.ready_problem()
        assert problem is not None and "credentials" in problem
        assert "wrong-password" not in problem
        # Serving goes on, paced alone.
        assert (await backend.reserve(Fingerprint("k-auth"), SPACING, 100)).blocked_until is None
    finally:
        await server.stop()


# -- three proxies, one simulator, one Redis ----------------------------------------------


async def start_replicas(
    tmp_path: Path,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    redis: RedisServer,
    **simulator: float,
) -> tuple[URL, list[URL]]:
    sim = await start_server(
        make_simulator_app(
            SimulatorConfig(api_key=API_KEY, access_token=ACCESS_TOKEN, qps=4, **simulator)  # type: ignore[arg-type]
        )
    )
    sim_url = sim.make_url("")
    config = proxy_config(
        tmp_path,
        sim_url,
        api_key=Secret(API_KEY),
        access_token=Secret(ACCESS_TOKEN),
        qps=4.0,
        pacing_margin=TEST_MARGIN,
        redis_url=Secret(redis.url),
        replicas=3,
    )
    proxies = [(await start_proxy(config))[1] for _ in range(3)]
    return sim_url, proxies


class Load:
    """Workers spread over the replicas, each sending back-to-back until stopped."""

    def __init__(self, http: aiohttp.ClientSession, proxies: list[URL], per_proxy: int) -> None:
        self.statuses: Counter[int] = Counter()
        self.finished: list[tuple[float, int]] = []
        self.errors: list[bytes] = []
        self._http = http
        self._tasks = [
            asyncio.create_task(self._worker(proxy)) for proxy in proxies for _ in range(per_proxy)
        ]

    async def _worker(self, proxy: URL) -> None:
        while True:
            async with self._http.get(proxy / "v2/contacts") as resp:
                body = await resp.read()
                self.statuses[resp.status] += 1
                self.finished.append((time.monotonic(), resp.status))
                if resp.status != 200:
                    self.errors.append(body)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def sim_stats(http: aiohttp.ClientSession, sim: URL) -> dict[str, Any]:
    async with http.get(sim / "__sim__/stats") as resp:
        stats = await resp.json()
    entry: dict[str, Any] = stats["keys"][FP]
    return entry


async def modes(http: aiohttp.ClientSession, proxies: list[URL]) -> list[tuple[int, str]]:
    out = []
    for proxy in proxies:
        async with http.get(proxy / "readyz") as resp:
            out.append((resp.status, (await resp.json())["mode"]))
    return out


async def test_three_replicas_pace_one_key_together_and_store_no_secret(
    tmp_path: Path,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    sim, proxies = await start_replicas(
        tmp_path, start_server, start_proxy, redis_server, jitter_in=0.02
    )
    assert await modes(http, proxies) == [(200, "shared")] * 3
    load = Load(http, proxies, per_proxy=3)
    await asyncio.sleep(4.0)
    await load.stop()
    stats = await sim_stats(http, sim)
    # Alone, each replica would send 4/s: 12 arrivals in a second. Shared: at most 4.
    assert stats["max_arrivals_1s"] <= 4, stats
    assert set(load.statuses) == {200}, load.errors[:3]
    assert load.statuses[200] >= 11  # ~4 s at 4/1.1 per second: sharing did not starve it

    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        names: list[str] = [name async for name in client.scan_iter()]
        assert set(names) >= {*redis_keys(FP)[:2], "ctct:replicas"}
        dump: list[str] = []
        for name in names:
            assert re.fullmatch(r"ctct:(\{[0-9a-f]{12}\}:(pace|daily|paused)|replicas)", name)
            kind = await client.type(name)
            if kind == "string":
                dump.append(str(await client.get(name)))
            elif kind == "hash":
                dump.extend(str(item) for item in (await client.hgetall(name)).items())
            else:
                dump.extend(str(member) for member in await client.zrange(name, 0, -1))
        text = " ".join(dump)
        for secret in (API_KEY, ACCESS_TOKEN):
            assert secret not in text and secret not in " ".join(names)
    finally:
        await client.aclose()


async def test_a_daily_pause_learned_by_one_replica_refuses_on_the_others(
    tmp_path: Path,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    sim, (first, second, third) = await start_replicas(
        tmp_path, start_server, start_proxy, redis_server, daily_quota=2
    )
    for proxy in (second, first):  # the second replica has loaded the key before the pause
        async with http.get(proxy / "v2/contacts") as resp:
            assert resp.status == 200
    async with http.get(first / "v2/contacts") as resp:
        assert resp.status == 429  # the gateway's daily error: the first replica pauses the key
        assert "over.ratelimit" in await resp.text()
    assert (await sim_stats(http, sim))["requests"] == 3
    for proxy in (second, third):
        async with http.get(proxy / "v2/contacts") as resp:
            body = await resp.text()
            assert resp.status == 429, body
            assert "mashery.not.authorized.over.ratelimit" in body
            assert int(resp.headers["Retry-After"]) > 60
    assert (await sim_stats(http, sim))["requests"] == 3  # refused here, never sent


async def test_redis_outage_keeps_serving_slower_then_shares_again(
    tmp_path: Path,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    sim, proxies = await start_replicas(
        tmp_path, start_server, start_proxy, redis_server, jitter_in=0.02
    )
    load = Load(http, proxies, per_proxy=3)
    await asyncio.sleep(1.5)
    await redis_server.stop()
    killed = time.monotonic()

    async def all_fallback() -> bool:
        return await modes(http, proxies) == [(200, "fallback")] * 3  # degraded, still ready

    await wait_for(all_fallback, timeout=3.0)
    await asyncio.sleep(max(0.0, killed + 3.5 - time.monotonic()))
    served_alone = sum(1 for at, status in load.finished if at > killed and status == 200)
    await redis_server.start()

    async def all_shared() -> bool:
        return await modes(http, proxies) == [(200, "shared")] * 3

    await wait_for(all_shared, timeout=4.0)
    await asyncio.sleep(0.5)
    await load.stop()
    stats = await sim_stats(http, sim)
    assert served_alone >= 2  # slower, but served
    assert set(load.statuses) == {200}, load.errors[:3]  # no quota error reached a client
    assert stats["max_arrivals_1s"] <= 4, stats  # never failed open
    # The restarted Redis forgot the day's count; the replicas told it again.
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        counted = int(await client.hget(redis_keys(FP)[1], "sent") or 0)
    finally:
        await client.aclose()
    assert counted >= stats["accepted"]

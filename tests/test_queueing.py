"""The quota engine through HTTP: pacing against the simulator, 429s, Prefer, headers, buckets."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.credentials import Secret, fingerprint
from proxy.simulator import SimulatorConfig, make_simulator_app
from tests.conftest import Recorder, ServerFactory, StartProxy, proxy_config


def jwt(claims: dict[str, Any]) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


async def sim_stats(http: aiohttp.ClientSession, sim: URL) -> dict[str, Any]:
    async with http.get(sim / "__sim__" / "stats") as resp:
        stats: dict[str, Any] = await resp.json()
        return stats


async def test_a_burst_against_the_rolling_window_sees_no_quota_error(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await start_server(
        make_simulator_app(SimulatorConfig(api_key="KEY", qps=4, jitter_in=0.02, seed=7))
    )
    sim_url = sim.make_url("")
    # In-process simulator: the shared event loop adds to the 20 ms jitter, hence the margin.
    _, proxy = await start_proxy(
        # Each identical read its own send (no coalescing): 14 sends to pace.
        proxy_config(
            tmp_path, sim_url, qps=4.0, api_key=Secret("KEY"), pacing_margin=0.06, coalesce=False
        )
    )
    answers = await asyncio.gather(*(http.get(proxy / "v2/contacts") for _ in range(14)))
    assert [a.status for a in answers] == [200] * 14
    stats = await sim_stats(http, sim_url)
    assert stats["totals"]["rejected"]["per_second"] == 0
    assert stats["totals"]["max_arrivals_1s"] <= 4
    assert stats["totals"]["accepted"] == 14


@pytest.mark.parametrize(
    ("path", "key", "shape"),
    [("v2/lists", "mashery.not.authorized.over.qps", list), ("v3/contacts", "throttled", dict)],
)
async def test_429_at_once_when_the_wait_is_beyond_prefer(
    path: str,
    key: str,
    shape: Any,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, upstream = recorder
    # Each identical read its own place in the queue (no coalescing): 5 ahead.
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=2.0, coalesce=False))
    ahead = [asyncio.ensure_future(http.get(proxy / path)) for _ in range(5)]
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.get(proxy / path, headers={"Prefer": "wait=1"}) as resp:
        elapsed = loop.time() - started
        assert resp.status == 429
        body: Any = await resp.json()
        retry_after = int(resp.headers["Retry-After"])
        assert resp.headers["RateLimit-Policy"] == '"per-second";q=2;w=1, "daily";q=10000;w=86400'
        assert re.fullmatch(
            r'"per-second";r=\d+;t=\d+, "daily";r=\d+;t=\d+', resp.headers["RateLimit"]
        )
    assert elapsed < 0.5  # answered at once, not after waiting
    assert type(body) is shape
    entry = body[0] if isinstance(body, list) else body
    assert entry["error_key"] == key
    assert f"{retry_after} seconds" in entry["error_message"]
    assert retry_after >= 2  # 4 still ahead at 2/s
    for task in ahead:
        (await task).release()


async def test_prefer_wait_is_honoured_and_said_so(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=4.0, max_wait=30.0))
    async with http.get(proxy / "v3/contacts", headers={"Prefer": "respond-async, wait=5"}) as resp:
        assert resp.status == 200
        assert resp.headers["Preference-Applied"] == "wait=5"
        assert resp.headers["Server-Timing"].startswith("queue;dur=")
        assert "RateLimit" in resp.headers
    async with http.get(proxy / "v3/contacts", headers={"Prefer": "wait=100"}) as resp:
        assert "Preference-Applied" not in resp.headers  # beyond --max-wait: not what was used


async def test_v3_requests_are_queued_by_the_jwt_client_id(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=4.0))
    tokens = {"app-one": jwt({"cid": "app-one"}), "app-two": jwt({"client_id": "app-two"})}
    for token in tokens.values():
        async with http.get(
            proxy / "v3/contacts", headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200
    async with http.get(proxy / "v3/contacts", headers={"Authorization": "Bearer opaque"}) as r:
        assert r.status == 200
    async with http.get(proxy / "status") as resp:
        status = await resp.json()
    keys = {entry["key"] for entry in status["keys"]}
    assert keys == {fingerprint("app-one"), fingerprint("app-two"), "(v3-shared)"}
    text = json.dumps(status)
    assert "app-one" not in text and "opaque" not in text


async def test_a_client_that_leaves_the_queue_is_never_sent(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    # Each identical read its own place in the queue (no coalescing).
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=2.0, coalesce=False))
    async with aiohttp.ClientSession() as patient, aiohttp.ClientSession() as impatient:
        ahead = [
            asyncio.ensure_future(
                patient.get(proxy / "v2/lists", headers={"X-Request-Id": f"p{i}"})
            )
            for i in range(3)
        ]
        await asyncio.sleep(0.1)
        with pytest.raises(asyncio.TimeoutError):
            await impatient.get(
                proxy / "v2/lists",
                headers={"X-Request-Id": "gone"},
                timeout=aiohttp.ClientTimeout(total=0.3),
            )
        for task in ahead:
            (await task).release()
        await asyncio.sleep(1.0)  # past the slot the leaver would have had
    ids = [s.headers["X-Request-Id"] for s in rec.seen]
    assert ids == ["p0", "p1", "p2"]
    async with aiohttp.ClientSession() as http, http.get(proxy / "status") as resp:
        entry = (await resp.json())["keys"][0]
    assert entry["sent_today"] == 3
    assert entry["queued"] == 0


async def test_the_daily_count_survives_a_restart(
    recorder: tuple[Recorder, URL],
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    from proxy.app import make_app

    _, upstream = recorder
    config = proxy_config(tmp_path, upstream, qps=50.0, daily_quota=10, api_key=Secret("KEY-R"))
    first = await start_server(make_app(config))
    for _ in range(6):
        async with http.get(first.make_url("/v2/lists")) as resp:
            assert resp.status == 200
    await first.close()  # a graceful stop writes the state
    second = await start_server(make_app(config))
    answers = [await http.get(second.make_url("/v2/lists")) for _ in range(5)]
    assert [a.status for a in answers] == [200] * 4 + [429]
    body = await answers[-1].json()
    assert body[0]["error_key"] == "mashery.not.authorized.over.ratelimit"

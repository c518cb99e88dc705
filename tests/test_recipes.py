"""Every client recipe of docs/clients.md, run against the proxy with a forced 429 burst.

The simulator takes QPS calls a second (rolling window); the proxy paces to it with a short
--max-wait, so of a burst of concurrent calls some are queued and the rest answered 429 with
Retry-After at once. Each recipe (requests + urllib3 Retry, httpx, aiohttp, Node fetch, axios +
axios-retry, curl --retry, and the PHP and C# programs of examples/) must end with every call
answered 2xx, and the upstream must have received no more calls than were made: a 429 from the
proxy means nothing was sent, so retrying it (POST included) costs nothing.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.credentials import Secret
from proxy.simulator import STATS_PATH, SimulatorConfig, make_simulator_app
from tests import clients
from tests.conftest import ServerFactory, StartProxy, proxy_config

API_KEY = "RECIPE-API-KEY-3f1a"
ACCESS_TOKEN = "RECIPE-ACCESS-TOKEN-6b2c"
QPS = 10
MAX_WAIT = 1.0
# Calls per recipe: about QPS * MAX_WAIT fit the queue, the rest of the burst gets 429s.
COUNT = 16
# Client processes and the servers share two cores: arrivals bunch up by more than the
# default 25 ms (see tests/test_clients.py), and the margin is the proxy's setting for that.
PACING_MARGIN = 0.1


async def _pair(
    start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path, **overrides: Any
) -> tuple[URL, str]:
    sim = await start_server(
        make_simulator_app(
            SimulatorConfig(api_key=API_KEY, access_token=ACCESS_TOKEN, qps=QPS, window="rolling")
        )
    )
    _, proxy = await start_proxy(
        proxy_config(
            tmp_path,
            sim.make_url(""),
            api_key=Secret(API_KEY),
            access_token=Secret(ACCESS_TOKEN),
            qps=float(QPS),
            max_wait=MAX_WAIT,
            pacing_margin=PACING_MARGIN,
            # The recipes repeat one URL; each call must be its own send for the count to hold.
            coalesce=False,
            **overrides,
        )
    )
    return sim.make_url(""), str(proxy).rstrip("/")


async def _upstream_totals(sim: URL) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(sim / STATS_PATH.lstrip("/")) as resp:
        stats: dict[str, Any] = await resp.json()
    totals: dict[str, Any] = stats["totals"]
    return totals


async def _throttled(proxy: str) -> float:
    """How many 429s the proxy answered itself (per-second budget)."""
    async with aiohttp.ClientSession() as http, http.get(f"{proxy}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name, sample.labels.get("kind")) == (
                "ctct_proxy_throttled_total",
                "per_second",
            ):
                return sample.value
    return 0.0


def _assert_every_call_served(lines: list[dict[str, object]]) -> None:
    for line in lines:
        assert 200 <= int(str(line["status"])) < 300, line
    # The burst was forced: some calls were answered 429 and came back.
    assert any(int(str(line["attempts"])) > 1 for line in lines), lines


async def _assert_sent_once_each(sim: URL, calls: int) -> None:
    totals = await _upstream_totals(sim)
    assert totals["requests"] == calls, totals  # no more sends than requests
    assert totals["accepted"] == calls, totals
    assert totals["max_arrivals_1s"] <= QPS, totals


@pytest.mark.parametrize(
    "recipe",
    [
        "requests_retry.py",
        "httpx_retry.py",
        "aiohttp_retry.py",
        "fetch_retry.mjs",
        "axios_retry.cjs",
        "curl_retry.sh",
    ],
)
async def test_recipe_gets_every_call_through_a_429_burst(
    recipe: str, start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    sim, proxy = await _pair(start_server, start_proxy, tmp_path)
    lines = await clients.run_recipe(recipe, proxy, COUNT)
    _assert_every_call_served(lines)
    assert {line["method"] for line in lines} == {"GET", "POST"}
    assert await _throttled(proxy) >= 1
    await _assert_sent_once_each(sim, COUNT)


async def test_php_and_csharp_programs_get_every_call_through_a_429_burst(
    start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The programs of examples/ with their retry habits: PHP v2 and C# v2 sleep a second on
    `mashery.not.authorized.over.qps` (the SDKs' users' loop), C# v3 sleeps Retry-After."""
    await asyncio.to_thread(clients.ensure_built)
    sim, proxy = await _pair(start_server, start_proxy, tmp_path)
    php_runs, cs_v2, cs_v3 = await asyncio.gather(
        asyncio.gather(
            *(clients.run_php_v2(proxy, 2, f"burst{n}", max_retries=10) for n in range(2))
        ),
        clients.run_cs_v2(proxy, 6, max_retries=10),
        clients.run_cs_v3(proxy, 6, max_retries=10),
    )
    lines = [line for run in php_runs for line in run] + cs_v2 + cs_v3
    _assert_every_call_served(lines)
    for line in lines:
        assert line["body_sha256_echoed"] == line["body_sha256_sent"], line
    assert await _throttled(proxy) >= 1
    await _assert_sent_once_each(sim, len(lines))


@pytest.mark.parametrize(
    "recipe",
    [
        "requests_retry.py",
        "httpx_retry.py",
        "aiohttp_retry.py",
        "fetch_retry.mjs",
        "axios_retry.cjs",
        "curl_retry.sh",
    ],
)
async def test_recipe_hands_back_a_daily_quota_429_instead_of_sleeping_for_hours(
    recipe: str, start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Past the day's quota the proxy answers 429 with Retry-After until 00:00 UTC: hours that
    urllib3, axios-retry and curl would sleep through as given. The recipes give it back."""
    now = time.time()
    to_midnight = 86_400 - now % 86_400
    if to_midnight < 120:  # the day would end under the recipes' own LONGEST_WAIT
        await asyncio.sleep(to_midnight + 1)
    sim, proxy = await _pair(start_server, start_proxy, tmp_path, daily_quota=3)
    started = time.monotonic()
    lines = await clients.run_recipe(recipe, proxy, 6)
    assert time.monotonic() - started < 30
    assert sorted(int(str(line["status"])) for line in lines) == [200] * 3 + [429] * 3
    assert all(line["attempts"] == 1 for line in lines if line["status"] == 429), lines
    totals = await _upstream_totals(sim)
    assert totals["requests"] == totals["accepted"] == 3, totals

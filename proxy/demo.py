"""`ctct-proxy demo`: the problem and the fix, side by side, on the built-in stand-in.

Starts the stand-in (4 calls/s, rolling window, like the real gateway) and the proxy in this
process, fires one burst of concurrent requests straight at the stand-in and the same burst
through the proxy, and shows what each got.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.app import make_app
from proxy.config import Config
from proxy.credentials import Secret
from proxy.simulator import SimulatorConfig, make_simulator_app

DEMO_KEY = "demo-api-key"
DEMO_TOKEN = "demo-access-token"


@dataclass
class BurstResult:
    """What one burst of requests got back."""

    label: str
    statuses: Counter[int] = field(default_factory=Counter)
    error_keys: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    upstream: dict[str, object] = field(default_factory=dict)


async def _start(app: web.Application) -> tuple[web.AppRunner, URL]:
    runner = web.AppRunner(app, handler_cancellation=True, auto_decompress=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, URL(f"http://{host}:{port}")


async def _burst(
    session: aiohttp.ClientSession,
    label: str,
    base: URL,
    count: int,
    query: str,
    out: TextIO,
) -> BurstResult:
    result = BurstResult(label)
    tty = out.isatty()
    done = 0
    started = time.monotonic()

    async def one(i: int) -> None:
        nonlocal done
        url = URL(f"{base}/v2/contacts?email=user{i}%40example.com&{query}", encoded=True)
        async with session.get(url, headers={"Authorization": f"Bearer {DEMO_TOKEN}"}) as resp:
            result.statuses[resp.status] += 1
            if resp.status >= 400:
                body = await resp.json(content_type=None)
                entry = body[0] if isinstance(body, list) else body
                result.error_keys[str(entry.get("error_key"))] += 1
        done += 1
        if tty:
            out.write(f"\r  {label:<22} {done:>4}/{count} answered")
            out.flush()
        elif done % max(1, count // 4) == 0 or done == count:
            out.write(f"  {label:<22} {done:>4}/{count} answered\n")

    await asyncio.gather(*(one(i) for i in range(count)))
    result.seconds = time.monotonic() - started
    if tty:
        out.write("\n")
    return result


def _table(direct: BurstResult, proxied: BurstResult, out: TextIO) -> None:
    rows = [
        ("requests", sum(direct.statuses.values()), sum(proxied.statuses.values())),
        ("200 OK", direct.statuses[200], proxied.statuses[200]),
        (
            "quota errors (403/429)",
            direct.statuses[403] + direct.statuses[429],
            proxied.statuses[403] + proxied.statuses[429],
        ),
        ("seconds", f"{direct.seconds:.1f}", f"{proxied.seconds:.1f}"),
        ("upstream rejections", _rejected(direct), _rejected(proxied)),
        (
            "most arrivals in 1 s",
            direct.upstream.get("max_arrivals_1s"),
            proxied.upstream.get("max_arrivals_1s"),
        ),
    ]
    out.write(f"\n  {'':<24}{'straight at the API':>22}{'through ctct-proxy':>22}\n")
    for name, left, right in rows:
        out.write(f"  {name:<24}{left!s:>22}{right!s:>22}\n")
    if direct.error_keys:
        keys = ", ".join(f"{k} ×{n}" for k, n in direct.error_keys.items())
        out.write(f"\n  Straight at the API the clients saw: {keys}\n")
    out.write(
        "  Through the proxy every request succeeded: it queued them and paced the sends to the quota.\n"
    )


def _rejected(result: BurstResult) -> object:
    rejected = result.upstream.get("rejected")
    if isinstance(rejected, dict):
        return rejected.get("per_second", 0)
    return "?"


async def run_demo(
    count: int = 40, qps: int = 4, out: TextIO | None = None
) -> tuple[BurstResult, BurstResult]:
    """Run both bursts and print the comparison; returns the two results."""
    out = out or sys.stdout
    sim_config = SimulatorConfig(api_key=DEMO_KEY, access_token=DEMO_TOKEN, qps=qps, jitter_in=0.02)
    sim_runner, sim_url = await _start(make_simulator_app(sim_config))
    with tempfile.TemporaryDirectory(prefix="ctct-proxy-demo-") as state:
        config = Config(
            api_key=Secret(DEMO_KEY),
            access_token=Secret(DEMO_TOKEN),
            upstream_v2=sim_url,
            upstream_v3=sim_url,
            qps=float(qps),
            state_dir=Path(state),
            max_wait=max(30.0, count / qps * 1.2),
            # The stand-in, the proxy and the clients share one event loop here, so arrivals
            # wobble more than between separate processes: a little more margin than the
            # default keeps the demo's upstream clean on a busy machine.
            pacing_margin=0.05,
        )
        proxy_runner, proxy_url = await _start(make_app(config))
        out.write(
            f"ctct-proxy demo: a stand-in Constant Contact API at {sim_url} allows {qps} calls/s per key.\n"
            f"Firing {count} concurrent requests straight at it, then {count} through the proxy at {proxy_url}.\n\n"
        )
        try:
            async with aiohttp.ClientSession() as session:
                direct = await _burst(
                    session, "straight at the API", sim_url, count, f"api_key={DEMO_KEY}", out
                )
                direct.upstream = await _sim_stats(session, sim_url)
                await session.post(f"{sim_url}/__sim__/reset")
                await asyncio.sleep(1.1)  # let the window empty before the second burst
                proxied = await _burst(
                    session, "through ctct-proxy", proxy_url, count, "api_key=stale-or-dummy", out
                )
                proxied.upstream = await _sim_stats(session, sim_url)
        finally:
            await proxy_runner.cleanup()
            await sim_runner.cleanup()
    _table(direct, proxied, out)
    return direct, proxied


async def _sim_stats(session: aiohttp.ClientSession, sim_url: URL) -> dict[str, object]:
    async with session.get(f"{sim_url}/__sim__/stats") as resp:
        stats = await resp.json()
    totals = stats.get("totals", {})
    return totals if isinstance(totals, dict) else {}

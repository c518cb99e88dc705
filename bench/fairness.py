"""A bulk importer and an interactive program share one key: how long does the interactive wait?

Starts the simulator (rolling window, 20 ms inbound jitter) and the proxy as separate
processes. A bulk importer (N concurrent workers, its own User-Agent) saturates one key:
each worker sends back to back and, when answered 429, waits the `Retry-After` it was
given, as a well-behaved client does. Meanwhile an interactive program (another
User-Agent) makes one call every 2 s. Each combination of N and Priority runs against a
fresh simulator and proxy; with Priority, the interactive calls carry `Priority: u=1`
(RFC 9218) and the bulk ones nothing (the default u=3). Prints the interactive calls'
time to answer (p50, p95, max) and statuses, the bulk side's answers (200, 429 at once,
429 after queueing), the key's utilization and the upstream's rejections.

    python -m bench.fairness
    python -m bench.fairness --workers 40 --priority off --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.common import classify_answer, free_port, start, stop, wait_ready

KEY = "bench-fairness-api-key"
TOKEN = "bench-fairness-access-token"
BULK_AGENT = "bulk-importer/1.0"
INTERACTIVE_AGENT = "interactive-app/1.0"
INTERACTIVE_PERIOD = 2.0
# Bulk workers start first; the interactive program's first call comes once the key is busy.
WARM_UP = 2.0
# A 429 from a queue the proxy had admitted the request to (its deadline passed while queued),
# as opposed to one refused at once; the two messages differ (proxy/quota/engine.py).
_AFTER_QUEUEING = b"could not be sent within its wait budget"


@dataclass
class Side:
    """What one program saw."""

    outcomes: Counter[str] = field(default_factory=Counter)
    times: list[float] = field(default_factory=list)


async def bulk_worker(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], stop_at: float, side: Side
) -> None:
    """Send back to back until stop_at; after a 429, wait its Retry-After (bounded by stop_at)."""
    while time.monotonic() < stop_at:
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
        kind = classify_answer(resp.status, resp.headers, body)
        if kind == "proxy_429":
            kind = "429_after_queueing" if _AFTER_QUEUEING in body else "429_at_once"
            pause = float(resp.headers.get("Retry-After", "1"))
            await asyncio.sleep(min(pause, max(0.0, stop_at - time.monotonic())))
        side.outcomes[kind] += 1


async def interactive(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], stop_at: float, side: Side
) -> None:
    """One call every INTERACTIVE_PERIOD seconds (on a fixed schedule), each timed."""

    async def call() -> None:
        started = time.monotonic()
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
        side.times.append(time.monotonic() - started)
        side.outcomes[classify_answer(resp.status, resp.headers, body)] += 1

    calls = []
    next_at = time.monotonic()
    while next_at < stop_at:
        calls.append(asyncio.create_task(call()))
        next_at += INTERACTIVE_PERIOD
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*calls)


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (no interpolation: with few samples, a value seen)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


async def run_once(workers: int, priority: bool, seconds: float, qps: int) -> dict[str, Any]:
    """One run against a fresh simulator and proxy; the figures as a dict."""
    sim_port, proxy_port = free_port(), free_port()
    sim = start(
        [
            "simulate",
            "--port",
            str(sim_port),
            "--api-key",
            KEY,
            "--access-token",
            TOKEN,
            "--qps",
            str(qps),
            "--window",
            "rolling",
            "--jitter-in",
            "0.02",
        ]
    )
    bulk, inter = Side(), Side()
    with tempfile.TemporaryDirectory() as state:
        proxy = start(
            [
                "serve",
                "--port",
                str(proxy_port),
                "--api-key",
                KEY,
                "--access-token",
                TOKEN,
                "--upstream-v2",
                f"http://127.0.0.1:{sim_port}",
                "--upstream-v3",
                f"http://127.0.0.1:{sim_port}",
                "--qps",
                str(qps),
                "--state-dir",
                state,
                # Every request its own send: this measures the queue's order, not shared reads.
                "--no-coalesce",
            ]
        )
        try:
            sim_url, proxy_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{proxy_port}"
            await wait_ready(sim_url + "/__sim__/stats")
            await wait_ready(proxy_url + "/healthz")
            async with aiohttp.ClientSession() as s:
                await s.post(sim_url + "/__sim__/reset")
            url = proxy_url + "/v2/contacts?api_key=stale"
            bulk_headers = {"User-Agent": BULK_AGENT}
            inter_headers = {"User-Agent": INTERACTIVE_AGENT}
            if priority:
                inter_headers["Priority"] = "u=1"
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                stop_at = time.monotonic() + seconds
                tasks = [
                    asyncio.create_task(bulk_worker(session, url, bulk_headers, stop_at, bulk))
                    for _ in range(workers)
                ]
                await asyncio.sleep(WARM_UP)
                await interactive(session, url, inter_headers, stop_at, inter)
                # Bulk requests still queued when the time is up disconnect: never sent.
                await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            async with aiohttp.ClientSession() as s, s.get(sim_url + "/__sim__/stats") as resp:
                totals = (await resp.json())["totals"]
        finally:
            stop(proxy)
            stop(sim)
    sends = totals["requests"]
    accepted = totals["accepted"]
    rejected = totals["rejected"]["per_second"]
    span = (totals["last_arrival"] - totals["first_arrival"]) + 1.0 / qps if sends else 0.0
    times = inter.times or [0.0]
    raw = bulk.outcomes["raw_gateway"] + inter.outcomes["raw_gateway"]
    return {
        "workers": workers,
        "priority": priority,
        "seconds": seconds,
        "interactive_calls": len(inter.times),
        "interactive_200": inter.outcomes["ok"],
        "interactive_other": {k: v for k, v in inter.outcomes.items() if k != "ok"},
        "interactive_p50_s": round(statistics.median(times), 3),
        "interactive_p95_s": round(percentile(times, 0.95), 3),
        "interactive_max_s": round(max(times), 3),
        "bulk_200": bulk.outcomes["ok"],
        "bulk_429_at_once": bulk.outcomes["429_at_once"],
        "bulk_429_after_queueing": bulk.outcomes["429_after_queueing"],
        "bulk_other": {
            k: v
            for k, v in bulk.outcomes.items()
            if k not in ("ok", "429_at_once", "429_after_queueing")
        },
        "quota_errors_at_clients": raw,
        "upstream_sends": sends,
        "upstream_rejections": rejected,
        "rejection_rate": round(rejected / sends, 4) if sends else 0.0,
        "max_arrivals_1s": totals["max_arrivals_1s"],
        "utilization": round(accepted / (qps * span), 4) if span else 0.0,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[40, 200])
    parser.add_argument("--priority", choices=("off", "on", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--qps", type=int, default=4)
    args = parser.parse_args()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.priority]
    results = []
    for workers in args.workers:
        for priority in modes:
            result = await run_once(workers, priority, args.seconds, args.qps)
            results.append(result)
            print(
                f"N={workers:<3} priority={'on ' if priority else 'off'} "
                f"interactive: {result['interactive_200']}/{result['interactive_calls']} 200, "
                f"p50 {result['interactive_p50_s']:.2f} s, p95 {result['interactive_p95_s']:.2f} s, "
                f"max {result['interactive_max_s']:.2f} s | "
                f"bulk: {result['bulk_200']} 200, {result['bulk_429_at_once']} 429 at once, "
                f"{result['bulk_429_after_queueing']} 429 after queueing | "
                f"key used {result['utilization']:.1%}, quota errors at clients "
                f"{result['quota_errors_at_clients']}, upstream rejections "
                f"{result['upstream_rejections']}/{result['upstream_sends']}",
                flush=True,
            )
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())

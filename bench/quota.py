"""Saturate one key through the proxy and report what the upstream saw.

Starts the simulator (rolling window, inbound jitter) and the proxy as separate processes,
drives C concurrent clients for D seconds, and prints: successes, quota errors seen by
clients, upstream rejections, most arrivals in any one-second span, and utilization.

    python bench/quota.py --clients 100 --seconds 30
    python bench/quota.py --clients 30 --seconds 20 --neighbour-qps 1 --generation v3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
import time
from collections import Counter

import aiohttp

from bench.common import free_port, start, stop, wait_ready

KEY = "bench-api-key"


def _jwt(claims: dict[str, str]) -> str:
    """An unsigned JWT-shaped token: the v3 gateway (and the simulator) bucket by its `cid`."""

    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


TOKEN = _jwt({"cid": KEY})


async def drive(
    proxy: str, clients: int, seconds: float, generation: str
) -> tuple[Counter[str], int]:
    """C clients each sending back-to-back requests until the time is up."""
    outcomes: Counter[str] = Counter()
    stop_at = time.monotonic() + seconds
    path = "/v2/contacts?api_key=stale" if generation == "v2" else "/v3/contacts"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def client() -> None:
            while time.monotonic() < stop_at:
                async with session.get(
                    proxy + path, headers={"Authorization": "Bearer stale"}
                ) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        outcomes["ok"] += 1
                    elif resp.status in (403, 429) and (
                        b"over" in body or b"throttled" in body or b"quota" in body
                    ):
                        # A raw gateway error or the proxy's own 429: either way a quota error.
                        kind = "raw_gateway" if "Retry-After" not in resp.headers else "proxy_429"
                        outcomes[kind] += 1
                    else:
                        outcomes[f"status_{resp.status}"] += 1

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        # Clients still queued when the time is up disconnect: they cost nothing upstream.
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes, clients


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--qps", type=int, default=4)
    parser.add_argument(
        "--jitter", type=float, default=0.02, help="simulator inbound jitter, seconds"
    )
    parser.add_argument("--window", choices=("rolling", "fixed"), default="rolling")
    parser.add_argument("--neighbour-qps", type=float, default=0.0)
    parser.add_argument("--generation", choices=("v2", "v3"), default="v2")
    parser.add_argument(
        "--pacing-margin", type=float, default=None, help="override the proxy's default"
    )
    args = parser.parse_args()

    sim_port, proxy_port = free_port(), free_port()
    sim_args = [
        "simulate",
        "--port",
        str(sim_port),
        "--api-key",
        KEY,
        "--access-token",
        TOKEN,
        "--qps",
        str(args.qps),
        "--window",
        args.window,
        "--jitter-in",
        str(args.jitter),
    ]
    if args.neighbour_qps:
        sim_args += ["--neighbour-qps", str(args.neighbour_qps), "--neighbour-key", KEY]
    sim = start(sim_args)
    with tempfile.TemporaryDirectory() as state:
        proxy_args = [
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
            str(args.qps),
            "--state-dir",
            state,
            "--max-wait",
            "60",
            # Every request its own send: this measures the queue, not shared reads.
            "--no-coalesce",
        ]
        if args.pacing_margin is not None:
            proxy_args += ["--pacing-margin", str(args.pacing_margin)]
        proxy = start(proxy_args)
        try:
            sim_url, proxy_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{proxy_port}"
            await wait_ready(sim_url + "/__sim__/stats")
            await wait_ready(proxy_url + "/healthz")
            async with aiohttp.ClientSession() as s:
                await s.post(sim_url + "/__sim__/reset")
            outcomes, _ = await drive(proxy_url, args.clients, args.seconds, args.generation)
            async with aiohttp.ClientSession() as s, s.get(sim_url + "/__sim__/stats") as resp:
                stats = await resp.json()
        finally:
            stop(proxy)
            stop(sim)
    totals = stats["totals"]
    sends = totals["requests"]
    accepted = totals["accepted"]
    rejected = totals["rejected"]["per_second"]
    span = (totals["last_arrival"] - totals["first_arrival"]) + 1.0 / args.qps if sends else 0.0
    # The share of the quota left over by the neighbour (its accepted calls in the same span).
    available = args.qps * span - totals["neighbour"]["accepted"]
    utilization = accepted / available if available > 0 else 0.0
    result = {
        "clients": args.clients,
        "seconds": args.seconds,
        "qps": args.qps,
        "window": args.window,
        "jitter_in": args.jitter,
        "neighbour_qps": args.neighbour_qps,
        "generation": args.generation,
        "successes": outcomes["ok"],
        "raw_gateway_quota_errors_at_clients": outcomes["raw_gateway"],
        "proxy_429s": outcomes["proxy_429"],
        "other": {k: v for k, v in outcomes.items() if k.startswith("status_")},
        "upstream_sends": sends,
        "upstream_rejections": rejected,
        "rejection_rate": round(rejected / sends, 4) if sends else 0.0,
        "max_arrivals_1s": totals["max_arrivals_1s"],
        "neighbour_accepted": totals["neighbour"]["accepted"],
        "utilization": round(utilization, 4),
    }
    for name, value in result.items():
        print(f"{name:>38}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())

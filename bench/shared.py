"""Three replicas share one key through a real redis-server: what does the upstream see?

Starts a redis-server, the simulator (rolling window, inbound jitter) and R proxy replicas
as separate processes, all sharing one API key through Redis; drives C concurrent clients
spread over the replicas for D seconds, and prints: successes, quota errors seen by clients,
upstream rejections, most arrivals in any one-second span, and utilization. With
`--kill-redis-at S` (and `--restart-redis-at T`) Redis is killed mid-run and started again
(empty, as after a crash without persistence), and each phase's rate is reported.

    python -m bench.shared --seconds 30
    python -m bench.shared --seconds 30 --kill-redis-at 10 --restart-redis-at 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import drive, free_port, start, stop, wait_ready
from tests.redis_server import RedisServer

KEY = "bench-shared-api-key"
TOKEN = "bench-shared-access-token"
MODE_POLL = 0.1


class Run:
    """The clock of one run: event times, phase snapshots and each replica's mode changes."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.events: list[tuple[float, str]] = []
        self.snapshots: dict[str, dict[str, Any]] = {}

    def at(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def note(self, event: str) -> None:
        self.events.append((self.at(), event))


async def sim_totals(session: aiohttp.ClientSession, sim: str) -> dict[str, Any]:
    async with session.get(sim + "/__sim__/stats") as resp:
        totals: dict[str, Any] = (await resp.json())["totals"]
    return {**totals, "at": time.monotonic()}


async def watch_modes(session: aiohttp.ClientSession, proxies: list[str], run: Run) -> None:
    """Record every mode change of every replica, as /readyz reports it."""
    last: dict[str, str] = {}
    while True:
        for i, proxy in enumerate(proxies):
            try:
                async with session.get(proxy + "/readyz") as resp:
                    body = await resp.json()
                    mode = f"{body['mode']} ({resp.status})"
            except aiohttp.ClientError as error:
                mode = f"unreachable ({type(error).__name__})"
            if last.get(proxy) != mode:
                last[proxy] = mode
                run.note(f"replica {i}: {mode}")
        await asyncio.sleep(MODE_POLL)


async def outage(
    redis: RedisServer,
    session: aiohttp.ClientSession,
    sim: str,
    run: Run,
    kill_at: float | None,
    restart_at: float | None,
) -> None:
    """Kill Redis at kill_at and start it again at restart_at, snapshotting the simulator."""
    if kill_at is None:
        return
    await asyncio.sleep(max(0.0, run.started + kill_at - time.monotonic()))
    run.snapshots["kill"] = await sim_totals(session, sim)
    await redis.stop()
    run.note("redis killed")
    if restart_at is None:
        return
    await asyncio.sleep(max(0.0, run.started + restart_at - time.monotonic()))
    run.snapshots["restart"] = await sim_totals(session, sim)
    await redis.start()
    run.note("redis restarted (empty)")


def phase(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    seconds = after["at"] - before["at"]
    accepted = after["accepted"] - before["accepted"]
    rejected = after["rejected"]["per_second"] - before["rejected"]["per_second"]
    return {
        "seconds": round(seconds, 1),
        "accepted": accepted,
        "accepted_per_s": round(accepted / seconds, 2) if seconds > 0 else 0.0,
        "rejected": rejected,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=30, help="spread over the replicas")
    parser.add_argument("--qps", type=int, default=4)
    parser.add_argument(
        "--jitter", type=float, default=0.02, help="simulator inbound jitter, seconds"
    )
    parser.add_argument("--kill-redis-at", type=float, default=None, help="seconds into the run")
    parser.add_argument("--restart-redis-at", type=float, default=None, help="seconds into the run")
    parser.add_argument(
        "--pacing-margin", type=float, default=None, help="override the proxy's default"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        await redis.start()
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        procs = [
            start(
                [
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
                    "rolling",
                    "--jitter-in",
                    str(args.jitter),
                ]
            )
        ]
        proxies = []
        for i in range(args.replicas):
            port = free_port()
            proxies.append(f"http://127.0.0.1:{port}")
            proxy_args = [
                "serve",
                "--port",
                str(port),
                "--api-key",
                KEY,
                "--access-token",
                TOKEN,
                "--upstream-v2",
                sim_url,
                "--upstream-v3",
                sim_url,
                "--qps",
                str(args.qps),
                "--state-dir",
                str(Path(tmp) / f"state-{i}"),
                "--max-wait",
                "60",
                # Every request its own send: this measures the queue, not shared reads.
                "--no-coalesce",
                "--redis-url",
                redis.url,
                "--replicas",
                str(args.replicas),
            ]
            if args.pacing_margin is not None:
                proxy_args += ["--pacing-margin", str(args.pacing_margin)]
            procs.append(start(proxy_args))
        try:
            await wait_ready(sim_url + "/__sim__/stats")
            for proxy in proxies:
                await wait_ready(proxy + "/healthz")
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=120)
            ) as session:
                await session.post(sim_url + "/__sim__/reset")
                run = Run()
                run.snapshots["start"] = await sim_totals(session, sim_url)
                watcher = asyncio.create_task(watch_modes(session, proxies, run))
                chaos = asyncio.create_task(
                    outage(redis, session, sim_url, run, args.kill_redis_at, args.restart_redis_at)
                )
                outcomes = await drive(
                    session, proxies, args.clients, run.started + args.seconds, "/v2/contacts"
                )
                run.snapshots["end"] = await sim_totals(session, sim_url)
                chaos.cancel()
                await asyncio.sleep(2 * MODE_POLL)
                watcher.cancel()
                await asyncio.gather(watcher, chaos, return_exceptions=True)
        finally:
            for proc in procs:
                stop(proc)
            await redis.stop()

    totals = run.snapshots["end"]
    sends = totals["requests"]
    accepted = totals["accepted"]
    rejected = totals["rejected"]["per_second"]
    span = (totals["last_arrival"] - totals["first_arrival"]) + 1.0 / args.qps if sends else 0.0
    result: dict[str, Any] = {
        "replicas": args.replicas,
        "clients": args.clients,
        "seconds": args.seconds,
        "qps": args.qps,
        "jitter_in": args.jitter,
        "kill_redis_at": args.kill_redis_at,
        "restart_redis_at": args.restart_redis_at,
        "successes": outcomes["ok"],
        "raw_gateway_quota_errors_at_clients": outcomes["raw_gateway"],
        "proxy_429s": outcomes["proxy_429"],
        "other": {k: v for k, v in outcomes.items() if k.startswith("status_")},
        "upstream_sends": sends,
        "upstream_rejections": rejected,
        "rejection_rate": round(rejected / sends, 4) if sends else 0.0,
        "max_arrivals_1s": totals["max_arrivals_1s"],
        "utilization": round(accepted / (args.qps * span), 4) if span else 0.0,
    }
    marks = [m for m in ("start", "kill", "restart", "end") if m in run.snapshots]
    if len(marks) > 2:
        result["phases"] = {
            f"{a}->{b}": phase(run.snapshots[a], run.snapshots[b])
            for a, b in itertools.pairwise(marks)
        }
    result["timeline"] = [f"{t:6.2f}s {event}" for t, event in run.events]
    for name, value in result.items():
        if name == "timeline":
            print(f"{name:>36}:")
            for line in value:
                print(f"{'':>38}{line}")
        else:
            print(f"{name:>36}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())

"""Reads beyond the quota: what coalescing and the cache save, through the proxy.

Starts the stand-in (4 calls/s per key, rolling window, 100 ms to answer) and, one after the
other, proxies in front of it; prints client answers per second, upstream sends and distinct
bodies (the stand-in numbers every answer, so each send has a body of its own):

- burst: 20 identical concurrent GETs through the default proxy (coalescing on);
- mix: W workers over 5 read URLs for S seconds, with coalescing off (what every read cost
  before), with the default proxy, and with `--cache-ttl 5`; then a PUT through the caching
  proxy and a read of the item and of its collection (both must be fresh);
- pass-through: no credentials in the proxy, two clients with different tokens asking the
  same URL at the same moment (2 sends: they never share).

    python -m bench.reads --workers 30 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.common import free_port, start, stop, wait_ready

KEY, TOKEN = "bench-api-key", "bench-access-token"
ITEM = "/v3/contacts/2c0a3a7e"
READS = (
    "/v3/contact_lists?limit=50",
    "/v3/contact_custom_fields",
    "/v3/account/summary",
    "/v3/contacts?email=someone%40example.com",  # the collection ITEM belongs to
    "/v3/emails?limit=10",
)
BURST = "/v3/contact_lists?limit=50"


@dataclass
class Run:
    """What one proxy's clients got and what the stand-in saw meanwhile."""

    label: str
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    bodies: set[str] = field(default_factory=set)
    sends: int = 0
    saved: dict[str, int] = field(default_factory=dict)

    @property
    def answers(self) -> int:
        return sum(self.statuses.values())

    def as_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "seconds": round(self.seconds, 2),
            "answers": self.answers,
            "answers_per_second": round(self.answers / self.seconds, 1) if self.seconds else 0.0,
            "statuses": dict(self.statuses),
            "upstream_sends": self.sends,
            "distinct_bodies": len(self.bodies),
            "sends_saved": self.saved,
        }


class Stand:
    """The stand-in, and proxies started in front of it one at a time."""

    def __init__(self, latency: float, tmp: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.latency = latency
        self.tmp = tmp
        self.count = 0

    def start(self) -> subprocess.Popen[bytes]:
        # No credentials demanded: the pass-through clients bring their own, any will do.
        args = ["simulate", "--port", str(self.port), "--qps", "4", "--window", "rolling"]
        return start([*args, "--latency-out", str(self.latency)])

    async def proxy(self, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
        self.count += 1
        port = free_port()
        args = ["serve", "--port", str(port), "--qps", "4", "--max-wait", "60"]
        args += ["--upstream-v2", self.url, "--upstream-v3", self.url]
        args += ["--state-dir", f"{self.tmp}/state-{self.count}", *extra]
        proc = start(args)
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url + "/healthz")
        return proc, url

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(self.url + "/__sim__/reset") as resp:
            await resp.read()

    async def sends(self, session: aiohttp.ClientSession) -> int:
        async with session.get(self.url + "/__sim__/stats") as resp:
            return int((await resp.json())["totals"]["requests"])


async def fetch(
    session: aiohttp.ClientSession, url: str, run: Run, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url, headers=headers) as resp:
        body = await resp.read()
    run.statuses[resp.status] += 1
    run.bodies.add(hashlib.sha256(body).hexdigest())
    return resp.status, dict(resp.headers), body


async def saved(session: aiohttp.ClientSession, proxy: str) -> dict[str, int]:
    async with session.get(proxy + "/status") as resp:
        sends_saved: dict[str, int] = (await resp.json())["reads"]["sends_saved"]
        return sends_saved


def since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What the proxy saved between two readings of /status."""
    return {reason: after[reason] - before.get(reason, 0) for reason in after}


async def burst(stand: Stand, proxy: str, session: aiohttp.ClientSession) -> Run:
    """20 identical GETs at the same moment."""
    run = Run("burst of 20 identical GETs")
    await stand.reset(session)
    before = await saved(session, proxy)
    started = time.monotonic()
    await asyncio.gather(*(fetch(session, proxy + BURST, run) for _ in range(20)))
    run.seconds = time.monotonic() - started
    run.sends = await stand.sends(session)
    run.saved = since(before, await saved(session, proxy))
    return run


async def mix(
    stand: Stand,
    proxy: str,
    session: aiohttp.ClientSession,
    label: str,
    workers: int,
    seconds: float,
) -> Run:
    """`workers` clients, each reading one of the URLs back to back until the time is up."""
    run = Run(label)
    await stand.reset(session)
    before = await saved(session, proxy)
    stop_at = time.monotonic() + seconds

    async def worker(path: str) -> None:
        while time.monotonic() < stop_at:
            await fetch(session, proxy + path, run)

    started = time.monotonic()
    tasks = [asyncio.create_task(worker(READS[i % len(READS)])) for i in range(workers)]
    await asyncio.sleep(seconds)
    # Reads still waiting when the time is up are dropped: they cost nothing upstream.
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    run.seconds = time.monotonic() - started
    run.sends = await stand.sends(session)
    run.saved = since(before, await saved(session, proxy))
    return run


async def write_then_read(proxy: str, session: aiohttp.ClientSession) -> dict[str, object]:
    """A PUT through the caching proxy: its item and its collection are read fresh after it."""
    scratch = Run("write")
    collection = proxy + READS[3]
    await fetch(session, proxy + ITEM, scratch)
    _, hit, _ = await fetch(session, proxy + ITEM, scratch)
    _, before, _ = await fetch(session, collection, scratch)
    async with session.put(proxy + ITEM, data=b'{"first_name":"Ada"}') as resp:
        put_status = resp.status
    _, item_after, _ = await fetch(session, proxy + ITEM, scratch)
    _, collection_after, _ = await fetch(session, collection, scratch)
    return {
        "put_status": put_status,
        "item_before": hit.get("Cache-Status"),
        "collection_before": before.get("Cache-Status"),
        "item_after": item_after.get("Cache-Status"),
        "collection_after": collection_after.get("Cache-Status"),
    }


async def pass_through(stand: Stand, proxy: str, session: aiohttp.ClientSession) -> Run:
    """Two clients with their own, different tokens ask the same URL at the same moment."""
    run = Run("pass-through, two tokens, same URL at once")
    await stand.reset(session)
    started = time.monotonic()
    await asyncio.gather(
        *(
            fetch(session, proxy + BURST, run, {"Authorization": f"Bearer {token}"})
            for token in ("token-of-alice", "token-of-bob")
        )
    )
    run.seconds = time.monotonic() - started
    run.sends = await stand.sends(session)
    run.saved = await saved(session, proxy)
    return run


def show(run: Run) -> None:
    figures = run.as_json()
    print(
        f"{run.label:<44} answers {run.answers:>6} ({figures['answers_per_second']}/s), "
        f"upstream sends {run.sends:>3}, distinct bodies {len(run.bodies):>3}"
        + ("" if set(run.statuses) == {200} else f", statuses {dict(run.statuses)}")
    )


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cache-ttl", type=float, default=5.0)
    parser.add_argument(
        "--latency", type=float, default=0.1, help="seconds the stand-in takes to answer"
    )
    args = parser.parse_args(argv)

    results: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        stand = Stand(args.latency, tmp)
        procs = [stand.start()]
        try:
            await wait_ready(stand.url + "/__sim__/stats")
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                configured = ("--api-key", KEY, "--access-token", TOKEN)
                phases: list[tuple[tuple[str, ...], str]] = [
                    ((*configured, "--no-coalesce"), "mix, --no-coalesce"),
                    (configured, "mix, coalescing (default)"),
                    (
                        (*configured, "--cache-ttl", str(args.cache_ttl)),
                        f"mix, --cache-ttl {args.cache_ttl:g}",
                    ),
                ]
                write: dict[str, object] = {}
                for flags, label in phases:
                    proc, proxy = await stand.proxy(*flags)
                    procs.append(proc)
                    if label.startswith("mix, coalescing"):
                        results.append(await burst(stand, proxy, session))
                        show(results[-1])
                    results.append(
                        await mix(stand, proxy, session, label, args.workers, args.seconds)
                    )
                    show(results[-1])
                    if "--cache-ttl" in flags:
                        write = await write_then_read(proxy, session)
                        print(
                            f"{'a PUT, then its item and collection':<44} "
                            f"item {write['item_before']!r} -> {write['item_after']!r},\n"
                            f"{'':<44} collection {write['collection_before']!r} -> "
                            f"{write['collection_after']!r}"
                        )
                    stop(proc)
                proc, proxy = await stand.proxy()
                procs.append(proc)
                results.append(await pass_through(stand, proxy, session))
                show(results[-1])
        finally:
            for proc in procs:
                stop(proc)
    print(json.dumps({"runs": [r.as_json() for r in results], "write": write}))


if __name__ == "__main__":
    asyncio.run(main())

"""Hostile clients against a local proxy: memory before authentication, and /metrics cost.

Starts the stand-in API and the proxy as child processes on 127.0.0.1 (a fresh proxy for
each attack, so that its peak resident memory is that attack's) and runs, bounded in count
and time:

- header flood: C connections each send a request line and ~780 KB of headers, every one
  under the per-header limits, and never the blank line that would end them; held open for
  a few seconds, then closed. No client token is involved: all of it happens before one
  would be checked.
- body flood: C clients with a valid client token each POST an 8 MiB body at once.
- scrape storm: the proxy in pass-through mode learns K keys (one request per api_key),
  then S clients scrape /metrics back to back while /healthz is timed every 10 ms.

For each attack it prints the proxy's resident memory before, at its peak (VmHWM) and a
few seconds after the connections closed; for the storm, /healthz p50/p99/max and the time
one scrape takes.

    python -m bench.attack                     # all three
    python -m bench.attack --only headers --connections 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp

from bench.common import free_port, start, stop, wait_ready
from proxy.config import DEFAULT_MAX_BODY_MEMORY

API_KEY = "attack-api-key-3c1d"
ACCESS_TOKEN = "attack-access-token-9e2f"
CLIENT_TOKEN = "attack-client-token-5a7b1c9d"
MIB = 1024 * 1024


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident memory) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(rest.split()[0]) / 1024
    return fields


class Stack:
    """The stand-in API and one proxy in front of it."""

    def __init__(self, state: Path, passthrough: bool, extra: Sequence[str]) -> None:
        self.sim_port, self.port = free_port(), free_port()
        self.sim = start(
            [
                "simulate",
                "--port",
                str(self.sim_port),
                "--api-key",
                API_KEY,
                "--access-token",
                ACCESS_TOKEN,
            ]
        )
        upstream = f"http://127.0.0.1:{self.sim_port}"
        args = ["serve", "--port", str(self.port), "--state-dir", str(state)]
        args += ["--upstream-v2", upstream, "--upstream-v3", upstream, *extra]
        if not passthrough:
            args += ["--api-key", API_KEY, "--access-token", ACCESS_TOKEN]
            args += ["--client-token", CLIENT_TOKEN]
        self.proxy = start(args)
        self.base = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        await wait_ready(f"http://127.0.0.1:{self.sim_port}/__sim__/stats")
        await wait_ready(self.base + "/healthz")

    def memory(self) -> dict[str, float]:
        return memory_mb(self.proxy.pid)

    def close(self) -> None:
        stop(self.proxy)
        stop(self.sim)


class PeakWatch:
    """Samples the proxy's VmRSS every 20 ms (VmHWM is read too: the kernel's own peak)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, memory_mb(self.pid)["VmRSS"])
            await asyncio.sleep(0.02)

    def __enter__(self) -> PeakWatch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def header_flood(stack: Stack, connections: int, size: int, hold: float) -> str:
    """C connections with an unterminated head of `size` bytes each, held `hold` seconds."""
    # 99 lines of 7.9 KB make 780 KB: under the 8,190-byte field and 100-header limits.
    line = b"X-Filler-%05d: " + b"h" * 7860 + b"\r\n"
    headers = b"".join(line % i for i in range(size // len(line % 0) + 1))[:size]
    head = b"GET /v2/lists HTTP/1.1\r\nHost: proxy\r\n" + headers  # no final CRLF
    outcomes: Counter[str] = Counter()
    sent = 0
    opened = asyncio.Event()
    started = 0

    async def attacker() -> None:
        nonlocal sent, started
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        except OSError as exc:
            outcomes[f"connect failed: {type(exc).__name__}"] += 1
            return
        started += 1
        if started == connections:
            opened.set()
        try:
            for i in range(0, len(head), 64 * 1024):
                writer.write(head[i : i + 64 * 1024])
                await writer.drain()
                sent += min(64 * 1024, len(head) - i)
            outcomes["whole head sent"] += 1
            answer = await asyncio.wait_for(reader.read(64), hold)
            outcomes[answer[:12].decode(errors="replace") or "closed"] += 1
        except TimeoutError:
            outcomes["no answer, still open"] += 1
        except OSError as exc:
            outcomes[f"cut off ({type(exc).__name__})"] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    tasks = [asyncio.create_task(attacker()) for _ in range(connections)]
    await asyncio.wait_for(asyncio.gather(*tasks), hold + 60)
    summary = ", ".join(f"{n} {what}" for what, n in outcomes.most_common())
    return f"{summary}; {sent / 1e6:.0f} MB sent"


async def body_flood(stack: Stack, clients: int, size: int) -> str:
    """C authenticated clients each POST a body of `size` bytes at once."""
    body = b"b" * size
    outcomes: Counter[str] = Counter()
    headers = {
        "Authorization": f"Bearer {CLIENT_TOKEN}",
        "Content-Type": "application/octet-stream",
    }
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(i: int) -> None:
            try:
                async with session.post(
                    f"{stack.base}/v3/activities/{i}", data=body, headers=headers
                ) as resp:
                    await resp.read()
                    outcomes[str(resp.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    return ", ".join(f"{n} x {what}" for what, n in sorted(outcomes.items()))


async def learn_keys(stack: Stack, keys: int) -> None:
    """One request per made-up api_key: pass-through mode makes each a queue of its own."""
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem, session.get(f"{stack.base}/v2/lists?api_key=made-up-{i:05d}") as resp:
                await resp.read()

        await asyncio.gather(*(one(i) for i in range(keys)))


async def scrape_storm(stack: Stack, scrapers: int, seconds: float) -> tuple[str, list[float]]:
    """S clients scraping /metrics back to back; /healthz latency sampled every 10 ms."""
    latencies: list[float] = []
    scrape_times: list[float] = []
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def scraper() -> None:
            while time.monotonic() < stop_at:
                began = time.monotonic()
                async with session.get(stack.base + "/metrics") as resp:
                    await resp.read()
                scrape_times.append(time.monotonic() - began)

        async def prober() -> None:
            while time.monotonic() < stop_at:
                began = time.monotonic()
                async with session.get(stack.base + "/healthz") as resp:
                    await resp.read()
                latencies.append(time.monotonic() - began)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(scraper() for _ in range(scrapers)), prober())
    async with aiohttp.ClientSession() as session, session.get(stack.base + "/metrics") as resp:
        size = len(await resp.read())
    return (
        f"{len(scrape_times)} scrapes, median {statistics.median(scrape_times) * 1000:.1f} ms "
        f"each ({size / 1024:.0f} KiB)",
        latencies,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def attack(
    title: str,
    run: Callable[[Stack], Awaitable[str]],
    passthrough: bool = False,
    extra: Sequence[str] = (),
    settle: float = 3.0,
) -> None:
    with tempfile.TemporaryDirectory() as state:
        stack = Stack(Path(state), passthrough, extra)
        try:
            await stack.ready()
            idle = stack.memory()["VmRSS"]
            with PeakWatch(stack.proxy.pid) as watch:
                began = time.monotonic()
                what = await run(stack)
                took = time.monotonic() - began
            peak = max(watch.peak_rss, stack.memory()["VmHWM"])
            await asyncio.sleep(settle)
            after = stack.memory()["VmRSS"]
            print(f"{title}: {what} ({took:.1f} s)")
            when = f"{settle:.0f} s after the connections closed" if settle else "at the end"
            print(f"  proxy RSS: idle {idle:.0f} MB, peak {peak:.0f} MB, {when} {after:.0f} MB")
        finally:
            stack.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["headers", "bodies", "metrics"], action="append")
    parser.add_argument("--connections", type=int, default=1000, help="header flood")
    parser.add_argument("--header-bytes", type=int, default=780_000, help="per connection")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds each is held open")
    parser.add_argument("--bodies", type=int, default=150, help="body flood clients")
    parser.add_argument("--body-mib", type=int, default=8)
    parser.add_argument(
        "--max-body-memory", type=int, help="the proxy's setting, bytes (default: its default)"
    )
    parser.add_argument("--keys", type=int, default=10_000, help="scrape storm")
    parser.add_argument("--scrapers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="scrape storm length")
    args = parser.parse_args()
    only = set(args.only or ["headers", "bodies", "metrics"])
    # Each attacking connection is a file descriptor here and one in the proxy (a child,
    # which inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * args.connections + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    if "headers" in only:
        await attack(
            f"header flood: {args.connections} connections x {args.header_bytes / 1000:.0f} KB "
            "of headers, never ended",
            lambda s: header_flood(s, args.connections, args.header_bytes, args.hold),
        )
    if "bodies" in only:
        bound = args.max_body_memory or DEFAULT_MAX_BODY_MEMORY
        await attack(
            f"body flood: {args.bodies} clients x {args.body_mib} MiB bodies at once, "
            f"--max-body-memory {bound / MIB:g} MiB",
            lambda s: body_flood(s, args.bodies, args.body_mib * MIB),
            extra=["--max-body-memory", str(bound)] if args.max_body_memory else (),
        )
    if "metrics" in only:
        latencies: list[float] = []

        async def storm(stack: Stack) -> str:
            began = time.monotonic()
            await learn_keys(stack, args.keys)
            learned = time.monotonic() - began
            summary, found = await scrape_storm(stack, args.scrapers, args.seconds)
            latencies.extend(found)
            return f"{args.keys} keys learned in {learned:.1f} s; {summary}"

        await attack(
            f"/metrics storm: {args.scrapers} scrapers, {args.seconds:g} s",
            storm,
            passthrough=True,
            settle=0.0,
        )
        print(
            f"  /healthz every 10 ms meanwhile ({len(latencies)} probes): "
            f"p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())

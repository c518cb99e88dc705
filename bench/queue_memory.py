"""Queue 10,000 concurrent requests and report the proxy's memory and /healthz latency meanwhile.

The proxy runs as a child process in front of a small recording upstream in this process;
requests are started in order, a fraction of a millisecond apart, so the order in which
the upstream sees them tells whether the queue was served first in, first out.

    python bench/queue_memory.py --requests 10000 --qps 400
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import free_port, recording_upstream, start, stop, wait_ready


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument(
        "--qps", type=int, default=400, help="the key's quota, so the queue drains in bounded time"
    )
    parser.add_argument(
        "--stagger", type=float, default=0.0003, help="seconds between request starts"
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    order: list[int] = []

    runner, up_port = await recording_upstream(
        lambda r: order.append(int(r.headers["X-Request-Id"]))
    )

    proxy_port = free_port()
    with tempfile.TemporaryDirectory() as state:
        proxy = start(
            [
                "serve",
                "--port",
                str(proxy_port),
                "--api-key",
                "bench-key",
                "--upstream-v2",
                f"http://127.0.0.1:{up_port}",
                "--upstream-v3",
                f"http://127.0.0.1:{up_port}",
                "--qps",
                str(args.qps),
                "--max-wait",
                "3600",
                # Every request its own send: this measures the queue, not shared reads.
                "--no-coalesce",
                "--max-queue",
                str(args.requests),
                "--state-dir",
                state,
            ]
        )
        try:
            base = f"http://127.0.0.1:{proxy_port}"
            await wait_ready(base + "/healthz")
            idle_rss = rss_mb(proxy.pid)
            statuses: dict[int, int] = {}
            peak_rss = idle_rss
            health_ms: list[float] = []
            # Connect every client first, then write the requests in order: the order the
            # proxy reads them in is then the order they were written in.
            conns = [
                await asyncio.open_connection("127.0.0.1", proxy_port) for _ in range(args.requests)
            ]

            async def one(
                i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
            ) -> None:
                writer.write(
                    f"GET /v2/contacts HTTP/1.1\r\nHost: x\r\nX-Request-Id: {i}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                data = await reader.read()
                status = int(data.split(b" ", 2)[1]) if data else 0
                statuses[status] = statuses.get(status, 0) + 1
                writer.close()

            async def launch() -> list[asyncio.Task[None]]:
                tasks = []
                for i, (reader, writer) in enumerate(conns):
                    tasks.append(asyncio.create_task(one(i, reader, writer)))
                    await asyncio.sleep(args.stagger)
                return tasks

            started = time.monotonic()
            launcher = asyncio.create_task(launch())
            async with aiohttp.ClientSession() as probe:
                while not launcher.done() or len(order) < args.requests * 0.9:
                    t0 = time.perf_counter()
                    async with probe.get(base + "/healthz") as resp:
                        await resp.read()
                    health_ms.append((time.perf_counter() - t0) * 1000)
                    peak_rss = max(peak_rss, rss_mb(proxy.pid))
                    await asyncio.sleep(0.05)
                    if time.monotonic() - started > 600:
                        break
            tasks = await launcher
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
        finally:
            stop(proxy)
            await runner.cleanup()
    inversions = sum(1 for a, b in itertools.pairwise(order) if b < a)
    health_ms.sort()
    result = {
        "requests": args.requests,
        "qps": args.qps,
        "answered": sum(statuses.values()),
        "statuses": statuses,
        "upstream_received": len(order),
        "fifo_inversions": inversions,
        "proxy_rss_idle_mb": round(idle_rss, 1),
        "proxy_rss_peak_mb": round(peak_rss, 1),
        "healthz_samples": len(health_ms),
        "healthz_p50_ms": round(statistics.median(health_ms), 2),
        "healthz_p99_ms": round(health_ms[min(len(health_ms) - 1, int(len(health_ms) * 0.99))], 2),
        "seconds": round(elapsed, 1),
    }
    for name, value in result.items():
        print(f"{name:>20}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())

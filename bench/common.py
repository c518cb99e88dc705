"""Helpers the benchmark scripts share: free ports, child processes, waiting for readiness."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m proxy ARGS` (quietly) as a child process."""
    full_env = {**os.environ, "CTCT_PROXY_LOG_LEVEL": "warning", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(url: str, timeout: float = 15.0) -> None:
    """Poll a URL until it answers (any status)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def classify_answer(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """What a benchmark client makes of an answer: ok, raw_gateway, proxy_429 or status_N."""
    if status == 200:
        return "ok"
    if status in (403, 429) and (b"over" in body or b"throttled" in body or b"quota" in body):
        # A raw gateway error or the proxy's own 429 (which always carries Retry-After).
        return "raw_gateway" if "Retry-After" not in headers else "proxy_429"
    return f"status_{status}"


async def drive(
    session: aiohttp.ClientSession,
    bases: Sequence[str],
    clients: int,
    stop_at: float,
    path: str,
    headers: Mapping[str, str] | None = None,
) -> Counter[str]:
    """C clients, spread over the bases, each sending back-to-back until stop_at."""
    outcomes: Counter[str] = Counter()

    async def client(base: str) -> None:
        while time.monotonic() < stop_at:
            async with session.get(base + path, headers=headers) as resp:
                body = await resp.read()
            outcomes[classify_answer(resp.status, resp.headers, body)] += 1

    tasks = [asyncio.create_task(client(bases[i % len(bases)])) for i in range(clients)]
    # Clients still queued when the time is up disconnect: they cost nothing upstream.
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes


async def recording_upstream(record: Callable[[web.Request], None]) -> tuple[web.AppRunner, int]:
    """A minimal upstream on a free port that calls `record` for every request and says ok."""

    async def handler(request: web.Request) -> web.Response:
        record(request)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port

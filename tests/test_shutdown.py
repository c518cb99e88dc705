"""SIGTERM with requests still waiting on the upstream: the real `ctct-proxy serve` process.

`podman stop` and `docker stop` send SIGTERM and SIGKILL 10 s later; Kubernetes waits
`terminationGracePeriodSeconds`. The proxy must be gone, with status 0, within
`--shutdown-grace` + 1 s whatever the upstream does, and every client must have an answer:
the upstream's if it came in time, else 503 with `Retry-After`. Queued requests, never sent,
get their 503 at once. The proxy runs as a subprocess (signals, exit status and timing are the
process's), the upstream is a slow simulator or a small aiohttp app on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import ServerFactory
from tests.test_operations import (
    ACCESS_TOKEN,
    API_KEY,
    STALE_TOKEN,
    Served,
    child_env,
    eventually,
    start_serve,
    start_simulator,
)

GRACE = 2.0
SLOW = 12.0  # the upstream's answer comes long after the grace
Reply = tuple[int, dict[str, str], bytes]


@pytest.fixture
async def serve_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Start `ctct-proxy serve` against an upstream; killed at the end if still running."""
    started: list[Served] = []

    async def start(upstream: URL, *extra: str) -> Served:
        served = await start_serve(
            [str(Path(sys.executable).parent / "ctct-proxy"), "serve", "--port", "0",
             "--upstream-v2", str(upstream), "--upstream-v3", str(upstream),
             "--api-key", API_KEY, "--access-token", ACCESS_TOKEN,
             "--state-dir", str(tmp_path / "state"), "--shutdown-grace", str(GRACE),
             "--log-format", "json", "--no-coalesce", *extra],
            child_env(),
            tmp_path,
        )  # fmt: skip
        started.append(served)
        return served

    yield start
    for served in started:
        if served.proc.returncode is None:
            served.proc.kill()
            await served.proc.communicate()


async def arrived(http: aiohttp.ClientSession, sim: URL) -> int:
    """How many requests reached the simulator (counted on arrival, before its latency)."""
    async with http.get(sim / "__sim__/stats") as resp:
        return int((await resp.json())["totals"]["requests"])


async def arrived_once(http: aiohttp.ClientSession, sim: URL) -> bool:
    return await arrived(http, sim) == 1


async def get(http: aiohttp.ClientSession, proxy: URL, request_id: str) -> Reply:
    headers = {"X-Request-Id": request_id, "Authorization": f"Bearer {STALE_TOKEN}"}
    async with http.get(proxy / "v3/contacts", headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def settled(task: asyncio.Task[Any]) -> Any:
    """The task's result or exception; cancelled first if still running (nothing leaks)."""
    task.cancel()
    return (await asyncio.gather(task, return_exceptions=True))[0]


def assert_unavailable(reply: Reply) -> None:
    """503, a whole-second Retry-After of at least 1, Constant Contact's v3 error object."""
    status, headers, body = reply
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body)["error_key"] == "service_unavailable"


async def test_a_call_waiting_on_a_slow_upstream_gets_503_and_the_process_exits_within_grace(
    start_server: ServerFactory,
    serve_proxy: Callable[..., Awaitable[Served]],
    http: aiohttp.ClientSession,
) -> None:
    sim = await start_simulator(start_server, latency_out=SLOW)
    served = await serve_proxy(sim)
    proxy = URL(f"http://127.0.0.1:{served.port}")
    call = asyncio.create_task(get(http, proxy, "in-flight"))
    await eventually(lambda: arrived_once(http, sim))
    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    done, _ = await asyncio.wait({call}, timeout=GRACE + 1)
    answered = time.monotonic() - signalled
    code, events, err = await served.finish(timeout=GRACE + 5)
    exited = time.monotonic() - signalled
    reply = await settled(call)

    assert call in done, f"the client had no answer within the grace + 1 s: {reply!r}"
    assert not isinstance(reply, BaseException), reply
    assert_unavailable(reply)
    assert answered <= GRACE + 1
    assert code == 0, err
    assert exited <= GRACE + 1
    finished = [e for e in events if e["event"] == "request_finished"]
    assert [(e["request_id"], e["status"]) for e in finished] == [("in-flight", 503)]
    assert events[-1]["event"] == "stopped"


async def test_queued_calls_get_503_at_once_while_a_call_waits_on_the_upstream(
    start_server: ServerFactory,
    serve_proxy: Callable[..., Awaitable[Served]],
    http: aiohttp.ClientSession,
) -> None:
    # One send a second: the first call is at the upstream, the two behind it wait in the queue.
    sim = await start_simulator(start_server, latency_out=SLOW)
    served = await serve_proxy(sim, "--qps", "1")
    proxy = URL(f"http://127.0.0.1:{served.port}")
    calls = [asyncio.create_task(get(http, proxy, f"call-{n}")) for n in range(3)]

    async def one_sent_two_queued() -> bool:
        async with http.get(proxy / "status") as resp:
            keys = (await resp.json())["keys"]
        return await arrived_once(http, sim) and bool(keys) and keys[0]["queued"] == 2

    await eventually(one_sent_two_queued)
    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    queued = await asyncio.wait_for(asyncio.gather(*calls[1:]), GRACE + 1)
    took = time.monotonic() - signalled

    still_waiting = not calls[0].done()
    reached = await arrived(http, sim)
    await settled(calls[0])

    # Well before the grace is over: they were never sent, so they need not wait for it.
    assert took < 1.0
    for reply in queued:
        assert_unavailable(reply)
    assert still_waiting  # the one at the upstream is still inside its grace
    assert reached == 1  # the queued ones never reached the upstream


async def test_an_answer_stalled_mid_body_is_cut_and_the_process_exits_within_grace(
    start_server: ServerFactory,
    serve_proxy: Callable[..., Awaitable[Served]],
    http: aiohttp.ClientSession,
) -> None:
    # The upstream starts its answer and then stops sending: the client already has a 200 and
    # part of the body, so it cannot get a 503 any more; the connection is closed instead.
    started = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"results": [')
        started.set()
        await asyncio.sleep(60)
        return resp

    app = web.Application()
    app.router.add_get("/v3/contacts", stall)
    upstream = await start_server(app, shutdown_timeout=0.5)  # the stall outlives the test
    served = await serve_proxy(upstream.make_url(""))
    proxy = URL(f"http://127.0.0.1:{served.port}")

    async def read() -> tuple[int, bytes, str]:
        async with http.get(proxy / "v3/contacts") as resp:
            received = b""
            try:
                async for chunk in resp.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError as exc:
                return resp.status, received, type(exc).__name__
            return resp.status, received, "end"

    call = asyncio.create_task(read())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.2)  # the first bytes are on their way to the client
    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    done, _ = await asyncio.wait({call}, timeout=GRACE + 1)
    code, events, err = await served.finish(timeout=GRACE + 5)
    exited = time.monotonic() - signalled
    result = await settled(call)

    assert call in done, "the client's connection was still open after the grace + 1 s"
    status, received, _ = result
    assert (status, received) == (200, b'{"results": [')
    assert code == 0, err
    assert exited <= GRACE + 1
    assert events[-1]["event"] == "stopped"

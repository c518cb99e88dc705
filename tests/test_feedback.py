"""Upstream feedback: gateway quota errors are recognised, replayed or paused, never passed raw."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.credentials import Secret
from proxy.upstream_errors import QuotaKind, classify
from tests.conftest import Recorder, ServerFactory, StartProxy, proxy_config

V2_QPS = b'[{"error_key":"mashery.not.authorized.over.qps","error_message":"The Mashery account associated with this request is over its queries-per-second quota."}]'
V2_RATE = b'[{"error_key":"mashery.not.authorized.over.ratelimit","error_message":"The Mashery account associated with this request is over its rate limit quota."}]'
V2_INACTIVE = b'[{"error_key":"mashery.not.authorized.inactive","error_message":"Inactive key"}]'


@pytest.mark.parametrize(
    ("generation", "status", "headers", "body", "kind"),
    [
        ("v2", 403, {}, V2_QPS, QuotaKind.PER_SECOND),
        ("v2", 403, {}, V2_RATE, QuotaKind.DAILY),
        (
            "v2",
            403,
            {"X-Mashery-Error-Code": "ERR_403_DEVELOPER_OVER_QPS"},
            b"",
            QuotaKind.PER_SECOND,
        ),
        (
            "v2",
            403,
            {"X-Mashery-Error-Code": "ERR_403_SERVICE_OVER_QPS"},
            b"",
            QuotaKind.PER_SECOND,
        ),
        ("v2", 403, {"X-Mashery-Error-Code": "ERR_403_DEVELOPER_OVER_RATE"}, b"", QuotaKind.DAILY),
        (
            "v2",
            403,
            {},
            b"<html><body><h1>Developer Over Qps</h1></body></html>",
            QuotaKind.PER_SECOND,
        ),
        ("v2", 403, {}, b"<h1>Developer Over Rate</h1>", QuotaKind.DAILY),
        (
            "v2",
            403,
            {},
            b'<?xml version="1.0"?><error><h1>Developer Over Qps</h1></error>',
            QuotaKind.PER_SECOND,
        ),
        (
            "v3",
            429,
            {},
            b'{"error_key":"throttled","error_message":"Too Many Requests"}',
            QuotaKind.PER_SECOND,
        ),
        (
            "v3",
            429,
            {},
            b'{"error_key":"quota_exceeded","error_message":"Limit Exceeded"}',
            QuotaKind.DAILY,
        ),
        ("v3", 429, {}, b"", QuotaKind.PER_SECOND),
        # Not quota errors: pass through untouched.
        ("v2", 403, {}, V2_INACTIVE, QuotaKind.NONE),
        ("v2", 403, {}, b"", QuotaKind.NONE),
        (
            "v2",
            401,
            {},
            b'[{"error_key":"http.status.authentication.invalid_token"}]',
            QuotaKind.NONE,
        ),
        (
            "v3",
            401,
            {},
            b'{"error_key":"unauthorized","error_message":"Unauthorized"}',
            QuotaKind.NONE,
        ),
        ("v3", 403, {}, b'[{"error_key":"forbidden","error_message":"no"}]', QuotaKind.NONE),
        ("v2", 200, {}, V2_QPS, QuotaKind.NONE),
        (
            "v3",
            429,
            {},
            b'[{"error_key":"too_many_activities","error_message":"1000 activities queued"}]',
            QuotaKind.NONE,
        ),
    ],
)
def test_classification_table(
    generation: str, status: int, headers: dict[str, str], body: bytes, kind: QuotaKind
) -> None:
    assert classify(generation, status, headers, body) is kind  # type: ignore[arg-type]


async def _counting_upstream(
    recorder: Recorder, rejections: list[tuple[int, bytes, dict[str, str]]]
) -> None:
    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        if rejections:
            status, payload, headers = rejections.pop(0)
            return web.Response(
                status=status, body=payload, headers=headers, content_type="application/json"
            )
        return web.json_response({"sha256": hashlib.sha256(body).hexdigest(), "len": len(body)})

    recorder.answer = answer


async def test_per_second_rejection_is_replayed_with_a_byte_exact_body(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    await _counting_upstream(rec, [(403, V2_QPS, {}), (403, V2_QPS, {"Retry-After": "1"})])
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=4.0, api_key=Secret("KEY-1")))
    body = os.urandom(200_000)
    started = time.monotonic()
    async with http.post(proxy / "v2/activities/addcontacts", data=body) as resp:
        assert resp.status == 200
        got = await resp.json()
    elapsed = time.monotonic() - started
    assert got == {"sha256": hashlib.sha256(body).hexdigest(), "len": len(body)}
    assert [s.body == body for s in rec.seen] == [True, True, True]
    assert elapsed >= 1.0  # the upstream's Retry-After was honoured


async def test_v3_throttle_replayed_then_deadline_gives_429_with_upstream_key(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    throttled = b'{"error_key":"throttled","error_message":"Too Many Requests"}'
    await _counting_upstream(rec, [(429, throttled, {"Retry-After": "3"})])
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=4.0, max_wait=1.0))
    async with http.get(proxy / "v3/contacts") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
        body = await resp.json()
    assert body["error_key"] == "throttled"
    assert "3 seconds" in body["error_message"]
    assert len(rec.seen) == 1


async def test_daily_quota_error_pauses_the_key_until_reset(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    await _counting_upstream(rec, [(403, V2_RATE, {})])
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=4.0, api_key=Secret("KEY-D")))
    results = await asyncio.gather(*(http.get(proxy / "v2/lists") for _ in range(4)))
    statuses = [r.status for r in results]
    bodies = [json.loads(await r.read()) for r in results]
    assert statuses == [429] * 4
    midnight = (int(time.time()) // 86400 + 1) * 86400
    for r, body in zip(results, bodies, strict=True):
        assert body[0]["error_key"] == "mashery.not.authorized.over.ratelimit"
        assert abs(int(r.headers["Retry-After"]) - (midnight - time.time())) < 5
    assert len(rec.seen) == 1  # the queued ones never touched the upstream
    async with http.get(proxy / "v2/lists") as again:
        assert again.status == 429
    assert len(rec.seen) == 1
    async with http.get(proxy / "status") as status:
        keys = (await status.json())["keys"]
    assert keys[0]["paused_until"] is not None


async def test_authorisation_failures_pass_through_byte_for_byte(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder
    await _counting_upstream(rec, [(403, V2_INACTIVE, {"X-Custom": "1"}), (403, b"", {})])
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=4.0))
    async with http.get(proxy / "v2/lists") as resp:
        assert resp.status == 403
        assert await resp.read() == V2_INACTIVE
        assert resp.headers["X-Custom"] == "1"
    async with http.get(proxy / "v2/lists") as resp:
        assert resp.status == 403
        assert await resp.read() == b""
    assert len(rec.seen) == 2


async def _drop_first_connection() -> tuple[list[str], URL]:
    """An upstream that reads the first request and closes the socket without answering."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode()
        length = next(
            (
                int(h.split(b":")[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length")
            ),
            0,
        )
        if length:
            await reader.readexactly(length)
        seen.append(line)
        if len(seen) == 1:
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return seen, URL(f"http://127.0.0.1:{port}")


@pytest.mark.parametrize(("method", "replayed"), [("GET", True), ("POST", False)])
async def test_connection_loss_replays_idempotent_methods_only(
    method: str,
    replayed: bool,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    seen, upstream = await _drop_first_connection()
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=10.0))
    async with http.request(
        method, proxy / "v3/contacts", data=b"{}" if method == "POST" else None
    ) as resp:
        if replayed:
            assert resp.status == 200
            assert await resp.read() == b"ok"
        else:
            assert resp.status == 502
            body = await resp.json()
            assert body["error_key"] == "bad_gateway"
            assert "may or may not" in body["error_message"]
    assert len(seen) == (2 if replayed else 1)


async def test_neighbour_spending_the_key_causes_no_client_errors(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    from proxy.simulator import SimulatorConfig, make_simulator_app

    sim = await start_server(
        make_simulator_app(
            SimulatorConfig(api_key="KEY-N", qps=4, neighbour_qps=1.0, neighbour_key="KEY-N")
        )
    )
    sim_url = sim.make_url("")
    # Each of the identical reads its own send (no coalescing): 16 sends for the neighbour to meet.
    _, proxy = await start_proxy(
        proxy_config(tmp_path, sim_url, qps=4.0, api_key=Secret("KEY-N"), coalesce=False)
    )
    responses = await asyncio.gather(*(http.get(proxy / "v2/lists") for _ in range(16)))
    assert [r.status for r in responses] == [200] * 16
    async with http.get(sim_url / "__sim__/stats") as resp:
        stats = await resp.json()
    assert stats["totals"]["neighbour"]["accepted"] >= 2

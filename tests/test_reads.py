"""Reads beyond the quota: coalesced identical GETs and the opt-in cache, against real servers."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from proxy.config import Config, ConfigError
from proxy.credentials import Secret
from proxy.reads import READS, SHARED_BODY_LIMIT
from proxy.simulator import SimulatorConfig, make_simulator_app
from tests.conftest import Recorder, ServerFactory, StartProxy, proxy_config, raw_url
from tests.fakes import FakeClock

KEY, TOKEN = "reads-api-key", "reads-access-token"


async def simulator(start_server: ServerFactory, **settings: Any) -> URL:
    """The stand-in; `latency_out` keeps an answer in flight long enough for others to join."""
    # The proxy's test config sends at up to 1000/s: the stand-in takes as many.
    server = await start_server(make_simulator_app(SimulatorConfig(**{"qps": 1000, **settings})))
    return server.make_url("")


async def sends(http: aiohttp.ClientSession, sim: URL) -> int:
    """Requests that reached the stand-in."""
    async with http.get(sim / "__sim__/stats") as resp:
        return int((await resp.json())["totals"]["requests"])


async def status(http: aiohttp.ClientSession, proxy: URL) -> dict[str, Any]:
    async with http.get(proxy / "status") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def counter(http: aiohttp.ClientSession, proxy: URL, sample: str) -> float:
    """One sample of /metrics by its exposition text, e.g. `ctct_proxy_x_total{a="b"}`."""
    async with http.get(proxy / "metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        name, _, number = line.rpartition(" ")
        if name == sample:
            return float(number)
    return 0.0


async def get(
    http: aiohttp.ClientSession, url: URL, method: str = "GET", **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.request(method, url, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def echo_number(body: bytes) -> int:
    """Which answer of the stand-in a body is (each echo is numbered)."""
    number: int = json.loads(body)["echo"]
    return number


async def configured_proxy(
    start_proxy: StartProxy, tmp_path: Path, upstream: URL, **overrides: Any
) -> tuple[TestServer, URL]:
    settings: dict[str, Any] = {"api_key": Secret(KEY), "access_token": Secret(TOKEN)}
    return await start_proxy(proxy_config(tmp_path, upstream, **{**settings, **overrides}))


def waiting(server: TestServer) -> tuple[int, int]:
    """Clients waiting on the proxy's flights: (leaders, joiners)."""
    flights = server.app[READS].flights.values()
    return sum(f.leader_waiting for f in flights), sum(f.joined for f in flights)


def fake_clock(server: TestServer) -> FakeClock:
    """Put the reads' clock (Age, freshness) under the test's control."""
    clock = FakeClock()
    server.app[READS].clock = clock
    return clock


# -- coalescing ----------------------------------------------------------------------------


async def test_twenty_identical_concurrent_gets_share_one_send(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN, latency_out=0.3)
    _, proxy = await configured_proxy(start_proxy, tmp_path, sim)
    url = raw_url(proxy, "/v3/contact_lists?limit=50")
    answers = await asyncio.gather(
        *(get(http, url, **{"X-Request-Id": f"c{i}"}) for i in range(20))
    )

    assert [status_ for status_, _, _ in answers] == [200] * 20
    assert len({body for _, _, body in answers}) == 1
    assert await sends(http, sim) == 1
    # Each client sees its own request id, never the leader's; the joiners say what happened.
    assert [headers["X-Request-Id"] for _, headers, _ in answers] == [f"c{i}" for i in range(20)]
    collapsed = [
        h for _, h, _ in answers if h.get("Cache-Status") == "ctct-proxy; fwd=miss; collapsed"
    ]
    assert len(collapsed) == 19
    assert all(h["Age"] == "0" for h in collapsed)
    # Coalesced answers cost no quota but still carry the key's RateLimit fields.
    assert all(
        re.match(r'"per-second";r=\d+;t=\d+, "daily";r=9999;', h["RateLimit"]) for h in collapsed
    )
    shown = await status(http, proxy)
    assert shown["keys"][0]["sent_today"] == 1
    assert shown["reads"]["sends_saved"] == {"cached": 0, "coalesced": 19}
    assert await counter(http, proxy, 'ctct_proxy_sends_saved_total{reason="coalesced"}') == 19
    assert (
        await counter(http, proxy, 'ctct_proxy_requests_total{outcome="coalesced",status="200"}')
        == 19
    )


async def test_reads_that_differ_in_what_they_ask_are_not_shared(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN, latency_out=0.3)
    _, proxy = await configured_proxy(start_proxy, tmp_path, sim)
    url = raw_url(proxy, "/v3/contacts?limit=1")
    variants: list[tuple[URL, dict[str, str]]] = [
        (url, {}),
        (url, {}),  # the only twin
        (raw_url(proxy, "/v3/contacts?limit=2"), {}),
        (raw_url(proxy, "/v3/contacts?limit=01"), {}),  # same value, other bytes
        (url, {"Accept": "text/csv"}),
        (url, {"Accept-Encoding": "gzip"}),
        (url, {"If-None-Match": '"abc"'}),  # a conditional read always goes on its own
    ]
    answers = await asyncio.gather(*(get(http, u, **h) for u, h in variants))
    assert [s for s, _, _ in answers] == [200] * len(variants)
    assert await sends(http, sim) == len(variants) - 1
    assert answers[0][2] == answers[1][2]


async def test_a_joiner_that_leaves_does_not_call_the_send_off(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    release = asyncio.Event()

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"n": len(rec.seen)})

    rec.answer = slow
    server, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    url = proxy / "v3/contacts"
    async with aiohttp.ClientSession() as stay, aiohttp.ClientSession() as leave:
        leader = asyncio.ensure_future(get(stay, url))
        await _eventually(lambda: len(rec.seen) == 1)
        joiner = asyncio.ensure_future(get(stay, url))
        leaver = asyncio.ensure_future(leave.get(url, timeout=aiohttp.ClientTimeout(total=0.3)))
        await _eventually(lambda: waiting(server) == (1, 2))
        with pytest.raises(asyncio.TimeoutError):
            await leaver
        await _eventually(lambda: waiting(server) == (1, 1))  # the proxy saw it go
        release.set()
        (s1, _, b1), (s2, h2, b2) = await asyncio.gather(leader, joiner)
    assert (s1, s2) == (200, 200)
    assert b1 == b2
    assert h2["Cache-Status"] == "ctct-proxy; fwd=miss; collapsed"
    assert len(rec.seen) == 1


async def test_the_leader_leaving_does_not_call_the_send_off_while_others_wait(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    release = asyncio.Event()

    async def slow(request: web.Request, body: bytes) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"answered": True})

    rec.answer = slow
    server, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    url = proxy / "v2/lists"
    async with aiohttp.ClientSession() as stay, aiohttp.ClientSession() as leave:
        leader = asyncio.ensure_future(leave.get(url, timeout=aiohttp.ClientTimeout(total=0.5)))
        await _eventually(lambda: len(rec.seen) == 1)
        joiners = [asyncio.ensure_future(get(stay, url)) for _ in range(2)]
        await _eventually(lambda: waiting(server) == (1, 2))
        with pytest.raises(asyncio.TimeoutError):
            await leader
        await _eventually(lambda: waiting(server) == (0, 2))  # the proxy saw the leader go
        release.set()
        answers = await asyncio.gather(*joiners)
    assert [(s, json.loads(b)) for s, _, b in answers] == [(200, {"answered": True})] * 2
    assert len(rec.seen) == 1


async def test_when_every_client_leaves_a_queued_read_is_never_sent(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=1.0))
    async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as leave:
        async with http.get(proxy / "v2/lists/first") as resp:  # takes this second's slot
            assert resp.status == 200
        gone = [
            asyncio.ensure_future(
                leave.get(proxy / "v2/lists", timeout=aiohttp.ClientTimeout(total=0.3))
            )
            for _ in range(3)
        ]
        for task in gone:
            with pytest.raises(asyncio.TimeoutError):
                await task
        await asyncio.sleep(1.2)  # past the slot the read would have had
        shown = await status(http, proxy)
    assert [s.raw_path for s in rec.seen] == ["/v2/lists/first"]
    assert shown["keys"][0]["sent_today"] == 1
    assert shown["reads"]["in_flight"] == 0


async def test_a_read_joins_only_when_the_send_comes_within_its_wait_budget(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    server, proxy = await start_proxy(proxy_config(tmp_path, upstream, qps=1.0))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy / "v2/lists/first") as resp:  # takes this second's slot
            assert resp.status == 200
        leader = asyncio.ensure_future(get(http, proxy / "v2/lists"))
        # Queued behind the first, about a second to go.
        await _eventually(lambda: waiting(server) == (1, 0))
        hurried = await get(http, proxy / "v2/lists", Prefer="wait=0")
        patient = await get(http, proxy / "v2/lists", Prefer="wait=5")
        led = await leader
    assert hurried[0] == 429  # at once, as if it were alone
    assert (led[0], patient[0]) == (200, 200)
    assert patient[1]["Cache-Status"] == "ctct-proxy; fwd=miss; collapsed"
    assert patient[2] == led[2]
    assert [s.raw_path for s in rec.seen] == ["/v2/lists/first", "/v2/lists"]


async def test_an_answer_above_the_buffer_bound_is_streamed_and_joiners_send_their_own(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    big = bytes(range(256)) * (SHARED_BODY_LIMIT // 256 + 8)
    release = asyncio.Event()

    async def large(request: web.Request, body: bytes) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=big, content_type="application/octet-stream")

    rec.answer = large
    server, proxy = await start_proxy(proxy_config(tmp_path, upstream, cache_ttl=60.0))
    url = proxy / "v3/activities/export"
    async with aiohttp.ClientSession() as http:
        leader = asyncio.ensure_future(get(http, url))
        await _eventually(lambda: len(rec.seen) == 1)
        joiners = [asyncio.ensure_future(get(http, url)) for _ in range(2)]
        await _eventually(lambda: waiting(server) == (1, 2))
        release.set()
        answers = await asyncio.gather(leader, *joiners)
        again = await get(http, url)  # too large to store as well
    assert [(s, b == big) for s, _, b in [*answers, again]] == [(200, True)] * 4
    assert all("collapsed" not in h.get("Cache-Status", "") for _, h, _ in answers)
    assert len(rec.seen) == 4


async def test_an_answer_that_sets_a_cookie_is_neither_shared_nor_stored(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    release = asyncio.Event()

    async def cookie(request: web.Request, body: bytes) -> web.StreamResponse:
        await release.wait()
        response = web.json_response({"n": len(rec.seen)})
        response.set_cookie("session", f"s{len(rec.seen)}")
        return response

    rec.answer = cookie
    server, proxy = await start_proxy(proxy_config(tmp_path, upstream, cache_ttl=60.0))
    url = proxy / "v3/account/summary"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        first = asyncio.ensure_future(get(http, url))
        await _eventually(lambda: len(rec.seen) == 1)
        second = asyncio.ensure_future(get(http, url))
        await _eventually(lambda: waiting(server) == (1, 1))
        release.set()
        answers = await asyncio.gather(first, second)
        third = await get(http, url)
    assert len(rec.seen) == 3
    assert len({h["Set-Cookie"] for _, h, _ in [*answers, third]}) == 3


async def test_identical_heads_share_one_send_and_keep_the_length(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN, latency_out=0.3)
    _, proxy = await configured_proxy(start_proxy, tmp_path, sim)
    url = proxy / "v3/contacts/abc"
    answers = await asyncio.gather(*(get(http, url, "HEAD") for _ in range(5)))
    assert await sends(http, sim) == 1
    lengths = {h["Content-Length"] for _, h, _ in answers}
    assert [(s, b) for s, _, b in answers] == [(200, b"")] * 5
    assert len(lengths) == 1 and int(lengths.pop()) > 0


# -- the cache -----------------------------------------------------------------------------


async def test_cache_hit_miss_and_expiry_on_the_clock(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN)
    server, proxy = await configured_proxy(start_proxy, tmp_path, sim, cache_ttl=5.0)
    clock = fake_clock(server)
    url = raw_url(proxy, "/v2/lists?api_key=stale&modified_since=2024-01-01")

    s, first_headers, first = await get(http, url)
    assert s == 200
    assert first_headers["Cache-Status"] == "ctct-proxy; fwd=miss; stored"
    assert "Age" not in first_headers

    await clock.advance(3)
    s, headers, body = await get(http, url)
    assert (s, body) == (200, first)
    assert headers["Age"] == "3"
    assert headers["Cache-Status"] == "ctct-proxy; hit; ttl=2"
    assert headers["X-Request-Id"] != first_headers["X-Request-Id"]
    assert headers["RateLimit-Policy"] == first_headers["RateLimit-Policy"]
    assert await sends(http, sim) == 1
    shown = await status(http, proxy)
    assert shown["keys"][0]["sent_today"] == 1  # the hit cost no quota
    assert shown["reads"]["cache_entries"] == 1
    assert shown["reads"]["cache_bytes"] > len(first)

    await clock.advance(2)  # the TTL is over
    s, headers, body = await get(http, url)
    assert s == 200
    assert echo_number(body) == echo_number(first) + 1
    assert headers["Cache-Status"] == "ctct-proxy; fwd=miss; stored"
    assert await sends(http, sim) == 2
    assert await counter(http, proxy, 'ctct_proxy_sends_saved_total{reason="cached"}') == 1
    assert (
        await counter(http, proxy, 'ctct_proxy_requests_total{outcome="cached",status="200"}') == 1
    )


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_a_write_drops_its_path_and_parent_collection(
    method: str,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN)
    _, proxy = await configured_proxy(start_proxy, tmp_path, sim, cache_ttl=60.0)
    item, collection, other = (
        raw_url(proxy, "/v3/contacts/abc"),
        raw_url(proxy, "/v3/contacts?limit=5"),
        raw_url(proxy, "/v3/contact_lists"),
    )
    before = {u: (await get(http, u))[2] for u in (item, collection, other)}
    for url in before:
        assert (await get(http, url))[1]["Cache-Status"].startswith("ctct-proxy; hit")

    async with http.request(method, proxy / "v3/contacts/abc", data=b"{}") as resp:
        assert resp.status == 200

    for url, fresh in ((item, True), (collection, True), (other, False)):
        _, headers, body = await get(http, url)
        assert (body != before[url]) is fresh, url
        assert ("hit" in headers["Cache-Status"]) is not fresh, url
    assert await sends(http, sim) == 3 + 1 + 2


async def test_a_write_keeps_a_read_already_in_flight_out_of_the_cache(
    recorder: tuple[Recorder, URL], start_proxy: StartProxy, tmp_path: Path
) -> None:
    rec, upstream = recorder
    release = asyncio.Event()

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.method == "GET" and len(rec.seen) == 1:
            await release.wait()  # the first read is answered after the write
        return web.json_response({"n": len(rec.seen)})

    rec.answer = answer
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, cache_ttl=60.0))
    url = proxy / "v3/contacts/abc"
    async with aiohttp.ClientSession() as http:
        read = asyncio.ensure_future(get(http, url))
        await _eventually(lambda: len(rec.seen) == 1)
        async with http.put(url, data=b"{}") as resp:
            assert resp.status == 200
        release.set()
        s, headers, _ = await read
        assert (s, headers["Cache-Status"]) == (200, "ctct-proxy; fwd=miss")
        _, headers, _ = await get(http, url)
    assert headers["Cache-Status"] == "ctct-proxy; fwd=miss; stored"
    assert [s.method for s in rec.seen] == ["GET", "PUT", "GET"]


@pytest.mark.parametrize(
    ("header", "value"),
    [("Cache-Control", "no-cache"), ("Cache-Control", "max-age=0"), ("Pragma", "no-cache")],
)
async def test_a_client_asking_for_a_fresh_answer_bypasses_and_refreshes(
    header: str,
    value: str,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN)
    _, proxy = await configured_proxy(start_proxy, tmp_path, sim, cache_ttl=60.0)
    url = proxy / "v3/contact_custom_fields"
    _, _, first = await get(http, url)
    _, headers, fresh = await get(http, url, **{header: value})
    assert echo_number(fresh) == echo_number(first) + 1
    assert headers["Cache-Status"] == "ctct-proxy; fwd=request; stored"
    _, headers, later = await get(http, url)
    assert later == fresh  # the refreshed answer replaced the old one
    assert headers["Cache-Status"].startswith("ctct-proxy; hit")
    assert await sends(http, sim) == 2


async def test_a_client_max_age_bounds_the_age_it_accepts(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN)
    server, proxy = await configured_proxy(start_proxy, tmp_path, sim, cache_ttl=60.0)
    clock = fake_clock(server)
    url = proxy / "v3/contact_lists"
    _, _, first = await get(http, url)
    await clock.advance(10)
    assert (await get(http, url, **{"Cache-Control": "max-age=20"}))[2] == first
    assert (await get(http, url, **{"Cache-Control": "max-age=5"}))[2] != first
    assert await sends(http, sim) == 2


@pytest.mark.parametrize(
    ("status_", "headers"),
    [
        (200, {"Cache-Control": "private, no-store"}),
        (200, {"Vary": "Accept-Language"}),
        (404, {}),
    ],
)
async def test_answers_that_may_not_be_reused_are_not_stored(
    status_: int,
    headers: dict[str, str],
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rec, upstream = recorder

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response({"n": len(rec.seen)}, status=status_, headers=headers)

    rec.answer = answer
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, cache_ttl=60.0))
    for _ in range(2):
        s, seen_headers, _ = await get(http, proxy / "v3/contacts/abc")
        assert s == status_
        assert seen_headers["Cache-Status"] == "ctct-proxy; fwd=miss"
    assert len(rec.seen) == 2


async def test_a_head_is_answered_from_a_stored_get(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN)
    _, proxy = await configured_proxy(start_proxy, tmp_path, sim, cache_ttl=60.0)
    url = proxy / "v3/contact_lists"
    _, _, body = await get(http, url)
    s, headers, empty = await get(http, url, "HEAD")
    assert (s, empty, int(headers["Content-Length"])) == (200, b"", len(body))
    assert headers["Cache-Status"].startswith("ctct-proxy; hit")
    # A HEAD that misses is sent as a HEAD, and nothing is stored from it.
    other = proxy / "v3/contacts/xyz"
    assert (await get(http, other, "HEAD"))[1]["Cache-Status"] == "ctct-proxy; fwd=miss"
    assert (await get(http, other))[1]["Cache-Status"] == "ctct-proxy; fwd=miss; stored"
    assert await sends(http, sim) == 3


async def test_the_cache_stays_within_its_bytes_least_recently_used_out_first(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN)
    # Room for about three of the stand-in's echoes (each ~ 1 KiB with headers).
    _, proxy = await configured_proxy(
        start_proxy, tmp_path, sim, cache_ttl=60.0, cache_max_bytes=8 * 1024
    )
    urls = [raw_url(proxy, f"/v3/contacts?limit={n}") for n in range(12)]
    for url in urls:
        await get(http, url)
    await get(http, urls[0])  # a miss again: it was pushed out
    shown = (await status(http, proxy))["reads"]
    assert 0 < shown["cache_bytes"] <= 8 * 1024
    assert shown["cache_entries"] < 12
    assert (await get(http, urls[0]))[1]["Cache-Status"].startswith("ctct-proxy; hit")
    assert (await get(http, urls[1]))[1]["Cache-Status"].startswith("ctct-proxy; fwd=miss")


# -- credentials ---------------------------------------------------------------------------


async def test_pass_through_clients_with_different_credentials_never_share(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The rule of docs/security.md: in pass-through mode each client's own credentials are
    part of the key, so two tokens asking the same URL at the same moment cost two sends,
    and a stored answer is only ever served to the credentials that fetched it."""
    sim = await simulator(start_server, latency_out=0.3)
    _, proxy = await start_proxy(proxy_config(tmp_path, sim, cache_ttl=60.0))
    url = proxy / "v3/contact_lists"
    alice, bob = {"Authorization": "Bearer alice-token"}, {"Authorization": "Bearer bob-token"}

    answers = await asyncio.gather(get(http, url, **alice), get(http, url, **bob))
    assert await sends(http, sim) == 2
    assert echo_number(answers[0][2]) != echo_number(answers[1][2])
    # Each is now stored for its own credentials only.
    again = await asyncio.gather(get(http, url, **alice), get(http, url, **bob))
    assert [b for _, _, b in again] == [b for _, _, b in answers]
    assert await sends(http, sim) == 2
    _, headers, _ = await get(http, url, Authorization="Bearer carol-token")
    assert headers["Cache-Status"] == "ctct-proxy; fwd=miss; stored"
    # v2: the client's own api_key is a credential too.
    v2 = [raw_url(proxy, f"/v2/lists?api_key={key}") for key in ("key-one", "key-two")]
    await asyncio.gather(*(get(http, u) for u in v2))
    assert await sends(http, sim) == 5
    # The same token twice at once: one send (the control).
    same = proxy / "v3/contacts"
    await asyncio.gather(get(http, same, **alice), get(http, same, **alice))
    assert await sends(http, sim) == 6


# -- settings ------------------------------------------------------------------------------


def test_settings_turn_coalescing_off_and_bound_the_cache() -> None:
    assert Config.from_sources({}, {}).coalesce is True
    assert Config.from_sources({"coalesce": "false"}, {}).coalesce is False  # --no-coalesce
    assert Config.from_sources({}, {"CTCT_PROXY_COALESCE": "false"}).coalesce is False
    config = Config.from_sources(
        {}, {"CTCT_PROXY_CACHE_TTL": "5", "CTCT_PROXY_CACHE_MAX_BYTES": "1000"}
    )
    assert (config.cache_ttl, config.cache_max_bytes) == (5.0, 1000)
    with pytest.raises(ConfigError, match="CTCT_PROXY_CACHE_TTL: must be zero or a positive"):
        Config.from_sources({}, {"CTCT_PROXY_CACHE_TTL": "-1"})
    with pytest.raises(ConfigError, match="--cache-max-bytes: must be a positive whole number"):
        Config.from_sources({"cache_max_bytes": "0"}, {})


def test_no_coalesce_is_a_flag_of_serve() -> None:
    from proxy.cli import build_parser

    args = build_parser().parse_args(["serve", "--no-coalesce", "--cache-ttl", "5"])
    config = Config.from_sources(vars(args), {})
    assert (config.coalesce, config.cache_ttl) == (False, 5.0)


async def test_without_coalescing_identical_reads_each_send(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await simulator(start_server, api_key=KEY, access_token=TOKEN, latency_out=0.2)
    _, proxy = await configured_proxy(start_proxy, tmp_path, sim, coalesce=False)
    answers = await asyncio.gather(*(get(http, proxy / "v3/contacts") for _ in range(4)))
    assert len({b for _, _, b in answers}) == 4
    assert all("Cache-Status" not in h for _, h, _ in answers)
    assert await sends(http, sim) == 4


async def _eventually(check: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)

"""The exchange's outcomes and their side effects: each requeue reason does its own and no other."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.config import Config
from proxy.credentials import Secret
from proxy.errors import Throttled
from proxy.quota import KeyQueue, Limits, LocalBackend, QuotaEngine
from proxy.quota.engine import BACKOFF
from proxy.quota.fair import Ticket, TicketState
from proxy.simulator import SimulatorConfig, make_simulator_app
from proxy.simulator.config import OAUTH_EXPIRE_PATH, OAUTH_TOKEN_PATH
from tests.conftest import Recorder, ServerFactory, StartProxy, proxy_config
from tests.fakes import FakeClock, settle

Logs = Callable[[str], list[dict[str, Any]]]
SPACING = 0.25625  # (1 + 0.025) / 4
CLIENT_ID = "exchange-client"
SECRET = "exchange-secret"
SEED = "exchange-refresh-seed"


def engine(clock: FakeClock) -> QuotaEngine:
    return QuotaEngine(Limits(4.0, 10_000, 10_000, 0.025), LocalBackend(clock), clock)


# -- the queue's side of each outcome, on the fake clock -----------------------------------


async def test_retry_goes_back_at_the_head_and_leaves_pacing_alone() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    first, second = queue.admit(30), queue.admit(30)
    await clock.advance(0)
    assert first.state is TicketState.GRANTED
    assert queue.retry(first)  # a lost connection, or a renewed token
    await clock.advance(SPACING)
    # The retried ticket is sent next, ahead of the one that queued behind it.
    assert first.future.done() and not second.future.done()
    assert queue.spacing == pytest.approx(SPACING)
    await clock.advance(SPACING)
    assert second.future.done()


async def test_replay_backs_off_and_holds_the_key() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    ticket = queue.admit(30)
    await clock.advance(0)
    await queue.replay(ticket, None, "throttled")
    assert queue.spacing == pytest.approx(SPACING * BACKOFF)
    assert queue.predicted_wait(0) == pytest.approx(SPACING * BACKOFF)
    assert ticket.state is TicketState.QUEUED


async def test_retry_past_the_deadline_gives_the_ticket_up() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    ticket = queue.admit(0.1)
    others = [queue.admit(30) for _ in range(3)]
    await clock.advance(0)
    await clock.advance(0.2)  # the others' slots are booked ahead of any retry
    assert ticket.state is TicketState.GRANTED
    assert not queue.retry(ticket)
    assert _state_of(ticket) is not TicketState.QUEUED  # not put back
    assert queue.queued == len(others)  # the slot that came next is theirs


@pytest.mark.parametrize("busy", [False, True], ids=["idle-pump", "busy-pump"])
async def test_wait_zero_goes_out_when_the_slot_is_free_now(busy: bool) -> None:
    """`Prefer: wait=0` on a free key is sent, whatever the pump was doing."""
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    if busy:
        # The pump has served earlier traffic and sits in a gateway hold that has just ended.
        earlier = queue.admit(30)
        await clock.advance(0)
        await queue.replay(earlier, 0.5, "throttled")
        await clock.advance(0.6)
        assert earlier.future.done()
        await clock.advance(2.0)
    ticket = queue.admit(0)
    await clock.advance(0)
    await settle()
    assert ticket.future.done()
    assert ticket.future.exception() is None


async def test_wait_zero_behind_a_queue_is_refused_at_once() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    queue.admit(30)
    queue.admit(30)
    with pytest.raises(Throttled):
        queue.admit(0)


def _state_of(ticket: Ticket) -> TicketState:
    return ticket.state


# -- end to end, through the simulator -----------------------------------------------------


def _nested_jwt(depth: int) -> str:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    # Unterminated: the JSON parser recurses `depth` levels before it finds anything wrong.
    payload = b"[" * depth
    return f"{part(b'{}')}.{part(payload)}.sig"


async def test_a_deeply_nested_jwt_gets_a_clean_answer(
    start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    recorder = Recorder()
    upstream = (await start_server(recorder.app())).make_url("")
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    token = _nested_jwt(5000)
    async with (
        aiohttp.ClientSession() as http,
        http.get(proxy / "v3/contacts", headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        assert response.status == 200
    assert recorder.seen[0].headers["Authorization"] == f"Bearer {token}"


async def _oauth_sim(start_server: ServerFactory, **overrides: Any) -> URL:
    config = SimulatorConfig(
        qps=4,
        oauth_client_id=CLIENT_ID,
        oauth_client_secret=SECRET,
        oauth_refresh_token=SEED,
        **overrides,
    )
    server = await start_server(make_simulator_app(config))
    return server.make_url("")


def _oauth_proxy(tmp_path: Path, sim: URL, **overrides: Any) -> Config:
    return proxy_config(
        tmp_path,
        sim,
        qps=4.0,
        client_id=Secret(CLIENT_ID),
        client_secret=Secret(SECRET),
        refresh_token=Secret(SEED),
        token_url=sim.with_path(OAUTH_TOKEN_PATH),
        **overrides,
    )


async def test_short_tokens_and_long_queues_never_show_a_client_401(
    start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """4-second tokens, 10 clients keeping the key's queue ~2.5 s deep for 15 s: every
    request leaves with the token current when it is sent, so no client ever sees a 401."""
    sim = await _oauth_sim(start_server, token_ttl=4)
    _, proxy = await start_proxy(_oauth_proxy(tmp_path, sim))
    statuses: list[int] = []
    stop = time.monotonic() + 15

    async def client(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            async with http.get(proxy / "v3/contacts") as response:
                statuses.append(response.status)
                await response.read()

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(10)))
        async with http.get(sim / "__sim__" / "stats") as response:
            stats = await response.json()
    assert len(statuses) >= 50
    assert statuses.count(401) == 0
    assert set(statuses) == {200}
    assert stats["oauth"]["issued"] >= 5  # the token really did turn over during the run


async def test_a_401_renews_the_token_and_retries_at_the_head(
    start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path, log_lines: Logs
) -> None:
    sim = await _oauth_sim(start_server)
    _, proxy = await start_proxy(_oauth_proxy(tmp_path, sim))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy / "v3/contacts") as response:
            assert response.status == 200
        # The gateway stops taking the token early (revoked): the next send gets a 401.
        async with http.post(sim.with_path(OAUTH_EXPIRE_PATH)) as response:
            assert response.status == 200
        started = time.monotonic()
        async with http.get(proxy / "v3/contacts") as response:
            assert response.status == 200
        # Sent again from the head: one spacing, not the back of a queue.
        assert time.monotonic() - started < 1.5
        async with http.get(sim / "__sim__" / "stats") as response:
            stats = await response.json()
    assert stats["totals"]["rejected"]["auth"] == 1
    last = log_lines("request_finished")[-1]
    assert last["retries"] == 1
    assert last["replays"] == 0
    assert last["outcome"] == "replayed"


async def test_a_lost_connection_is_502_not_a_quota_429(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    """A POST whose connection broke may have been processed: 502, sent once, key untouched."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, proxy = await start_proxy(proxy_config(tmp_path, URL(f"http://127.0.0.1:{port}")))
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy / "v3/contacts", data=json.dumps({}).encode()) as response,
    ):
        assert response.status == 502
        assert (await response.json())["error_key"] == "bad_gateway"
    server.close()


async def test_a_late_departure_spaces_the_next_send_from_it() -> None:
    """A send that leaves late (a connection to open) pushes the next one: no bunching."""
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    first, second = queue.admit(30), queue.admit(30)
    await clock.advance(0)
    assert first.future.done()
    granted = clock.now
    await clock.advance(0.06)  # the first request's headers leave 60 ms after its slot
    await queue.departed(first)
    await clock.advance(SPACING - 0.06 + 0.001)
    assert not second.future.done()  # its slot was at SPACING; now SPACING after departure
    await clock.advance(0.06)
    assert second.future.done()
    assert second.granted_at is not None
    assert second.granted_at - (granted + 0.06) >= SPACING - 1e-9


async def test_an_on_time_departure_changes_nothing() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    first, second = queue.admit(30), queue.admit(30)
    await clock.advance(0)
    await clock.advance(0.001)
    await queue.departed(first)
    await clock.advance(SPACING - 0.001)
    assert second.future.done()


async def test_every_send_reports_its_departure(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upstream session's trace tells the queue when each request's headers are out."""
    seen: list[float | None] = []
    original = KeyQueue.departed

    async def spy(self: KeyQueue, ticket: Ticket) -> None:
        seen.append(ticket.granted_at)
        await original(self, ticket)

    monkeypatch.setattr(KeyQueue, "departed", spy)
    recorder = Recorder()
    upstream = (await start_server(recorder.app())).make_url("")
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, coalesce=False))
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(proxy / "v3/contacts") as response:
                assert response.status == 200
    assert len(seen) == 3
    assert all(granted is not None for granted in seen)

"""Fair share inside a key, on the fake clock: clients in turn, lanes, admission, moving back."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.clients import client_name, urgency
from proxy.config import Config, ConfigError
from proxy.credentials import ClientToken, Secret, client_token_label
from proxy.errors import Throttled
from proxy.metrics import CLIENT_SERIES, OTHER_CLIENT, Metrics
from proxy.quota import LANE_ROUND, KeyQueue, Limits, LocalBackend, QuotaEngine, Ticket
from proxy.quota.fair import FairOrder, TicketState
from proxy.simulator import SimulatorConfig, make_simulator_app
from tests.conftest import Recorder, ServerFactory, StartProxy, proxy_config, raw_url
from tests.fakes import FakeClock

# The logging fixtures live with the operations tests; importing them makes them usable here.
from tests.test_operations import Captured, captured_logs, restore_logging  # noqa: F401
from tests.test_queueing import sim_stats
from tests.test_quota import SPACING, engine

LONG = 3600.0  # a budget that never runs out in these tests


def admit(
    queue: KeyQueue, client: str, n: int, lane: int = 3, budget: float = LONG
) -> list[Ticket]:
    return [queue.admit(budget, client, lane) for _ in range(n)]


async def run_for(clock: FakeClock, seconds: float) -> None:
    await clock.advance(seconds)


def order_of(tickets: dict[str, Ticket]) -> list[str]:
    """Labels of the granted tickets, in the order they were granted."""
    granted = [(t.granted_at, label) for label, t in tickets.items() if t.granted_at is not None]
    return [label for _, label in sorted(granted)]


def labelled(prefix: str, tickets: list[Ticket]) -> dict[str, Ticket]:
    return {f"{prefix}{i}": t for i, t in enumerate(tickets)}


# -- clients in turn -------------------------------------------------------------------------


async def test_two_clients_take_turns_and_each_keeps_its_fifo() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    tickets = {**labelled("a", admit(queue, "bulk", 6)), **labelled("b", admit(queue, "app", 3))}
    await run_for(clock, 3.0)
    assert order_of(tickets) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "a4", "a5"]
    stamps = sorted(t.granted_at for t in tickets.values() if t.granted_at is not None)
    # The key's pacing is the same whoever's turn it is.
    assert all(b - a == pytest.approx(SPACING, abs=1e-6) for a, b in itertools.pairwise(stamps))


async def test_three_clients_share_the_key_in_turn() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    tickets = {
        **labelled("a", admit(queue, "a", 4)),
        **labelled("b", admit(queue, "b", 4)),
        **labelled("c", admit(queue, "c", 1)),
    }
    await run_for(clock, 3.0)
    assert order_of(tickets) == ["a0", "b0", "c0", "a1", "b1", "a2", "b2", "a3", "b3"]


async def test_a_client_arriving_later_joins_the_back_of_the_round() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    tickets = labelled("a", admit(queue, "bulk", 10))
    await clock.advance(0.6)  # a0, a1, a2 sent; a3's slot is booked
    tickets |= labelled("i", admit(queue, "app", 1))
    await run_for(clock, 3.0)
    assert order_of(tickets)[:6] == ["a0", "a1", "a2", "a3", "i0", "a4"]


async def test_one_client_alone_gets_every_slot_in_fifo_order() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    tickets = labelled("a", admit(queue, "alone", 12))
    await run_for(clock, 4.0)
    assert order_of(tickets) == [f"a{i}" for i in range(12)]
    assert queue.clients_status() == [
        {"client": "alone", "queued": 0, "sent_last_minute": 12, "share_last_minute": 1.0}
    ]


# -- admission: a place in the fair order -----------------------------------------------------


async def test_an_interactive_call_on_a_saturated_key_is_admitted_with_a_short_wait() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    admit(queue, "bulk", 100)
    await clock.advance(0.01)
    ahead, wait = queue.place("app")
    assert ahead == 1  # only the bulk client's current turn is before it
    assert wait < 3 * SPACING
    call = queue.admit(1.0, "app")
    await clock.advance(2 * SPACING + 0.01)
    assert call.state is TicketState.GRANTED
    # The bulk client's next request is behind its own 99: refused at once, told when.
    with pytest.raises(Throttled) as caught:
        queue.admit(10.0, "bulk")
    retry_after = caught.value.retry_after
    assert retry_after is not None and 99 * SPACING < retry_after < 101 * SPACING
    assert caught.value.headers()["Retry-After"] == str(math.ceil(retry_after))


async def test_a_deep_client_is_refused_by_its_own_share_not_the_whole_queue() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    admit(queue, "a", 10)
    admit(queue, "b", 10)
    # Alone, 10 ahead would be 2.6 s; sharing with b, a's 11th waits for 20 sends (5.1 s).
    assert queue.place("a")[0] == 20
    with pytest.raises(Throttled) as caught:
        queue.admit(4.0, "a")
    assert caught.value.headers()["Retry-After"] == "6"
    assert queue.place("c")[0] == 2  # a newcomer waits for one turn of each
    queue.admit(1.0, "c")


async def test_one_clients_place_and_wait_are_what_a_single_fifo_gave() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    for n in range(8):
        assert queue.place("only") == (n, queue.predicted_wait())
        queue.admit(LONG, "only")
    await clock.advance(1.0)  # grants measured: nothing was moved back
    assert queue.place("only") == (queue.queued, queue.predicted_wait())


async def test_prefer_wait_0_is_granted_when_its_turn_is_now_and_refused_when_not() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    now = queue.admit(0.0, "x")  # an idle key: its slot is free this moment
    other = queue.admit(LONG, "x")
    with pytest.raises(Throttled):
        queue.admit(0.0, "y")  # one request (x's) would go first
    await clock.advance(0.001)
    assert now.state is TicketState.GRANTED and now.future.exception() is None
    assert other.state is TicketState.QUEUED


# -- lanes ------------------------------------------------------------------------------------


async def test_a_more_urgent_lane_goes_first() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    tickets = labelled("b", admit(queue, "bulk", 5))
    tickets |= labelled("u", admit(queue, "app", 2, lane=0))
    await run_for(clock, 2.0)
    assert order_of(tickets) == ["u0", "u1", "b0", "b1", "b2", "b3", "b4"]


async def test_a_less_urgent_lane_gets_one_send_in_lane_round() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    tickets = labelled("u", admit(queue, "urgent", 40, lane=0))
    tickets |= labelled("b", admit(queue, "bulk", 4, lane=7))
    await run_for(clock, 12.0)
    order = order_of(tickets)
    assert len(order) == 44
    bulk_at = [i for i, label in enumerate(order) if label.startswith("b")]
    # Passed over exactly LANE_ROUND - 1 times in a row, then served: 1 send in 8.
    assert bulk_at == [LANE_ROUND - 1 + i * LANE_ROUND for i in range(4)]


async def test_no_lane_is_passed_over_more_than_the_stated_bound() -> None:
    loop = asyncio.get_running_loop()
    order = FairOrder()
    lanes = list(range(8))
    for lane in lanes:
        for _ in range(60):
            order.push(Ticket(loop.create_future(), LONG, 0.0, client=f"c{lane}", lane=lane))
    sent = [order.pop().lane for _ in range(400)]
    for lane in lanes:
        at = [i for i, u in enumerate(sent) if u == lane]
        gaps = [b - a - 1 for a, b in itertools.pairwise([-1, *at])]
        assert at and max(gaps) <= LANE_ROUND - 1 + 6, (lane, gaps)
    # The most urgent lane still gets most of the key.
    assert Counter(sent[:100]).most_common(1)[0][0] == 0


# -- moved back by later arrivals -------------------------------------------------------------


@pytest.mark.parametrize("urgent", [1, 2, 3])
async def test_each_later_urgent_arrival_moves_an_admitted_request_back_one_send(
    urgent: int,
) -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    admit(queue, "bulk", 8)
    last = queue.admit(LONG, "bulk")
    start = clock.now
    for _ in range(urgent):
        queue.admit(LONG, "app", lane=0)
    await run_for(clock, 4.0)
    assert last.granted_at == pytest.approx(start + (8 + urgent) * SPACING, abs=1e-6)


async def test_a_late_urgent_arrival_makes_an_admitted_request_miss_with_429_and_is_counted() -> (
    None
):
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    admit(queue, "bulk", 8)
    # Predicted 9 slots (2.31 s) fits 2.4 s; sent at its 9th slot it would have made it.
    tight = queue.admit(2.4, "bulk")
    on_time = queue.admit(LONG, "bulk")
    for _ in range(2):
        queue.admit(LONG, "app", lane=0)  # two more urgent arrivals go before it
    await run_for(clock, 2.5)
    error = tight.future.exception()
    assert isinstance(error, Throttled)
    assert "other clients went first" in error.message
    assert int(error.headers()["Retry-After"]) >= 1
    assert queue.moved_back_misses == 1
    assert queue.status()["moved_back_misses"] == 1
    await run_for(clock, 1.0)
    assert on_time.state is TicketState.GRANTED  # the others were not dropped


async def test_admission_stretches_a_place_by_how_far_requests_were_moved_back() -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    admit(queue, "bulk", 100)
    for _ in range(20):  # an urgent call every 4 slots: bulk requests are moved back often
        queue.admit(LONG, "app", lane=0)
        await clock.advance(4 * SPACING)
    ahead, wait = queue.place("bulk")
    assert ahead == queue.queued == 40
    assert wait > queue.predicted_wait(ahead) + 4 * SPACING  # stretched
    assert wait <= queue.predicted_wait(ahead * 3.0)  # ...within MAX_STRETCH


# -- put back after a send: at the head of its client, and next -----------------------------


@pytest.mark.parametrize("how", ["replay", "retry"])
async def test_a_request_put_back_goes_next_ahead_of_its_client_and_the_others(how: str) -> None:
    clock = FakeClock()
    queue = engine(clock).queue_for("K")
    a = labelled("a", admit(queue, "bulk", 3))
    b = labelled("b", admit(queue, "app", 1))
    await clock.advance(0.001)
    first = a["a0"]
    assert first.state is TicketState.GRANTED
    first.granted_at = None
    if how == "replay":
        await queue.replay(first, None, "mashery.not.authorized.over.qps")
    else:
        assert queue.retry(first)
    assert queue.clients_status()[0]["client"] == "bulk"
    await run_for(clock, 3.0)
    assert order_of(a | b) == ["a0", "b0", "a1", "a2"]


# -- who a client is, how urgent ---------------------------------------------------------------


def test_a_client_is_its_token_name_else_its_user_agent_and_address() -> None:
    assert client_name("importer", "anything/1.0", "10.0.0.1") == "importer"
    one = client_name(None, "bulk-importer/2.1 (linux)", "10.0.0.1")
    assert one.startswith("bulk-importer-") and len(one) == len("bulk-importer-") + 8
    assert client_name(None, "bulk-importer/2.1 (linux)", "10.0.0.2") != one
    assert client_name(None, "other/1.0", "10.0.0.1") != one
    assert client_name(None, None, "10.0.0.1").startswith("anonymous-")
    assert client_name(None, "(weird) agent", None).startswith("anonymous-")


@pytest.mark.parametrize(
    ("header", "lane"),
    [
        (None, 3),
        ("u=0", 0),
        ("u=7, i", 7),
        ("i, u=1", 1),
        ("u=5;x=1", 5),
        ("u=2, u=6", 6),  # a dictionary: the last member wins
        ("u=8", 3),  # out of range: ignored
        ("u=-1", 3),
        ("u=1.5", 3),
        ("U=1", 3),  # keys are lowercase
        ("garbage", 3),
    ],
)
def test_priority_urgency_follows_rfc_9218(header: str | None, lane: int) -> None:
    assert urgency(header) == lane


# -- the ring's arithmetic: a new arrival's place is where it is actually sent -----------------


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["push", "pop", "leave"]), st.sampled_from("abcde")),
        max_size=60,
    ),
    newcomer=st.sampled_from("abcdef"),
)
def test_the_predicted_place_in_one_lane_is_exact(
    ops: list[tuple[str, str]], newcomer: str
) -> None:
    loop = asyncio.new_event_loop()
    try:
        order = FairOrder()
        waiting: list[Ticket] = []
        for op, client in ops:
            if op == "push":
                ticket = Ticket(loop.create_future(), LONG, 0.0, client=client)
                order.push(ticket)
                waiting.append(ticket)
            elif op == "pop" and order.live:
                waiting.remove(order.pop())
            elif op == "leave":
                mine = [t for t in waiting if t.client == client]
                if mine:
                    mine[0].state = TicketState.GONE
                    order.remove(mine[0])
                    waiting.remove(mine[0])
        ahead = order.ahead(newcomer, 3)
        marker = Ticket(loop.create_future(), LONG, 0.0, client=newcomer)
        order.push(marker)
        sent = 0
        while order.pop() is not marker:
            sent += 1
        assert sent == ahead
    finally:
        loop.close()


# -- through the proxy ---------------------------------------------------------------------------


async def test_an_interactive_program_goes_ahead_of_a_bulk_import_through_the_simulator(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await start_server(
        make_simulator_app(SimulatorConfig(api_key="KEY", qps=4, jitter_in=0.02, seed=7))
    )
    sim_url = sim.make_url("")
    # In-process simulator: the shared event loop adds to the 20 ms jitter, hence the margin.
    _, proxy = await start_proxy(
        proxy_config(
            tmp_path,
            sim_url,
            qps=4.0,
            api_key=Secret("KEY"),
            pacing_margin=0.06,
            coalesce=False,  # the import repeats one URL: each call must queue on its own
        )
    )
    done: list[str] = []

    async def call(label: str, headers: dict[str, str]) -> int:
        async with http.get(proxy / "v2/contacts", headers=headers) as resp:
            await resp.read()
        done.append(label)
        return resp.status

    bulk = [
        asyncio.create_task(call(f"bulk{i}", {"User-Agent": "bulk-importer/1.0"}))
        for i in range(10)
    ]

    async def queued() -> dict[str, int]:
        async with http.get(proxy / "status") as resp:
            keys = (await resp.json())["keys"]
        clients = keys[0]["clients"] if keys else []
        return {c["client"].rsplit("-", 1)[0]: c["queued"] for c in clients}

    # Wait for the import to be queued (a busy machine may take a while to send it all).
    for _ in range(200):
        if (await queued()).get("bulk-importer", 0) >= 6:
            break
        await asyncio.sleep(0.01)
    before = len(done)
    app = asyncio.create_task(call("app", {"User-Agent": "crm-app/3.2"}))
    for _ in range(200):
        if (await queued()).get("crm-app", 0) == 1:
            break
        await asyncio.sleep(0.01)
    now_queued = await queued()
    assert now_queued["bulk-importer"] >= 5 and now_queued["crm-app"] == 1
    urgent = asyncio.create_task(call("urgent", {"User-Agent": "crm-app/3.2", "Priority": "u=0"}))
    statuses = await asyncio.gather(*bulk, app, urgent)
    assert statuses == [200] * 12
    # A single FIFO would have sent it after all ten; in turn, it waits for one bulk send
    # (plus the ones already on their way), and the more urgent one goes first of all.
    assert done.index("app") <= before + 3 < done.index("bulk9")
    assert done.index("urgent") < done.index("bulk8")
    stats = await sim_stats(http, sim_url)
    assert stats["totals"]["rejected"]["per_second"] == 0
    assert stats["totals"]["max_arrivals_1s"] <= 4


async def test_named_client_tokens_show_their_names_and_never_the_tokens(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: Captured,  # noqa: F811 (the fixture of test_operations)
) -> None:
    rec, upstream = recorder
    named, unnamed = "importer-token-5e1f0c9a2b", "unnamed-token-77d0e41c3a"
    tokens = Config.from_sources({"client_token": [f"importer={named}"]}, {}).client_token
    tokens += Config.from_sources({}, {"CTCT_PROXY_CLIENT_TOKENS": unnamed}).client_token
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream, client_token=tokens))
    headers = {"Authorization": f"Bearer {named}", "Priority": "u=1", "User-Agent": "imp/1"}
    async with http.get(proxy / "v3/contacts", headers=headers) as resp:
        assert resp.status == 200
    async with http.get(raw_url(proxy, f"/v2/lists?api_key={unnamed}")) as resp:
        assert resp.status == 200
    assert "Priority" not in rec.seen[0].headers  # hop-by-hop to the proxy
    async with http.get(proxy / "status") as resp:
        status_text = await resp.text()
    async with http.get(proxy / "metrics") as resp:
        metrics_text = await resp.text()
    await asyncio.sleep(0.05)  # the ledger writes its lines on the loop's next pass
    label = client_token_label(unnamed)
    assert label.startswith("token-") and len(label) == len("token-") + 8
    clients = {c["client"] for key in json.loads(status_text)["keys"] for c in key["clients"]}
    assert clients == {"importer", label}
    assert 'ctct_proxy_client_sends_total{client="importer"} 1.0' in metrics_text
    assert f'ctct_proxy_client_sends_total{{client="{label}"}} 1.0' in metrics_text
    lines = {(e["client"], e["lane"]) for e in captured_logs.finished() if e["client"]}
    assert lines == {("importer", 1), (label, 3)}
    for text in (status_text, metrics_text, captured_logs.text):
        assert named not in text and unnamed not in text


def test_a_token_is_named_only_by_a_valid_name_and_a_real_token() -> None:
    tokens = Config.from_sources(
        {"client_token": ["web-app=0123456789abcdef0123", "QUJDREVGR0hJSktMTU5PUA=="]}, {}
    ).client_token
    assert [t.reveal() for t in tokens] == ["0123456789abcdef0123", "QUJDREVGR0hJSktMTU5PUA=="]
    assert [t.name for t in tokens if isinstance(t, ClientToken)] == [
        "web-app",
        client_token_label("QUJDREVGR0hJSktMTU5PUA=="),
    ]
    with pytest.raises(ConfigError, match="at least 16"):
        Config.from_sources({"client_token": ["web-app=short"]}, {})


def test_the_client_send_counter_is_bounded_in_series() -> None:
    clock = FakeClock()
    engine = QuotaEngine(Limits(4.0, 10_000, 10_000, 0.025), LocalBackend(clock), clock)
    metrics = Metrics(engine, lambda: "local")
    for i in range(CLIENT_SERIES + 5):
        metrics.count_client_sends(f"client-{i}", 2)
    metrics.count_client_sends("client-0", 1)  # a client with a series keeps it
    found = {
        sample.labels["client"]: sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        if family.name == "ctct_proxy_client_sends"
        for sample in family.samples
        if sample.name == "ctct_proxy_client_sends_total"
    }
    assert len(found) == CLIENT_SERIES + 1
    assert found["client-0"] == 3 and found["client-19"] == 2
    assert found[OTHER_CLIENT] == 5 * 2

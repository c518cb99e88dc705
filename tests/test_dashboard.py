"""The dashboard's JSON and files, against the simulator: the same figures as /status, every send,
rejection and replay counted, the token state, the client hook, and no secret anywhere."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, ConfigError
from proxy.credentials import client_token_label
from proxy.edge.dashboard import DASHBOARD, ClientQueue
from proxy.quota import KeyQueue
from tests.conftest import ServerFactory, StartProxy
from tests.dashboard_rig import CLIENT_TOKEN, KEY_FP, KEY_NAME, Rig, start_rig

STATUS_FIELDS = (
    "key",
    "queued",
    "spacing_seconds",
    "sent_today",
    "remaining_today",
    "next_reset",
    "paused_until",
)


def samples(text: str) -> dict[str, float]:
    """Prometheus text as {name{labels}: value}, labels sorted (a flat view for asserts)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def dashboard_key(document: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [k for k in document["keys"] if k["key"] == KEY_FP]
    return entry  # type: ignore[no-any-return]


@pytest.fixture
async def rig(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> Rig:
    return await start_rig(start_server, start_proxy, http, tmp_path, qps=200.0)


async def whole_seconds_later(rig: Rig) -> None:
    """Wait until the second of the last send is complete (the history shows whole seconds)."""
    now = rig.app[DASHBOARD].engine.clock.time()
    await asyncio.sleep(math.floor(now) + 1 - now + 0.01)


async def test_the_json_shows_what_status_shows_and_counts_every_send(rig: Rig) -> None:
    statuses = await rig.burst(30)
    assert statuses == [200] * 30
    await whole_seconds_later(rig)
    document = await rig.json("/dashboard.json")
    status = await rig.json("/status")
    key = dashboard_key(document)
    status_key = await rig.status_key()
    assert {f: key[f] for f in STATUS_FIELDS} == {f: status_key[f] for f in STATUS_FIELDS}
    assert (document["mode"], document["qps"], document["daily_quota"]) == (
        status["mode"],
        status["qps"],
        status["daily_quota"],
    )
    assert key["name"] == KEY_NAME
    assert document["max_wait"] == 30.0
    # Every send the simulator received is in the history, once.
    sim = rig.sim.ledger.stats()
    received = sim["totals"]["requests"]  # type: ignore[index]
    assert received == 30
    assert sum(key["history"]["sends"]) == received
    assert key["sends_last_minute"] == received
    assert key["wait_samples"] == received
    assert 0 <= key["wait_p50_seconds"] <= key["wait_p95_seconds"] < 30
    assert sum(key["history"]["rejections"]) == sum(key["history"]["replays"]) == 0
    assert len(key["history"]["sends"]) == document["window_seconds"] == 900
    # One program (its client token) made every call: the whole share is its.
    [client] = key["clients"]
    assert client["name"] == client_token_label(CLIENT_TOKEN)
    assert (client["sends_last_minute"], client["share"], client["queued"]) == (received, 1.0, 0)
    assert key["predicted_wait_seconds"] >= 0
    # v3 went out with the OAuth token: its state, no token.
    token = document["token"]
    assert token["kind"] == "oauth" and token["ready"] is True
    assert 86_000 < token["expires_in"] <= 86_400
    assert token["failures"] == token["failures_total"] == 0
    assert token["last_refresh"] is not None
    # ?seconds= trims the history; nonsense is ignored.
    short = dashboard_key(await rig.json("/dashboard.json?seconds=60"))
    assert len(short["history"]["sends"]) == 60
    bad = dashboard_key(await rig.json("/dashboard.json?seconds=-5"))
    assert len(bad["history"]["sends"]) == 900


async def test_gateway_rejections_and_replays_are_marked_where_they_happened(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # The proxy thinks the key takes 20/s; the gateway takes 5: rejections, then replays.
    rig = await start_rig(start_server, start_proxy, http, tmp_path, sim_qps=5, qps=20.0)
    statuses = await rig.burst(16, concurrency=8, v3_every=1000)
    assert statuses == [200] * 16
    await whole_seconds_later(rig)
    key = dashboard_key(await rig.json("/dashboard.json"))
    metrics = samples(await rig.text("/metrics"))
    rejections = metrics["ctct_proxy_upstream_quota_errors_total{kind=per_second}"]
    replays = metrics["ctct_proxy_replays_total{}"]
    assert rejections > 0
    assert sum(key["history"]["rejections"]) == rejections
    assert sum(key["history"]["replays"]) == replays == rejections
    # Every arrival at the gateway (accepted or rejected) was a send.
    totals: Any = rig.sim.ledger.stats()["totals"]
    arrivals = totals["accepted"] + totals["rejected"]["per_second"]
    assert sum(key["history"]["sends"]) == arrivals == 16 + rejections
    assert metrics[f"ctct_proxy_upstream_sends_total{{key={KEY_FP}}}"] == arrivals


async def test_page_and_files_come_from_the_package_and_load_nothing_from_elsewhere(
    rig: Rig,
) -> None:
    pages = {}
    for path in ("/", "/dashboard", "/dashboard.css", "/dashboard.js"):
        async with rig.http.get(rig.proxy.with_path(path)) as response:
            assert response.status == 200
            csp = response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            pages[path] = (response.content_type, await response.text())
    assert pages["/"] == pages["/dashboard"]
    assert pages["/"][0] == "text/html"
    assert pages["/dashboard.css"][0] == "text/css"
    assert pages["/dashboard.js"][0] == "text/javascript"
    for _, text in pages.values():
        # The SVG namespace is a name, not a fetch; nothing else may point off the proxy.
        text = text.replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"https?:|//[a-z0-9]|@import|url\(", text, re.IGNORECASE)
    html = pages["/"][1]
    assert "no client breakdown" in html
    async with rig.http.get(rig.proxy.with_path("/dashboard.json")) as response:
        assert response.headers["Cache-Control"] == "no-store"
    # Like /status: no client token needed (the rig's proxy demands one for /v2 and /v3).
    async with rig.http.get(rig.proxy.with_path("/v2/lists")) as response:
        assert response.status == 401


async def test_no_secret_in_the_page_its_files_or_its_json(rig: Rig) -> None:
    await rig.burst(10)
    served = "".join(
        [
            await rig.text("/"),
            await rig.text("/dashboard.js"),
            await rig.text("/dashboard.json"),
            await rig.text("/metrics"),
        ]
    )
    assert KEY_FP in served
    for secret in rig.secrets():
        assert secret not in served


async def test_clients_come_from_the_hook_and_shares_from_the_history(rig: Rig) -> None:
    await rig.burst(4)
    await whole_seconds_later(rig)
    app = rig.app
    dashboard = app[DASHBOARD]

    def breakdown(queue: KeyQueue) -> list[ClientQueue] | None:
        # What per-client queues will report: here two clients, one with requests waiting.
        return [ClientQueue("billing-job", queued=3, lane=1), ClientQueue("crm-sync", queued=0)]

    dashboard.client_breakdown = breakdown
    feed = app[DASHBOARD].history
    now = dashboard.engine.clock.time() - 1  # a whole second ago: in the last minute's count
    for _ in range(6):
        feed.sent(KEY_FP, now, client="crm-sync")
    for _ in range(2):
        feed.sent(KEY_FP, now, client="<script>alert(1)</script>")
    key = dashboard_key(await rig.json("/dashboard.json"))
    total = key["sends_last_minute"]
    assert total == 4 + 8
    rows = {row["name"]: row for row in key["clients"]}
    assert [row["name"] for row in key["clients"]] == [
        "crm-sync",
        client_token_label(CLIENT_TOKEN),  # the burst's client, from the fair-share queues
        "<script>alert(1)</script>",
        "billing-job",
    ]
    assert rows["crm-sync"]["share"] == round(6 / total, 4)
    assert rows["billing-job"] == {
        "name": "billing-job",
        "sends_last_minute": 0,
        "share": 0.0,
        "queued": 3,
        "lane": 1,
    }
    assert rows["<script>alert(1)</script>"]["queued"] == 0


async def test_a_failing_refresh_shows_on_the_dashboard_and_in_metrics(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    from proxy.credentials import Secret

    bad = "RT.never-issued-by-anyone-9"
    rig = await start_rig(
        start_server, start_proxy, http, tmp_path, qps=200.0, refresh_token=Secret(bad)
    )
    assert await rig.call("v3") == 502
    token = (await rig.json("/dashboard.json"))["token"]
    assert token["kind"] == "oauth"
    assert token["ready"] is False
    assert token["failures"] == token["failures_total"] == 1
    assert token["last_error"] == "invalid_grant"
    assert token["expires_in"] is None
    metrics = samples(await rig.text("/metrics"))
    assert metrics["ctct_proxy_oauth_refresh_failing{}"] == 1
    assert metrics["ctct_proxy_oauth_refresh_failures_total{}"] == 1
    assert metrics["ctct_proxy_oauth_token_expires_in_seconds{}"] == 0
    assert bad not in await rig.text("/dashboard.json")


def test_key_names_are_validated_and_need_the_key_they_name() -> None:
    env = {"CTCT_API_KEY": "k-0001"}
    config = Config.from_sources({"key_name": ["billing", "0123456789ab=crm"]}, env)
    assert config.key_name == ("billing", "0123456789ab=crm")
    assert Config.from_sources({}, {**env, "CTCT_PROXY_KEY_NAMES": "a, b"}).key_name == ("a", "b")
    for bad, message in [
        ("0123=crm", "FINGERPRINT=NAME"),
        ("0123456789AB=crm", "FINGERPRINT=NAME"),
        ("0123456789ab=", "1 to 64"),
        ("x" * 65, "1 to 64"),
        ("tab\there", "1 to 64"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            Config.from_sources({"key_name": [bad]}, env)
    with pytest.raises(ConfigError, match="--key-name: a NAME without FINGERPRINT="):
        Config.from_sources({"key_name": ["billing"]}, {})
    assert Config.from_sources({"key_name": ["0123456789ab=crm"]}, {}).key_name


async def test_the_fair_share_clients_show_on_the_dashboard(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The real wiring: each program's sends and queue come from the key's fair-share queues
    (without client tokens a program is its User-Agent and address)."""
    rig = await start_rig(start_server, start_proxy, http, tmp_path, qps=200.0, client_token=())

    async def call(agent: str) -> None:
        path = rig.proxy.with_path("/v2/lists")
        async with rig.http.get(path, headers={"User-Agent": agent}) as response:
            assert response.status == 200
            await response.read()

    await asyncio.gather(
        *(call("billing-job/1.0") for _ in range(3)), *(call("crm-sync/2.0") for _ in range(2))
    )
    await whole_seconds_later(rig)
    key = dashboard_key(await rig.json("/dashboard.json"))
    rows = {row["name"].rsplit("-", 1)[0]: row for row in key["clients"]}
    assert rows["billing-job"]["sends_last_minute"] == 3
    assert rows["crm-sync"]["sends_last_minute"] == 2
    assert all(row["queued"] == 0 for row in key["clients"])

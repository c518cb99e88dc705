"""The dashboard in a real browser: Debian's chromium, headless, driven by selenium + chromedriver.

Traffic flows through the proxy to the simulator (which also lets a neighbour spend part of the
key, so the gateway rejects a few sends and the proxy replays them) while the page is open. The
page must show what /status shows, move while requests are sent, log no console error, and
show no secret.

With CTCT_SCREENSHOT=docs/dashboard.png the test keeps the load up for longer and saves a
screenshot of the page under that load (the README's picture):

    CTCT_SCREENSHOT=docs/dashboard.png .venv/bin/pytest tests/test_dashboard_browser.py
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

from proxy.credentials import client_token_label
from tests.conftest import ServerFactory, StartProxy
from tests.dashboard_rig import CLIENT_TOKEN, KEY_FP, KEY_NAME, Rig, start_rig, until

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = os.environ.get("CTCT_SCREENSHOT")
# Seconds of load while the page is watched; longer when taking the README's screenshot, so
# that the chart has a minute of history to show.
LOAD_SECONDS = 75.0 if SCREENSHOT else 8.0
SHOT_AFTER = 60.0

# As root, in a container without a session bus: no sandbox, no GPU, and none of the
# background connections Chrome makes on its own (they are refused here, and would be noise).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
    "--force-device-scale-factor=1",
    "--lang=en-US",
)

# What the page shows of the configured key, read from the DOM (data-value holds raw numbers).
READ_PAGE = """
const card = document.querySelector(`article[data-key="${arguments[0]}"]`);
if (!card) return null;
const value = (name) => card.querySelector(`[data-field="${name}"]`).dataset.value;
const top = (name) => document.querySelector(`header [data-field="${name}"]`).dataset.value;
const clients = card.querySelector('[data-field="no_clients"]');
return {
  key: value("key"),
  name: value("name"),
  sent_today: Number(value("sent_today")),
  remaining_today: Number(value("remaining_today")),
  queued: Number(value("queued")),
  next_reset: value("reset_local"),
  paused_until: card.querySelector('[data-field="paused"]').dataset.value || null,
  rejections_window: Number(card.querySelector('[data-field="rejections_window"]').textContent),
  rejection_marks: card.querySelectorAll(".chart .rej").length,
  replay_marks: card.querySelectorAll(".chart .rep").length,
  bars: card.querySelectorAll(".chart path.bars").length,
  no_clients: clients.hidden ? null : clients.textContent,
  client_rows: Array.from(card.querySelectorAll(".clients tr[data-client]")).map(
    (row) => row.dataset.client),
  mode: document.getElementById("mode").dataset.value,
  qps: Number(top("qps")),
  daily_quota: Number(top("daily_quota")),
  token: document.querySelector('[data-field="token_kind"]').dataset.value,
};
"""


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Chrome]:
    """Debian's chromium, headless, with a fresh profile; quit at the end."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "chromium and chromium-driver are missing: run ./scripts/test"
    options = Options()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    browser = Chrome(service=service, options=options)
    try:
        yield browser
    finally:
        browser.quit()


async def in_thread(call: Any, *args: Any) -> Any:
    # Selenium blocks; the proxy it talks to runs on this event loop.
    return await asyncio.to_thread(call, *args)


async def read_page(chrome: Chrome) -> dict[str, Any] | None:
    page: dict[str, Any] | None = await in_thread(chrome.execute_script, READ_PAGE, KEY_FP)
    return page


async def page_matches_status(chrome: Chrome, rig: Rig) -> bool:
    """Whether the page shows what /status says now (checked at rest, when nothing moves)."""
    page = await read_page(chrome)
    status = await rig.json("/status")
    key = await rig.status_key()
    if page is None:
        return False
    shown = {f: page[f] for f in ("key", "sent_today", "remaining_today", "queued")}
    wanted = {f: key[f] for f in ("key", "sent_today", "remaining_today", "queued")}
    return (
        shown == wanted
        and page["next_reset"] == key["next_reset"]
        and page["paused_until"] == key["paused_until"]
        and page["mode"] == status["mode"]
        and page["qps"] == status["qps"]
        and page["daily_quota"] == status["daily_quota"]
    )


async def save_screenshot(chrome: Chrome, path: Path) -> None:
    """The whole page at 1280 px wide, as tall as it is (no scrollbar, nothing cut off)."""
    height = await in_thread(
        chrome.execute_script, "return Math.ceil(document.body.getBoundingClientRect().height)"
    )
    metrics = {"width": 1280, "height": int(height), "deviceScaleFactor": 1, "mobile": False}
    await in_thread(chrome.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", metrics)
    await asyncio.sleep(2.0)  # one more poll at the new size, so the chart is drawn to fit
    path.parent.mkdir(parents=True, exist_ok=True)
    assert await in_thread(chrome.save_screenshot, str(path))


async def test_the_dashboard_in_chromium_matches_status_moves_and_shows_no_secret(
    chrome: Chrome,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    rig = await start_rig(
        start_server,
        start_proxy,
        http,
        tmp_path,
        sim_qps=8,
        neighbour_qps=1.5,
        qps=8.0,
        daily_quota=2_000,
    )
    assert set(await rig.burst(16, concurrency=8)) == {200}
    await in_thread(chrome.get, str(rig.proxy.with_path("/")))

    # At rest, the page shows exactly what /status shows.
    await until(lambda: page_matches_status(chrome, rig), timeout=15)
    before = await read_page(chrome)
    assert before is not None
    assert before["name"] == KEY_NAME
    assert before["sent_today"] >= 16
    assert before["bars"] == 1
    # Every call came from one program (its client token): one row, under the token's name.
    assert before["no_clients"] is None
    assert before["client_rows"] == [client_token_label(CLIENT_TOKEN)]
    assert before["token"] == "oauth"

    # Under load, the figures move.
    load = asyncio.create_task(rig.load(LOAD_SECONDS, concurrency=16))
    try:

        async def moved() -> bool:
            page = await read_page(chrome)
            return page is not None and page["sent_today"] > before["sent_today"]

        await until(moved, timeout=10)
        if SCREENSHOT:
            await asyncio.sleep(SHOT_AFTER)
            await save_screenshot(chrome, ROOT / SCREENSHOT)
    finally:
        statuses = await load
    assert set(statuses) == {200}, "every request through the proxy succeeded"

    # At rest again: the page caught up with /status, and the chart's marks are the metrics'.
    await until(lambda: page_matches_status(chrome, rig), timeout=15)
    after = await read_page(chrome)
    assert after is not None
    assert after["sent_today"] >= before["sent_today"] + len(statuses)
    document = await rig.json("/dashboard.json?seconds=300")
    (key,) = [k for k in document["keys"] if k["key"] == KEY_FP]
    history = key["history"]
    assert after["rejections_window"] == sum(history["rejections"])
    assert after["rejection_marks"] == sum(1 for n in history["rejections"] if n)
    assert after["replay_marks"] == sum(1 for n in history["replays"] if n)

    # The 15-minute view asks for, and draws, 900 seconds.
    await in_thread(
        chrome.execute_script, "document.querySelector('[data-window=\"900\"]').click()"
    )

    async def fifteen_minutes() -> bool:
        seconds = await in_thread(
            chrome.execute_script,
            f'return document.querySelector(`article[data-key="{KEY_FP}"] .chart`).dataset.seconds',
        )
        return bool(seconds == "900")

    await until(fifteen_minutes, timeout=10)

    # No console errors (a blocked resource or a script error would be one).
    logs = await in_thread(chrome.get_log, "browser")
    assert [entry for entry in logs if entry["level"] == "SEVERE"] == []

    # No secret in the rendered page, the HTML as served, or the JSON.
    rendered = await in_thread(lambda: chrome.page_source)
    served = rendered + await rig.text("/") + await rig.text("/dashboard.json")
    assert KEY_FP in served
    for secret in rig.secrets():
        assert secret not in served

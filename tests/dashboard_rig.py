"""The simulator and a proxy with every kind of secret configured, for the dashboard's tests.

The proxy holds an API key, a fixed v2 access token, v3 OAuth (client id, secret, refresh
token against the simulator's token endpoint) and a client token, so a test can look for every
one of them (and every access token the simulator issued) in what the dashboard serves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.credentials import Secret, fingerprint
from proxy.simulator import OAUTH_TOKEN_PATH, Simulator, SimulatorConfig, make_simulator_app
from proxy.simulator.gateway import SIMULATOR
from tests.conftest import ServerFactory, StartProxy, proxy_config, raw_url

API_KEY = "dash-api-key-4Rt9xV"
ACCESS_TOKEN = "dash-v2-access-token-Q2w8"
CLIENT_TOKEN = "dash-client-token-5f3a9c1e7b2d"
CLIENT_ID = "dash-oauth-client-7Yu1"
CLIENT_SECRET = "dash-oauth-secret-Kp30"
REFRESH_TOKEN = "RT.dash-refresh-token-Lm44"
KEY_NAME = "newsletters"
KEY_FP = fingerprint(API_KEY)


@dataclass
class Rig:
    """A running simulator and proxy, and a session to talk to both."""

    sim: Simulator
    sim_url: URL
    proxy: URL
    app: web.Application
    http: aiohttp.ClientSession

    def secrets(self) -> list[str]:
        """Every secret the proxy holds or was given, and every token the simulator issued."""
        assert self.sim.oauth is not None
        return [
            API_KEY,
            ACCESS_TOKEN,
            CLIENT_TOKEN,
            CLIENT_SECRET,
            REFRESH_TOKEN,
            *self.sim.oauth.issued_tokens(),
        ]

    async def json(self, path: str) -> Any:
        """GET a JSON page of the proxy."""
        async with self.http.get(raw_url(self.proxy, path)) as response:
            assert response.status == 200, await response.text()
            return json.loads(await response.read())

    async def text(self, path: str) -> str:
        """GET a page of the proxy as text."""
        async with self.http.get(raw_url(self.proxy, path)) as response:
            assert response.status == 200
            return await response.text()

    async def status_key(self) -> dict[str, Any]:
        """The configured key's entry in /status."""
        status = await self.json("/status")
        (entry,) = [k for k in status["keys"] if k["key"] == KEY_FP]
        return entry  # type: ignore[no-any-return]

    async def call(self, generation: str = "v2") -> int:
        """One API call through the proxy, presenting the client token; its status."""
        path = "/v2/lists?api_key=stale" if generation == "v2" else "/v3/contacts"
        headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
        async with self.http.get(raw_url(self.proxy, path), headers=headers) as response:
            await response.read()
            return response.status

    async def burst(self, count: int, concurrency: int = 10, v3_every: int = 5) -> list[int]:
        """`count` calls, `concurrency` at a time, every `v3_every`-th on v3; their statuses."""
        statuses: list[int] = []
        numbers = iter(range(count))

        async def worker() -> None:
            for n in numbers:
                statuses.append(await self.call("v3" if n % v3_every == v3_every - 1 else "v2"))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return statuses

    async def load(self, seconds: float, concurrency: int = 16, v3_every: int = 5) -> list[int]:
        """Keep `concurrency` clients calling for `seconds`; the statuses they got."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        statuses: list[int] = []
        counter = iter(range(1_000_000))

        async def worker() -> None:
            while loop.time() < deadline:
                n = next(counter)
                statuses.append(await self.call("v3" if n % v3_every == v3_every - 1 else "v2"))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return statuses


async def start_rig(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    *,
    sim_qps: int = 1000,
    neighbour_qps: float = 0.0,
    **overrides: Any,
) -> Rig:
    """Start the simulator and a proxy in front of it (overrides: proxy Config fields)."""
    sim_app = make_simulator_app(
        SimulatorConfig(
            api_key=API_KEY,
            access_token=ACCESS_TOKEN,
            qps=sim_qps,
            neighbour_qps=neighbour_qps,
            oauth_client_id=CLIENT_ID,
            oauth_client_secret=CLIENT_SECRET,
            oauth_refresh_token=REFRESH_TOKEN,
        )
    )
    sim_url = (await start_server(sim_app)).make_url("")
    settings: dict[str, Any] = {
        "api_key": Secret(API_KEY),
        "access_token": Secret(ACCESS_TOKEN),
        "client_token": (Secret(CLIENT_TOKEN),),
        "client_id": Secret(CLIENT_ID),
        "client_secret": Secret(CLIENT_SECRET),
        "refresh_token": Secret(REFRESH_TOKEN),
        "token_url": sim_url.with_path(OAUTH_TOKEN_PATH),
        "key_name": (KEY_NAME,),
        **overrides,
    }
    # Every request is its own send here: the dashboard is checked against the upstream's count.
    settings.setdefault("coalesce", False)
    server, proxy = await start_proxy(proxy_config(tmp_path, sim_url, **settings))
    return Rig(sim_app[SIMULATOR], sim_url, proxy, server.app, http)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait (polling briefly) until `check` holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)

"""Replicas with one Redis share the OAuth refresh: one token call, one rotated token for all."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from proxy.credentials import Secret
from proxy.simulator import OAUTH_EXPIRE_PATH
from tests.conftest import ServerFactory, StartProxy
from tests.redis_server import RedisServer
from tests.test_oauth import SEED, get_v3, oauth_config, sim_stats, start_sim


async def test_replicas_refresh_once_and_share_the_rotated_token(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    _, sim_url = await start_sim(start_server, rotate_refresh_tokens=True)
    proxies = []
    for i in range(3):
        # Each replica has its own state dir (separate hosts): only Redis connects them.
        config = oauth_config(
            tmp_path / f"replica{i}", sim_url, redis_url=Secret(redis_server.url), replicas=3
        )
        proxies.append((await start_proxy(config))[1])

    # Cold start on every replica at once: one token call, no invalid_grant from rotation.
    answers = await asyncio.gather(*(get_v3(http, p) for p in proxies for _ in range(10)))
    assert {status for status, _ in answers} == {200}
    stats = await sim_stats(http, sim_url)
    assert stats["oauth"]["token_calls"] == 1

    # The gateway stops taking the token: the replicas agree on one refresh between them.
    async with http.post(sim_url.with_path(OAUTH_EXPIRE_PATH)) as response:
        assert response.status == 200
    answers = await asyncio.gather(*(get_v3(http, p) for p in proxies for _ in range(10)))
    assert {status for status, _ in answers} == {200}
    stats = await sim_stats(http, sim_url)
    assert stats["oauth"]["token_calls"] == 2
    assert stats["oauth"].get("invalid_grant", 0) == 0

    # Redis keys are named by fingerprints only; the token set is a value there.
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = [k.decode() if isinstance(k, bytes) else k for k in await client.keys("*")]
        token_keys = [k for k in keys if k.endswith(":tokens")]
        assert len(token_keys) == 1
        assert all(SEED not in k and "sim-client" not in k for k in keys)
        raw = await client.get(token_keys[0])
        assert raw is not None
        shared = json.loads(raw)
        assert shared["refresh_token"] != SEED  # the rotated one
    finally:
        await client.aclose()

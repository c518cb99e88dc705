"""The OAuth token set shared by replicas through Redis: one refresher at a time, one result."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import LockError, RedisError

from proxy.credentials import fingerprint, redact
from proxy.logs import get_logger
from proxy.oauth.tokens import (
    LOCK_POLL,
    LOCK_TIMEOUT,
    RefreshFailed,
    StateUnreadable,
    TokenSet,
    TokenStore,
)

log = get_logger("oauth")

# One Redis call for the token set may take this long before Redis counts as away.
CALL_TIMEOUT = 1.0
# A refresh (lock, token call, save) takes well under this; a crashed holder's lock expires.
TOKEN_LOCK_TTL = 30.0
# Unused refresh tokens expire after 180 days at Constant Contact; keep the set as long.
TOKEN_SET_TTL = 180 * 86_400


class RedisTokenStore:
    """The OAuth token set shared by replicas: one refresher at a time, one result for all.

    The lock is redis-py's own (`SET NX PX` with a token, released only by its holder); the
    token set is a value under a key named by the client id's fingerprint. Every save also
    goes to the replica's own state file first, so a restart without Redis still has the
    newest rotated refresh token. When Redis is away, the local file and its lock serve alone.
    Redis then holds the tokens as a value (key names carry fingerprints only): give it a
    password and TLS (`rediss://`) when it is reachable by others.
    """

    def __init__(self, client: aioredis.Redis, client_id: str, local: TokenStore) -> None:
        tag = "oauth-" + fingerprint(client_id)
        self._client = client
        self._local = local
        self._key = f"ctct:{{{tag}}}:tokens"
        self._lock_name = f"ctct:{{{tag}}}:lock"

    async def load(self) -> TokenSet | None:
        """The newer of the shared token set and the local one."""
        local = await self._local.load()
        try:
            raw = await asyncio.wait_for(self._client.get(self._key), CALL_TIMEOUT)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("oauth_shared_store_unavailable", error=redact(str(exc)))
            return local
        if raw is None:
            return local
        try:
            shared = TokenSet.from_json(json.loads(raw))
        except (ValueError, StateUnreadable) as exc:
            log.warning("oauth_shared_store_unreadable", error=str(exc))
            return local
        if local is None or shared.obtained_at >= local.obtained_at:
            return shared
        return local

    async def save(self, tokens: TokenSet) -> None:
        """Save locally (durable first), then share."""
        await self._local.save(tokens)
        try:
            await asyncio.wait_for(
                self._client.set(self._key, json.dumps(tokens.to_json()), ex=TOKEN_SET_TTL),
                CALL_TIMEOUT,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("oauth_shared_store_unavailable", error=redact(str(exc)))

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the replicas' refresh lock (and the local one) across load-refresh-save."""
        lock = self._client.lock(
            self._lock_name,
            timeout=TOKEN_LOCK_TTL,
            sleep=LOCK_POLL,
            blocking_timeout=LOCK_TIMEOUT,
        )
        held = False
        try:
            held = await asyncio.wait_for(lock.acquire(), LOCK_TIMEOUT + CALL_TIMEOUT)
        except (RedisError, OSError, TimeoutError) as exc:
            # Never fail a refresh because Redis is away: the local lock still serialises
            # this host, and a replica cut off from Redis cannot be coordinated anyway.
            if isinstance(exc, LockError):
                raise
            log.warning("oauth_shared_lock_unavailable", error=redact(str(exc)))
        else:
            if not held:
                raise RefreshFailed(
                    "state_locked", description="the replicas' OAuth lock stayed taken"
                )
        try:
            async with self._local.exclusive():
                yield
        finally:
            if held:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(lock.release(), CALL_TIMEOUT)

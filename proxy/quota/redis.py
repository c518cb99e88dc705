"""Quota state shared by replicas through Redis, with a local fallback when Redis is away.

Every decision about a key (take the next send slot, give one back, hold, pause) is one Lua
script run atomically by Redis, with Redis `TIME` as the only clock: the script answers
"send in `delay` seconds" and each replica sleeps that long on its own monotonic clock, so
replicas never compare their clocks with each other. Redis keys are
``ctct:{<fingerprint>}:<what>``: the hash tag keeps one key's state in one Cluster slot, and
only fingerprints (never an API key) are stored.

When Redis errors or is slower than `CALL_TIMEOUT`, the replica falls back to a
`LocalBackend` that paces at its share of the key (`fallback_spacing`) given the replicas
seen alive at the last good contact, and probes Redis every `PROBE_INTERVAL` to come back.
It never fails open: no request is sent unpaced because Redis is away. docs/shared.md states
the protocol and its bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, RedisError

from proxy.clock import Clock, SystemClock
from proxy.config import Config
from proxy.credentials import Fingerprint, redact
from proxy.logs import get_logger
from proxy.quota.backend import Mode, Reservation, Usage, next_reset, utc_day
from proxy.quota.local import LocalBackend
from proxy.upstream_errors import QuotaKind

log = get_logger("proxy.quota")

# A Redis call slower than this counts as Redis being away: a queued request should not
# wait on a struggling Redis longer than a fraction of one send spacing.
CALL_TIMEOUT = 0.25
# How often each replica writes its heartbeat; in fallback (and while settling) it beats
# every RECOVERY_PROBE instead, so that replicas come back close together.
PROBE_INTERVAL = 1.0
RECOVERY_PROBE = 0.25
# A replica whose heartbeat is older than this no longer counts as alive.
HEARTBEAT_TTL = 3.0
# After coming back, replicas that are back share only the fallback shares of those back
# (others may not have noticed yet: they probe every PROBE_INTERVAL) until everyone is back
# or this long has passed.
SETTLE = 3.0
# Daily counts outlive their day by a day, for /status around midnight and for debugging.
DAILY_TTL_SECONDS = 2 * 86_400
REPLICAS_KEY = "ctct:replicas"

_US = 1_000_000


def _script(name: str) -> str:
    """A Lua script from `lua/`, after the shared prelude (Redis TIME, integer formatting)."""
    lua = resources.files("proxy.quota") / "lua"
    return (lua / "prelude.lua").read_text() + (lua / f"{name}.lua").read_text()


def redis_keys(fingerprint: Fingerprint) -> tuple[str, str, str]:
    """The pace, daily and paused keys of a key fingerprint (one hash tag: one Cluster slot)."""
    base = f"ctct:{{{fingerprint}}}"
    return f"{base}:pace", f"{base}:daily", f"{base}:paused"


def fallback_spacing(spacing: float, replicas: int, pacing_margin: float) -> float:
    """The spacing one of `replicas` uncoordinated replicas may pace a key at.

    `spacing × replicas` keeps the sum of rates right but not the one-second window: with
    phases that drift independently, three replicas at 3 × 0.256 s can put 6 sends into one
    second. So each replica's share is rounded down to a whole number of sends per
    (1 s + margin) window, which no alignment of phases can push over the key's rate. Only
    when there are more replicas than sends per window is no such share possible; then the
    rate is divided evenly and the gateway's rejections (which are replayed) do the rest.
    """
    if replicas <= 1:
        return spacing
    window = 1.0 + pacing_margin
    per_replica = math.floor(window / spacing / replicas + 1e-9)
    if per_replica < 1:
        return spacing * replicas
    return max(spacing * replicas, window / per_replica)


@dataclass(slots=True)
class _Issued:
    """The last slot handed out for a key: what a give-back must undo, and where."""

    reservation: Reservation
    shared: bool
    spacing: float


@dataclass(slots=True)
class _KeyMemory:
    """What this replica knows of a key: enough to pace it alone and to restore Redis later."""

    day: int = -1
    sent: int = 0  # the shared count for `day` at the last good contact
    unsynced: int = 0  # sends made in fallback that Redis has not been told about
    paused_until: float = 0.0  # epoch
    local_next: float = 0.0  # monotonic: earliest next send after our last fallback send
    episode: int = -1  # the fallback episode whose transition hold this key has had
    issued: _Issued | None = None

    def roll(self, day: int) -> None:
        if day != self.day:
            self.day, self.sent, self.unsynced = day, 0, 0


class RedisBackend:
    """The `QuotaBackend` of replicas that share keys through one Redis.

    `start()` makes the first contact and starts the heartbeat; `close()` stops it. Falls
    back to local pacing at the replica's share of each key when Redis is away, and returns
    to shared mode by itself when Redis answers again.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        replicas: int = 1,
        pacing_margin: float = 0.0,
        clock: Clock | None = None,
        call_timeout: float = CALL_TIMEOUT,
        probe_interval: float = PROBE_INTERVAL,
        recovery_probe: float = RECOVERY_PROBE,
        heartbeat_ttl: float = HEARTBEAT_TTL,
        settle: float = SETTLE,
    ) -> None:
        self._client = client
        self._clock: Clock = clock or SystemClock()
        self._configured_replicas = replicas
        self._margin = pacing_margin
        self._call_timeout = call_timeout
        self._probe_interval = probe_interval
        self._recovery_probe = recovery_probe
        self._heartbeat_ttl = heartbeat_ttl
        self._settle = settle
        self.replica_id = uuid.uuid4().hex[:12]
        self._local = LocalBackend(self._clock)
        self._keys: dict[Fingerprint, _KeyMemory] = {}
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source)
            for name, source in (
                ("reserve", _script("reserve")),
                ("give_back", _script("give_back")),
                ("hold", _script("hold")),
                ("pause", _script("pause")),
                ("usage", _script("usage")),
                ("restore", _script("restore")),
                ("heartbeat", _script("heartbeat")),
            )
        }
        # Until the first contact the replica is in fallback, in its first episode.
        self._mode: Mode = "fallback"
        self._episode = 0
        self._fallback_since = self._clock.monotonic()
        # A heartbeat newer than this (monotonic) proves its replica is in shared mode. At
        # start-up, the replicas already running have beaten within the last interval.
        self._back_since = self._fallback_since - 1.5 * probe_interval
        self._settle_until = 0.0
        self._back = 1  # replicas known to be back in shared mode, while settling
        self._replicas_seen = 0
        self._problem: str | None = None
        self._last_failure = "Redis did not answer"
        self._watcher: asyncio.Task[None] | None = None

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client, for other state the replicas share (OAuth tokens)."""
        return self._client

    @classmethod
    def from_config(cls, config: Config, clock: Clock | None = None) -> RedisBackend:
        """A backend for `config.redis_url`, sized by `config.replicas` and its pacing margin."""
        assert config.redis_url is not None
        client = aioredis.Redis.from_url(
            config.redis_url.reveal(),
            socket_timeout=CALL_TIMEOUT,
            socket_connect_timeout=CALL_TIMEOUT,
            # A reservation must never run twice: a timed-out call is a lost slot, not a retry.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return cls(
            client, replicas=config.replicas, pacing_margin=config.pacing_margin, clock=clock
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the first contact (or start in fallback) and keep a heartbeat going."""
        await self._beat()
        if self._mode == "fallback":
            log.warning(
                "shared_mode_changed",
                mode="fallback",
                previous=None,
                reason=self._last_failure,
                replicas=self.replicas(),
                replica=self.replica_id,
            )
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        """Stop the heartbeat, leave the replica set, close the connections."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._mode == "shared":
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._call_timeout):
                    await self._client.zrem(REPLICAS_KEY, self.replica_id)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._client.aclose()

    def mode(self) -> Mode:
        """The mode: `shared` while Redis answers, `fallback` while this replica paces alone."""
        return self._mode

    def replicas(self) -> int:
        """How many replicas share the keys, as far as this one knows (at least `--replicas`)."""
        return max(self._replicas_seen, self._configured_replicas)

    async def ready_problem(self) -> str | None:
        """A readiness check: Redis refusing our credentials will not heal by itself.

        An outage does not make a replica unready: it serves in fallback, which /readyz
        reports as its mode, and taking every replica out of rotation would turn a slowdown
        into an outage.
        """
        return self._problem if self._mode == "fallback" else None

    # -- the QuotaBackend protocol -----------------------------------------------------------

    async def reserve(self, key: Fingerprint, spacing: float, daily_quota: int) -> Reservation:
        """Take the next free send slot of the key (shared if Redis answers, else local)."""
        memory = self._memory(key)
        if self._mode == "shared":
            reservation = await self._reserve_shared(key, memory, spacing, daily_quota)
            if reservation is not None:
                return reservation
        return await self._reserve_local(key, memory, spacing, daily_quota)

    async def give_back(self, key: Fingerprint, reservation: Reservation, spacing: float) -> None:
        """Return an unused slot: in Redis only if it is still the last one reserved."""
        memory = self._memory(key)
        issued = memory.issued
        if issued is None or issued.reservation is not reservation:
            return
        memory.issued = None
        if not issued.shared:
            await self._local.give_back(key, reservation, issued.spacing)
            memory.unsynced = max(0, memory.unsynced - 1)
            return
        memory.sent = max(0, memory.sent - 1)
        if self._mode == "shared":
            pace, daily, _ = redis_keys(key)
            slot_us = round(reservation.slot * _US)
            await self._run("give_back", [pace, daily], [slot_us, round(issued.spacing * _US)])
        # In fallback the slot is lost and the count comes back through the restore (unless
        # Redis kept it: then it is one send too many in the day's count, never too few).

    async def hold(self, key: Fingerprint, seconds: float) -> None:
        """Let no send of the key go before `seconds` from now, on every replica."""
        if self._mode == "shared":
            pace, _, _ = redis_keys(key)
            if await self._run("hold", [pace], [round(seconds * _US)]) is not None:
                return
        await self._local.hold(key, seconds)

    async def pause(self, key: Fingerprint, until: float) -> None:
        """Pause the key until the epoch time `until` on every replica (daily quota spent)."""
        memory = self._memory(key)
        memory.paused_until = max(memory.paused_until, until)
        # Kept locally too, so the pause outlives a Redis outage; pushed again on return.
        await self._local.pause(key, until)
        if self._mode == "shared":
            _, _, paused = redis_keys(key)
            await self._run("pause", [paused], [round(until * _US)])

    async def usage(self, key: Fingerprint) -> Usage:
        """The key's count today and its pause (from Redis, else from what this replica knows)."""
        memory = self._memory(key)
        wall = self._clock.time()
        memory.roll(utc_day(wall))
        if self._mode == "shared":
            _, daily, paused = redis_keys(key)
            reply = await self._run("usage", [daily, paused], [])
            if reply is not None:
                memory.sent = int(reply[0])
                if int(reply[1]):
                    memory.paused_until = max(memory.paused_until, int(reply[1]) / _US)
                    await self._local.pause(key, memory.paused_until)
        paused_until = memory.paused_until if memory.paused_until > wall else None
        return Usage(memory.sent + memory.unsynced, paused_until)

    # -- shared and local reservations -------------------------------------------------------

    async def _reserve_shared(
        self, key: Fingerprint, memory: _KeyMemory, spacing: float, daily_quota: int
    ) -> Reservation | None:
        clock = self._clock
        if self._settling():
            # Those back share their fallback shares; the others still pace alone.
            share = fallback_spacing(spacing, self.replicas(), self._margin)
            spacing = max(spacing, share / self._back)
        started = clock.monotonic()
        reply = await self._run(
            "reserve",
            list(redis_keys(key)),
            [round(spacing * _US), daily_quota, DAILY_TTL_SECONDS],
        )
        if reply is None:
            return None
        elapsed = clock.monotonic() - started
        status, delay_us, sent, at_us = (int(x) for x in reply)
        memory.roll(utc_day(clock.time()))
        memory.sent = sent
        if status != 0:
            if status == 1:
                memory.paused_until = max(memory.paused_until, at_us / _US)
                await self._local.pause(key, memory.paused_until)
            return Reservation(
                0.0, sent_today=sent, blocked_until=at_us / _US, kind=QuotaKind.DAILY
            )
        # Redis decided at about the middle of the round trip; the delay runs from there.
        delay = max(0.0, delay_us / _US - elapsed / 2)
        reservation = Reservation(delay, slot=at_us / _US, sent_today=sent, spacing=spacing)
        memory.issued = _Issued(reservation, shared=True, spacing=spacing)
        return reservation

    async def _reserve_local(
        self, key: Fingerprint, memory: _KeyMemory, spacing: float, daily_quota: int
    ) -> Reservation:
        clock = self._clock
        wall, now = clock.time(), clock.monotonic()
        memory.roll(utc_day(wall))
        replicas = self.replicas()
        # Assume every other replica sends as much as this one: the same assumption as the
        # pacing share, so the day's quota is not overrun while nobody can count it.
        if memory.sent + replicas * memory.unsynced >= daily_quota:
            return Reservation(
                0.0,
                sent_today=memory.sent + memory.unsynced,
                blocked_until=next_reset(wall),
                kind=QuotaKind.DAILY,
            )
        if memory.episode != self._episode:
            memory.episode = self._episode
            # Slots other replicas reserved before Redis went away are at most one each,
            # within `replicas × spacing`; start once all of them are a whole window past.
            wait = self._fallback_since + replicas * spacing + 1.0 + self._margin - now
            if wait > 0:
                await self._local.hold(key, wait)
        share = fallback_spacing(spacing, replicas, self._margin)
        reservation = await self._local.reserve(key, share, daily_quota)
        if reservation.blocked_until is not None:
            return reservation
        memory.unsynced += 1
        memory.local_next = max(memory.local_next, reservation.slot + share)
        reservation.sent_today = memory.sent + memory.unsynced
        reservation.spacing = share
        memory.issued = _Issued(reservation, shared=False, spacing=share)
        return reservation

    # -- talking to Redis --------------------------------------------------------------------

    def _memory(self, key: Fingerprint) -> _KeyMemory:
        memory = self._keys.get(key)
        if memory is None:
            memory = self._keys[key] = _KeyMemory(day=utc_day(self._clock.time()))
        return memory

    async def _run(self, script: str, keys: list[str], args: list[int | float | str]) -> Any:
        """Run one script; on error or timeout switch to fallback and return None."""
        try:
            async with asyncio.timeout(self._call_timeout):
                return await self._scripts[script](keys=keys, args=args)
        except AuthenticationError:
            self._lost("Redis refused the credentials in --redis-url", problem=True)
        except TimeoutError:
            self._lost(f"Redis did not answer within {self._call_timeout:g} s")
        except (RedisError, OSError) as error:
            self._lost(redact(f"Redis failed: {type(error).__name__}: {error}"))
        return None

    def _lost(self, reason: str, *, problem: bool = False) -> None:
        self._last_failure = reason
        if problem:
            self._problem = reason
        if self._mode == "fallback":
            return
        self._mode = "fallback"
        self._episode += 1
        self._fallback_since = self._back_since = self._clock.monotonic()
        log.warning(
            "shared_mode_changed",
            mode="fallback",
            previous="shared",
            reason=reason,
            replicas=self.replicas(),
            replica=self.replica_id,
        )

    async def _watch(self) -> None:
        while True:
            recovering = self._mode == "fallback" or self._settling()
            await self._clock.sleep(self._recovery_probe if recovering else self._probe_interval)
            await self._beat()

    def _settling(self) -> bool:
        return self._clock.monotonic() < self._settle_until

    async def _beat(self) -> None:
        """Write the heartbeat; in fallback it is also the probe that brings shared mode back."""
        now = self._clock.monotonic()
        settling = self._mode == "fallback" or self._settling()
        age = now - self._back_since if settling else self._heartbeat_ttl
        reply = await self._run(
            "heartbeat",
            [REPLICAS_KEY],
            [self.replica_id, round(self._heartbeat_ttl * _US), round(age * _US)],
        )
        if reply is None:
            return
        self._problem = None
        alive, back = int(reply[0]), max(1, int(reply[1]))
        if not settling:
            self._replicas_seen = alive
            return
        # Until everyone is back, a restarted Redis has not heard from everyone yet.
        self._replicas_seen = max(self._replicas_seen, alive)
        self._back = back
        if back >= self.replicas():
            self._settle_until = 0.0
        if self._mode == "shared":
            return
        if not await self._restore():
            return
        # A replica that just started and served nobody alone joins at full speed, as into
        # a running fleet; after an outage, the others may still be pacing alone.
        served_alone = any(m.episode == self._episode for m in self._keys.values())
        if back < self.replicas() and (self._episode > 0 or served_alone):
            self._settle_until = now + self._settle
        self._mode = "shared"
        log.info(
            "shared_mode_changed",
            mode="shared",
            previous="fallback",
            reason="Redis answered",
            replicas=self.replicas(),
            replica=self.replica_id,
        )

    async def _restore(self) -> bool:
        """Tell Redis what happened while it was away; False if it went away again."""
        clock = self._clock
        for key, memory in list(self._keys.items()):  # keys may arrive meanwhile
            wall, now = clock.time(), clock.monotonic()
            memory.roll(utc_day(wall))
            paused = memory.paused_until if memory.paused_until > wall else 0.0
            reply = await self._run(
                "restore",
                list(redis_keys(key)),
                [
                    memory.day,
                    memory.sent,
                    memory.unsynced,
                    round(max(0.0, memory.local_next - now) * _US),
                    round(paused * _US),
                    DAILY_TTL_SECONDS,
                ],
            )
            if reply is None:
                return False
            memory.sent, memory.unsynced = int(reply), 0
        return True

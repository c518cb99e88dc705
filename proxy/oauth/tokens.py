"""OAuth for v3: keep the access token fresh, rotate refresh tokens safely, get the first one.

`OAuthTokens` is the `TokenSource` that `serve` injects v3 tokens from when a refresh token
is configured or `ctct-proxy login` left one under `--state-dir`. It refreshes ahead of
expiry and after a v3 401, one refresh at a time and never more than one token call a
second, and it saves a rotated refresh token before it uses the access token that came with
it. `ctct-proxy login` (proxy/oauth/login.py) gets the first token set.

The token set lives in one file (`oauth-tokens.json`, mode 0600, replaced atomically) behind
the `TokenStore` protocol. That protocol is also the seam for replicas: a shared store
(Redis) whose `exclusive()` is a cluster-wide lock lets one replica refresh while the others,
re-reading the store under the same lock, adopt its result instead of calling the endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

import aiohttp
from aiolimiter import AsyncLimiter
from yarl import URL

from proxy.clock import Clock, SystemClock
from proxy.config import Config, ConfigError
from proxy.credentials import Secret, TokenSource, fingerprint, redact
from proxy.egress import tls_cause, token_session
from proxy.errors import CredentialsNeedAttention
from proxy.files import atomic_write
from proxy.logs import get_logger
from proxy.upstream_errors import parse_retry_after

if sys.platform != "win32":
    import fcntl

log = get_logger("oauth")

STATE_FILE_NAME: Final = "oauth-tokens.json"
STATE_VERSION: Final = 1

# Refresh this long before the access token expires (24 h tokens: at 23 h 55 min). Tokens
# shorter than twice this are refreshed at half their life instead.
REFRESH_LEAD: Final = 300.0
# Stop handing out a token this close to its expiry (or a tenth of its life, if shorter): a
# request may still wait in its queue before it reaches the gateway.
EXPIRY_SLACK: Final = 10.0
# When a token answer has no expires_in, assume less than CC's 24 h so we refresh early.
ASSUMED_LIFETIME: Final = 3600.0
# The token endpoint takes one call a second per application (constant-contact.md). It
# counts arrivals, and two calls sent exactly 1 s apart can arrive closer than that when
# latency varies, so ours leave at least 1.1 s apart.
TOKEN_CALL_SPACING: Final = 1.1
TOKEN_CALL_TIMEOUT: Final = 30.0
# A 429 from the token endpoint (another process spent this second) is waited out inline a
# few times, briefly, so that waiting requests get a token rather than a 502.
RATE_LIMIT_RETRIES: Final = 3
MAX_RATE_LIMIT_WAIT: Final = 5.0
# After a failed refresh: retry after 1 s, doubling up to 5 min.
FIRST_RETRY: Final = 1.0
MAX_RETRY: Final = 300.0
# The keeper looks again at least this often, so a token saved by `login` (or another
# process) is noticed while the proxy is in trouble.
MAX_NAP: Final = 30.0
# A 401 for a token we refreshed because of a 401 this recently is not about freshness
# (e.g. an endpoint that answers 401 for other reasons): pass it on instead of refreshing
# on every request.
MIN_401_INTERVAL: Final = 30.0
LOCK_POLL: Final = 0.05
LOCK_TIMEOUT: Final = 60.0
# On shutdown a refresh in flight gets this long to finish: a rotated refresh token that
# is not saved is lost for good.
CLOSE_GRACE: Final = 10.0
_MAX_ANSWER: Final = 64 * 1024
_ERROR_CODE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


# -- the token set ------------------------------------------------------------------------


class StateUnreadable(Exception):
    """The token state file exists but cannot be used (the message never quotes a token)."""


@dataclass(frozen=True)
class TokenSet:
    """One generation of the proxy's OAuth credentials, as kept in memory and on disk.

    `client` is the fingerprint of the client id the tokens belong to; `origin` the
    fingerprint of the configured refresh token this chain of refreshes started from
    (None after `login` without one), which is how a restart tells a stale configured
    token (the state descends from it: the state wins) from a new one (it wins).
    """

    refresh_token: Secret
    access_token: Secret | None
    obtained_at: float  # epoch seconds the set was issued (or configured)
    expires_at: float  # epoch seconds the access token stops working (0: no access token)
    client: str
    origin: str | None
    scope: str | None = None

    @property
    def lifetime(self) -> float:
        """How long the access token was issued for, in seconds."""
        return max(0.0, self.expires_at - self.obtained_at)

    def refresh_due(self) -> float:
        """When to refresh: REFRESH_LEAD before expiry, or at half-life for short tokens."""
        if self.access_token is None:
            return -math.inf
        return self.expires_at - min(REFRESH_LEAD, self.lifetime / 2)

    def usable_until(self) -> float:
        """Until when the access token may still be handed to a request."""
        if self.access_token is None:
            return -math.inf
        return self.expires_at - min(EXPIRY_SLACK, self.lifetime / 10)

    def to_json(self) -> dict[str, object]:
        """The state file's content: the tokens themselves and fingerprints, nothing else."""
        return {
            "version": STATE_VERSION,
            "client": self.client,
            "origin": self.origin,
            "refresh_token": self.refresh_token.reveal(),
            "access_token": self.access_token.reveal() if self.access_token else None,
            "obtained_at": self.obtained_at,
            "expires_at": self.expires_at,
            "scope": self.scope,
            "saved_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }

    @classmethod
    def from_json(cls, data: object) -> TokenSet:
        """Read a state file's content; StateUnreadable names what is wrong, never a value."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise StateUnreadable("not a version-1 token state")
        refresh, access = data.get("refresh_token"), data.get("access_token")
        obtained, expires = data.get("obtained_at"), data.get("expires_at")
        client, origin, scope = data.get("client"), data.get("origin"), data.get("scope")
        if not isinstance(refresh, str) or not refresh:
            raise StateUnreadable("no refresh_token")
        if access is not None and not isinstance(access, str):
            raise StateUnreadable("access_token is not a string")
        if not isinstance(obtained, int | float) or not isinstance(expires, int | float):
            raise StateUnreadable("obtained_at / expires_at are not numbers")
        if not isinstance(client, str) or not (origin is None or isinstance(origin, str)):
            raise StateUnreadable("client / origin are not strings")
        return cls(
            refresh_token=Secret(refresh),
            access_token=Secret(access) if access else None,
            obtained_at=float(obtained),
            expires_at=float(expires),
            client=client,
            origin=origin,
            scope=scope if isinstance(scope, str) else None,
        )


def choose_start(
    stored: TokenSet | None, configured: Secret | None, client: str, now: float
) -> TokenSet | None:
    """The credentials to start from: the saved state, unless a new refresh token is configured.

    A configured token the state descends from (or still holds) is stale: the state has
    moved on, perhaps by rotation, and wins. Any other configured token is the operator's
    newer word and wins over the state. A state for another client id is never used.
    """
    if stored is not None and stored.client != client:
        stored = None
    if configured is None:
        return stored
    origin = fingerprint(configured.reveal())
    if stored is not None and (stored.origin == origin or stored.refresh_token == configured):
        return stored
    return TokenSet(configured, None, now, 0.0, client, origin)


# -- where the token set is kept --------------------------------------------------------------


class TokenStore(Protocol):
    """Where the token set lives across refreshes, restarts and processes.

    The refresher holds `exclusive()` while it reads the store, calls the token endpoint and
    saves the result, so that whoever shares the store never spends a rotated-away refresh
    token. A Redis store (for replicas) would implement it as a lock key with an expiry and
    keep the token set under another key; nothing else here needs to change.
    """

    async def load(self) -> TokenSet | None:
        """The saved token set, or None; raises StateUnreadable if it cannot be used."""
        ...

    async def save(self, tokens: TokenSet) -> None:
        """Save a token set so that a crash at any moment leaves the old or the new one."""
        ...

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held across load-refresh-save by whoever refreshes."""
        ...


class FileTokenStore:
    """The token set in one JSON file: mode 0600, replaced atomically, flock'd while refreshing.

    The lock is a sibling file (the state file itself is replaced, so its inode changes); it
    also keeps a `login` and a running `serve`, or two proxies sharing a state dir, apart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    async def load(self) -> TokenSet | None:
        """The saved token set, or None if there is no file."""
        return await asyncio.to_thread(self.read)

    def read(self) -> TokenSet | None:
        """`load`, blocking."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateUnreadable(f"{self.path}: {exc.strerror}") from None
        try:
            return TokenSet.from_json(json.loads(text))
        except ValueError:
            raise StateUnreadable(f"{self.path}: not valid JSON") from None
        except StateUnreadable as exc:
            raise StateUnreadable(f"{self.path}: {exc}") from None

    async def save(self, tokens: TokenSet) -> None:
        """Write the token set next to the file, fsync it, then rename it over the file."""
        await asyncio.to_thread(self.write, tokens)

    def write(self, tokens: TokenSet) -> None:
        """`save`, blocking."""
        atomic_write(self.path, (json.dumps(tokens.to_json(), indent=2) + "\n").encode())

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """An advisory lock on the sibling `.lock` file, polled so the event loop never blocks."""
        if sys.platform == "win32":
            yield
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RefreshFailed(
                "state_unavailable", description=f"{self._lock_path}: {exc.strerror}"
            ) from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RefreshFailed(
                            "state_locked", description=f"{self._lock_path} stayed locked"
                        ) from None
                    await asyncio.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def state_path(config: Config) -> Path:
    """Where `serve` and `login` keep the token set."""
    if config.state_dir is None:
        raise ConfigError("--state-dir: is required to keep OAuth tokens")
    return config.state_dir / STATE_FILE_NAME


# -- the token endpoint ---------------------------------------------------------------------


class RefreshFailed(Exception):
    """A token call that gave no tokens. Everything on it is safe to log.

    `code` is the OAuth error (`invalid_grant`, `invalid_client`, ...) or ours
    (`unreachable`, `timeout`, `rate_limited`, `server_error`, `bad_response`).
    """

    def __init__(
        self,
        code: str,
        *,
        status: int | None = None,
        description: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code)
        self.code = code
        self.status = status
        self.description = redact(description)[:200]
        self.retry_after = retry_after

    @property
    def refused(self) -> bool:
        """The server refused the refresh token itself: using it again cannot work."""
        return self.code == "invalid_grant"


@dataclass(frozen=True)
class TokenAnswer:
    """A successful token endpoint answer."""

    access_token: Secret
    refresh_token: Secret | None
    expires_in: float
    scope: str | None


class TokenClient:
    """Calls the token endpoint: client authentication, the form, and reading the answer.

    It has its own session: the proxy's session is set up for byte-exact forwarding (no
    decompression, no default headers), which is wrong for a JSON API we parse ourselves.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        token_url: URL,
        client_id: Secret,
        client_secret: Secret | None,
    ) -> None:
        self._session = session
        self._url = token_url
        self._client_id = client_id
        self._client_secret = client_secret

    @classmethod
    def open(cls, config: Config) -> TokenClient:
        """A client for the configured token endpoint (call within a running loop)."""
        if config.client_id is None:
            raise ConfigError("--client-id: is required for OAuth")
        # The same CAs and egress route as the API calls.
        session = token_session(config, TOKEN_CALL_TIMEOUT)
        return cls(session, config.token_url, config.client_id, config.client_secret)

    async def close(self) -> None:
        """Close the session."""
        await self._session.close()

    async def refresh(self, refresh_token: Secret) -> TokenAnswer:
        """The `refresh_token` grant."""
        return await self._call(
            {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
        )

    async def exchange_code(self, code: str, redirect_uri: str, verifier: str) -> TokenAnswer:
        """The `authorization_code` grant, with the PKCE verifier."""
        return await self._call(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            }
        )

    async def _call(self, form: dict[str, str]) -> TokenAnswer:
        headers = {"Accept": "application/json"}
        if self._client_secret is not None:
            pair = f"{self._client_id.reveal()}:{self._client_secret.reveal()}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            # A PKCE (public) app has no secret: it names itself in the form instead.
            form = {**form, "client_id": self._client_id.reveal()}
        try:
            async with self._session.post(
                self._url, data=form, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                body = await response.content.read(_MAX_ANSWER)
                response_headers = response.headers
        except TimeoutError:
            raise RefreshFailed(
                "timeout", description="the token endpoint did not answer"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise RefreshFailed("tls_failed", description=tls_cause(exc)) from None
        except aiohttp.ClientError as exc:
            raise RefreshFailed("unreachable", description=type(exc).__name__) from None
        if status == 200:
            return _parse_tokens(body)
        raise _parse_failure(status, body, response_headers)


def _parse_tokens(body: bytes) -> TokenAnswer:
    try:
        data = json.loads(body)
    except ValueError:
        raise RefreshFailed("bad_response", status=200, description="not JSON") from None
    if not isinstance(data, dict):
        raise RefreshFailed("bad_response", status=200, description="not a JSON object")
    access, refresh = data.get("access_token"), data.get("refresh_token")
    if not isinstance(access, str) or not access:
        raise RefreshFailed("bad_response", status=200, description="no access_token")
    expires_in = data.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = ASSUMED_LIFETIME
    scope = data.get("scope")
    return TokenAnswer(
        access_token=Secret(access),
        refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None,
        expires_in=float(expires_in),
        scope=scope if isinstance(scope, str) else None,
    )


def _parse_failure(status: int, body: bytes, headers: Mapping[str, str]) -> RefreshFailed:
    error, description = "", ""
    with contextlib.suppress(ValueError):
        data = json.loads(body)
        if isinstance(data, dict):
            error = str(data.get("error") or data.get("errorCode") or "")
            description = str(data.get("error_description") or data.get("errorSummary") or "")
    if status == 429:
        return RefreshFailed(
            "rate_limited",
            status=status,
            description=description,
            retry_after=_rate_limit_wait(headers),
        )
    if not _ERROR_CODE.fullmatch(error):
        error = "server_error" if status >= 500 else f"http_{status}"
    return RefreshFailed(error, status=status, description=description)


# The token endpoint's own "come back later" is believed up to this many seconds.
MAX_TOKEN_WAIT = 60.0


def _rate_limit_wait(headers: Mapping[str, str]) -> float:
    """Seconds to wait after a 429: Retry-After, else Okta's X-Rate-Limit-Reset (epoch), else 1."""
    retry_after = parse_retry_after(headers.get("Retry-After"), time.time())
    if retry_after is not None:
        return min(retry_after, MAX_TOKEN_WAIT)
    reset = headers.get("X-Rate-Limit-Reset", "").strip()
    if reset.isdigit():
        return min(max(0.0, int(reset[:12]) - time.time()), MAX_TOKEN_WAIT)
    return 1.0


# -- the token source -----------------------------------------------------------------------


class OAuthTokens(TokenSource):
    """The v3 access token, kept fresh: ahead of expiry, after a 401, and after a failure.

    One refresh runs at a time (every caller awaits the same task, which outlives any one
    caller) and at most one token call a second goes out. While no usable access token is
    at hand and the last refresh failed, `current` raises CredentialsNeedAttention (502).
    """

    def __init__(
        self,
        client: TokenClient,
        store: TokenStore,
        start: TokenSet,
        *,
        clock: Clock | None = None,
        limiter: AsyncLimiter | None = None,
    ) -> None:
        super().__init__(None)
        self._client = client
        self._store = store
        self._tokens = start
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._limiter = limiter if limiter is not None else AsyncLimiter(1, TOKEN_CALL_SPACING)
        self._inflight: asyncio.Task[TokenSet] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._failure: RefreshFailed | None = None
        self._failures = 0
        self._failures_total = 0  # every failed refresh since start (the metric's counter)
        self._retry_at = -math.inf
        self._refused: Secret | None = None  # a refresh token the server said is dead
        self._rejected: str | None = None  # an access token the upstream answered 401 to
        self._after_401: str | None = None  # the token a 401 made us fetch, and when
        self._after_401_at = -math.inf

    @property
    def ready(self) -> bool:
        """Whether an access token is at hand that the proxy may still send."""
        return self._usable(self._tokens)

    @property
    def tokens(self) -> TokenSet:
        """The token set in use (its repr shows no secret)."""
        return self._tokens

    def status(self) -> dict[str, object]:
        """The token state for the dashboard and /metrics: times and counts, never a token."""
        now = self._clock.time()
        tokens = self._tokens
        has_access = tokens.access_token is not None
        failure = self._failure
        return {
            "kind": "oauth",
            "ready": self.ready,
            "expires_in": round(tokens.expires_at - now, 1) if has_access else None,
            "last_refresh": tokens.obtained_at if has_access else None,
            "refreshing": self._inflight is not None,
            "failures": self._failures,
            "failures_total": self._failures_total,
            "last_error": failure.code if failure is not None else None,
            "retry_in": (round(max(0.0, self._retry_at - now), 1) if failure is not None else None),
        }

    def start(self) -> None:
        """Start keeping the token fresh in the background (call within the running loop)."""
        if self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep_fresh(), name="oauth-keeper"
            )

    async def close(self) -> None:
        """Stop the keeper, let a refresh in flight be saved, close the client."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        task = self._inflight
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), CLOSE_GRACE)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, CredentialsNeedAttention):
                    await task
            except CredentialsNeedAttention:
                pass
        await self._client.close()

    async def current(self) -> str:
        """The access token to send now, waiting for a refresh if there is none usable."""
        tokens = self._tokens
        if self._usable(tokens) and tokens.access_token is not None:
            return tokens.access_token.reveal()
        failing = self._failure is not None and self._clock.time() < self._retry_at
        if failing and self._inflight is None:
            raise self._attention()
        return _reveal_access(await self._refreshed())

    async def refresh_after_401(self, rejected: str) -> str | None:
        """A fresh token after the upstream refused `rejected`; None to pass the 401 on.

        Raises CredentialsNeedAttention when the refresh itself fails.
        """
        tokens = self._tokens
        access = tokens.access_token.reveal() if tokens.access_token else None
        if access is not None and access != rejected and self._usable(tokens):
            return access  # refreshed since `rejected` went out
        if access == rejected and self._inflight is None:
            if (
                rejected == self._after_401
                and self._clock.time() - self._after_401_at < MIN_401_INTERVAL
            ):
                log.warning("oauth_token_rejected_again", action="passing the 401 on")
                return None
            log.info("oauth_token_rejected", action="refreshing")
        self._rejected = rejected
        fresh = _reveal_access(await self._refreshed())
        self._after_401, self._after_401_at = fresh, self._clock.time()
        return fresh

    # -- internals ----------------------------------------------------------------------------

    def _usable(self, tokens: TokenSet) -> bool:
        access = tokens.access_token
        return (
            access is not None
            and access.reveal() != self._rejected
            and self._clock.time() < tokens.usable_until()
        )

    def _attention(self) -> CredentialsNeedAttention:
        failure = self._failure
        code = failure.code if failure is not None else "no_token"
        retry_after = None
        if failure is not None and not failure.refused:
            retry_after = max(1.0, self._retry_at - self._clock.time())
        return CredentialsNeedAttention(
            "The proxy's Constant Contact credentials need attention: it could not renew its "
            f"OAuth access token ({code}). Ask the proxy's operator to check its logs.",
            retry_after=retry_after,
        )

    async def _refreshed(self) -> TokenSet:
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh(), name="oauth-refresh")
            self._inflight = task
            task.add_done_callback(self._refresh_done)
        # Shielded: a caller that goes away must not cancel a rotation half-way.
        return await asyncio.shield(task)

    def _refresh_done(self, task: asyncio.Task[TokenSet]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _refresh(self) -> TokenSet:
        tokens = self._tokens
        try:
            async with self._store.exclusive():
                tokens = await self._newest()
                if self._usable(tokens) and self._clock.time() < tokens.refresh_due():
                    self._tokens = tokens
                    self._recovered()
                    expires_in = round(tokens.expires_at - self._clock.time())
                    log.info("oauth_adopted", expires_in=expires_in)
                    return tokens
                if self._refused is not None and tokens.refresh_token == self._refused:
                    raise RefreshFailed("invalid_grant", description="refused before")
                answer = await self._call(tokens.refresh_token)
                now = self._clock.time()
                rotated = answer.refresh_token is not None and (
                    answer.refresh_token != tokens.refresh_token
                )
                fresh = TokenSet(
                    refresh_token=answer.refresh_token or tokens.refresh_token,
                    access_token=answer.access_token,
                    obtained_at=now,
                    expires_at=now + answer.expires_in,
                    client=tokens.client,
                    origin=tokens.origin,
                    scope=answer.scope or tokens.scope,
                )
                # Saved before use: once rotated, the old refresh token is dead upstream.
                try:
                    await self._store.save(fresh)
                except OSError as exc:
                    log.error(
                        "oauth_state_not_saved",
                        error=exc.strerror or type(exc).__name__,
                        rotated=rotated,
                        consequence="a restart may need `ctct-proxy login`" if rotated else "",
                    )
                self._tokens = fresh
                self._rejected = None
                self._recovered()
                log.info("oauth_refreshed", expires_in=answer.expires_in, rotated=rotated)
                return fresh
        except RefreshFailed as failure:
            self._failed(failure, tokens)
            raise self._attention() from None

    async def _newest(self) -> TokenSet:
        """Ours, or the store's if someone (login, another process) saved a newer set since."""
        try:
            return self._pick(await self._store.load())
        except StateUnreadable as exc:
            log.warning("oauth_state_unreadable", error=str(exc))
            return self._tokens

    async def _store_has_newer(self) -> bool:
        try:
            return self._pick(await self._store.load()) is not self._tokens
        except StateUnreadable:
            return False

    def _pick(self, stored: TokenSet | None) -> TokenSet:
        ours = self._tokens
        if stored is None or stored.client != ours.client:
            return ours
        if ours.access_token is None and stored.origin == ours.origin and stored.access_token:
            # We hold only the configured refresh token; the store holds what another
            # replica or process already got for it (rotated, perhaps): theirs is newer.
            return stored
        return stored if stored.obtained_at > ours.obtained_at else ours

    async def _call(self, refresh_token: Secret) -> TokenAnswer:
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            async with self._limiter:
                try:
                    return await self._client.refresh(refresh_token)
                except RefreshFailed as failure:
                    if failure.code != "rate_limited" or attempt == RATE_LIMIT_RETRIES:
                        raise
                    wait = min(failure.retry_after or 1.0, MAX_RATE_LIMIT_WAIT)
            log.info("oauth_token_endpoint_busy", retry_in=round(wait, 2))
            await self._clock.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _recovered(self) -> None:
        if self._failure is not None:
            log.info("oauth_recovered", after_failures=self._failures)
        self._failure, self._failures, self._retry_at = None, 0, -math.inf

    def _failed(self, failure: RefreshFailed, tokens: TokenSet) -> None:
        self._failure = failure
        self._failures += 1
        self._failures_total += 1
        if failure.refused:
            self._refused = tokens.refresh_token
        delay = min(MAX_RETRY, FIRST_RETRY * 2 ** (self._failures - 1))
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        now = self._clock.time()
        self._retry_at = now + delay
        current = self._tokens
        log.error(
            "oauth_refresh_failed",
            error=failure.code,
            status=failure.status,
            description=failure.description,
            hint=_HINTS.get(failure.code, "the token endpoint did not give a token"),
            retry_in=round(delay, 1),
            access_token_valid_for=(
                round(current.usable_until() - now) if self._usable(current) else 0
            ),
        )

    async def _keep_fresh(self) -> None:
        while True:
            due = self._tokens.refresh_due() if self._failure is None else self._retry_at
            # While failing, a newer saved token set (a `login`) is worth trying at once.
            failing = self._failure is not None and self._clock.time() < due
            if failing and await self._store_has_newer():
                due = -math.inf
            now = self._clock.time()
            if now < due:
                await self._clock.sleep(min(due - now, MAX_NAP))
                continue
            # Logged where it happened; requests see it as 502 until a retry succeeds.
            with contextlib.suppress(CredentialsNeedAttention):
                await self._refreshed()


_HINTS: Final = {
    "invalid_grant": "the refresh token was refused (expired, revoked or rotated away): run "
    "`ctct-proxy login` or configure a new --refresh-token",
    "invalid_client": "the token endpoint does not accept --client-id / --client-secret",
    "unauthorized_client": "this client may not use the refresh_token grant",
    "unreachable": "the token endpoint could not be reached (--token-url)",
    "timeout": "the token endpoint did not answer in time",
    "tls_failed": "the token endpoint's TLS certificate was refused (see description): check "
    "--ca-bundle (or SSL_CERT_FILE), an egress proxy that re-signs TLS, and the clock",
    "rate_limited": "the token endpoint kept answering 429 (another process shares the app?)",
    "state_locked": "another process held the token state lock too long",
    "state_unavailable": "the token state under --state-dir cannot be written",
}


def _reveal_access(tokens: TokenSet) -> str:
    if tokens.access_token is None:  # pragma: no cover - a refresh always brings one
        raise CredentialsNeedAttention("The proxy has no OAuth access token.")
    return tokens.access_token.reveal()


async def open_token_source(
    config: Config,
    *,
    clock: Clock | None = None,
    share: Callable[[TokenStore], TokenStore] | None = None,
) -> OAuthTokens | None:
    """The OAuth token source for `serve`, started; None when OAuth is not configured.

    OAuth is on when a refresh token is configured or a token state file exists; it needs
    `--client-id`. Raises ConfigError when it cannot work at all.
    """
    if config.refresh_token is None and config.client_id is None:
        if config.state_dir is not None and (config.state_dir / STATE_FILE_NAME).exists():
            log.warning("oauth_state_ignored", reason="no --client-id to refresh it with")
        return None
    path = state_path(config)
    store: TokenStore = FileTokenStore(path)
    if share is not None:
        # Replicas: one refreshes under a shared lock, the others adopt its result.
        store = share(store)
    try:
        stored = await store.load()
    except StateUnreadable as exc:
        log.warning("oauth_state_unreadable", error=str(exc))
        stored = None
    if stored is None and config.refresh_token is None:
        return None
    if config.client_id is None:  # pragma: no cover - Config requires it with a refresh token
        raise ConfigError("--client-id: is required to refresh OAuth tokens")
    client = fingerprint(config.client_id.reveal())
    if stored is not None and stored.client != client:
        log.warning("oauth_state_ignored", reason="saved for another --client-id", path=str(path))
    now = (clock or SystemClock()).time()
    start = choose_start(stored, config.refresh_token, client, now)
    if start is None:
        return None
    log.info(
        "oauth_enabled",
        source="state file" if start is stored else "--refresh-token",
        state_file=str(path),
        pkce=config.client_secret is None,
    )
    tokens = OAuthTokens(TokenClient.open(config), store, start, clock=clock)
    tokens.start()
    return tokens

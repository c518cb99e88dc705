"""OAuth for v3: refresh ahead of expiry and after a 401, rotation, restarts, failures, login.

Everything runs against the real simulator on loopback (its token endpoint is limited to one
call a second, like the real one); the keeper's schedule is checked with a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy import logs
from proxy.cli import main
from proxy.config import Config, ConfigError
from proxy.credentials import Secret, fingerprint
from proxy.oauth.login import LoginOptions, login, login_settings, pkce_pair
from proxy.oauth.tokens import (
    REFRESH_LEAD,
    STATE_FILE_NAME,
    FileTokenStore,
    OAuthTokens,
    TokenClient,
    TokenSet,
    choose_start,
)
from proxy.simulator import Simulator, SimulatorConfig, make_simulator_app
from proxy.simulator.config import OAUTH_AUTHORIZE_PATH, OAUTH_EXPIRE_PATH, OAUTH_TOKEN_PATH
from proxy.simulator.gateway import SIMULATOR, QuotaLedger
from tests.conftest import ServerFactory, StartProxy, proxy_config
from tests.fakes import FakeClock

CLIENT_ID = "0f1e2d3c-sim-client"
CLIENT_SECRET = "sim-client-secret-7Hq2"
SEED = "RT.seed-refresh-token-Zx81"


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """Everything the proxy logs during the test, rendered as in production (JSON)."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    logs.configure("json", "debug", stream=stream)
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


async def start_sim(start_server: ServerFactory, **overrides: Any) -> tuple[Simulator, URL]:
    settings: dict[str, Any] = {
        "qps": 1000,
        "oauth_client_id": CLIENT_ID,
        "oauth_client_secret": CLIENT_SECRET,
        "oauth_refresh_token": SEED,
        **overrides,
    }
    app = make_simulator_app(SimulatorConfig(**settings))
    server = await start_server(app)
    return app[SIMULATOR], server.make_url("")


def oauth_config(tmp_path: Path, sim: URL, **overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "client_id": Secret(CLIENT_ID),
        "client_secret": Secret(CLIENT_SECRET),
        "refresh_token": Secret(SEED),
        "token_url": sim.with_path(OAUTH_TOKEN_PATH),
        **overrides,
    }
    return proxy_config(tmp_path, sim, **settings)


async def sim_stats(http: aiohttp.ClientSession, sim: URL) -> dict[str, Any]:
    async with http.get(sim / "__sim__" / "stats") as response:
        stats: dict[str, Any] = await response.json()
        return stats


async def get_v3(http: aiohttp.ClientSession, proxy: URL) -> tuple[int, bytes]:
    async with http.get(proxy / "v3" / "contacts", headers={"Authorization": "Bearer x"}) as r:
        return r.status, await r.read()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def saved(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "state" / STATE_FILE_NAME).read_text())
    return data


def basic(client_id: str, secret: str) -> dict[str, str]:
    pair = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def assert_no_secrets(text: str, sim: Simulator, *extra: str) -> None:
    assert sim.oauth is not None
    for secret in (CLIENT_SECRET, SEED, *sim.oauth.issued_tokens(), *extra):
        assert secret not in text


async def token_by_code(http: aiohttp.ClientSession, sim: URL) -> str:
    """A new refresh token, the way a person gets one: authorize, then exchange the code."""
    verifier, challenge = pkce_pair()
    redirect_uri = "http://127.0.0.1:9/callback"  # never visited: the code is in Location
    query = {
        "client_id": CLIENT_ID,
        "redirect_uri": redirect_uri,
        "response_type": "code",
        "scope": "contact_data offline_access",
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with http.get(
        sim.with_path(OAUTH_AUTHORIZE_PATH).with_query(query), allow_redirects=False
    ) as response:
        assert response.status == 302
        code = URL(response.headers["Location"]).query["code"]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    for _ in range(5):
        async with http.post(
            sim.with_path(OAUTH_TOKEN_PATH),
            data=form,
            headers=basic(CLIENT_ID, CLIENT_SECRET),
        ) as response:
            if response.status == 429:  # the endpoint's one call a second
                await asyncio.sleep(0.5)
                continue
            assert response.status == 200
            refresh: str = (await response.json())["refresh_token"]
            return refresh
    raise AssertionError("token endpoint stayed busy")


# -- pure decisions ---------------------------------------------------------------------------


def test_refresh_schedule_for_long_and_short_tokens() -> None:
    day = TokenSet(Secret("r-0001"), Secret("a-0001"), 1000.0, 1000.0 + 86_400, "c", None)
    assert day.refresh_due() == 1000.0 + 86_400 - REFRESH_LEAD
    assert day.usable_until() == 1000.0 + 86_400 - 10
    short = TokenSet(Secret("r-0001"), Secret("a-0001"), 1000.0, 1003.0, "c", None)
    assert short.refresh_due() == pytest.approx(1001.5)  # half-life
    assert short.usable_until() == pytest.approx(1002.7)  # a tenth before the end
    no_access = TokenSet(Secret("r-0001"), None, 1000.0, 0.0, "c", None)
    assert no_access.refresh_due() < 0


def test_which_refresh_token_wins_at_start() -> None:
    client = fingerprint(CLIENT_ID)
    stale, new = Secret("RT.configured-long-ago"), Secret("RT.configured-today")
    rotated = TokenSet(Secret("RT.rotated-3"), Secret("a-0001"), 50.0, 9e9, client, None)
    descended = TokenSet(
        Secret("RT.rotated-3"), Secret("a-0001"), 50.0, 9e9, client, fingerprint(stale.reveal())
    )
    # The state descends from the configured token: it has moved on (rotation) and wins.
    assert choose_start(descended, stale, client, 100.0) is descended
    # A token the state never saw is the operator's newer word.
    fresh = choose_start(descended, new, client, 100.0)
    assert fresh is not None
    assert fresh.refresh_token == new
    assert fresh.origin == fingerprint(new.reveal())
    assert fresh.access_token is None
    # Nothing configured: the state; state of another client: never.
    assert choose_start(rotated, None, client, 100.0) is rotated
    assert choose_start(rotated, None, fingerprint("other-client"), 100.0) is None
    assert choose_start(None, None, client, 100.0) is None


def test_login_settings_take_flags_over_environment() -> None:
    env = {
        "CTCT_CLIENT_ID": "from-env",
        "CTCT_PROXY_REDIRECT_PORT": "9999",
        "CTCT_PROXY_HOST": "0.0.0.0",  # a serve setting: login must not trip over it
        "HOME": "/home/someone",
    }
    config, options = login_settings({"redirect_port": "0", "scope": "contact_data"}, env)
    assert config.client_id == Secret("from-env")
    assert config.state_dir == Path("/home/someone/.local/share/ctct-proxy")
    assert options.redirect_port == 0
    assert options.scope == "contact_data"
    with pytest.raises(ConfigError, match="--client-id"):
        login_settings({}, {})
    with pytest.raises(ConfigError, match="CTCT_PROXY_REDIRECT_PORT"):
        login_settings({}, {"CTCT_CLIENT_ID": "x-1234", "CTCT_PROXY_REDIRECT_PORT": "70000"})


# -- the simulator's authorization server -----------------------------------------------------


async def test_sim_token_endpoint_rotates_limits_and_checks_clients(
    start_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    config = SimulatorConfig(
        oauth_client_id=CLIENT_ID,
        oauth_client_secret=CLIENT_SECRET,
        oauth_refresh_token=SEED,
        rotate_refresh_tokens=True,
        token_ttl=60,
    )
    simulator = Simulator(config, QuotaLedger(config, clock=clock.monotonic, wall_clock=clock.time))
    app = web.Application()
    app.add_routes(simulator.routes())
    base = (await start_server(app)).make_url("")
    token_url = base.with_path(OAUTH_TOKEN_PATH)
    good = basic(CLIENT_ID, CLIENT_SECRET)

    async def refresh(token: str, auth: dict[str, str] = good) -> tuple[int, Any]:
        form = {"grant_type": "refresh_token", "refresh_token": token}
        async with http.post(token_url, data=form, headers=auth) as response:
            return response.status, await response.json()

    status, body = await refresh(SEED)
    assert status == 200
    assert body["expires_in"] == 60
    assert body["refresh_token"] != SEED
    assert (await refresh(body["refresh_token"]))[0] == 429  # same second
    await clock.advance(1.0)
    assert (await refresh(SEED))[1]["error"] == "invalid_grant"  # rotated away
    await clock.advance(1.0)
    wrong = basic(CLIENT_ID, "not-the-secret")
    assert (await refresh(body["refresh_token"], wrong)) == (
        401,
        {"error": "invalid_client", "error_description": "Client authentication failed."},
    )
    await clock.advance(1.0)

    access = body["access_token"]
    assert simulator.oauth is not None
    assert simulator.oauth.access_ok(access)
    await clock.advance(60.0)
    assert not simulator.oauth.access_ok(access)  # expired
    async with http.get(
        base / "v3" / "contacts", headers={"Authorization": f"Bearer {access}"}
    ) as r:
        assert r.status == 401
        assert await r.json() == {"error_key": "unauthorized", "error_message": "Unauthorized"}
    assert simulator.oauth.stats()["token_calls"] == 4


# -- serve: keeping the token fresh -----------------------------------------------------------


async def test_refresh_ahead_of_expiry_under_load(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_text: io.StringIO,
) -> None:
    sim, sim_url = await start_sim(start_server, token_ttl=3, rotate_refresh_tokens=True)
    _, proxy = await start_proxy(oauth_config(tmp_path, sim_url))
    statuses: list[int] = []
    stop = time.monotonic() + 4.6

    async def client() -> None:
        while time.monotonic() < stop:
            statuses.append((await get_v3(http, proxy))[0])

    await asyncio.gather(*(client() for _ in range(6)))
    stats = await sim_stats(http, sim_url)
    assert len(statuses) > 200
    assert set(statuses) == {200}
    # Never a 401 at the gateway: every token was replaced before it expired.
    assert stats["totals"]["rejected"]["auth"] == 0
    assert stats["oauth"]["issued"] >= 3  # start + a refresh at every half-life
    assert stats["oauth"]["token_calls"] == stats["oauth"]["issued"]  # no wasted calls
    assert stats["oauth"]["errors"] == {}
    assert len(events(log_text, "oauth_refreshed")) == stats["oauth"]["issued"]
    async with http.get(proxy / "status") as response:
        status_page = await response.text()
    async with http.get(proxy / "metrics") as response:
        metrics_page = await response.text()
    assert_no_secrets(log_text.getvalue() + status_page + metrics_page, sim)


async def test_401_refreshes_once_and_replays_for_every_waiting_request(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_text: io.StringIO,
) -> None:
    sim, sim_url = await start_sim(start_server, rotate_refresh_tokens=True)
    # Each identical read its own send (no coalescing): every one of them meets the 401.
    _, proxy = await start_proxy(oauth_config(tmp_path, sim_url, coalesce=False))

    # Cold start: many requests, one token call.
    answers = await asyncio.gather(*(get_v3(http, proxy) for _ in range(30)))
    assert {status for status, _ in answers} == {200}
    assert (await sim_stats(http, sim_url))["oauth"]["token_calls"] == 1
    first = saved(tmp_path)

    # The gateway stops taking the token early (revoked): one refresh, every request replayed.
    async with http.post(sim_url.with_path(OAUTH_EXPIRE_PATH)) as response:
        assert response.status == 200
    answers = await asyncio.gather(*(get_v3(http, proxy) for _ in range(30)))
    assert {status for status, _ in answers} == {200}
    stats = await sim_stats(http, sim_url)
    assert stats["oauth"]["token_calls"] == 2
    assert stats["oauth"]["rotated"] == 2
    assert stats["totals"]["rejected"]["auth"] >= 1  # the 401s the proxy absorbed
    assert stats["totals"]["accepted"] == 60
    second = saved(tmp_path)
    assert second["refresh_token"] != first["refresh_token"]  # the rotated one, saved
    assert len(events(log_text, "oauth_token_rejected")) == 1
    assert_no_secrets(log_text.getvalue(), sim)


async def test_restart_uses_the_rotated_token_and_a_new_configured_one_wins(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_text: io.StringIO,
) -> None:
    sim, sim_url = await start_sim(start_server, rotate_refresh_tokens=True)
    server, proxy = await start_proxy(oauth_config(tmp_path, sim_url))
    assert (await get_v3(http, proxy))[0] == 200
    await server.close()
    state = saved(tmp_path)
    assert state["refresh_token"] != SEED  # SEED is dead upstream now
    assert state["origin"] == fingerprint(SEED)

    # Restart with the same (now stale) configured token; the gateway has dropped the access
    # token, so the proxy must refresh, and only the saved rotated token can do that.
    async with http.post(sim_url.with_path(OAUTH_EXPIRE_PATH)):
        pass
    server, proxy = await start_proxy(oauth_config(tmp_path, sim_url))
    assert (await get_v3(http, proxy))[0] == 200
    await server.close()
    stats = await sim_stats(http, sim_url)
    assert "invalid_grant" not in stats["oauth"]["errors"]
    assert stats["oauth"]["issued"] == 2

    # A refresh token the state never descended from is the operator's newer word.
    new = await token_by_code(http, sim_url)
    _, proxy = await start_proxy(oauth_config(tmp_path, sim_url, refresh_token=Secret(new)))
    assert (await get_v3(http, proxy))[0] == 200
    state = saved(tmp_path)
    assert state["origin"] == fingerprint(new)
    assert state["refresh_token"] not in (new, SEED)
    assert "invalid_grant" not in (await sim_stats(http, sim_url))["oauth"]["errors"]

    path = tmp_path / "state" / STATE_FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert CLIENT_SECRET not in text
    assert CLIENT_ID not in text
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert_no_secrets(log_text.getvalue(), sim, new)


@pytest.mark.parametrize("failure", ["invalid_grant", "unreachable"])
async def test_failed_refresh_answers_502_and_is_not_ready(
    failure: str,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_text: io.StringIO,
    unused_tcp_port: int,
) -> None:
    sim, sim_url = await start_sim(start_server)
    bad_token = "RT.never-issued-by-anyone"
    overrides: dict[str, Any] = {"refresh_token": Secret(bad_token)}
    if failure == "unreachable":
        overrides["token_url"] = URL(f"http://127.0.0.1:{unused_tcp_port}/token")
    _, proxy = await start_proxy(oauth_config(tmp_path, sim_url, **overrides))

    status, body = await get_v3(http, proxy)
    assert status == 502
    answer = json.loads(body)
    assert answer["error_key"] == "bad_gateway"
    assert "credentials need attention" in answer["error_message"]
    assert failure in answer["error_message"]
    async with http.get(proxy / "readyz") as response:
        assert response.status == 503
        assert "OAuth" in " ".join((await response.json())["problems"])
    # v2 does not depend on the v3 token.
    async with http.get(proxy / "v2" / "contacts", params={"api_key": "k-0001"}) as response:
        assert response.status == 200

    failed = events(log_text, "oauth_refresh_failed")
    assert failed
    assert failed[0]["error"] == failure
    assert failed[0]["level"] == "error"
    stats = await sim_stats(http, sim_url)
    calls = 1 if failure == "invalid_grant" else 0
    # A refused refresh token is never sent again, however many requests come.
    for _ in range(3):
        assert (await get_v3(http, proxy))[0] == 502
    assert stats["oauth"]["token_calls"] == calls
    assert (await sim_stats(http, sim_url))["oauth"]["token_calls"] == calls
    assert_no_secrets(log_text.getvalue() + body.decode(), sim, bad_token)


# -- the keeper's schedule, on a fake clock ---------------------------------------------------


class OrderCheckingStore(FileTokenStore):
    """Fails the test if a token set is in use before it has been saved."""

    owner: OAuthTokens | None = None
    saves = 0

    async def save(self, tokens: TokenSet) -> None:
        assert self.owner is not None
        assert self.owner.tokens.refresh_token != tokens.refresh_token
        assert self.owner.tokens.access_token != tokens.access_token
        await super().save(tokens)
        self.saves += 1


@pytest.fixture
async def fake_keeper(
    start_server: ServerFactory, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[tuple[OAuthTokens, Simulator, FakeClock]]]]:
    made: list[OAuthTokens] = []

    async def make(
        start: TokenSet, **sim_overrides: Any
    ) -> tuple[OAuthTokens, Simulator, FakeClock]:
        sim, sim_url = await start_sim(start_server, **sim_overrides)
        clock = FakeClock()
        config = oauth_config(tmp_path, sim_url)
        store = OrderCheckingStore(tmp_path / "state" / STATE_FILE_NAME)
        tokens = OAuthTokens(TokenClient.open(config), store, start, clock=clock)
        store.owner = tokens
        made.append(tokens)
        tokens.start()
        return tokens, sim, clock

    yield make
    for tokens in made:
        await tokens.close()


async def test_keeper_refreshes_at_the_lead_time_not_before(
    fake_keeper: Callable[..., Awaitable[tuple[OAuthTokens, Simulator, FakeClock]]],
    tmp_path: Path,
) -> None:
    wall = FakeClock().time()
    start = TokenSet(
        Secret(SEED), Secret("AT.fake-0001"), wall, wall + 3600, fingerprint(CLIENT_ID), None
    )
    tokens, sim, clock = await fake_keeper(start, rotate_refresh_tokens=True)
    assert sim.oauth is not None
    assert tokens.ready
    await clock.advance(3600 - REFRESH_LEAD - 1)
    await asyncio.sleep(0.1)
    assert sim.oauth.token_calls == 0
    await clock.advance(2)

    async def refreshed() -> bool:
        return (
            sim.oauth is not None
            and sim.oauth.token_calls == 1
            and tokens.tokens.obtained_at > wall
        )

    await until(refreshed)
    # The rotated refresh token was saved before the new access token was handed out.
    assert sim.oauth.rotated == 1
    assert saved(tmp_path)["refresh_token"] == tokens.tokens.refresh_token.reveal()
    obtained = tokens.tokens.obtained_at
    assert wall + 3600 - REFRESH_LEAD <= obtained <= clock.time()
    assert tokens.tokens.expires_at == obtained + 86_400  # the simulator's 24 h tokens
    assert tokens.tokens.refresh_due() == obtained + 86_400 - REFRESH_LEAD


async def test_refused_token_is_not_retried_but_a_login_heals(
    fake_keeper: Callable[..., Awaitable[tuple[OAuthTokens, Simulator, FakeClock]]],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    log_text: io.StringIO,
) -> None:
    wall = FakeClock().time()
    start = TokenSet(Secret("RT.unknown-0001"), None, wall, 0.0, fingerprint(CLIENT_ID), None)
    tokens, sim, clock = await fake_keeper(start)
    assert sim.oauth is not None

    async def failed_once() -> bool:
        return len(events(log_text, "oauth_refresh_failed")) == 1

    await until(failed_once)
    assert not tokens.ready
    # The backoff doubles; each retry re-reads the state file, none calls the endpoint.
    for attempt, seconds in enumerate((1, 2, 4, 8, 16, 32), start=2):
        await clock.advance(seconds)

        async def retried(count: int = attempt) -> bool:
            return len(events(log_text, "oauth_refresh_failed")) == count

        await until(retried)
    assert sim.oauth.token_calls == 1
    assert [e["retry_in"] for e in events(log_text, "oauth_refresh_failed")] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
    ]

    # Someone runs `ctct-proxy login` meanwhile: the keeper finds the new state and uses it.
    new = TokenSet(
        Secret("RT.from-login-0001"),
        Secret("AT.from-login-0001"),
        clock.time(),
        clock.time() + 86_400,
        fingerprint(CLIENT_ID),
        None,
    )
    FileTokenStore(tmp_path / "state" / STATE_FILE_NAME).write(new)
    await clock.advance(30)  # well before the next retry (64 s): the keeper looks anyway

    async def healed() -> bool:
        return tokens.ready

    await until(healed)
    assert await tokens.current() == "AT.from-login-0001"
    assert sim.oauth.token_calls == 1
    assert events(log_text, "oauth_recovered")


# -- login ------------------------------------------------------------------------------------


async def test_login_end_to_end_then_serve_uses_and_refreshes_it(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_text: io.StringIO,
) -> None:
    # A PKCE app: no client secret anywhere.
    sim, sim_url = await start_sim(
        start_server, oauth_client_secret=None, oauth_refresh_token=None, rotate_refresh_tokens=True
    )
    config = Config(
        state_dir=tmp_path / "state",
        client_id=Secret(CLIENT_ID),
        token_url=sim_url.with_path(OAUTH_TOKEN_PATH),
    )
    options = LoginOptions(
        authorize_url=sim_url.with_path(OAUTH_AUTHORIZE_PATH),
        redirect_host="127.0.0.1",
        redirect_port=0,
        timeout=10,
    )
    printed: list[str] = []
    task = asyncio.create_task(login(config, options, say=printed.append))

    async def url_printed() -> bool:
        return any(line.strip().startswith("http") for line in printed)

    await until(url_printed)
    authorize = URL(next(line.strip() for line in printed if line.strip().startswith("http")))
    assert authorize.query["code_challenge_method"] == "S256"
    assert authorize.query["scope"] == "contact_data offline_access"
    async with http.get(authorize) as browser:  # the "browser": approve, follow the redirect
        assert browser.status == 200
        assert "close this tab" in await browser.text()
    path = await asyncio.wait_for(task, 10)

    assert path == tmp_path / "state" / STATE_FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert any(str(path) in line for line in printed)
    state = saved(tmp_path)
    assert state["client"] == fingerprint(CLIENT_ID)
    assert CLIENT_ID not in path.read_text()
    assert sim.oauth is not None
    for token in sim.oauth.issued_tokens():
        assert all(token not in line for line in printed)

    # serve, with no refresh token configured, finds the tokens and uses them as they are...
    serve_config = oauth_config(tmp_path, sim_url, client_secret=None, refresh_token=None)
    _, proxy = await start_proxy(serve_config)
    assert (await get_v3(http, proxy))[0] == 200
    assert (await sim_stats(http, sim_url))["oauth"]["token_calls"] == 1  # just the exchange
    # ...and refreshes them as a PKCE app (client_id in the form, no secret) when needed.
    async with http.post(sim_url.with_path(OAUTH_EXPIRE_PATH)):
        pass
    assert (await get_v3(http, proxy))[0] == 200
    stats = await sim_stats(http, sim_url)
    # The exchange was less than a second ago: a 429 here is the endpoint's limit, waited out.
    assert set(stats["oauth"]["errors"]) <= {"rate_limited"}
    assert stats["oauth"]["rotated"] == 1
    assert_no_secrets(log_text.getvalue() + "\n".join(printed), sim)


async def test_login_ignores_a_forged_state_and_reports_a_denial(
    start_server: ServerFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, sim_url = await start_sim(start_server)
    config = Config(
        state_dir=tmp_path / "state",
        client_id=Secret(CLIENT_ID),
        token_url=sim_url.with_path(OAUTH_TOKEN_PATH),
    )
    options = LoginOptions(redirect_host="127.0.0.1", redirect_port=0, timeout=10)
    printed: list[str] = []
    task = asyncio.create_task(login(config, options, say=printed.append))

    async def waiting() -> bool:
        return any("Waiting for the redirect" in line for line in printed)

    await until(waiting)
    authorize = URL(next(line.strip() for line in printed if line.strip().startswith("http")))
    callback = URL(authorize.query["redirect_uri"])
    async with http.get(callback.with_query(code="c", state="forged")) as response:
        assert response.status == 400
    assert not task.done()
    denied = callback.with_query(state=authorize.query["state"], error="access_denied")
    async with http.get(denied) as response:
        assert response.status == 400
    with pytest.raises(Exception, match="access_denied"):
        await asyncio.wait_for(task, 5)
    assert not (tmp_path / "state" / STATE_FILE_NAME).exists()


def test_login_command_exits_2_naming_the_missing_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["login", "--redirect-port", "0"], env={}) == 2
    assert capsys.readouterr().err.strip() == (
        "ctct-proxy: error: --client-id: is required for login (env CTCT_CLIENT_ID)"
    )

"""Egress through a real forward proxy (tinyproxy): HTTPS_PROXY / HTTP_PROXY / NO_PROXY and
--egress-proxy, for the API calls and the OAuth token endpoint, credentials kept secret.

The upstream is the simulator behind TLS (a private CA the proxy is told to trust), so calls
go through the forward proxy as CONNECT tunnels, as they do to the real API.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy import logs
from proxy.config import Config, ConfigError, ProxyEnvironment
from proxy.credentials import Secret, SecretURL, redact
from proxy.egress import EgressRoutes
from proxy.oauth.login import login_settings
from proxy.simulator import SimulatorConfig, make_simulator_app
from proxy.simulator.config import OAUTH_TOKEN_PATH
from tests.conftest import ServerFactory, StartProxy, proxy_config
from tests.forward_proxy import TinyProxy
from tests.redis_server import free_port
from tests.tls import PrivateCA, TLSSimulator, start_tls_simulator

API_KEY = "EGRESS-API-KEY-41ab"
ACCESS_TOKEN = "EGRESS-ACCESS-TOKEN-8c0d"
CLIENT_ID = "egress-client-id-5"
CLIENT_SECRET = "egress-client-secret-62"
REFRESH_TOKEN = "RT.egress-refresh-token-17"
PROXY_USER, PROXY_PASSWORD = "egress-user", "proxy-pass-word-93"


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[TinyProxy]:
    """tinyproxy demanding Basic credentials, stopped at the end."""
    proxy = TinyProxy(tmp_path / "tinyproxy", PROXY_USER, PROXY_PASSWORD)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def open_tinyproxy(tmp_path: Path) -> AsyncIterator[TinyProxy]:
    """tinyproxy without credentials (as HTTPS_PROXY often names one)."""
    proxy = TinyProxy(tmp_path / "open-tinyproxy")
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("json", "debug", stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def upstream(start_server: ServerFactory, tmp_path: Path) -> tuple[TLSSimulator, PrivateCA]:
    """The simulator over HTTPS, reachable as localhost (API) and 127.0.0.1 (token endpoint)."""
    ca = PrivateCA.create(tmp_path / "ca")
    sim = await start_tls_simulator(
        start_server,
        ca.server_context("localhost", "127.0.0.1"),
        SimulatorConfig(
            qps=1000,
            api_key=API_KEY,
            oauth_client_id=CLIENT_ID,
            oauth_client_secret=CLIENT_SECRET,
            oauth_refresh_token=REFRESH_TOKEN,
        ),
    )
    return sim, ca


def _env(sim: TLSSimulator, ca: PrivateCA, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A `serve` environment: the TLS simulator for v2 and v3, OAuth, the private CA."""
    token_url = sim.url.with_host("127.0.0.1").with_path(OAUTH_TOKEN_PATH)
    return {
        "CTCT_PROXY_UPSTREAM_V2": str(sim.url),
        "CTCT_PROXY_UPSTREAM_V3": str(sim.url),
        "CTCT_API_KEY": API_KEY,
        "CTCT_CLIENT_ID": CLIENT_ID,
        "CTCT_CLIENT_SECRET": CLIENT_SECRET,
        "CTCT_REFRESH_TOKEN": REFRESH_TOKEN,
        "CTCT_PROXY_TOKEN_URL": str(token_url),
        "CTCT_PROXY_CA_BUNDLE": str(ca.ca_file),
        "CTCT_PROXY_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


async def _call_both(http: aiohttp.ClientSession, proxy: URL) -> None:
    for path in ("v3/contacts", "v2/lists"):
        async with http.get(proxy / path) as resp:
            assert resp.status == 200, await resp.text()


async def test_egress_proxy_carries_the_api_calls_and_the_token_refresh_through_connect(
    upstream: tuple[TLSSimulator, PrivateCA],
    tinyproxy: TinyProxy,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_lines: io.StringIO,
) -> None:
    sim, ca = upstream
    config = Config.from_sources(
        {"egress_proxy": tinyproxy.url}, _env(sim, ca, tmp_path, NO_PROXY="")
    )
    _, proxy = await start_proxy(config)
    await _call_both(http, proxy)
    # The token call (127.0.0.1) and the API calls (localhost) each went through a tunnel.
    assert set(tinyproxy.connects()) == {
        f"127.0.0.1:{sim.url.port}",
        f"localhost:{sim.url.port}",
    }, tinyproxy.requests()
    assert [m for m, _ in tinyproxy.requests()] == ["CONNECT"] * len(tinyproxy.requests())
    assert sim.simulator.ledger.stats()["totals"]["accepted"] == 2  # type: ignore[index]
    # The proxy's credentials are secrets: never in the configuration's log form, never logged.
    shown = config.redacted()
    assert shown["egress_proxy"] == f"http://***:***@127.0.0.1:{tinyproxy.port}"
    assert PROXY_PASSWORD not in repr(config)
    assert PROXY_PASSWORD not in log_lines.getvalue()
    assert PROXY_PASSWORD not in json.dumps(shown)


async def test_https_proxy_from_the_environment_is_used_and_no_proxy_skips_it(
    upstream: tuple[TLSSimulator, PrivateCA],
    open_tinyproxy: TinyProxy,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim, ca = upstream
    via = Config.from_sources({}, _env(sim, ca, tmp_path / "a", HTTPS_PROXY=open_tinyproxy.url))
    _, proxy = await start_proxy(via)
    await _call_both(http, proxy)
    tunnels = open_tinyproxy.connects()
    assert f"localhost:{sim.url.port}" in tunnels and f"127.0.0.1:{sim.url.port}" in tunnels

    direct = Config.from_sources(
        {},
        _env(
            sim,
            ca,
            tmp_path / "b",
            HTTPS_PROXY=open_tinyproxy.url,
            NO_PROXY="example.com,localhost,127.0.0.1",
        ),
    )
    _, proxy = await start_proxy(direct)
    await _call_both(http, proxy)
    assert open_tinyproxy.connects() == tunnels  # nothing more went through it
    assert sim.simulator.ledger.stats()["totals"]["accepted"] == 4  # type: ignore[index]


async def test_egress_proxy_flag_wins_over_https_proxy(
    upstream: tuple[TLSSimulator, PrivateCA],
    tinyproxy: TinyProxy,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim, ca = upstream
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = _env(sim, ca, tmp_path, HTTPS_PROXY=nowhere, https_proxy=nowhere)
    _, proxy = await start_proxy(Config.from_sources({"egress_proxy": tinyproxy.url}, env))
    await _call_both(http, proxy)
    assert f"localhost:{sim.url.port}" in tinyproxy.connects()


@pytest.mark.parametrize("credentials", [False, True])
async def test_plain_http_upstream_goes_through_http_proxy_in_absolute_form(
    credentials: bool,
    open_tinyproxy: TinyProxy,
    tinyproxy: TinyProxy,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    forward = tinyproxy if credentials else open_tinyproxy
    sim = (await start_server(make_simulator_app(SimulatorConfig(qps=1000)))).make_url("")
    plain = sim.with_host("localhost")
    environment = ProxyEnvironment.from_env({"HTTP_PROXY": forward.url})
    _, proxy = await start_proxy(proxy_config(tmp_path, plain, proxy_environment=environment))
    async with http.get(proxy / "v3/contacts", params={"limit": "5"}) as resp:
        assert resp.status == 200
        echo = await resp.json()
    base = str(plain).rstrip("/")
    assert forward.requests() == [("GET", f"{base}/v3/contacts?limit=5")]
    # Proxy-Authorization is for the forward proxy: it never reaches the API.
    assert "Proxy-Authorization" not in echo["header_names"]


async def test_a_proxy_that_refuses_the_tunnel_is_a_502_naming_the_egress_proxy(
    upstream: tuple[TLSSimulator, PrivateCA],
    tinyproxy: TinyProxy,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    log_lines: io.StringIO,
) -> None:
    sim, ca = upstream
    wrong = f"http://{PROXY_USER}:not-the-password-0@127.0.0.1:{tinyproxy.port}"
    config = proxy_config(
        tmp_path,
        sim.url,
        api_key=Secret(API_KEY),
        ca_bundle=ca.ca_file,
        egress_proxy=SecretURL(URL(wrong)),
    )
    _, proxy = await start_proxy(config)
    async with http.get(proxy / "v2/lists") as resp:
        assert resp.status == 502
        payload = await resp.json()
    message = payload[0]["error_message"]
    assert "egress proxy refused" in message
    assert sim.simulator.ledger.stats()["totals"]["accepted"] == 0  # type: ignore[index]
    refused = [
        json.loads(line)
        for line in log_lines.getvalue().splitlines()
        if '"egress_proxy_refused"' in line
    ]
    # tinyproxy answers a bad Proxy-Authorization on CONNECT with 401 (a 407 elsewhere).
    assert [line["status"] for line in refused] in ([401], [407])
    assert f"({refused[0]['status']})" in message
    assert "not-the-password-0" not in log_lines.getvalue()


# -- choosing the route -------------------------------------------------------------------------


def _routes(env: dict[str, str], flag: str | None = None) -> EgressRoutes:
    return EgressRoutes(Config.from_sources({"egress_proxy": flag}, {"HOME": "/h", **env}))


def _via(routes: EgressRoutes, url: str) -> str | None:
    route = routes.route(URL(url))
    return None if route is None else str(route.proxy)


def test_the_route_follows_scheme_no_proxy_and_the_flag() -> None:
    env = {
        "HTTPS_PROXY": "http://secure.proxy:3128",
        "HTTP_PROXY": "plain.proxy:8080",  # no scheme: http:// as curl reads it
        "NO_PROXY": "internal.test, .corp.test,api.local:8443",
    }
    routes = _routes(env)
    assert routes.active
    assert _via(routes, "https://api.cc.email/v3/x") == "http://secure.proxy:3128"
    assert _via(routes, "http://api.cc.email/v3/x") == "http://plain.proxy:8080"
    assert _via(routes, "https://internal.test/x") is None
    assert _via(routes, "https://a.b.corp.test/x") is None  # suffix
    assert _via(routes, "https://api.local:8443/x") is None  # host:port entry
    assert _via(routes, "https://api.local:9443/x") == "http://secure.proxy:3128"
    flagged = _routes(env, "http://flag.proxy:1")
    assert _via(flagged, "https://api.cc.email/v3/x") == "http://flag.proxy:1"
    assert _via(flagged, "http://api.cc.email/v3/x") == "http://flag.proxy:1"
    assert _via(flagged, "https://internal.test/x") is None  # NO_PROXY applies to it too
    assert _via(_routes({**env, "NO_PROXY": "*"}), "https://api.cc.email/") is None
    assert not _routes({}).active


def test_lower_case_variables_win_and_an_empty_one_unsets() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"}
    assert _via(_routes(env), "https://api.cc.email/") == "http://lower:2"
    assert _via(_routes({"HTTPS_PROXY": "http://upper:1", "https_proxy": ""}), "https://a/") is None


def test_credentials_in_the_proxy_url_go_in_basic_auth_and_are_redacted() -> None:
    routes = _routes({"HTTPS_PROXY": "http://bob:pa%3Ass-word@p.test:3128"})
    route = routes.route(URL("https://api.cc.email/"))
    assert route is not None and route.authorization is not None
    assert base64.b64decode(route.authorization.removeprefix("Basic ")) == b"bob:pa:ss-word"
    assert "Basic" not in repr(route)
    assert str(route.proxy) == "http://p.test:3128"
    config = Config.from_sources(
        {}, {"HOME": "/h", "HTTPS_PROXY": "http://bob:pa%3Ass-word@p.test"}
    )
    assert config.redacted()["proxy_environment"] == {"https_proxy": "http://***:***@p.test"}
    assert "pa:ss-word" not in repr(config) and "pa%3Ass-word" not in repr(config)
    # Text that quotes the URL anyway (an exception, say) is scrubbed by value and by shape.
    assert redact("to http://bob:pa%3Ass-word@p.test failed") == "to http://bob:***@p.test failed"
    assert redact("proxy pa:ss-word") == "proxy ***"


@pytest.mark.parametrize(
    ("flags", "env", "source"),
    [
        ({"egress_proxy": "socks5://p:1080"}, {}, "--egress-proxy"),
        ({}, {"CTCT_PROXY_EGRESS_PROXY": "http://p:1/path"}, "CTCT_PROXY_EGRESS_PROXY"),
        ({}, {"HTTPS_PROXY": "ftp://p:21"}, "HTTPS_PROXY"),
        ({}, {"http_proxy": "http://"}, "http_proxy"),
    ],
)
def test_a_bad_proxy_url_stops_the_start_naming_its_source(
    flags: dict[str, Any], env: dict[str, str], source: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{source}: must be"):
        Config.from_sources(flags, {"HOME": "/h", **env})


def test_login_takes_the_same_trust_and_route(tmp_path: Path) -> None:
    """`ctct-proxy login` calls the same token endpoint: same CA file, same egress proxy."""
    ca = PrivateCA.create(tmp_path / "ca").ca_file
    flags = {"client_id": CLIENT_ID, "egress_proxy": "http://login.proxy:3128"}
    env = {"HOME": str(tmp_path), "SSL_CERT_FILE": str(ca), "NO_PROXY": "internal.test"}
    config, _ = login_settings(flags, env)
    assert config.ca_bundle == ca
    routes = EgressRoutes(config)
    assert _via(routes, "https://authz.constantcontact.com/") == "http://login.proxy:3128"
    assert _via(routes, "https://internal.test/") is None
    config, _ = login_settings({"client_id": CLIENT_ID}, {**env, "https_proxy": "env.proxy:1"})
    assert _via(EgressRoutes(config), "https://authz.constantcontact.com/") == "http://env.proxy:1"

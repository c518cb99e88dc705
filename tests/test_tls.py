"""An HTTPS upstream, for real: the simulator behind TLS with certificates from a private CA.

Verification is on by default; `--ca-bundle` (or `SSL_CERT_FILE`) trusts a private CA; an
unknown CA, a certificate for another host or an expired one is a 502 that says it was the
certificate, with one log line naming OpenSSL's cause; the token endpoint trusts the same CAs;
connections to the upstream are reused.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy import logs
from proxy.cli import main
from proxy.config import Config, ConfigError
from proxy.credentials import Secret
from proxy.egress import ssl_context
from proxy.simulator import SimulatorConfig
from proxy.simulator.config import OAUTH_TOKEN_PATH
from tests.conftest import ServerFactory, StartProxy, proxy_config, raw_url
from tests.tls import PrivateCA, start_tls_simulator

API_KEY = "TLS-API-KEY-5c1d"
ACCESS_TOKEN = "TLS-ACCESS-TOKEN-9e2f"
CLIENT_ID = "tls-client-id-77"
CLIENT_SECRET = "tls-client-secret-31"
REFRESH_TOKEN = "RT.tls-refresh-token-08"
SECRETS = (API_KEY, ACCESS_TOKEN, CLIENT_SECRET, REFRESH_TOKEN)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything the process logs during the test, as JSON lines."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("json", "debug", stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


@pytest.fixture
def ca(tmp_path: Path) -> PrivateCA:
    return PrivateCA.create(tmp_path / "ca")


def _simulator(**overrides: Any) -> SimulatorConfig:
    return SimulatorConfig(qps=1000, api_key=API_KEY, access_token=ACCESS_TOKEN, **overrides)


def _config(tmp_path: Path, upstream: URL, **overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "api_key": Secret(API_KEY),
        "access_token": Secret(ACCESS_TOKEN),
        **overrides,
    }
    return proxy_config(tmp_path, upstream, **settings)


async def test_a_private_ca_in_ca_bundle_is_trusted_and_both_generations_pass(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    ca: PrivateCA,
    tmp_path: Path,
) -> None:
    upstream = await start_tls_simulator(start_server, ca.server_context("localhost"), _simulator())
    _, proxy = await start_proxy(_config(tmp_path, upstream.url, ca_bundle=ca.ca_file))
    for path in ("/v2/lists?api_key=stale", "/v3/contacts"):
        async with http.get(raw_url(proxy, path)) as resp:
            assert resp.status == 200, await resp.text()
            echo = await resp.json()
            assert echo["host"] == f"localhost:{upstream.url.port}"
    assert upstream.handshakes and set(upstream.handshakes) == {"localhost"}
    stats = upstream.simulator.ledger.stats()
    assert stats["totals"]["accepted"] == 2  # type: ignore[index]


@pytest.mark.parametrize(
    ("case", "phrase", "cause"),
    [
        ("unknown CA", "a certificate authority the proxy does not trust", "local issuer"),
        ("wrong host", "issued for another host name", "Hostname mismatch"),
        ("expired", "has expired", "certificate has expired"),
    ],
)
@pytest.mark.parametrize("generation", ["v2", "v3"])
async def test_a_refused_certificate_is_a_502_that_says_so_and_one_log_line_naming_the_cause(
    case: str,
    phrase: str,
    cause: str,
    generation: str,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    ca: PrivateCA,
    tmp_path: Path,
    log_lines: io.StringIO,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if case == "unknown CA":
        # Verification is on by default: the system store does not know the private CA.
        context, trusted = ca.server_context("localhost"), None
    elif case == "wrong host":
        context, trusted = ca.server_context("api.elsewhere.test"), ca.ca_file
    else:
        context = ca.server_context(
            "localhost",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
        trusted = ca.ca_file
    upstream = await start_tls_simulator(start_server, context, _simulator())
    _, proxy = await start_proxy(_config(tmp_path, upstream.url, ca_bundle=trusted))
    async with http.get(proxy / generation / "contacts", params={"api_key": "x"}) as resp:
        assert resp.status == 502
        body = await resp.read()
    payload = json.loads(body)
    entry = payload[0] if generation == "v2" else payload
    assert entry["error_key"] == (
        "http.status.bad_gateway" if generation == "v2" else "bad_gateway"
    )
    assert "TLS" in entry["error_message"] and phrase in entry["error_message"]
    assert "Retry-After" not in resp.headers  # it will not fix itself in a second
    [line] = events(log_lines, "upstream_tls_failed")
    assert cause in line["cause"]
    assert line["host"] == "localhost" and line["port"] == upstream.url.port
    # Certificate errors are not retried: one handshake, nothing sent.
    assert len(upstream.handshakes) == 1
    assert upstream.simulator.ledger.stats()["totals"]["accepted"] == 0  # type: ignore[index]
    everything = body.decode() + log_lines.getvalue()
    assert not any(secret in everything for secret in SECRETS)


async def test_one_hundred_sequential_calls_reuse_the_tls_connection(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    ca: PrivateCA,
    tmp_path: Path,
) -> None:
    upstream = await start_tls_simulator(start_server, ca.server_context("localhost"), _simulator())
    _, proxy = await start_proxy(_config(tmp_path, upstream.url, ca_bundle=ca.ca_file))
    for n in range(100):
        path = "v3/contacts" if n % 2 else "v2/lists"
        async with http.get(proxy / path) as resp:
            assert resp.status == 200
            await resp.read()
    assert upstream.simulator.ledger.stats()["totals"]["accepted"] == 100  # type: ignore[index]
    assert len(upstream.handshakes) <= 2, upstream.handshakes


async def test_the_token_endpoint_is_called_with_the_same_trust(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    ca: PrivateCA,
    tmp_path: Path,
    log_lines: io.StringIO,
) -> None:
    """v3 with OAuth: the proxy refreshes its access token over TLS before the first call."""
    sim_config = SimulatorConfig(
        qps=1000,
        oauth_client_id=CLIENT_ID,
        oauth_client_secret=CLIENT_SECRET,
        oauth_refresh_token=REFRESH_TOKEN,
    )
    upstream = await start_tls_simulator(start_server, ca.server_context("localhost"), sim_config)
    oauth: dict[str, Any] = {
        "client_id": Secret(CLIENT_ID),
        "client_secret": Secret(CLIENT_SECRET),
        "refresh_token": Secret(REFRESH_TOKEN),
        "token_url": upstream.url.with_path(OAUTH_TOKEN_PATH),
    }
    _, trusting = await start_proxy(
        proxy_config(tmp_path / "a", upstream.url, ca_bundle=ca.ca_file, **oauth)
    )
    async with http.get(trusting / "v3/contacts") as resp:
        assert resp.status == 200, await resp.text()
    assert events(log_lines, "oauth_refreshed")

    _, default_trust = await start_proxy(proxy_config(tmp_path / "b", upstream.url, **oauth))
    async with http.get(default_trust / "v3/contacts") as resp:
        assert resp.status == 502
        payload = await resp.json()
    assert "tls_failed" in payload["error_message"]
    [failed] = events(log_lines, "oauth_refresh_failed")
    assert failed["error"] == "tls_failed"
    assert "local issuer" in failed["description"]
    assert "--ca-bundle" in failed["hint"]
    assert not any(secret in log_lines.getvalue() for secret in (CLIENT_SECRET, REFRESH_TOKEN))


# -- where the CA file comes from -------------------------------------------------------------


def test_ca_bundle_comes_from_the_flag_then_its_variable_then_ssl_cert_file(
    ca: PrivateCA, tmp_path: Path
) -> None:
    other = PrivateCA.create(tmp_path / "other").ca_file
    third = PrivateCA.create(tmp_path / "third").ca_file
    assert Config.from_sources({}, {}).ca_bundle is None
    assert Config.from_sources({}, {"SSL_CERT_FILE": str(ca.ca_file)}).ca_bundle == ca.ca_file
    env = {"SSL_CERT_FILE": str(ca.ca_file), "CTCT_PROXY_CA_BUNDLE": str(other)}
    assert Config.from_sources({}, env).ca_bundle == other
    assert Config.from_sources({"ca_bundle": str(third)}, env).ca_bundle == third
    shown = Config.from_sources({}, env).redacted()
    assert shown["ca_bundle"] == str(other)


@pytest.mark.parametrize("source", ["--ca-bundle", "CTCT_PROXY_CA_BUNDLE", "SSL_CERT_FILE"])
def test_a_ca_bundle_that_is_not_pem_stops_the_start_naming_the_setting(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    argv, env = ["serve"], {"HOME": str(tmp_path)}
    if source == "--ca-bundle":
        argv += ["--ca-bundle", str(junk)]
    else:
        env[source] = str(junk)
    with pytest.raises(ConfigError, match=f"^{source}: must be a readable file of PEM"):
        Config.from_sources({"ca_bundle": str(junk)} if source == "--ca-bundle" else {}, env)
    assert main(argv, env) == 2
    assert f"{source}: must be a readable file of PEM" in capsys.readouterr().err


async def test_ssl_cert_file_reaches_the_proxy_through_its_configuration(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    ca: PrivateCA,
    tmp_path: Path,
) -> None:
    upstream = await start_tls_simulator(start_server, ca.server_context("localhost"), _simulator())
    env = {
        "SSL_CERT_FILE": str(ca.ca_file),
        "CTCT_PROXY_UPSTREAM_V3": str(upstream.url),
        "CTCT_API_KEY": API_KEY,
        "CTCT_ACCESS_TOKEN": ACCESS_TOKEN,
        "CTCT_PROXY_STATE_DIR": str(tmp_path / "state"),
    }
    _, proxy = await start_proxy(Config.from_sources({}, env))
    async with http.get(proxy / "v3/contacts") as resp:
        assert resp.status == 200


def test_the_context_verifies_even_with_a_ca_bundle(ca: PrivateCA, tmp_path: Path) -> None:
    for config in (Config(), Config(ca_bundle=ca.ca_file)):
        context = ssl_context(config)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname

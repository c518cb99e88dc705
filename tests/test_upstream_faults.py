"""An upstream that misbehaves cannot corrupt an answer, wedge a key or fake a quota error."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from yarl import URL

from proxy.cli import main
from proxy.credentials import Fingerprint, Secret
from proxy.errors import StartupError
from proxy.quota import LocalBackend
from proxy.quota.engine import MAX_HOLD
from proxy.quota.redis import redis_keys
from proxy.simulator import SimulatorConfig, make_simulator_app
from proxy.state import STATE
from tests.conftest import ServerFactory, StartProxy, proxy_config
from tests.fakes import FakeClock
from tests.faults import Fault, FaultyUpstream, answer
from tests.redis_server import RedisServer

Logs = Callable[[str], list[dict[str, Any]]]

V3_THROTTLED = {"Content-Type": "application/json"}


@pytest.fixture
async def faulty() -> AsyncIterator[Callable[[list[Fault]], Any]]:
    servers: list[FaultyUpstream] = []

    async def start(script: list[Fault]) -> tuple[FaultyUpstream, URL]:
        server = FaultyUpstream(script)
        servers.append(server)
        return server, await server.start()

    yield start
    for server in servers:
        await server.close()


TRUNCATED = answer("200 OK", {"Content-Type": "application/json"}, b"x" * 100, length=150)
CHUNKED_CUT = Fault(
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"64\r\n" + b"y" * 100 + b"\r\n"
)


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        (TRUNCATED, "close"),
        (Fault(TRUNCATED.head, TRUNCATED.body, then="reset"), "reset"),
        (CHUNKED_CUT, "chunked"),
        (Fault(TRUNCATED.head, TRUNCATED.body, then="stall"), "stall"),
    ],
    ids=["truncated", "reset", "chunked", "stall"],
)
async def test_a_fault_mid_body_cuts_the_connection_never_a_second_answer(
    fault: Fault,
    detail: str,
    faulty: Any,
    start_proxy: StartProxy,
    tmp_path: Path,
    log_lines: Logs,
) -> None:
    upstream, url = await faulty([fault, answer("200 OK", {}, b"fine")])
    _, proxy = await start_proxy(proxy_config(tmp_path, url, upstream_timeout=0.5))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy / "v3/contacts") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        # A new connection works; nothing foreign was written into the first answer.
        async with http.get(proxy / "v3/contacts") as response:
            assert response.status == 200
            assert await response.read() == b"fine"
    cut = log_lines("answer_cut")
    assert len(cut) == 1
    assert cut[0]["status"] == 200
    finished = log_lines("request_finished")
    assert [line["outcome"] for line in finished] == ["cut", "forwarded"]
    assert finished[0]["status"] == 200  # what the client was told, not a made-up 500
    assert len(upstream.requests) == 2


APP_403 = [
    b'{"error_key":"forbidden","error_message":"Hover QPS testers are not enabled"}',
    b'[{"error_key":"campaign.forbidden","error_message":"See the turnover rate report"}]',
    b"<html><body>over qps / over rate, mashery.not.authorized.over.qps in prose</body></html>",
    b'{"error_key":"throttled","error_message":"Too Many Requests","detail":"extra field"}',
]


@pytest.mark.parametrize("body", APP_403)
@pytest.mark.parametrize("status", ["403 Forbidden", "429 Too Many Requests"])
async def test_an_application_error_is_not_a_quota_signal(
    body: bytes, status: str, faulty: Any, start_proxy: StartProxy, tmp_path: Path
) -> None:
    upstream, url = await faulty([answer(status, {"X-App": "1"}, body)])
    _, proxy = await start_proxy(proxy_config(tmp_path, url, qps=10.0))
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy / "v3/emails", data=b"{}") as response:
            assert response.status == int(status[:3])
            assert await response.read() == body
            assert response.headers["X-App"] == "1"
        # Sent exactly once; the key is not paused.
        assert len(upstream.requests) == 1
        async with http.get(proxy / "status") as response:
            keys = (await response.json())["keys"]
    assert all(key["paused_until"] is None for key in keys)


async def test_activities_429_is_passed_through_not_replayed(
    faulty: Any, start_proxy: StartProxy, tmp_path: Path
) -> None:
    queued = b'{"error_key":"too_many_activities","error_message":"1000 activities queued"}'
    upstream, url = await faulty([answer("429 Too Many Requests", {}, queued)])
    _, proxy = await start_proxy(proxy_config(tmp_path, url, qps=10.0))
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy / "v3/activities/contacts_json_import", data=b"{}") as response,
    ):
        assert response.status == 429
        assert await response.read() == queued
    assert len(upstream.requests) == 1


async def test_a_large_non_quota_403_arrives_whole(
    faulty: Any, start_proxy: StartProxy, tmp_path: Path
) -> None:
    body = b'{"error_key":"forbidden","error_message":"' + b"z" * 2_000_000 + b'"}'
    _, url = await faulty([answer("403 Forbidden", {}, body)])
    _, proxy = await start_proxy(proxy_config(tmp_path, url))
    async with aiohttp.ClientSession() as http, http.get(proxy / "v3/contacts") as response:
        assert response.status == 403
        assert await response.read() == body


async def test_a_quota_error_split_over_many_reads_is_still_recognised(
    faulty: Any, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The classifier sees the whole (small) body, not what the first read returned."""
    quota = b'[{"error_key":"mashery.not.authorized.over.qps","error_message":"' + b" " * 3000
    quota += b'"}]'
    _, url = await faulty([answer("403 Forbidden", {}, quota), answer("200 OK", {}, b"ok")])
    _, proxy = await start_proxy(proxy_config(tmp_path, url, qps=10.0))
    async with aiohttp.ClientSession() as http, http.get(proxy / "v2/lists") as response:
        assert response.status == 200
        assert response.headers.get("X-Request-Id")


async def test_retry_after_from_upstream_is_capped(
    faulty: Any, start_proxy: StartProxy, tmp_path: Path
) -> None:
    throttled = answer(
        "429 Too Many Requests",
        {"Retry-After": "999999999", **V3_THROTTLED},
        b'{"error_key":"throttled","error_message":"Too Many Requests"}',
    )
    _, url = await faulty([throttled])
    server, proxy = await start_proxy(proxy_config(tmp_path, url, qps=10.0, max_wait=1.0))
    async with aiohttp.ClientSession() as http, http.get(proxy / "v3/contacts") as response:
        # The hold is longer than the wait budget: 429 at once, with the capped wait.
        assert response.status == 429
        assert int(response.headers["Retry-After"]) <= MAX_HOLD
    queue = next(iter(server.app[STATE].engine.queues.values()))
    assert queue.predicted_wait(0) <= MAX_HOLD


async def test_retry_after_hold_is_capped_through_redis(
    faulty: Any, start_proxy: StartProxy, tmp_path: Path, redis_server: RedisServer
) -> None:
    throttled = answer(
        "429 Too Many Requests",
        {"Retry-After": "999999999", **V3_THROTTLED},
        b'{"error_key":"throttled","error_message":"Too Many Requests"}',
    )
    _, url = await faulty([throttled])
    config = proxy_config(tmp_path, url, qps=10.0, max_wait=1.0, redis_url=Secret(redis_server.url))
    server, proxy = await start_proxy(config)
    async with aiohttp.ClientSession() as http, http.get(proxy / "v3/contacts") as response:
        assert response.status == 429
    queue = next(iter(server.app[STATE].engine.queues.values()))
    pace_key = redis_keys(queue.fingerprint)[0]
    client = aioredis.Redis.from_url(redis_server.url)
    pace_us = int(await client.get(pace_key) or 0)
    seconds, micros = await client.time()
    await client.aclose()
    assert (pace_us - (seconds * 1_000_000 + micros)) / 1e6 <= MAX_HOLD + 0.1


async def test_a_reset_storm_is_502_and_leaves_the_key_alone(
    faulty: Any, start_proxy: StartProxy, tmp_path: Path
) -> None:
    upstream, url = await faulty([Fault(before="reset")])
    server, proxy = await start_proxy(proxy_config(tmp_path, url, qps=10.0))
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            async with http.get(proxy / "v3/contacts") as response:
                assert response.status == 502  # never a quota 429
                body = await response.json()
                assert body["error_key"] == "bad_gateway"
    queue = next(iter(server.app[STATE].engine.queues.values()))
    assert queue.spacing == pytest.approx(1.025 / 10.0)  # not backed off
    assert queue.predicted_wait(0) < 0.2  # no hold
    assert len(upstream.requests) == 10  # each GET sent twice: once, and one retry


# -- state files ---------------------------------------------------------------------------


def _state(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "state" / "daily.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


@pytest.mark.parametrize(
    "content",
    [
        '{"keys": {"abc": {"day": 1, "sent": 90',  # torn
        '["not", "an", "object"]',
        '{"keys": {"abc": {"day": "today", "sent": 1}}}',
        '{"keys": {"abc": {"day": 20000, "sent": -5}}}',
        '{"keys": {"abc": {"day": 20000, "sent": 1, "paused_until": NaN}}}',
    ],
    ids=["torn", "wrong-shape", "bad-day", "negative-count", "nan-pause"],
)
def test_an_untrustworthy_state_file_refuses_to_start(content: str, tmp_path: Path) -> None:
    path = _state(tmp_path, content)
    with pytest.raises(StartupError, match=r"daily\.json"):
        LocalBackend(FakeClock(), path)


def test_state_file_problems_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _state(tmp_path, '{"keys": {"abc": {"day": 1, "sent": 90')
    status = main(["serve", "--port", "0", "--state-dir", str(tmp_path / "state")], env={})
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctct-proxy: error: state file")
    assert "\n" not in err


def test_an_absurd_pause_is_cut_to_a_day(tmp_path: Path) -> None:
    clock = FakeClock()
    today = int(clock.time() // 86400)
    path = _state(
        tmp_path, json.dumps({"keys": {"abc": {"day": today, "sent": 9000, "paused_until": 1e308}}})
    )
    backend = LocalBackend(clock, path)
    usage = backend._keys[Fingerprint("abc")]
    assert usage.sent == 9000
    assert usage.paused_until <= clock.time() + 86400


@pytest.mark.parametrize("kind", ["file", "devnull", "empty"])
def test_an_unusable_state_dir_exits_2(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "file":
        target = tmp_path / "plain"
        target.write_text("x")
        state_dir = str(target)
    elif kind == "devnull":
        state_dir = "/dev/null"
    else:
        state_dir = ""
    status = main(["serve", "--port", "0", "--state-dir", state_dir], env={})
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "state-dir" in err
    assert "\n" not in err


async def test_an_unreadable_token_file_starts_loudly_and_is_kept(
    start_proxy: StartProxy, tmp_path: Path, log_lines: Logs
) -> None:
    """The token file holds no count, so no overspend is possible: the proxy starts, says
    which file it could not use, and leaves it for the operator (docs/operations.md)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "oauth-tokens.json").write_text('{"version": 1, "refresh_tok')
    _, proxy = await start_proxy(
        proxy_config(tmp_path, URL("http://127.0.0.1:9"), client_id=Secret("cid"))
    )
    async with aiohttp.ClientSession() as http, http.get(proxy / "healthz") as response:
        assert response.status == 200
    assert (state / "oauth-tokens.json").read_text() == '{"version": 1, "refresh_tok'
    [warning] = log_lines("oauth_state_unreadable")
    assert "oauth-tokens.json" in warning["error"]


@pytest.mark.parametrize("fault", ["truncate", "reset", "stall"])
async def test_the_simulators_faults_reproduce_a_cut_answer(
    fault: str, start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """`ctct-proxy simulate --fault …` lets a user see what the proxy does with a broken body."""
    # A stalled handler is still waiting when the test ends: don't wait its minute out.
    sim = await start_server(
        make_simulator_app(SimulatorConfig(fault=fault, fault_every=2)), shutdown_timeout=0.5
    )
    _, proxy = await start_proxy(proxy_config(tmp_path, sim.make_url(""), upstream_timeout=0.5))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy / "v3/contacts") as response:
            assert response.status == 200
            await response.read()  # the first call is fine
        async with http.get(proxy / "v3/contacts") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


@pytest.mark.parametrize(("fault", "status"), [("app-403", 403), ("huge-retry-after", 429)])
async def test_the_simulators_quota_lookalikes(
    fault: str, status: int, start_server: ServerFactory, start_proxy: StartProxy, tmp_path: Path
) -> None:
    sim = await start_server(make_simulator_app(SimulatorConfig(fault=fault)))
    _, proxy = await start_proxy(proxy_config(tmp_path, sim.make_url(""), max_wait=2.0))
    async with aiohttp.ClientSession() as http, http.get(proxy / "v3/contacts") as response:
        assert response.status == status
        if fault == "app-403":
            assert "Hover QPS" in (await response.json())["error_message"]
        else:
            assert int(response.headers["Retry-After"]) <= MAX_HOLD

"""Operating the proxy: the request log, /metrics, graceful shutdown and the container image.

Everything runs for real on 127.0.0.1: the simulator plays Constant Contact, the proxy runs
in-process (log and metrics scenarios) or as `ctct-proxy serve` in a subprocess (shutdown,
the Dockerfile's command), and what a log collector, Prometheus, a client and the container
runtime would see is what the tests assert on.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy import logs
from proxy.config import Config
from proxy.credentials import Secret, fingerprint
from proxy.metrics import OTHER, TOP_KEYS
from proxy.simulator import SimulatorConfig, make_simulator_app
from tests.conftest import Recorder, ServerFactory, StartProxy, proxy_config, raw_url
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "opsApiKey-5f1c2d9e7a"
ACCESS_TOKEN = "opsAccessToken-7b3e11c0"
CLIENT_TOKEN = "opsClientToken-91aa4f"
# What a client still sends from before the proxy: it must be replaced, and never logged.
STALE_KEY = "staleClientKey-0d0d55"
STALE_TOKEN = "staleClientToken-e3e3aa"
SECRETS = (API_KEY, ACCESS_TOKEN, CLIENT_TOKEN, STALE_KEY, STALE_TOKEN)
KEY_FP = fingerprint(API_KEY)
MODES = ("local", "shared", "fallback")
OUTCOMES = {"forwarded", "replayed", "throttled", "refused", "failed", "abandoned"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- helpers ------------------------------------------------------------------------------


@dataclass
class Captured:
    """What the logging pipeline wrote, one JSON event per line."""

    stream: io.StringIO

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def finished(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "request_finished"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Whatever a test configures, the process's logging as it was afterwards."""
    root = logging.getLogger()
    access = logging.getLogger("aiohttp.access")
    saved = (root.handlers[:], root.level, access.level)
    sink = logs._SINK
    # Our own events write through the sink, not the root handlers: put it back as well.
    saved_sink = (sink.stream, sink.level, sink.render)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    access.setLevel(saved[2])
    sink.stream, sink.level, sink.render = saved_sink
    structlog.reset_defaults()


@pytest.fixture
def captured_logs(restore_logging: None) -> Captured:
    """The proxy's logging pipeline writing JSON into a buffer."""
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    return Captured(stream)


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    """Poll until `check` holds, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def free_port() -> int:
    """A port nothing listens on (for an unreachable upstream or a pre-chosen listen port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def samples(exposition: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and sorted labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when the series does not exist (yet)."""
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: aiohttp.ClientSession, proxy: URL) -> tuple[str, Samples]:
    """The exposition of the proxy's /metrics, as text and as samples."""
    async with http.get(proxy / "metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return text, samples(text)


async def start_simulator(
    start_server: ServerFactory, seen_ids: list[str] | None = None, **settings: Any
) -> URL:
    """The stand-in API demanding our key and token; records the X-Request-Id it received."""
    app = make_simulator_app(
        SimulatorConfig(api_key=API_KEY, access_token=ACCESS_TOKEN, **settings)
    )
    if seen_ids is not None:

        async def remember(request: web.Request, _: web.StreamResponse) -> None:
            seen_ids.append(request.headers.get("X-Request-Id", ""))

        app.on_response_prepare.append(remember)
    server = await start_server(app)
    return server.make_url("")


def configured(tmp_path: Path, upstream: URL, **overrides: Any) -> Config:
    """The proxy with our key, token and a client token, in front of `upstream`."""
    return proxy_config(
        tmp_path,
        upstream,
        api_key=Secret(API_KEY),
        access_token=Secret(ACCESS_TOKEN),
        client_token=(Secret(CLIENT_TOKEN),),
        **overrides,
    )


# A client mid-migration: its old key and token still in the request, the proxy's client
# token in Proxy-Authorization.
CLIENT = {"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}", "Authorization": f"Bearer {STALE_TOKEN}"}
V2_CONTACTS = f"/v2/contacts?status=ALL&api_key={STALE_KEY}"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


# -- the request log ----------------------------------------------------------------------


async def test_one_request_finished_line_per_request_with_outcomes_and_no_secrets(
    captured_logs: Captured,
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    seen_ids: list[str] = []
    # The stand-in admits 1 request/s while the proxy paces at 4/s: sends get rejected and replayed.
    sim = await start_simulator(start_server, seen_ids, qps=1)
    dead = URL(f"http://127.0.0.1:{free_port()}")
    _, proxy = await start_proxy(configured(tmp_path, sim, qps=4.0, upstream_v3=dead))
    answers: dict[str, tuple[int, str]] = {}  # request id -> (status, expected outcome)

    async def call(
        target: str, expect: str, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        async with http.get(raw_url(proxy, target), headers=headers) as resp:
            await resp.read()
        request_id = resp.headers["X-Request-Id"]
        assert request_id not in answers
        answers[request_id] = (resp.status, expect)
        return resp

    # forwarded: stale client credentials replaced, our request id goes up and comes back.
    resp = await call(V2_CONTACTS, "forwarded", {**CLIENT, "X-Request-Id": "ops-req-1"})
    assert (resp.status, resp.headers["X-Request-Id"]) == (200, "ops-req-1")
    assert seen_ids == ["ops-req-1"]
    # replayed: within the stand-in's second, so rejected at least once; an id is generated.
    resp = await call(V2_CONTACTS, "replayed", CLIENT)
    assert resp.status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-Id"])
    assert seen_ids[-1] == resp.headers["X-Request-Id"]
    # throttled: no wait allowed while the key's next slot is still ahead.
    resp = await call(V2_CONTACTS, "throttled", {**CLIENT, "Prefer": "wait=0"})
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    # refused: no client token, and a path that is not served.
    assert (await call(V2_CONTACTS, "refused")).status == 401
    assert (await call("/nowhere?access_token=" + STALE_TOKEN, "refused", CLIENT)).status == 404
    # failed: the v3 upstream cannot be reached.
    resp = await call("/v3/contacts", "failed", {**CLIENT, "X-Request-Id": "ops-req-502"})
    assert resp.status == 502
    # abandoned: the client hangs up while the proxy still works on its request.
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(
        b"GET /v3/contacts HTTP/1.1\r\nHost: proxy\r\nX-Request-Id: ops-req-gone\r\n"
        + f"Proxy-Authorization: Bearer {CLIENT_TOKEN}\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.sleep(0.15)
    writer.close()
    answers["ops-req-gone"] = (499, "abandoned")
    await eventually(lambda: len(captured_logs.finished()) == len(answers))

    lines = captured_logs.finished()
    by_id = {line["request_id"]: line for line in lines}
    assert len(by_id) == len(lines) == len(answers)  # exactly one line per request
    for request_id, (status, outcome) in answers.items():
        line = by_id[request_id]
        assert (line["status"], line["outcome"]) == (status, outcome), line
        assert {
            "method",
            "path",
            "key",
            "queued_ms",
            "upstream_status",
            "replays",
            "duration_ms",
        } <= set(line)
        assert line["level"] == "info"
        assert line["timestamp"].endswith("Z")
    assert {line["outcome"] for line in lines} == OUTCOMES
    first = by_id["ops-req-1"]
    assert first["key"] == KEY_FP
    assert first["upstream_status"] == 200
    assert first["path"] == "/v2/contacts?status=ALL&api_key=***"
    replayed = next(line for line in lines if line["outcome"] == "replayed")
    assert replayed["replays"] >= 1
    assert replayed["queued_ms"] > 0
    assert by_id["ops-req-502"]["upstream_status"] is None
    assert any(e["event"] == "upstream_over_qps" for e in captured_logs.events())
    assert_no_secret(captured_logs.text)


async def test_operator_endpoints_are_not_counted_or_logged_as_api_traffic(
    captured_logs: Captured,
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    _, upstream = recorder
    _, proxy = await start_proxy(configured(tmp_path, upstream))
    for path in ("healthz", "readyz", "status", "metrics"):
        async with http.get(proxy / path) as resp:
            assert resp.status == 200
            assert "X-Request-Id" in resp.headers
    _, found = await scrape(http, proxy)
    assert value(found, "ctct_proxy_requests_total", outcome="forwarded", status="200") == 0
    assert value(found, "ctct_proxy_requests_total", outcome="local", status="200") == 4
    # Probes and scrapes every few seconds would drown the request log at info level.
    assert captured_logs.finished() == []


def test_stdlib_records_are_rendered_and_scrubbed_by_the_same_pipeline(
    captured_logs: Captured,
) -> None:
    Secret(API_KEY)  # known to the process, as after start-up
    try:
        raise RuntimeError(f"upstream said no to {API_KEY}")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception(
            "Error handling GET /v2/x?api_key=%s", STALE_KEY
        )
    logging.getLogger("aiohttp.access").info("GET /v2/x?api_key=%s 200", STALE_KEY)
    logs.get_logger("proxy").info(
        "custom",
        detail={"nested": [f"Bearer {STALE_TOKEN}"]},
        url=URL(f"http://127.0.0.1/v2/contacts?api_key={STALE_KEY}"),
        raw=f"access_token={STALE_TOKEN}".encode(),
        secret=Secret(ACCESS_TOKEN),
        count=3,
    )
    events = captured_logs.events()
    assert [e["event"] for e in events] == [
        "Error handling GET /v2/x?api_key=***",
        "custom",
    ]  # the access log stays quiet: request_finished replaces it
    assert events[0]["level"] == "error"
    assert events[0]["logger"] == "aiohttp.server"
    assert "RuntimeError: upstream said no to ***" in events[0]["exception"]
    assert events[1]["detail"] == {"nested": ["Bearer ***"]}
    # Objects the renderer would write as their repr are rendered and scrubbed first.
    assert events[1]["url"] == "http://127.0.0.1/v2/contacts?api_key=***"
    assert (events[1]["raw"], events[1]["secret"], events[1]["count"]) == (
        "access_token=***",
        "***",
        3,
    )
    assert_no_secret(captured_logs.text)


def test_configuring_again_reaches_loggers_already_in_use(restore_logging: None) -> None:
    # Our events skip the stdlib; loggers are cached on first use. A second configure (a new
    # stream, a new level) must still reach them, and foreign stdlib logs must share the stream.
    first, second = io.StringIO(), io.StringIO()
    logs.configure("json", "info", stream=first)
    log = logs.get_logger("proxy.reconfigured")
    log.info("one", token_hint="api_key=" + API_KEY)
    logs.configure("json", "warning", stream=second)
    log.info("below the new level")
    log.warning("two")
    logging.getLogger("aiohttp.server").warning("three %s", "api_key=" + API_KEY)
    one = [json.loads(line) for line in first.getvalue().splitlines()]
    two = [json.loads(line) for line in second.getvalue().splitlines()]
    assert [e["event"] for e in one] == ["one"]
    assert one[0]["logger"] == "proxy.reconfigured" and one[0]["level"] == "info"
    assert [(e["event"], e["logger"]) for e in two] == [
        ("two", "proxy.reconfigured"),
        ("three api_key=***", "aiohttp.server"),
    ]
    assert API_KEY not in first.getvalue() + second.getvalue()


def test_a_broken_log_stream_does_not_fail_logging_calls(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    logs.configure("json", "info", stream=Closed())
    logs.get_logger("proxy").info("into a closed pipe")
    logs.get_logger("proxy").info("and again")
    # Said once on stderr, and neither call raised.
    assert capsys.readouterr().err.count("log stream failed: BrokenPipeError") == 1


def test_console_rendering_is_chosen_for_a_terminal(restore_logging: None) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    logs.configure(None, "warning", stream=stream)
    logs.get_logger("proxy").warning("hello", key=KEY_FP)
    logs.get_logger("proxy").info("hidden below the level")
    text = stream.getvalue()
    assert "hello" in text
    assert KEY_FP in text
    assert "hidden" not in text
    with pytest.raises(ValueError, match="Expecting value"):
        json.loads(text)


def test_config_redacted_shows_settings_but_no_secret() -> None:
    secrets = {
        "CTCT_API_KEY": API_KEY,
        "CTCT_ACCESS_TOKEN": ACCESS_TOKEN,
        "CTCT_PROXY_CLIENT_TOKENS": f"{CLIENT_TOKEN},{STALE_TOKEN}",
        "CTCT_CLIENT_ID": "opsClientId-4411",
        "CTCT_CLIENT_SECRET": "opsClientSecret-8822",
        "CTCT_REFRESH_TOKEN": "opsRefreshToken-6633",
        "CTCT_PROXY_REDIS_URL": "redis://:opsRedisPassword-77@127.0.0.1:6379/0",
    }
    config = Config.from_sources({}, {**secrets, "CTCT_PROXY_QPS": "2.5", "HOME": "/home/x"})
    shown = config.redacted()
    text = json.dumps(shown)
    for secret in secrets.values():
        assert secret not in text
    assert "opsRedisPassword" not in text
    assert shown["api_key"] == shown["access_token"] == shown["client_secret"] == "***"
    assert shown["client_token"] == ["***", "***"]
    assert shown["qps"] == 2.5
    assert shown["upstream_v2"] == "https://api.constantcontact.com"
    assert shown["host"] == "127.0.0.1"


# -- /metrics -----------------------------------------------------------------------------


async def test_at_warning_no_request_lines_but_the_metrics_count_every_request(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    restore_logging: None,
) -> None:
    # Requests are counted with their lines, a batch at a time: a level that writes no lines
    # must still count them (the advice for the fastest set-up is --log-level warning).
    stream = io.StringIO()
    logs.configure("json", "warning", stream=stream)
    sim = await start_simulator(start_server, qps=1000)
    # Each identical read its own send (no coalescing), so that each is counted as forwarded.
    _, proxy = await start_proxy(configured(tmp_path, sim, qps=50.0, coalesce=False))

    async def get() -> int:
        async with http.get(raw_url(proxy, V2_CONTACTS), headers=CLIENT) as resp:
            await resp.read()
            return resp.status

    assert await asyncio.gather(*(get() for _ in range(20))) == [200] * 20
    _, found = await scrape(http, proxy)
    assert value(found, "ctct_proxy_requests_total", outcome="forwarded", status="200") == 20
    assert value(found, "ctct_proxy_queue_wait_seconds_count") == 20
    assert value(found, "ctct_proxy_upstream_latency_seconds_count") == 20
    assert "request_finished" not in stream.getvalue()


async def test_metrics_move_as_requests_flow_and_hold_no_secret(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await start_simulator(start_server, qps=1)
    # Each identical read its own send (no coalescing): three queued, one at a time.
    config = configured(tmp_path, sim, qps=4.0, coalesce=False)
    _, proxy = await start_proxy(config)
    _, before = await scrape(http, proxy)
    assert value(before, "ctct_proxy_shared_mode", mode="local") == 1
    assert not any(name == "ctct_proxy_queue_depth" for name, _ in before)

    async def get() -> int:
        async with http.get(raw_url(proxy, V2_CONTACTS), headers=CLIENT) as resp:
            await resp.read()
            return resp.status

    burst = [asyncio.create_task(get()) for _ in range(3)]
    depths: list[float] = []

    async def queued() -> bool:
        _, found = await scrape(http, proxy)
        depths.append(value(found, "ctct_proxy_queue_depth", key=KEY_FP))
        return depths[-1] >= 1

    await eventually(queued)
    assert await asyncio.gather(*burst) == [200, 200, 200]
    async with http.get(
        raw_url(proxy, V2_CONTACTS), headers={**CLIENT, "Prefer": "wait=0"}
    ) as resp:
        assert resp.status == 429
    async with http.get(sim / "__sim__/stats") as resp:
        upstream = (await resp.json())["keys"][KEY_FP]  # the stand-in names keys the same way

    text, found = await scrape(http, proxy)
    assert_no_secret(text)
    sends = upstream["requests"]
    rejected = upstream["rejected"]["per_second"]
    assert rejected >= 1
    assert sends == upstream["accepted"] + rejected
    forwarded = value(found, "ctct_proxy_requests_total", outcome="forwarded", status="200")
    replayed = value(found, "ctct_proxy_requests_total", outcome="replayed", status="200")
    assert replayed >= 1
    assert forwarded + replayed == 3
    assert value(found, "ctct_proxy_requests_total", outcome="throttled", status="429") == 1
    assert value(found, "ctct_proxy_throttled_total", kind="per_second") == 1
    assert value(found, "ctct_proxy_upstream_quota_errors_total", kind="per_second") == rejected
    assert value(found, "ctct_proxy_replays_total") == rejected
    # Every send waited in the queue first and got an answer back.
    assert value(found, "ctct_proxy_queue_wait_seconds_count") == sends
    assert value(found, "ctct_proxy_upstream_latency_seconds_count") == sends
    assert value(found, "ctct_proxy_queue_wait_seconds_sum") > 1.0  # three sends at 1/s
    assert value(found, "ctct_proxy_queue_wait_seconds_bucket", le="+Inf") == sends
    assert value(found, "ctct_proxy_queue_depth", key=KEY_FP) == 0
    used = value(found, "ctct_proxy_daily_used", key=KEY_FP)
    assert used >= upstream["accepted"] == 3
    assert used + value(found, "ctct_proxy_daily_remaining", key=KEY_FP) == config.daily_quota
    # The gateway's rejections backed the key's spacing off from the configured one.
    assert value(found, "ctct_proxy_spacing_seconds", key=KEY_FP) > config.spacing
    assert value(found, "ctct_proxy_paused", key=KEY_FP) == 0
    assert value(found, "ctct_proxy_shared_mode", mode="shared") == 0


async def test_per_key_series_are_bounded_to_the_busiest_keys_plus_one_aggregate(
    recorder: tuple[Recorder, URL],
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # Pass-through mode: every api_key a client sends is a key of its own.
    _, upstream = recorder
    _, proxy = await start_proxy(proxy_config(tmp_path, upstream))
    keys = [f"pass-key-{i:03d}" for i in range(TOP_KEYS + 30)]
    busiest = keys[-1]
    for key in [*keys, busiest, busiest]:
        async with http.get(raw_url(proxy, f"/v2/lists?api_key={key}")) as resp:
            assert resp.status == 200
    text, found = await scrape(http, proxy)
    per_key = {dict(labels)["key"] for (name, labels) in found if name == "ctct_proxy_daily_used"}
    assert len(per_key) == TOP_KEYS + 1
    assert fingerprint(busiest) in per_key
    assert OTHER in per_key
    assert value(found, "ctct_proxy_keys") == len(keys)
    assert value(found, "ctct_proxy_daily_used", key=fingerprint(busiest)) == 3
    shown = sum(v for (name, labels), v in found.items() if name == "ctct_proxy_daily_used")
    assert shown == len(keys) + 2  # every send counted once: per key or in "other"
    assert value(found, "ctct_proxy_queue_depth", key=OTHER) == 0
    assert value(found, "ctct_proxy_paused", key=OTHER) == 0
    assert "pass-key" not in text


async def test_a_daily_quota_error_pauses_the_key_and_shows_in_metrics(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await start_simulator(start_server, daily_quota=0)
    _, proxy = await start_proxy(configured(tmp_path, sim))
    for _ in range(2):  # the first meets the gateway's answer, the second the pause
        async with http.get(raw_url(proxy, V2_CONTACTS), headers=CLIENT) as resp:
            assert resp.status == 429
            body = await resp.json()
            assert body[0]["error_key"] == "mashery.not.authorized.over.ratelimit"
    text, found = await scrape(http, proxy)
    assert_no_secret(text)
    assert value(found, "ctct_proxy_upstream_quota_errors_total", kind="daily") == 1
    assert value(found, "ctct_proxy_throttled_total", kind="daily") == 2
    assert value(found, "ctct_proxy_requests_total", outcome="throttled", status="429") == 2
    assert value(found, "ctct_proxy_paused", key=KEY_FP) == 1


async def test_shared_mode_gauge_follows_redis(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis")
    await redis.start()
    try:
        sim = await start_simulator(start_server)
        config = configured(tmp_path, sim, redis_url=Secret(redis.url), replicas=2)
        _, proxy = await start_proxy(config)
        text, found = await scrape(http, proxy)
        assert [value(found, "ctct_proxy_shared_mode", mode=m) for m in MODES] == [0, 1, 0]
        assert redis.url not in text
        await redis.stop()  # an outage: the next send notices and paces alone
        async with http.get(raw_url(proxy, V2_CONTACTS), headers=CLIENT) as resp:
            assert resp.status == 200
        _, found = await scrape(http, proxy)
        assert [value(found, "ctct_proxy_shared_mode", mode=m) for m in MODES] == [0, 0, 1]
    finally:
        await redis.stop()


# -- the process: start-up line, graceful shutdown, the container image ------------------


def child_env(*overlays: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without any CTCT_ setting of the developer's, then `overlays`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTCT_")}
    for overlay in overlays:
        env.update(overlay)
    return env


@dataclass
class Served:
    """A `ctct-proxy serve` subprocess and what it logged up to `listening`."""

    proc: asyncio.subprocess.Process
    port: int
    listening: dict[str, Any]
    stdout: list[str]

    async def finish(self, timeout: float) -> tuple[int, list[dict[str, Any]], str]:
        """Wait for the exit; the exit status, every logged event and stderr."""
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        lines = self.stdout + out.decode().splitlines()
        return self.proc.returncode, [json.loads(line) for line in lines if line], err.decode()


async def start_serve(argv: list[str], env: dict[str, str], cwd: Path) -> Served:
    """Start the command and read its JSON log until the `listening` event gives the port."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
            assert line, "exited before listening"
            seen.append(line.rstrip("\n"))
            event = json.loads(line)
            if event["event"] == "listening":
                return Served(proc, int(event["port"]), event, seen)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"serve did not start: {seen} {err.decode()}") from None


async def test_sigterm_finishes_in_flight_answers_queued_503_and_exits_0(
    start_server: ServerFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Each answer takes the stand-in a second: the first request is in flight when the
    # signal comes, the two behind it (1 request/s) are still queued.
    sim = await start_simulator(start_server, latency_out=1.0)
    state_dir = tmp_path / "state"
    grace = 5.0
    served = await start_serve(
        [sys.executable, "-m", "proxy", "serve", "--port", "0", "--qps", "1",
         "--upstream-v2", str(sim), "--upstream-v3", str(sim),
         "--api-key", API_KEY, "--access-token", ACCESS_TOKEN,
         "--state-dir", str(state_dir), "--shutdown-grace", str(grace), "--log-format", "json",
         "--no-coalesce"],  # three sends of one read: one in flight, two queued
        child_env(),
        tmp_path,
    )  # fmt: skip
    shown = served.listening["config"]
    assert (served.listening["host"], shown["api_key"], shown["access_token"]) == (
        "127.0.0.1",
        "***",
        "***",
    )
    assert shown["qps"] == 1.0
    assert shown["state_dir"] == str(state_dir)
    proxy = URL(f"http://127.0.0.1:{served.port}")

    async def get(n: int) -> tuple[int, str | None, bytes]:
        headers = {"X-Request-Id": f"shutdown-{n}", "Authorization": f"Bearer {STALE_TOKEN}"}
        async with http.get(raw_url(proxy, V2_CONTACTS), headers=headers) as resp:
            return resp.status, resp.headers.get("Retry-After"), await resp.read()

    calls = [asyncio.create_task(get(n)) for n in range(3)]

    async def in_flight_and_two_queued() -> bool:
        async with http.get(sim / "__sim__/stats") as resp:
            arrived = (await resp.json())["totals"]["requests"]
        async with http.get(proxy / "status") as resp:
            keys = (await resp.json())["keys"]
        return arrived == 1 and bool(keys) and keys[0]["queued"] == 2

    await eventually(in_flight_and_two_queued)
    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    answers = await asyncio.gather(*calls)
    code, events, err = await served.finish(timeout=grace + 5)
    took = time.monotonic() - signalled

    assert code == 0, err
    assert took < grace
    status, _, body = answers[0]
    assert status == 200  # the upstream's own answer, after the signal
    assert json.loads(body)["path"] == "/v2/contacts"
    for status, retry_after, body in answers[1:]:
        assert status == 503
        assert retry_after is not None and int(retry_after) >= 1
        error = json.loads(body)
        assert isinstance(error, list)  # Constant Contact's v2 shape
        assert error[0]["error_key"] == "http.status.service_unavailable"
        assert "shutting down" in error[0]["error_message"]
    names = [e["event"] for e in events]
    assert names.index("shutting_down") < names.index("stopped") == len(names) - 1
    finished = {e["request_id"]: e for e in events if e["event"] == "request_finished"}
    assert [(finished[f"shutdown-{n}"]["status"]) for n in range(3)] == [200, 503, 503]
    saved = json.loads((state_dir / "daily.json").read_text())
    assert saved["keys"][KEY_FP]["sent"] >= 1
    assert_no_secret(json.dumps(events) + err + (state_dir / "daily.json").read_text())


@dataclass
class Dockerfile:
    """The instructions of the repository's Dockerfile, continuation lines joined."""

    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        logical: list[str] = []
        pending = ""
        for line in path.read_text().splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        assert not pending, "a continuation runs off the end"
        out = []
        for text in logical:
            keyword, _, rest = text.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
        return cls(out)

    def all(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"{keyword}: {found}"
        return found[0]

    def env(self) -> dict[str, str]:
        values = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                name, sep, val = item.partition("=")
                assert sep, f"ENV {rest}: use the KEY=value form"
                values[name] = val
        return values

    def healthcheck(self) -> list[str]:
        rest = self.one("HEALTHCHECK")
        _, sep, command = rest.partition("CMD ")
        assert sep
        argv = json.loads(command)
        assert isinstance(argv, list)
        return [str(a) for a in argv]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern wins)."""
    parts = path.split("/")
    ignored = False
    for raw in patterns:
        exclude = not raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = exclude
    return ignored


def test_dockerfile_is_pinned_non_root_exec_form_and_layered() -> None:
    docker = Dockerfile.read(ROOT / "Dockerfile")
    bases = docker.all("FROM")
    assert bases
    for base in bases:
        assert re.fullmatch(
            r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?( AS \w+)?", base
        ), base
    users = docker.all("USER")
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(docker.one("CMD")) == ["ctct-proxy", "serve"]
    assert docker.one("EXPOSE") == "8080"
    env = docker.env()
    assert env["CTCT_PROXY_HOST"] == "0.0.0.0"
    assert "CTCT_PROXY_TRUST_NETWORK" not in env  # client tokens stay required by default
    # The proxy is gone within the grace + 1 s, before `docker stop` (10 s) resorts to SIGKILL.
    assert float(env["CTCT_PROXY_SHUTDOWN_GRACE"]) + 1 <= 10
    health = docker.healthcheck()
    assert health[:2] == ["python", "-c"]
    assert "/healthz" in health[2]
    assert "curl" not in docker.one("HEALTHCHECK")
    # Dependencies are installed from pyproject.toml alone, before the code is copied in.
    steps = [f"{k} {rest}" for k, rest in docker.instructions]

    def first(keyword: str, word: str) -> int:
        return next(i for i, s in enumerate(steps) if s.startswith(keyword) and word in s)

    copy_manifest, install_deps = first("COPY", "pyproject.toml"), first("RUN", "pyproject.toml")
    copy_code = first("COPY", "proxy/")
    assert copy_manifest < install_deps < copy_code
    assert "proxy/" not in steps[copy_manifest]
    assert "--no-deps" in next(s for s in steps[copy_code:] if s.startswith("RUN"))
    # Whatever is copied is in the build context; the venv, tests and git history are not.
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    for step in steps:
        if step.startswith("COPY") and "--from" not in step:
            for source in step.split()[1:-1]:
                assert not _dockerignored(source.rstrip("/"), patterns), source
    for kept in ("pyproject.toml", "proxy/app.py", "proxy/py.typed"):
        assert not _dockerignored(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_quota.py",
        "proxy/__pycache__/app.cpython-311.pyc",
    ):
        assert _dockerignored(dropped, patterns), dropped


async def test_the_images_command_serves_and_passes_its_healthcheck_then_stops_on_sigint(
    tmp_path: Path,
) -> None:
    docker = Dockerfile.read(ROOT / "Dockerfile")
    command = json.loads(docker.one("CMD"))
    program = Path(sys.executable).parent / command[0]
    dead = f"http://127.0.0.1:{free_port()}"
    # As the image runs it, plus what a user adds (a client token); the state dir and the
    # port are moved to where this machine can have them.
    env = child_env(
        docker.env(),
        {
            "CTCT_PROXY_PORT": str(free_port()),
            "CTCT_PROXY_STATE_DIR": str(tmp_path / "state"),
            "CTCT_PROXY_CLIENT_TOKENS": CLIENT_TOKEN,
            "CTCT_PROXY_UPSTREAM_V2": dead,
            "CTCT_PROXY_UPSTREAM_V3": dead,
        },
    )
    served = await start_serve([str(program), *command[1:]], env, tmp_path)
    assert served.listening["host"] == "0.0.0.0"
    assert served.port == int(env["CTCT_PROXY_PORT"])
    assert served.listening["config"]["client_token"] == ["***"]
    health = docker.healthcheck()
    health_argv = [sys.executable, *health[1:]]

    async def healthcheck() -> int:
        check = await asyncio.create_subprocess_exec(*health_argv, env=env, cwd=tmp_path)
        return await asyncio.wait_for(check.wait(), 10)

    assert await healthcheck() == 0
    served.proc.send_signal(signal.SIGINT)
    code, events, err = await served.finish(timeout=10)
    assert code == 0, err
    assert events[-1]["event"] == "stopped"
    assert CLIENT_TOKEN not in json.dumps(events) + err
    assert await healthcheck() != 0  # and it does notice a proxy that is gone


async def test_the_image_refuses_to_serve_beyond_loopback_without_client_tokens(
    tmp_path: Path,
) -> None:
    docker = Dockerfile.read(ROOT / "Dockerfile")
    command = json.loads(docker.one("CMD"))
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / command[0]),
        *command[1:],
        env=child_env(docker.env(), {"CTCT_PROXY_STATE_DIR": str(tmp_path)}),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "ctct-proxy: error: --host: listening on 0.0.0.0 needs --client-token"
    )

"""The Constant Contact stand-in: echo, credential errors, quota windows and what it records.

The expected error bodies are written out literally from constant-contact.md rather than
built from proxy.upstream_errors, so a drift in either place shows up here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import io
import json
import random
import re
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient
from yarl import URL

from proxy.simulator import (
    SimulatorConfig,
    add_simulate_arguments,
    make_simulator_app,
    simulator_config_from_args,
)
from proxy.simulator.gateway import SIMULATOR, QuotaLedger, Verdict

Client = TestClient[web.Request, web.Application]

V2_OVER_QPS_BODY = [
    {
        "error_key": "mashery.not.authorized.over.qps",
        "error_message": "The Mashery account associated with this request is over its"
        " queries-per-second quota.",
    }
]
V2_OVER_RATE_BODY = [
    {
        "error_key": "mashery.not.authorized.over.ratelimit",
        "error_message": "The Mashery account associated with this request is over its"
        " rate limit quota.",
    }
]
V3_THROTTLED_BODY = {"error_key": "throttled", "error_message": "Too Many Requests"}
V3_QUOTA_BODY = {"error_key": "quota_exceeded", "error_message": "Limit Exceeded"}
V3_UNAUTHORIZED_BODY = {"error_key": "unauthorized", "error_message": "Unauthorized"}

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")
NUMERIC_CID = json.dumps({"cid": 5}).encode()
NO_CLIENT_ID = json.dumps({"sub": "user"}).encode()


def fp(key: str) -> str:
    """The stats name of a key, computed independently of the simulator."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: object) -> str:
    header = b64url(json.dumps({"alg": "RS256", "kid": "test"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}.c2lnbmF0dXJl"


def path_for(generation: str, key: str = "k") -> str:
    return f"/v2/contacts?api_key={key}" if generation == "v2" else "/v3/contacts"


async def start(aiohttp_client: AiohttpClient, **config: Any) -> Client:
    return await aiohttp_client(make_simulator_app(SimulatorConfig(**config)))


async def stats(client: Client) -> dict[str, Any]:
    response = await client.get("/__sim__/stats")
    assert response.status == 200
    result: dict[str, Any] = await response.json()
    return result


async def burst(client: Client, path: str, n: int, **kwargs: Any) -> list[tuple[int, Any]]:
    async def one() -> tuple[int, Any]:
        async with client.get(path, **kwargs) as response:
            return response.status, await response.json()

    return list(await asyncio.gather(*(one() for _ in range(n))))


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ledger_with(clock: FakeClock, wall: FakeClock | None = None, **config: Any) -> QuotaLedger:
    return QuotaLedger(SimulatorConfig(**config), clock=clock, wall_clock=wall or FakeClock())


# --- echo -------------------------------------------------------------------------------------


async def test_echo_hashes_3mb_multipart_body_byte_for_byte(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client)
    boundary = "----simBoundary7MA4YWxkTrZu0gW"
    payload = random.Random(1).randbytes(3 * 1024 * 1024)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="list_ids"\r\n\r\n1,2\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f"multipart/form-data; boundary={boundary}"

    response = await client.post(
        "/v3/activities/contacts_file_import",
        data=io.BytesIO(body),  # raw bytes this large make aiohttp warn about blocking
        headers={"Content-Type": content_type},
    )

    assert response.status == 200
    assert response.content_type == "application/json"
    echo = await response.json()
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["body_length"] == len(body)
    assert echo["content_type"] == content_type
    assert echo["method"] == "POST"
    assert echo["path"] == "/v3/activities/contacts_file_import"
    assert echo["generation"] == "v3"


async def test_echo_names_query_parameters_in_order_without_values(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await start(aiohttp_client)
    url = URL(
        "/v2/lists/a%2Fb/contacts?api_key=SECRETKEY&limit=5&status=ACTIVE&limit=6", encoded=True
    )

    response = await client.get(url)

    assert response.status == 200
    text = await response.text()
    assert "SECRETKEY" not in text
    echo = json.loads(text)
    assert echo["query_names"] == ["api_key", "limit", "status", "limit"]
    assert echo["path"] == "/v2/lists/a%2Fb/contacts"
    assert echo["generation"] == "v2"
    assert echo["body_length"] == 0
    assert echo["content_type"] is None


async def test_echo_hashes_encoded_body_without_decompressing(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await start(aiohttp_client)
    body = gzip.compress(b'{"contacts": []}' * 100)

    response = await client.post(
        "/v3/activities/contacts_json_import",
        data=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )

    echo = await response.json()
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["body_length"] == len(body)


@pytest.mark.parametrize("generation", ["v2", "v3"])
@pytest.mark.parametrize("method", METHODS)
async def test_every_method_is_answered(
    aiohttp_client: AiohttpClient, generation: str, method: str
) -> None:
    client = await start(aiohttp_client)

    response = await client.request(method, path_for(generation), data=b"x" * 10)

    assert response.status == 200
    if method != "HEAD":
        echo = await response.json()
        assert echo["method"] == method
        assert echo["generation"] == generation
        assert echo["body_length"] == 10


async def test_other_paths_are_not_found(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client)

    assert (await client.get("/v4/contacts")).status == 404
    assert (await client.get("/contacts")).status == 404
    assert (await client.get("/__sim__/reset")).status == 405


# --- credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["", "?limit=1", "?api_key=", "?api_key=k&api_key=k", "?api_key=k&limit=1&api_key=other"],
    ids=["none", "other-params", "empty", "duplicated-same", "duplicated-different"],
)
async def test_v2_missing_or_duplicated_api_key_is_inactive(
    aiohttp_client: AiohttpClient, query: str
) -> None:
    client = await start(aiohttp_client)

    response = await client.get(URL(f"/v2/contacts{query}", encoded=True))

    assert response.status == 403
    body = await response.json()
    assert [entry["error_key"] for entry in body] == ["mashery.not.authorized.inactive"]
    assert isinstance(body[0]["error_message"], str)


async def test_v2_wrong_api_key_is_inactive_when_one_is_configured(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await start(aiohttp_client, api_key="right")

    wrong = await client.get("/v2/contacts?api_key=wrong")
    right = await client.get("/v2/contacts?api_key=right")

    assert wrong.status == 403
    assert (await wrong.json())[0]["error_key"] == "mashery.not.authorized.inactive"
    assert right.status == 200


@pytest.mark.parametrize(
    "authorization",
    [None, ["Bearer wrong"], ["Basic dG9rZW4="], ["Bearer token", "Bearer token"]],
    ids=["missing", "wrong", "not-bearer", "duplicated"],
)
@pytest.mark.parametrize("generation", ["v2", "v3"])
async def test_bad_token_is_401_in_each_generations_shape(
    aiohttp_client: AiohttpClient, generation: str, authorization: list[str] | None
) -> None:
    client = await start(aiohttp_client, access_token="token")
    headers = [("Authorization", value) for value in authorization or []]

    rejected = await client.get(path_for(generation), headers=headers)
    accepted = await client.get(path_for(generation), headers={"Authorization": "Bearer token"})

    assert rejected.status == 401
    body = await rejected.json()
    if generation == "v2":
        assert [entry["error_key"] for entry in body] == [
            "http.status.authentication.invalid_token"
        ]
    else:
        assert body == V3_UNAUTHORIZED_BODY
    assert accepted.status == 200


async def test_credential_failures_do_not_spend_the_keys_quota(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await start(aiohttp_client, api_key="k", access_token="token", qps=4)
    good = {"Authorization": "Bearer token"}

    refused = await burst(client, "/v2/contacts?api_key=k", 6)  # no token
    inactive = await burst(client, "/v2/contacts?api_key=nope", 2, headers=good)
    admitted = await burst(client, "/v2/contacts?api_key=k", 4, headers=good)

    assert [status for status, _ in refused] == [401] * 6
    assert [status for status, _ in inactive] == [403] * 2
    assert [status for status, _ in admitted] == [200] * 4
    seen = await stats(client)
    key = seen["keys"][fp("k")]
    assert key["requests"] == 10
    assert key["accepted"] == 4
    assert key["rejected"] == {"per_second": 0, "daily": 0, "auth": 6}
    assert key["max_arrivals_1s"] == 4
    assert seen["keys"][fp("nope")]["rejected"]["auth"] == 2
    assert seen["totals"]["rejected"]["auth"] == 8


# --- per-second quota -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "status", "body"),
    [("v2", 403, V2_OVER_QPS_BODY), ("v3", 429, V3_THROTTLED_BODY)],
)
async def test_rolling_window_admits_exactly_qps_of_a_concurrent_burst(
    aiohttp_client: AiohttpClient, generation: str, status: int, body: object
) -> None:
    client = await start(aiohttp_client, qps=4)

    results = await burst(client, path_for(generation), 10)

    assert sorted(code for code, _ in results) == [200] * 4 + [status] * 6
    assert all(answer == body for code, answer in results if code != 200)
    seen = await stats(client)
    bucket = fp("k") if generation == "v2" else fp("v3")
    assert list(seen["keys"]) == [bucket]
    for view in (seen["keys"][bucket], seen["totals"]):
        assert view["requests"] == 10
        assert view["accepted"] == 4
        assert view["rejected"] == {"per_second": 6, "daily": 0, "auth": 0}
        assert view["max_arrivals_1s"] == 10
        assert view["max_accepted_1s"] == 4


def test_rolling_window_counts_accepted_arrivals_in_the_last_second() -> None:
    clock = FakeClock()
    ledger = ledger_with(clock, qps=4)

    def at(t: float) -> Verdict:
        clock.now = t
        return ledger.arrive("k")

    assert [at(t) for t in (0.0, 0.25, 0.5, 0.75)] == [Verdict.ACCEPTED] * 4
    assert at(0.999) is Verdict.OVER_QPS
    # (t-1, t] excludes the arrival exactly one second earlier.
    assert at(1.0) is Verdict.ACCEPTED
    assert at(1.0) is Verdict.OVER_QPS
    assert at(1.25) is Verdict.ACCEPTED


def test_rejected_arrivals_do_not_occupy_the_window() -> None:
    clock = FakeClock()
    ledger = ledger_with(clock, qps=1)
    verdicts = []
    for t in (0.0, 0.5, 1.0, 1.25):
        clock.now = t
        verdicts.append(ledger.arrive("k"))

    assert verdicts == [Verdict.ACCEPTED, Verdict.OVER_QPS, Verdict.ACCEPTED, Verdict.OVER_QPS]


def test_fixed_window_counts_per_clock_second() -> None:
    clock = FakeClock()
    ledger = ledger_with(clock, qps=2, window="fixed")
    verdicts = []
    for t in (0.5, 0.9, 0.95, 1.0, 1.1, 1.2):
        clock.now = t
        verdicts.append(ledger.arrive("k"))

    accepted, over = Verdict.ACCEPTED, Verdict.OVER_QPS
    assert verdicts == [accepted, accepted, over, accepted, accepted, over]
    # The fixed window lets twice the limit land within 0.2 s across the boundary.
    totals: Any = ledger.stats()["totals"]
    assert totals["max_accepted_1s"] == 4


async def test_fixed_window_option_over_http(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, qps=4, window="fixed")
    # The simulator's windows run on time.monotonic(), the same clock as this process.
    await asyncio.sleep((0.8 - time.monotonic() % 1.0) % 1.0)

    before = await burst(client, "/v3/contacts", 6)
    await asyncio.sleep(1.0 - time.monotonic() % 1.0 + 0.02)
    after = await burst(client, "/v3/contacts", 4)

    assert sorted(code for code, _ in before) == [200] * 4 + [429] * 2
    assert [code for code, _ in after] == [200] * 4
    seen = await stats(client)
    assert seen["totals"]["max_accepted_1s"] == 8
    assert seen["config"]["window"] == "fixed"


# --- daily quota ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "status", "body"),
    [("v2", 403, V2_OVER_RATE_BODY), ("v3", 429, V3_QUOTA_BODY)],
)
async def test_daily_quota_exceeded_shapes(
    aiohttp_client: AiohttpClient, generation: str, status: int, body: object
) -> None:
    client = await start(aiohttp_client, qps=100, daily_quota=3)

    results = [await client.get(path_for(generation)) for _ in range(5)]

    assert [r.status for r in results] == [200, 200, 200, status, status]
    assert await results[-1].json() == body
    assert "Retry-After" not in results[-1].headers
    seen = await stats(client)
    key = next(iter(seen["keys"].values()))
    assert key["rejected"] == {"per_second": 0, "daily": 2, "auth": 0}
    assert key["daily_used"] == 3


def test_daily_quota_resets_at_utc_midnight_and_counts_only_accepted() -> None:
    clock = FakeClock()
    one_second_to_midnight = FakeClock(86_400 * 20_000 - 1.0)
    ledger = ledger_with(clock, one_second_to_midnight, qps=1, daily_quota=2)

    def at(t: float) -> Verdict:
        clock.now = t
        return ledger.arrive("k")

    assert at(0.0) is Verdict.ACCEPTED
    assert at(0.1) is Verdict.OVER_QPS  # does not use the day's quota
    assert at(2.0) is Verdict.ACCEPTED
    assert at(4.0) is Verdict.OVER_DAILY
    one_second_to_midnight.now += 1.0
    assert at(6.0) is Verdict.ACCEPTED
    keys: Any = ledger.stats()["keys"]
    assert keys[fp("k")]["daily_used"] == 1


@pytest.mark.parametrize("mashery", [False, True])
async def test_mashery_headers_option(aiohttp_client: AiohttpClient, mashery: bool) -> None:
    per_second = await start(aiohttp_client, qps=1, mashery_headers=mashery)
    daily = await start(aiohttp_client, qps=100, daily_quota=1, mashery_headers=mashery)
    v2 = "/v2/contacts?api_key=k"

    await per_second.get(v2)
    over_qps = await per_second.get(v2)
    await per_second.get("/v3/contacts")
    throttled = await per_second.get("/v3/contacts")
    await daily.get(v2)
    over_rate = await daily.get(v2)

    assert (over_qps.status, await over_qps.json()) == (403, V2_OVER_QPS_BODY)
    assert (over_rate.status, await over_rate.json()) == (403, V2_OVER_RATE_BODY)
    assert throttled.status == 429
    assert "X-Mashery-Error-Code" not in throttled.headers
    assert "Retry-After" not in over_rate.headers
    if mashery:
        assert over_qps.headers["X-Mashery-Error-Code"] == "ERR_403_DEVELOPER_OVER_QPS"
        assert over_qps.headers["Retry-After"] == "1"
        assert over_rate.headers["X-Mashery-Error-Code"] == "ERR_403_DEVELOPER_OVER_RATE"
    else:
        for response in (over_qps, over_rate):
            assert "X-Mashery-Error-Code" not in response.headers
            assert "Retry-After" not in response.headers


# --- buckets ----------------------------------------------------------------------------------


async def test_v3_quota_is_per_jwt_client_id(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, qps=2)
    app_a = {"Authorization": f"Bearer {make_jwt({'cid': 'app-a', 'sub': 'u1'})}"}
    app_a_other_user = {"Authorization": f"Bearer {make_jwt({'cid': 'app-a', 'sub': 'u2'})}"}
    app_b = {"Authorization": f"Bearer {make_jwt({'client_id': 'app-b'})}"}

    a_results, a2_results, b_results = await asyncio.gather(
        burst(client, "/v3/contacts", 2, headers=app_a),
        burst(client, "/v3/contacts", 1, headers=app_a_other_user),
        burst(client, "/v3/contacts", 2, headers=app_b),
    )

    a_codes = sorted(code for code, _ in a_results + a2_results)
    assert a_codes == [200, 200, 429]
    assert [code for code, _ in b_results] == [200, 200]
    keys = (await stats(client))["keys"]
    assert set(keys) == {fp("app-a"), fp("app-b")}
    assert keys[fp("app-a")]["rejected"]["per_second"] == 1
    assert keys[fp("app-b")]["accepted"] == 2


@pytest.mark.parametrize(
    "token",
    [
        "opaque-token",
        "a.b.c",
        "a.!!!.c",
        f"h.{b64url(b'[1, 2]')}.s",
        f"h.{b64url(bytes([0xFF, 0xFE, 0x00]))}.s",
        f"h.{b64url(NUMERIC_CID)}.s",
        f"h.{b64url(b'[' * 3000)}.s",
        f"h.{b64url(NO_CLIENT_ID)}.s",
    ],
)
async def test_v3_tokens_without_a_client_id_share_one_bucket(
    aiohttp_client: AiohttpClient, token: str
) -> None:
    client = await start(aiohttp_client)

    response = await client.get("/v3/contacts", headers={"Authorization": f"Bearer {token}"})
    anonymous = await client.get("/v3/contacts")

    assert response.status == 200
    assert anonymous.status == 200
    assert list((await stats(client))["keys"]) == [fp("v3")]


async def test_v2_and_v3_share_a_bucket_when_the_key_is_the_client_id(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await start(aiohttp_client, qps=4)
    token = {"Authorization": f"Bearer {make_jwt({'cid': 'shared'})}"}

    v2 = await burst(client, "/v2/contacts?api_key=shared", 3)
    v3 = await burst(client, "/v3/contacts", 3, headers=token)

    assert [code for code, _ in v2] == [200] * 3
    assert sorted(code for code, _ in v3) == [200, 429, 429]


async def test_two_simulators_in_one_process_are_independent(
    aiohttp_client: AiohttpClient,
) -> None:
    first = await start(aiohttp_client, qps=4)
    second = await start(aiohttp_client, qps=4)

    one = await burst(first, "/v3/contacts", 4)
    two = await burst(second, "/v3/contacts", 4)

    assert [code for code, _ in one + two] == [200] * 8


# --- neighbour --------------------------------------------------------------------------------


async def test_neighbour_spends_the_keys_quota(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, api_key="k", qps=4, neighbour_qps=4)
    # Evenly at 4/s from start-up, the neighbour alone fills the window from 0.75 s on.
    await asyncio.sleep(0.9)

    response = await client.get("/v2/contacts?api_key=k")

    assert response.status == 403
    assert await response.json() == V2_OVER_QPS_BODY
    key = (await stats(client))["keys"][fp("k")]
    assert key["neighbour"]["accepted"] >= 3
    assert key["requests"] == 1
    assert key["accepted"] == 0
    assert key["rejected"]["per_second"] == 1


def test_neighbour_arrivals_share_the_window_but_are_counted_apart() -> None:
    clock = FakeClock()
    ledger = ledger_with(clock, qps=4)
    for _ in range(5):
        ledger.arrive("k", neighbour=True)

    assert ledger.arrive("k") is Verdict.OVER_QPS
    key: Any = ledger.stats()["keys"]
    assert key[fp("k")]["neighbour"] == {"accepted": 4, "rejected": 1}
    assert key[fp("k")]["requests"] == 1
    assert key[fp("k")]["max_arrivals_1s"] == 1
    assert key[fp("k")]["daily_used"] == 4
    assert ledger.arrivals("k") == [0.0]


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({}, "v3"),
        ({"api_key": "app"}, "app"),
        ({"api_key": "app", "neighbour_key": "other"}, "other"),
    ],
)
def test_neighbour_key_defaults(config: dict[str, Any], key: str) -> None:
    assert QuotaLedger(SimulatorConfig(neighbour_qps=1, **config)).neighbour_key == key


# --- stats ------------------------------------------------------------------------------------


async def test_max_arrivals_for_requests_spaced_wider_than_the_limit(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await start(aiohttp_client, qps=4)
    start_at = time.monotonic()
    codes = []
    for i in range(6):
        await asyncio.sleep(max(start_at + i * 0.3 - time.monotonic(), 0.0))
        codes.append((await client.get("/v3/contacts")).status)

    assert codes == [200] * 6
    seen = await stats(client)
    view = seen["keys"][fp("v3")]
    # 0, 0.3, 0.6, 0.9 share a second; 1.2 no longer sees 0.
    assert view["max_arrivals_1s"] == 4
    assert view["max_accepted_1s"] == 4
    assert start_at <= view["first_arrival"] < view["last_arrival"] <= seen["now"]
    assert view["last_arrival"] - view["first_arrival"] >= 1.5 - 0.05


@settings(max_examples=200, deadline=None)
@given(
    ticks=st.lists(st.integers(min_value=0, max_value=64 * 4), max_size=40),
    qps=st.integers(min_value=1, max_value=5),
)
def test_stats_match_a_brute_force_count(ticks: list[int], qps: int) -> None:
    # Multiples of 1/64 s are exact in binary, so "exactly one second apart" is exact too.
    times = [tick / 64 for tick in sorted(ticks)]
    clock = FakeClock()
    ledger = ledger_with(clock, qps=qps)
    verdicts = []
    for t in times:
        clock.now = t
        verdicts.append(ledger.arrive("k"))

    accepted: list[float] = []
    expected = []
    for t in times:
        ok = sum(1 for a in accepted if t - 1 < a <= t) < qps
        expected.append(Verdict.ACCEPTED if ok else Verdict.OVER_QPS)
        if ok:
            accepted.append(t)

    def busiest(points: list[float]) -> int:
        return max((sum(1 for p in points if t - 1 < p <= t) for t in points), default=0)

    assert verdicts == expected
    view: Any = ledger.stats()["totals"]
    assert view["max_arrivals_1s"] == busiest(times)
    assert view["max_accepted_1s"] == busiest(accepted)
    assert view["accepted"] == len(accepted)
    assert ledger.arrivals("k") == times


async def test_latency_delays_arrival_and_answer(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, latency_in=0.15, latency_out=0.1, jitter_in=0.05, seed=3)
    sent = time.monotonic()

    response = await client.get("/v3/contacts")
    answered = time.monotonic()

    assert response.status == 200
    arrived = (await stats(client))["totals"]["first_arrival"]
    assert sent + 0.15 <= arrived <= sent + 0.15 + 0.05 + 0.1
    assert answered - arrived >= 0.1


async def test_stats_show_fingerprints_never_keys_and_reset_clears_them(
    aiohttp_client: AiohttpClient,
) -> None:
    secret, token = "super-secret-api-key", "super-secret-token"
    client = await start(aiohttp_client, qps=4, api_key=secret, access_token=token)
    headers = {"Authorization": f"Bearer {token}"}
    await burst(client, f"/v2/contacts?api_key={secret}", 5, headers=headers)

    text = await (await client.get("/__sim__/stats")).text()
    assert secret not in text
    assert token not in text
    assert fp(secret) in text

    reset = await client.post("/__sim__/reset")
    assert reset.status == 200
    seen = await stats(client)
    assert seen["keys"] == {}
    assert seen["totals"]["requests"] == 0
    assert seen["totals"]["first_arrival"] is None
    after = await burst(client, f"/v2/contacts?api_key={secret}", 4, headers=headers)
    assert [code for code, _ in after] == [200] * 4


async def test_simulator_state_is_reachable_from_the_app(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client)
    await client.get("/v2/contacts?api_key=k")

    assert client.app is not None
    assert len(client.app[SIMULATOR].ledger.arrivals("k")) == 1


# --- configuration ----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser.parse_args(argv)


def test_config_defaults() -> None:
    ns = parse([])

    assert simulator_config_from_args(ns) == SimulatorConfig()
    assert (ns.host, ns.port) == ("127.0.0.1", 9000)


def test_config_from_every_flag() -> None:
    ns = parse(
        [
            "--api-key", "k", "--access-token", "t", "--qps", "10", "--window", "fixed",
            "--daily-quota", "250000", "--latency-in", "0.05", "--jitter-in", "0.01",
            "--latency-out", "0.02", "--jitter-out", "0.03", "--mashery-headers",
            "--neighbour-qps", "2.5", "--neighbour-key", "nk", "--seed", "7",
        ]
    )  # fmt: skip

    assert simulator_config_from_args(ns) == SimulatorConfig(
        api_key="k",
        access_token="t",
        qps=10,
        window="fixed",
        daily_quota=250_000,
        latency_in=0.05,
        jitter_in=0.01,
        latency_out=0.02,
        jitter_out=0.03,
        mashery_headers=True,
        neighbour_qps=2.5,
        neighbour_key="nk",
        seed=7,
    )


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--qps", "0"], "--qps"),
        (["--qps", "-3"], "--qps"),
        (["--daily-quota", "-1"], "--daily-quota"),
        (["--latency-in", "-0.1"], "--latency-in"),
        (["--jitter-in", "nan"], "--jitter-in"),
        (["--latency-out", "inf"], "--latency-out"),
        (["--jitter-out", "-1"], "--jitter-out"),
        (["--neighbour-qps", "-2"], "--neighbour-qps"),
        (["--neighbour-qps", "inf"], "--neighbour-qps"),
        (["--api-key", ""], "--api-key"),
        (["--access-token", " "], "--access-token"),
        (["--neighbour-key", ""], "--neighbour-key"),
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--host", ""], "--host"),
    ],
)
def test_config_rejects_bad_values_naming_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(flag)} "):
        simulator_config_from_args(parse(argv))


def test_an_unknown_window_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--window: must be one of rolling, fixed"):
        simulator_config_from_args(parse(["--window", "sliding"]))


def test_every_simulate_flag_has_an_environment_twin_and_flags_win() -> None:
    env = {"CTCT_SIMULATOR_QPS": "7", "CTCT_SIMULATOR_WINDOW": "fixed"}
    config = simulator_config_from_args(parse([]), env)
    assert (config.qps, config.window) == (7, "fixed")
    assert simulator_config_from_args(parse(["--qps", "9"]), env).qps == 9
    with pytest.raises(ValueError, match="CTCT_SIMULATOR_QPS"):
        simulator_config_from_args(parse([]), {"CTCT_SIMULATOR_QPS": "many"})


def test_config_repr_hides_secrets() -> None:
    config = SimulatorConfig(api_key="the-key", access_token="the-token", neighbour_key="nk-x")

    assert "the-key" not in repr(config)
    assert "the-token" not in repr(config)
    assert "nk-x" not in repr(config)

"""`ctct-proxy simulate`: the simulator's flags, read into a `SimulatorConfig`."""

from __future__ import annotations

import argparse

from proxy.simulator.config import (
    DEFAULT_DAILY_QUOTA,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_QPS,
    DEFAULT_TOKEN_TTL,
    FAULTS,
    WINDOWS,
    SimulatorConfig,
)


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `simulate` command's flags; the parser checks types, the config checks ranges."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free)")
    parser.add_argument(
        "--api-key", help="demand this v2 api_key (default: accept any one key, count per key)"
    )
    parser.add_argument("--access-token", help="demand Authorization: Bearer <token> on v2 and v3")
    parser.add_argument("--qps", type=int, default=DEFAULT_QPS, help="per-key calls per second")
    parser.add_argument(
        "--window",
        choices=WINDOWS,
        default="rolling",
        help="rolling: any 1 s span; fixed: each clock second",
    )
    parser.add_argument(
        "--daily-quota", type=int, default=DEFAULT_DAILY_QUOTA, help="per-key calls per UTC day"
    )
    parser.add_argument("--latency-in", type=float, default=0.0, help="seconds before arrival")
    parser.add_argument("--jitter-in", type=float, default=0.0, help="plus up to this, uniform")
    parser.add_argument("--latency-out", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--jitter-out", type=float, default=0.0, help="plus up to this, uniform")
    parser.add_argument(
        "--mashery-headers",
        action="store_true",
        help="v2 quota 403s also carry X-Mashery-Error-Code (and Retry-After: 1 for qps)",
    )
    parser.add_argument(
        "--neighbour-qps",
        type=float,
        default=0.0,
        help="another program spends this many calls/s of the neighbour key",
    )
    parser.add_argument(
        "--neighbour-key", help="the key the neighbour spends (default: --api-key, else v3's)"
    )
    parser.add_argument("--seed", type=int, help="seed for the jitter")
    parser.add_argument(
        "--oauth-client-id",
        help="run the OAuth authorize/token endpoints for this client id; v3 then accepts "
        "the access tokens they issue",
    )
    parser.add_argument(
        "--oauth-client-secret", help="the client's secret (default: a PKCE app without one)"
    )
    parser.add_argument(
        "--oauth-refresh-token", help="a refresh token the token endpoint accepts from the start"
    )
    parser.add_argument(
        "--token-ttl",
        type=float,
        default=DEFAULT_TOKEN_TTL,
        help="seconds an issued access token lives (default 86400)",
    )
    parser.add_argument(
        "--rotate-refresh-tokens",
        action="store_true",
        help="each refresh returns a new refresh token and invalidates the old one",
    )
    parser.add_argument(
        "--fault",
        choices=FAULTS,
        help="misbehave like a broken upstream: truncate, reset or stall the body mid-way, "
        "answer an application 403 that mentions QPS, or a quota error with a huge Retry-After",
    )
    parser.add_argument(
        "--fault-every", type=int, default=1, help="misbehave on every Nth accepted call"
    )


def simulator_config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    """Build and validate the config from parsed `simulate` flags; ValueError names the flag."""
    if not 0 <= ns.port <= 65_535:
        raise ValueError("--port must be between 0 and 65535")
    if not ns.host.strip():
        raise ValueError("--host must not be empty")
    return SimulatorConfig(
        api_key=ns.api_key,
        access_token=ns.access_token,
        qps=ns.qps,
        window=ns.window,
        daily_quota=ns.daily_quota,
        latency_in=ns.latency_in,
        jitter_in=ns.jitter_in,
        latency_out=ns.latency_out,
        jitter_out=ns.jitter_out,
        mashery_headers=ns.mashery_headers,
        neighbour_qps=ns.neighbour_qps,
        neighbour_key=ns.neighbour_key,
        seed=ns.seed,
        oauth_client_id=ns.oauth_client_id,
        oauth_client_secret=ns.oauth_client_secret,
        fault=ns.fault,
        fault_every=ns.fault_every,
        oauth_refresh_token=ns.oauth_refresh_token,
        token_ttl=ns.token_ttl,
        rotate_refresh_tokens=ns.rotate_refresh_tokens,
    )

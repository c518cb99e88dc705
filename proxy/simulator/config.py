"""The simulator's settings and the fixed facts it imitates (paths, token lifetimes, limits)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from proxy.config import parse_bool, setting, settings_of
from proxy.upstream_errors import MASHERY_OVER_QPS, MASHERY_OVER_RATE

Window = Literal["rolling", "fixed"]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9000
DEFAULT_QPS: Final = 4
DEFAULT_DAILY_QUOTA: Final = 10_000
WINDOWS: Final[tuple[Window, ...]] = ("rolling", "fixed")
# truncate: Content-Length promises more than is sent, then close; reset: the same, then a TCP
# RST; stall: half the body, then nothing for a minute; app-403: an application's own 403
# whose text mentions "QPS"; huge-retry-after: a quota rejection with Retry-After: 999999999.
FAULTS: Final = ("truncate", "reset", "stall", "app-403", "huge-retry-after")

# The bucket every v3 call without a readable client id shares, as one unknown application.
V3_SHARED_BUCKET: Final = "v3"
STATS_PATH: Final = "/__sim__/stats"
RESET_PATH: Final = "/__sim__/reset"
# The authorization server's endpoints, at the same paths as authz.constantcontact.com's.
OAUTH_AUTHORIZE_PATH: Final = "/oauth2/default/v1/authorize"
OAUTH_TOKEN_PATH: Final = "/oauth2/default/v1/token"
# Test levers: end every issued access token now; forget every refresh token too.
OAUTH_EXPIRE_PATH: Final = "/__sim__/oauth/expire"
OAUTH_REVOKE_PATH: Final = "/__sim__/oauth/revoke"
DEFAULT_TOKEN_TTL: Final = 86_400.0  # Constant Contact's access tokens live 24 hours
# The real token endpoint takes 1 request per second per application.
TOKEN_ENDPOINT_QPS: Final = 1
_CODE_TTL: Final = 300.0
_TOKEN_HISTORY: Final = 1_000
_OFFLINE_ACCESS: Final = "offline_access"

# Enough history for a long benchmark while bounding memory (a float and a slot each).
ARRIVAL_HISTORY: Final = 1_000_000
# Well above Constant Contact's 4 MB import limit, so the stand-in is never the reason a
# large upload fails in a test of the proxy.
MAX_BODY_BYTES: Final = 32 * 1024 * 1024

SPAN: Final = 1.0  # seconds: the span the per-second quota and the busiest-second stats use
_SECONDS_PER_DAY: Final = 86_400
_JSON: Final = "application/json"
# The per-key ("developer") variants: each simulated key is a Mashery developer key.
_MASHERY_QPS_CODE: Final = MASHERY_OVER_QPS[0]
_MASHERY_RATE_CODE: Final = MASHERY_OVER_RATE[0]


def _require_int(value: int, flag: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum > 0 else "a non-negative integer"
        raise ValueError(f"{flag} must be {kind}")


def _require_seconds(value: float, flag: str, what: str = "a number of seconds") -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{flag} must be {what} >= 0")


def _require_text(value: str | None, flag: str) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{flag} must not be empty")


def _window(text: str) -> Window:
    if text == "rolling":
        return "rolling"
    if text == "fixed":
        return "fixed"
    raise ValueError(f"must be one of {', '.join(WINDOWS)}")


def _fault(text: str) -> str:
    if text not in FAULTS:
        raise ValueError(f"must be one of {', '.join(FAULTS)}")
    return text


@dataclass(frozen=True)
class SimulatorConfig:
    """How the stand-in behaves: which credentials it demands, its limits and its latency.

    Validated on construction; error messages name the command-line flag of the field.
    """

    api_key: str | None = setting(
        None,
        "CTCT_SIMULATOR_API_KEY",
        str,
        "demand this v2 api_key (default: accept any one key, count per key)",
        repr=False,
    )
    access_token: str | None = setting(
        None,
        "CTCT_SIMULATOR_ACCESS_TOKEN",
        str,
        "demand Authorization: Bearer <token> on v2 and v3",
        repr=False,
    )
    qps: int = setting(DEFAULT_QPS, "CTCT_SIMULATOR_QPS", int, "per-key calls per second")
    window: Window = setting(
        "rolling",
        "CTCT_SIMULATOR_WINDOW",
        _window,
        "rolling: any 1 s span; fixed: each clock second",
    )
    daily_quota: int = setting(
        DEFAULT_DAILY_QUOTA, "CTCT_SIMULATOR_DAILY_QUOTA", int, "per-key calls per UTC day"
    )
    latency_in: float = setting(0.0, "CTCT_SIMULATOR_LATENCY_IN", float, "seconds before arrival")
    jitter_in: float = setting(0.0, "CTCT_SIMULATOR_JITTER_IN", float, "plus up to this, uniform")
    latency_out: float = setting(
        0.0, "CTCT_SIMULATOR_LATENCY_OUT", float, "seconds before answering"
    )
    jitter_out: float = setting(0.0, "CTCT_SIMULATOR_JITTER_OUT", float, "plus up to this, uniform")
    mashery_headers: bool = setting(
        False,
        "CTCT_SIMULATOR_MASHERY_HEADERS",
        parse_bool,
        "v2 quota 403s also carry X-Mashery-Error-Code (and Retry-After: 1 for qps)",
        is_flag=True,
    )
    neighbour_qps: float = setting(
        0.0,
        "CTCT_SIMULATOR_NEIGHBOUR_QPS",
        float,
        "another program spends this many calls/s of the neighbour key",
    )
    neighbour_key: str | None = setting(
        None,
        "CTCT_SIMULATOR_NEIGHBOUR_KEY",
        str,
        "the key the neighbour spends (default: --api-key, else v3's)",
        repr=False,
    )
    seed: int | None = setting(None, "CTCT_SIMULATOR_SEED", int, "seed for the jitter")
    oauth_client_id: str | None = setting(
        None,
        "CTCT_SIMULATOR_OAUTH_CLIENT_ID",
        str,
        "run the OAuth authorize/token endpoints for this client id; v3 then accepts the "
        "access tokens they issue",
        repr=False,
    )
    oauth_client_secret: str | None = setting(
        None,
        "CTCT_SIMULATOR_OAUTH_CLIENT_SECRET",
        str,
        "the client's secret (default: a PKCE app without one)",
        repr=False,
    )
    oauth_refresh_token: str | None = setting(
        None,
        "CTCT_SIMULATOR_OAUTH_REFRESH_TOKEN",
        str,
        "a refresh token the token endpoint accepts from the start",
        repr=False,
    )
    token_ttl: float = setting(
        DEFAULT_TOKEN_TTL,
        "CTCT_SIMULATOR_TOKEN_TTL",
        float,
        "seconds an issued access token lives",
    )
    rotate_refresh_tokens: bool = setting(
        False,
        "CTCT_SIMULATOR_ROTATE_REFRESH_TOKENS",
        parse_bool,
        "each refresh returns a new refresh token and invalidates the old one",
        is_flag=True,
    )
    # Misbehave on every `fault_every`-th accepted call (FAULTS says how), to reproduce what a
    # real network and server can do to the proxy.
    fault: str | None = setting(
        None,
        "CTCT_SIMULATOR_FAULT",
        _fault,
        "misbehave like a broken upstream: truncate, reset or stall the body mid-way, answer "
        "an application 403 that mentions QPS, or a quota error with a huge Retry-After",
    )
    fault_every: int = setting(
        1, "CTCT_SIMULATOR_FAULT_EVERY", int, "misbehave on every Nth accepted call"
    )

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"--fault must be one of {', '.join(FAULTS)}")
        _require_int(self.fault_every, "--fault-every", minimum=1)
        _require_text(self.api_key, "--api-key")
        _require_text(self.access_token, "--access-token")
        _require_int(self.qps, "--qps", minimum=1)
        if self.window not in WINDOWS:
            raise ValueError(f"--window must be one of {', '.join(WINDOWS)}")
        # 0 is allowed: it plays a key whose day is already used up.
        _require_int(self.daily_quota, "--daily-quota", minimum=0)
        _require_seconds(self.latency_in, "--latency-in")
        _require_seconds(self.jitter_in, "--jitter-in")
        _require_seconds(self.latency_out, "--latency-out")
        _require_seconds(self.jitter_out, "--jitter-out")
        _require_seconds(self.neighbour_qps, "--neighbour-qps", "a number of calls per second")
        _require_text(self.neighbour_key, "--neighbour-key")
        _require_text(self.oauth_client_id, "--oauth-client-id")
        _require_text(self.oauth_client_secret, "--oauth-client-secret")
        _require_text(self.oauth_refresh_token, "--oauth-refresh-token")
        _require_seconds(self.token_ttl, "--token-ttl")
        if self.token_ttl == 0:
            raise ValueError("--token-ttl must be a number of seconds > 0")
        if self.oauth_client_id is None and (
            self.oauth_client_secret is not None or self.oauth_refresh_token is not None
        ):
            raise ValueError("--oauth-client-id is required with the other --oauth-* flags")


SIMULATOR_SETTINGS: Final = settings_of(SimulatorConfig)

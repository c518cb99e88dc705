"""Constant Contact's error shapes: recognising the gateway's quota answers and writing our own.

One module owns the knowledge of what the upstream's errors look like (constant-contact.md),
so the simulator that imitates them and the proxy that recognises them cannot drift apart.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Literal

Generation = Literal["v2", "v3"]

# v2 (Mashery): bodies are JSON arrays of {error_key, error_message}.
V2_OVER_QPS = "mashery.not.authorized.over.qps"
V2_OVER_RATE = "mashery.not.authorized.over.ratelimit"
V2_INACTIVE = "mashery.not.authorized.inactive"
V2_INVALID_TOKEN = "http.status.authentication.invalid_token"
V2_OVER_QPS_MESSAGE = (
    "The Mashery account associated with this request is over its queries-per-second quota."
)
V2_OVER_RATE_MESSAGE = (
    "The Mashery account associated with this request is over its rate limit quota."
)
V2_INACTIVE_MESSAGE = (
    "The Mashery account associated with this request is not active,"
    " or an invalid API key was used."
)
# The exact v2 wording is undocumented; clients switch on the error_key, not the message.
V2_INVALID_TOKEN_MESSAGE = "Invalid token."

# v3 (API gateway): quota and auth errors are JSON objects.
V3_THROTTLED = "throttled"
V3_QUOTA_EXCEEDED = "quota_exceeded"
V3_UNAUTHORIZED = "unauthorized"
V3_THROTTLED_MESSAGE = "Too Many Requests"
V3_QUOTA_EXCEEDED_MESSAGE = "Limit Exceeded"
V3_UNAUTHORIZED_MESSAGE = "Unauthorized"

# Stock Mashery headers (Constant Contact's gateway may or may not send them).
MASHERY_ERROR_HEADER = "X-Mashery-Error-Code"
MASHERY_OVER_QPS = ("ERR_403_DEVELOPER_OVER_QPS", "ERR_403_SERVICE_OVER_QPS")
MASHERY_OVER_RATE = ("ERR_403_DEVELOPER_OVER_RATE", "ERR_403_SERVICE_OVER_RATE")


class QuotaKind(enum.Enum):
    """What an upstream answer says about the key's quota."""

    NONE = "none"
    PER_SECOND = "per_second"
    DAILY = "daily"


def error_key_for(kind: QuotaKind, generation: Generation) -> str:
    """The error_key Constant Contact uses for a quota kind on an API generation."""
    if kind is QuotaKind.DAILY:
        return V2_OVER_RATE if generation == "v2" else V3_QUOTA_EXCEEDED
    return V2_OVER_QPS if generation == "v2" else V3_THROTTLED


def cc_error_body(generation: Generation, error_key: str, message: str) -> bytes:
    """An error body in Constant Contact's shape: v2 an array, v3 an object.

    v2 SDKs (PHP 2.x, .NET) parse only a JSON array; v3 gateway errors are objects.
    """
    entry = {"error_key": error_key, "error_message": message}
    payload: object = [entry] if generation == "v2" else entry
    return json.dumps(payload).encode()


def classify(
    generation: Generation, status: int, headers: Mapping[str, str], body: bytes
) -> QuotaKind:
    """Say whether an upstream answer is a per-second or daily quota rejection, or neither.

    A quota error is recognised by the Mashery header or by the body, so that either
    form of the gateway is understood; a 403 with neither signal is an authorisation
    failure and must pass through untouched.
    """
    if status not in (403, 429):
        return QuotaKind.NONE
    code = headers.get(MASHERY_ERROR_HEADER, "").strip().upper()
    if code in MASHERY_OVER_QPS:
        return QuotaKind.PER_SECOND
    if code in MASHERY_OVER_RATE:
        return QuotaKind.DAILY
    text = body[:4096].decode("utf-8", "replace").lower()
    if V2_OVER_QPS in text or "over qps" in text or f'"{V3_THROTTLED}"' in text:
        return QuotaKind.PER_SECOND
    if V2_OVER_RATE in text or "over rate" in text or f'"{V3_QUOTA_EXCEEDED}"' in text:
        return QuotaKind.DAILY
    if status == 429 and generation == "v3" and not text.strip():
        # A bare v3 429 is the gateway's throttle without its body.
        return QuotaKind.PER_SECOND
    return QuotaKind.NONE

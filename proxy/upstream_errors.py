"""Constant Contact's error shapes: recognising the gateway's quota answers and writing our own.

One module owns the knowledge of what the upstream's errors look like (constant-contact.md),
so the simulator that imitates them and the proxy that recognises them cannot drift apart.
"""

from __future__ import annotations

import email.utils
import enum
import json
import re
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


# The documented Mashery page's heading for each quota kind (an HTML/XML body, no JSON).
_MASHERY_PAGE = re.compile(rb"<h1>\s*(developer|service) over (qps|rate)\s*</h1>", re.IGNORECASE)
_QUOTA_KEYS = {
    V2_OVER_QPS: QuotaKind.PER_SECOND,
    V3_THROTTLED: QuotaKind.PER_SECOND,
    V2_OVER_RATE: QuotaKind.DAILY,
    V3_QUOTA_EXCEEDED: QuotaKind.DAILY,
}
# Larger bodies are never a gateway's quota error (the documented ones are < 200 bytes).
QUOTA_BODY_LIMIT = 64 * 1024


def classify(
    generation: Generation,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    path: str = "",
) -> QuotaKind:
    """Say whether an upstream answer is a per-second or daily quota rejection, or neither.

    Only the gateway's documented signals count: Mashery's `X-Mashery-Error-Code` values,
    the `error_key` of a JSON body of the documented shapes (a v2 array of
    {error_key, error_message}, a v3 object), and the documented Mashery page. A phrase in a
    body is not a signal: everything else (an application's own 403 or 429, v3's 429 for
    1,000 queued bulk activities, whose error_key differs) passes through untouched.
    """
    if status not in (403, 429):
        return QuotaKind.NONE
    code = headers.get(MASHERY_ERROR_HEADER, "").strip().upper()
    if code in MASHERY_OVER_QPS:
        return QuotaKind.PER_SECOND
    if code in MASHERY_OVER_RATE:
        return QuotaKind.DAILY
    if len(body) > QUOTA_BODY_LIMIT:
        return QuotaKind.NONE
    kind = _json_quota_kind(body)
    if kind is not None:
        return kind
    page = _MASHERY_PAGE.search(body) if b"<" in body else None
    if page is not None and status == 403:
        return QuotaKind.PER_SECOND if page.group(2).lower() == b"qps" else QuotaKind.DAILY
    bare = not body.strip()
    if bare and status == 429 and generation == "v3" and "/activities" not in path:
        # A bare v3 429 is the gateway's throttle without its body.
        return QuotaKind.PER_SECOND
    return QuotaKind.NONE


def _json_quota_kind(body: bytes) -> QuotaKind | None:
    """The quota kind named by a documented error body's error_key; None if it names none."""
    stripped = body.lstrip()
    if stripped[:1] not in (b"[", b"{"):
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    entries = payload if isinstance(payload, list) else [payload]
    for entry in entries:
        if isinstance(entry, dict) and set(entry) <= {"error_key", "error_message"}:
            kind = _QUOTA_KEYS.get(entry.get("error_key"))  # type: ignore[arg-type]
            if kind is not None:
                return kind
    return None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a `Retry-After` value (delay-seconds or an HTTP-date), or None.

    Callers bound the result: a number from outside is never trusted as it is.
    """
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text[:12])
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)

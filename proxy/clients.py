"""Who sent a request and how urgent it is: the client a key's fair order groups it under.

A client is the named client token it presented when `--client-token` is in use (an
unnamed token is named `token-` and a short fingerprint of it), otherwise its `User-Agent`
together with the address it connects from, shown as the User-Agent's product and a short
fingerprint of both (`bulk-importer-3fa9c0d1`). A program is told apart from another by
its own client token, or by its own User-Agent. The name is what /status, the metrics and
the logs show; a token never is.
"""

from __future__ import annotations

import functools
import hashlib
import re

from proxy.credentials import redact
from proxy.quota import DEFAULT_URGENCY

# The product token of a User-Agent, as much of it as is safe to show in a metric label.
_PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
ANONYMOUS = "anonymous"
_URGENCIES = {str(u): u for u in range(8)}


@functools.lru_cache(maxsize=1024)
def client_name(token_name: str | None, user_agent: str | None, address: str | None) -> str:
    """The name a request's client is queued, counted and logged under."""
    if token_name is not None:
        return token_name
    agent = user_agent or ""
    match = _PRODUCT.match(agent)
    product = match.group() if match else ANONYMOUS
    if redact(product) != product:  # a program that puts a credential in its User-Agent
        product = ANONYMOUS
    identity = f"{agent}\x00{address or ''}".encode("utf-8", "surrogatepass")
    return f"{product}-{hashlib.sha256(identity).hexdigest()[:8]}"


def urgency(priority: str | None) -> int:
    """The urgency of an RFC 9218 `Priority` field (`u=0` most urgent .. `u=7`; default 3).

    The field is a structured-field dictionary: the last `u` wins; a value that is not an
    integer from 0 to 7 is ignored, as the RFC asks.
    """
    if not priority:
        return DEFAULT_URGENCY
    found = DEFAULT_URGENCY
    for member in priority.split(","):
        name, _, value = member.split(";", 1)[0].strip().partition("=")
        if name == "u":
            found = _URGENCIES.get(value.strip(), DEFAULT_URGENCY)
    return found

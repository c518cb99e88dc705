"""httpx through ctct-proxy: a timeout above --max-wait, and 429 retried after Retry-After.

httpx's default timeout is 5 seconds; a request may wait in the proxy's queue up to
--max-wait (30 s by default), so with the default a burst loses requests to ReadTimeout that
the proxy would have served. Set the read timeout above --max-wait. httpx retries nothing on a
status (its transport `retries` only re-tries connections), so the 429 loop is here. It does
not follow redirects unless told to, and it reads HTTP(S)_PROXY from the environment
(trust_env): a corporate HTTP_PROXY must leave the proxy's address in NO_PROXY.

Usage: python httpx_retry.py BASE_URL [COUNT]   (prints one JSON line per call)
"""

import asyncio
import json
import sys

import httpx

MAX_WAIT = 30  # the proxy's --max-wait
TIMEOUT = httpx.Timeout(MAX_WAIT + 5, connect=5)
LONGEST_WAIT = 60  # seconds; a longer Retry-After is the daily quota: give the 429 back
ATTEMPTS = 10


def retry_after(response: httpx.Response) -> int:
    value = response.headers.get("Retry-After", "1")
    return int(value) if value.isdigit() else 1


async def call(client: httpx.AsyncClient, i: int) -> dict:
    method = "POST" if i % 2 else "GET"
    body = {"email_address": {"address": f"httpx-{i}@example.com"}, "create_source": "Account"}
    for attempt in range(1, ATTEMPTS + 1):
        if method == "POST":
            response = await client.post("/v3/contacts", json=body)
        else:
            response = await client.get("/v3/contacts", params={"limit": 1})
        wait = retry_after(response)
        if response.status_code != 429 or wait > LONGEST_WAIT or attempt == ATTEMPTS:
            break
        await asyncio.sleep(wait)
    return {"client": "httpx", "i": i, "method": method, "status": response.status_code, "attempts": attempt}


async def main() -> None:
    base, count = sys.argv[1].rstrip("/"), int(sys.argv[2]) if len(sys.argv) > 2 else 10
    async with httpx.AsyncClient(
        base_url=base,
        timeout=TIMEOUT,
        headers={"Authorization": "Bearer dummy"},  # the proxy puts in the real token
        limits=httpx.Limits(max_connections=count),
    ) as client:
        for line in await asyncio.gather(*(call(client, i) for i in range(count))):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
